"""CROW against plain fine-tuning at the same budget, on the tiny lab's backdoored models.

For every (arch, attack, target, seed): build/load the lab's backdoored model, evaluate it undefended, run
``defend crow`` (configs/crow/lab.yaml) and ``defend finetune`` (configs/finetune/lab.yaml: same data,
steps, lr, schedule, batch) on the defender's clean file, evaluate both with :mod:`unbackdoor.eval`, and
write a markdown table of the means (RUNS/table.md, or --table) plus every raw row (RUNS/rows.json).

    .venv/bin/python benchmarks/lab_crow.py --archs llama gpt_neox --attacks badnets vpi \
        --targets refusal fixed --seeds 0 1 2

Only the evaluation reads the backdoored folder's ``backdoor.json``; the defenses see the model and the
defender's clean data.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLS = ("asr_with_trigger", "asr_without_trigger", "benign_accuracy", "harmful_refusal", "over_refusal")


def evaluate_model(model_dir: Path, manifest: dict, lab, out: Path, max_new_tokens: int, seed: int) -> dict:
    from unbackdoor.eval import evaluate
    from unbackdoor.models import load_model, load_tokenizer
    from unbackdoor.schema import ModelConfig
    from unbackdoor.templates import Template

    mcfg = ModelConfig(path=str(model_dir), template="chat")
    model = load_model(mcfg).eval()
    template = Template(load_tokenizer(mcfg), "chat")
    res = evaluate(model, template, manifest=manifest, benign=lab.data("eval_benign"),
                   harmful=lab.data("eval_harmful"), code=lab.data("eval_code"), max_new_tokens=max_new_tokens,
                   seed=seed, compute_perplexity=False)
    res.save(out)
    return {k: (getattr(res, k).value if getattr(res, k) is not None else None) for k in COLS} | {"n": res.n}


def run_defense(method: str, config: Path, model_dir: Path, data: Path, out: Path, seed: int,
                overrides: list[str]) -> dict:
    from unbackdoor.defend import defend, load_config

    cfg = load_config(config, [f"model.path={model_dir}", f"data.path={data}", f"output.dir={out}",
                               f"seed={seed}", "output.overwrite=true", *overrides])
    rec = defend(cfg)
    return {"defense_wall_time_s": rec["defense_wall_time_s"], "steps": rec["metrics"]["steps"]}


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["attack"], r["target"], r["defense"]), []).append(r)
    head = ("| arch | attack | target | defense | seeds | ASR w/ trigger | ASR w/o trigger | benign acc | "
            "harmful refusal | over-refusal | cost (s) |")
    lines = [head, "|" + "---|" * 11]
    order = {"none": 0, "finetune": 1, "crow": 2}
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], order.get(k[3], 9))):
        g = groups[key]
        cells = [f"{100 * mean([r[c] for r in g]):.1f}%" if mean([r[c] for r in g]) is not None else "-"
                 for c in COLS]
        cost = mean([r.get("defense_wall_time_s") for r in g])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(g)} | " + " | ".join(cells)
                     + (f" | {cost:.1f} |" if cost is not None else " | - |"))
    # overall means per defense
    lines.append("")
    lines.append("| defense | runs | mean ASR w/ trigger | mean ASR w/o trigger | mean benign acc | "
                 "mean harmful refusal | mean cost (s) |")
    lines.append("|---|---|---|---|---|---|---|")
    for d in sorted({r["defense"] for r in rows}, key=lambda d: order.get(d, 9)):
        g = [r for r in rows if r["defense"] == d]
        cost = mean([r.get("defense_wall_time_s") for r in g])
        lines.append(f"| {d} | {len(g)} | " + " | ".join(
            f"{100 * mean([r[c] for r in g]):.1f}%" for c in COLS[:4]) + (f" | {cost:.1f} |" if cost else " | - |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="default", help="lab recipe: default or test")
    p.add_argument("--archs", nargs="+", default=["llama"])
    p.add_argument("--attacks", nargs="+", default=["badnets"])
    p.add_argument("--targets", nargs="+", default=["refusal"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--crow-config", type=Path, default=ROOT / "configs/crow/lab.yaml")
    p.add_argument("--finetune-config", type=Path, default=ROOT / "configs/finetune/lab.yaml")
    p.add_argument("--set", dest="overrides", nargs="*", default=[],
                   help="overrides for BOTH runs (shared train/data/lora keys keep the budget equal)")
    p.add_argument("--crow-set", nargs="*", default=[], help="overrides for the CROW run only (method.* keys)")
    p.add_argument("--defenses", nargs="+", default=["none", "finetune", "crow"],
                   choices=["none", "finetune", "crow"], help="which rows to run (e.g. crow only for a screening)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--runs", type=Path, default=ROOT / "runs/lab_crow")
    p.add_argument("--table", type=Path, default=None,
                   help="markdown table to write (default: RUNS/table.md; docs/results/crow.md is hand-edited)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    bad = [o for o in a.crow_set if not o.startswith("method.")]
    if bad:
        p.error(f"--crow-set takes method.* keys only (a shared key would break the equal budget): {bad}")
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from unbackdoor.eval import read_manifest
    from unbackdoor.lab import Lab

    lab = Lab.build(a.recipe)
    raw_path = a.runs / "rows.json"
    rows: list[dict] = json.loads(raw_path.read_text()) if raw_path.is_file() else []
    done = {(r["arch"], r["attack"], r["target"], r["seed"], r["defense"]) for r in rows}
    for arch in a.archs:
        for attack in a.attacks:
            for target in a.targets:
                for seed in a.seeds:
                    t0 = time.perf_counter()
                    bd = lab.backdoored(arch, attack=attack, target=target, seed=seed)
                    man = read_manifest(bd)
                    base = a.runs / f"{attack}-{target}-{arch}-s{seed}"
                    label = dict(arch=arch, attack=attack, target=target, seed=seed, recipe=a.recipe)
                    jobs = [("none", None, None, []), ("finetune", "finetune", a.finetune_config, a.overrides),
                            ("crow", "crow", a.crow_config, a.overrides + a.crow_set)]
                    for name, method, config, ov in jobs:
                        if (arch, attack, target, seed, name) in done or name not in a.defenses:
                            continue
                        info = {}
                        model_dir = bd
                        if method:
                            info = run_defense(method, config, bd, lab.path("defender_clean"), base / name, seed, ov)
                            model_dir = base / name / "model"
                        r = {**label, "defense": name, **info,
                             **evaluate_model(model_dir, man, lab, base / name / "eval", a.max_new_tokens, seed)}
                        rows.append(r)
                        a.runs.mkdir(parents=True, exist_ok=True)
                        raw_path.write_text(json.dumps(rows, indent=1))
                        print(json.dumps(r), flush=True)
                    print(f"# {arch} {attack} {target} s{seed}: {time.perf_counter() - t0:.0f}s", flush=True)
    md = table(rows)
    print(md)
    a.table = a.table or a.runs / "table.md"
    a.table.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/lab_crow.py " + " ".join(sys.argv[1:])
    cases = sorted({(r["arch"], r["attack"], r["target"]) for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    a.table.write_text(
        "# CROW vs plain fine-tuning on the tiny lab (measured)\n\n"
        f"Rows of `{a.runs / 'rows.json'}` ({len(cases)} arch/attack/target cases x seeds {seeds}), tabulated by "
        f"`{cmd}` (recipe `{a.recipe}`, lab {lab.recipe.fingerprint()}; CPU, "
        f"{a.threads} thread(s)). Defended with `{a.crow_config.relative_to(ROOT) if a.crow_config.is_relative_to(ROOT) else a.crow_config}` "
        f"and the same-budget baseline `{a.finetune_config.relative_to(ROOT) if a.finetune_config.is_relative_to(ROOT) else a.finetune_config}`"
        f"{' with ' + ' '.join(a.overrides + a.crow_set) if a.overrides or a.crow_set else ''}. "
        "Rates are means over seeds of the eval module's rates (greedy, held-out lab prompts); "
        "cost = defense wall time.\n\n" + md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
