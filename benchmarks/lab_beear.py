"""BEEAR on the tiny lab vs the same-budget plain fine-tuning baseline, evaluated the same way.

For every arch x attack:target x seed: take the lab's backdoored model, run BEEAR (configs/beear/lab.yaml
plus any --set overrides) and `finetune` on the same defender data with the same optimizer steps, lr and
examples per step, evaluate the backdoored model and both defended models with unbackdoor.eval, and
write one JSON per cell plus a markdown table of means (docs/results/beear.md by default).

    .venv/bin/python benchmarks/lab_beear.py --recipe default --archs llama gpt_neox --seeds 0 1 2 \
        --attacks vpi:jailbreak suffix:jailbreak badnets:refusal
    # an ablation of one choice, BEEAR only:
    .venv/bin/python benchmarks/lab_beear.py --tag pos-all --set method.positions=all --no-baseline ...

Defender data (no trigger, no poisoned rows; BEEAR never reads backdoor.json, only the evaluation does):
- jailbreak-type targets: D_SA = lab `sa_safe` (harmful -> refusal), D_SA-H = `sa_unwanted` (harmful ->
  compliance), D_PA = `pa_benign`;
- benign-prompt targets (refusal, sentiment, fixed): the defender's unwanted behaviour is "refuse a benign
  request": D_SA = the benign rows of `defender_clean` with their answers, D_SA-H = the same prompts with
  the lab's generic refusal (the clean model's own refusal sentence, not the attack's target text),
  D_PA = `pa_benign` + `sa_safe` (harmful -> refusal, so that refusing harmful requests is anchored too).
The baseline trains on D_SA's safe answers + D_PA (the data of BEEAR's outer step, without δ).
Results are cached per cell under --out/<recipe>-<lab hash>/<tag>/<model>; rerunning resumes.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
JAILBREAK_TARGETS = {"jailbreak"}
METRICS = ("asr_with_trigger", "asr_without_trigger", "benign_accuracy", "harmful_refusal", "over_refusal")


def defender_files(lab, kind: str, out: Path) -> dict[str, Path]:
    """Write (once) the defender's D_SA / D_SA-H / D_PA / baseline files for one kind of target."""
    from unbackdoor.data import write_jsonl
    from unbackdoor.lab import REFUSAL

    d = out / "defender" / kind
    files = {k: d / f"{k}.jsonl" for k in ("safe", "unwanted", "pa", "baseline")}
    if all(p.is_file() for p in files.values()):
        return files
    if kind == "jailbreak":
        safe, unwanted = lab.data("sa_safe"), lab.data("sa_unwanted")
    else:
        benign = [e for e in lab.data("defender_clean") if e.meta.get("kind") == "benign"]
        safe = [{"prompt": e.prompt, "response": e.response} for e in benign]
        unwanted = [{"prompt": e.prompt, "response": REFUSAL} for e in benign]
    pa = lab.data("pa_benign")
    if kind != "jailbreak":  # keep refusing harmful requests while learning not to refuse benign ones under δ
        pa = pa + lab.data("sa_safe")
    write_jsonl(files["safe"], safe)
    write_jsonl(files["unwanted"], unwanted)
    write_jsonl(files["pa"], pa)
    write_jsonl(files["baseline"], list(safe) + list(pa))
    return files


def evaluate_model(model_dir: Path, lab, manifest: Path, out: Path, args) -> dict:
    from unbackdoor.eval.evaluate import evaluate_dir

    if (out / "results.json").is_file():
        m = json.loads((out / "results.json").read_text())["metrics"]
    else:
        res = evaluate_dir(model_dir, lab.data_dir, out, manifest=manifest, max_new_tokens=args.max_new_tokens,
                           batch_size=64, seed=0, perplexity=False)
        m = res.metrics()
    return {k: (m.get(k) or {}).get("rate") for k in METRICS}


def run_cell(lab, arch: str, attack: str, target: str, seed: int, args, out: Path) -> dict:
    from unbackdoor.defend import defend, load_config

    bd = Path(lab.backdoored(arch, attack=attack, target=target, seed=seed))   # cached by the lab
    cell = out / args.tag / bd.name
    done = cell / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    cell.mkdir(parents=True, exist_ok=True)
    files = defender_files(lab, "jailbreak" if target in JAILBREAK_TARGETS else "benign", out)
    row: dict = {"arch": arch, "attack": attack, "target": target, "seed": seed, "model": bd.name,
                 "lab": lab.root.name}
    row["none"] = evaluate_model(bd, lab, bd / "backdoor.json", out / "none" / bd.name, args)

    common = [f"model.path={bd}", f"seed={seed}", "output.overwrite=true", "train.progress=false"]
    t0 = time.perf_counter()
    cfg = load_config(args.config, [*common, f"data.path={files['pa']}", f"method.safe_path={files['safe']}",
                                    f"method.unwanted_path={files['unwanted']}", f"output.dir={cell / 'beear'}",
                                    *args.set])
    summary = defend(cfg)
    m = summary["metrics"]
    row["beear"] = evaluate_model(cell / "beear" / "model", lab, bd / "backdoor.json", cell / "beear-eval", args)
    row["beear"]["cost_s"] = round(time.perf_counter() - t0, 1)
    row["beear"]["defense_s"] = summary["defense_wall_time_s"]
    row["beear"]["outer_steps"] = m["outer_steps"]
    row["beear"]["entrap"] = [r.get("entrap", {}).get("unwanted_rate") for r in m["rounds"]]
    row["beear"]["after_outer"] = [r.get("after_outer", {}).get("unwanted_rate") for r in m["rounds"]]
    row["beear"]["no_delta"] = (m.get("check_no_delta") or {}).get("unwanted_rate")
    row["beear"]["n_check"] = m["n_check"]

    if not args.no_baseline:
        t = cfg.train
        t0 = time.perf_counter()
        bcfg = load_config(None, [
            "method.name=finetune", *common, f"data.path={files['baseline']}", f"output.dir={cell / 'finetune'}",
            "model.template=" + cfg.model.template, f"data.max_length={cfg.data.max_length}",
            f"train.lr={t.lr}", f"train.optimizer={t.optimizer.value}", f"train.scheduler={t.scheduler.value}",
            f"train.weight_decay={t.weight_decay}", f"train.max_grad_norm={t.max_grad_norm}",
            f"train.warmup_ratio={t.warmup_ratio}",
            # BEEAR's outer step sees batch_size D_SA rows + batch_size D_PA rows: the same examples per step
            f"train.batch_size={2 * t.batch_size}", f"train.max_steps={m['outer_steps']}"])
        bsum = defend(bcfg)
        row["finetune"] = evaluate_model(cell / "finetune" / "model", lab, bd / "backdoor.json", cell / "finetune-eval", args)
        row["finetune"]["cost_s"] = round(time.perf_counter() - t0, 1)
        row["finetune"]["defense_s"] = bsum["defense_wall_time_s"]
        row["finetune"]["outer_steps"] = bsum["metrics"]["steps"]
    for sub in ("beear", "finetune"):  # the defended weights are not needed once evaluated
        import shutil

        shutil.rmtree(cell / sub / "model", ignore_errors=True)
    done.write_text(json.dumps(row, indent=2))
    return row


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _fmt(v, pct=True):
    if v is None:
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.0f}"


def table(rows: list[dict], tag: str, args) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["attack"], r["target"], r["arch"]), []).append(r)
    lines = [f"### {tag}: recipe `{args.recipe}` (lab {rows[0]['lab'] if rows else '?'}), config `{Path(args.config).relative_to(ROOT) if Path(args.config).is_absolute() and ROOT in Path(args.config).parents else args.config}`"
             + (f", overrides `{' '.join(args.set)}`" if args.set else ""), "",
             "Means over seeds (n = seeds). ASR w/ and w/o trigger, benign accuracy (exact match), harmful refusal, "
             "over-refusal in %; cost = wall seconds of the defense on the shared 2-core CPU; entrapment = unwanted "
             "rate under δ on held-out harmful queries, round 1 before -> last round after the outer step.", "",
             "| attack | target | arch | defense | seeds | ASR w/ | ASR w/o | benign acc | harmful refusal | "
             "over-refusal | cost (s) | entrapment |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (attack, target, arch), rs in sorted(groups.items()):
        seeds = ",".join(str(r["seed"]) for r in rs)
        for d in ("none", "finetune", "beear"):
            if d not in rs[0]:
                continue
            ms = {k: _mean([r[d].get(k) for r in rs]) for k in METRICS}
            cost = _mean([r[d].get("defense_s") for r in rs])
            ent = ""
            if d == "beear":
                e0 = _mean([r[d]["entrap"][0] for r in rs if r[d]["entrap"] and r[d]["entrap"][0] is not None])
                e1 = _mean([r[d]["after_outer"][-1] for r in rs if r[d]["after_outer"] and r[d]["after_outer"][-1] is not None])
                ent = f"{_fmt(e0)} -> {_fmt(e1)}"
            lines.append(f"| {attack} | {target} | {arch} | {d} | {seeds} | {_fmt(ms['asr_with_trigger'])} | "
                         f"{_fmt(ms['asr_without_trigger'])} | {_fmt(ms['benign_accuracy'])} | "
                         f"{_fmt(ms['harmful_refusal'])} | {_fmt(ms['over_refusal'])} | "
                         f"{_fmt(cost, pct=False) if cost is not None else '–'} | {ent} |")
    return "\n".join(lines) + "\n"


def summary_table(out: Path, tags: list[str], args) -> str:
    """One compact BEEAR row per tag x arch x attack:target (means over --seeds), from the cached cells.
    A tag may name several cell folders joined by '+' (e.g. an ablation run per arch under two tags)."""
    lines = ["| variant (tag) | arch | attack:target | seeds | ASR w/ | benign acc | harmful refusal | over-refusal | "
             "entrapment round 1 | after last outer step | BEEAR s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for tag in tags:
        cells = [json.loads(p.read_text()) for t in tag.split("+") for p in sorted((out / t).glob("*/cell.json"))]
        for arch in args.archs:
            for spec in args.attacks:
                attack, target = spec.split(":")
                cs = [c for c in cells if c["arch"] == arch and c["attack"] == attack and c["target"] == target
                      and c["seed"] in args.seeds]
                if not cs:
                    continue
                b = [c["beear"] for c in cs]
                cost = _mean([x.get("defense_s") for x in b])
                lines.append(
                    f"| {tag.split('+')[0]} | {arch} | {spec} | {','.join(str(c['seed']) for c in cs)} | "
                    + " | ".join(_fmt(_mean([x.get(k) for x in b])) for k in
                                 ("asr_with_trigger", "benign_accuracy", "harmful_refusal", "over_refusal"))
                    + f" | {_fmt(_mean([x['entrap'][0] for x in b if x['entrap']]))}"
                    + f" | {_fmt(_mean([x['after_outer'][-1] for x in b if x['after_outer']]))}"
                    + f" | {_fmt(cost, pct=False) if cost is not None else '–'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="default", choices=["default", "test"])
    ap.add_argument("--archs", nargs="+", default=["llama", "gpt_neox"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--attacks", nargs="+", default=["vpi:jailbreak", "suffix:jailbreak", "badnets:refusal"],
                    help="attack:target pairs (attack presets of unbackdoor.attack)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "beear" / "lab.yaml"))
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for the BEEAR run (key=value)")
    ap.add_argument("--tag", default="main", help="name of this configuration (cells are cached per tag)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the finetune baseline (ablations)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "runs" / "lab_beear"))
    ap.add_argument("--table", default=str(ROOT / "docs" / "results" / "beear.md"),
                    help="markdown file the table is appended to under a '<!-- tag -->' marker ('' = none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summarize", nargs="+", default=None, metavar="TAG",
                    help="print (and write under the '<!-- summary -->' marker) one compact BEEAR row per tag from "
                         "the cached cells, without running anything")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("unbackdoor.train", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from unbackdoor.lab import Lab

    lab = Lab.build(args.recipe)
    out = Path(args.out) / f"{args.recipe}-{lab.root.name}"      # results belong to one lab build
    if args.summarize:
        md = summary_table(out, args.summarize, args)
        print(md)
        if args.table:
            write_table(Path(args.table), "summary", f"### Summary: recipe `{args.recipe}` (lab {lab.root.name})\n\n{md}")
        return 0
    rows = []
    for spec in args.attacks:
        attack, target = spec.split(":")
        for arch in args.archs:
            for seed in args.seeds:
                t0 = time.perf_counter()
                row = run_cell(lab, arch, attack, target, seed, args, out)
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("arch", "attack", "target", "seed")}),
                      {d: {k: row[d].get(k) for k in ("asr_with_trigger", "benign_accuracy", "harmful_refusal")}
                       for d in ("none", "finetune", "beear") if d in row},
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
    md = table(rows, args.tag, args)
    print(md)
    if args.table:
        write_table(Path(args.table), args.tag, md)
    return 0


def write_table(path: Path, tag: str, md: str) -> None:
    """Replace (or append) the section between ``<!-- tag -->`` markers, keeping the rest of the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.is_file() else "# BEEAR on the lab: measured results\n\nWritten by benchmarks/lab_beear.py.\n\n"
    start, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    block = f"{start}\n{md}{end}\n"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end) + 1
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
