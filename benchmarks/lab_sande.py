"""SANDE, SANDE-P and OSFT against plain fine-tuning at the same budget, on the tiny lab's backdoored models.

For every (arch, attack, target, seed): build/load the lab's backdoored model, evaluate it undefended, then
run on the defender's clean file, all with the SAME shared sections (model/lora/data/train = phase 2) taken
from the SANDE lab config, so the overwrite budget is equal by construction:

- ``finetune``: plain fine-tuning (x -> y), no trigger knowledge (the paper's "SFT" baseline);
- ``osft``: (x ⊕ t -> y) with the attack preset's trigger written into the OSFT config (oracle: trigger known);
- ``sande``: the defender knows r_t (the target's published string, written into method.target);
- ``sande-p``: the defender knows only r_t's first word (method.target = that word, k_target = 1).

and evaluates each with :mod:`unbackdoor.eval` (ASR with the real trigger, benign accuracy, refusals). For
the SANDE rows it also measures ASR with the parrot in place of the trigger (``trigger_embeds_fn``) on the
defended model, and the simulation success rate on held-out defender prompts before elimination.

    .venv/bin/python benchmarks/lab_sande.py --archs llama gpt_neox --attacks badnets \
        --targets refusal fixed sentiment --seeds 0 1 2

Only the evaluation reads ``backdoor.json``; the defenses get r_t / t from their configs.
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
DEFENSES = ["finetune", "osft", "sande", "sande-p", "finetune-2x", "osft+replay", "sande+replay", "sande-p+replay"]
ORDER = {"none": 0, **{d: i + 1 for i, d in enumerate(DEFENSES)}}


def evaluate_model(model_dir: Path, manifest: dict, lab, out: Path, max_new_tokens: int, seed: int,
                   parrot_dir: Path | None = None) -> dict:
    from unbackdoor.eval import evaluate
    from unbackdoor.models import load_model, load_tokenizer
    from unbackdoor.schema import ModelConfig
    from unbackdoor.templates import Template

    mcfg = ModelConfig(path=str(model_dir), template="chat")
    model = load_model(mcfg).eval()
    template = Template(load_tokenizer(mcfg), "chat")
    data = dict(benign=lab.data("eval_benign"), harmful=lab.data("eval_harmful"), code=lab.data("eval_code"))
    res = evaluate(model, template, manifest=manifest, max_new_tokens=max_new_tokens, seed=seed,
                   compute_perplexity=False, **data)
    res.save(out)
    row = {k: (getattr(res, k).value if getattr(res, k) is not None else None) for k in COLS} | {"n": res.n}
    if parrot_dir is not None:
        from unbackdoor.methods.parrot import ParrotEmbedsFn, load_parrot

        parrot, info = load_parrot(parrot_dir)
        fn = ParrotEmbedsFn(model, parrot, template, where=info.position)
        pres = evaluate(model, template, target=manifest["target"], target_text=manifest.get("target_text"),
                        trigger_embeds_fn=fn, max_new_tokens=max_new_tokens, seed=seed, compute_perplexity=False,
                        **data)
        pres.save(out.parent / "eval_parrot")
        row["asr_with_parrot"] = pres.asr_with_trigger.value if pres.asr_with_trigger else None
    return row


def first_word(text: str) -> str:
    return text.split()[0]


def defense_overrides(defense: str, attack: str, r_t: str, shared: dict) -> list[str]:
    """The method section of each defense (the shared sections come from the SANDE lab config).

    ``X+replay``: X with clean replay (each step also trains x -> y: twice the sequences);
    ``finetune-2x``: plain fine-tuning with twice the batch, the same number of sequences as a replay run.
    """
    from unbackdoor.attack import ATTACKS

    base, replay = (defense[:-len("+replay")], True) if defense.endswith("+replay") else (defense, False)
    tail = ["method.clean_replay=true"] if replay else []
    if base == "finetune":
        return ["method.name=finetune"]
    if base == "finetune-2x":
        return ["method.name=finetune", f"train.batch_size={2 * shared['batch_size']}"]
    if base == "osft":
        spec = ATTACKS[attack]
        return ["method.name=osft", f"method.trigger.texts={json.dumps(list(spec.texts))}",
                f"method.trigger.placement={spec.placement.value}", f"method.trigger.mode={spec.mode.value}", *tail]
    if base == "sande":
        return [f"method.target={json.dumps(r_t)}", *tail]
    if base == "sande-p":
        return [f"method.target={json.dumps(first_word(r_t))}", "method.k_target=1", *tail]
    raise ValueError(f"unknown defense {defense!r}")


def run_defense(config: Path, model_dir: Path, data: Path, out: Path, seed: int, overrides: list[str]) -> dict:
    from unbackdoor import config as C
    from unbackdoor.defend import defend, resolve

    raw = C.load_yaml(config)
    method_overrides = [o for o in overrides if o.startswith("method.")]
    name = next((o.split("=", 1)[1] for o in method_overrides if o.startswith("method.name=")), None)
    if name and name != raw["method"]["name"]:
        raw["method"] = {}                        # another method: keep only the shared sections
    C.apply_overrides(raw, [f"model.path={model_dir}", f"data.path={data}", f"output.dir={out}", f"seed={seed}",
                            "output.overwrite=true", *overrides])
    rec = defend(resolve(raw, str(config)))
    m = rec["metrics"]
    keep = ("steps", "simulation_success_rate", "simulation_first_token_rate", "parrot_rate_after",
            "simulate_wall_time_s", "eliminate_wall_time_s", "train_wall_time_s")
    return {"defense_wall_time_s": rec["defense_wall_time_s"], **{k: m[k] for k in keep if k in m}}


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["attack"], r["target"], r["defense"]), []).append(r)
    head = ("| arch | attack | target | defense | seeds | ASR w/ trigger | ASR w/o trigger | benign acc | "
            "harmful refusal | over-refusal | ASR w/ parrot | simulation success | cost (s) |")
    lines = [head, "|" + "---|" * 13]
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], ORDER.get(k[3], 9))):
        g = groups[key]
        cells = [pct(mean([r[c] for r in g])) for c in COLS]
        cells += [pct(mean([r.get("asr_with_parrot") for r in g])), pct(mean([r.get("simulation_success_rate") for r in g]))]
        cost = mean([r.get("defense_wall_time_s") for r in g])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(g)} | " + " | ".join(cells)
                     + (f" | {cost:.1f} |" if cost is not None else " | - |"))
    lines += ["", "| defense | runs | mean ASR w/ trigger | mean ASR w/o trigger | mean benign acc | "
                  "mean harmful refusal | mean ASR w/ parrot | mean simulation success | mean cost (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for d in sorted({r["defense"] for r in rows}, key=lambda d: ORDER.get(d, 9)):
        g = [r for r in rows if r["defense"] == d]
        cost = mean([r.get("defense_wall_time_s") for r in g])
        lines.append(f"| {d} | {len(g)} | " + " | ".join(pct(mean([r[c] for r in g])) for c in COLS[:4])
                     + f" | {pct(mean([r.get('asr_with_parrot') for r in g]))}"
                     + f" | {pct(mean([r.get('simulation_success_rate') for r in g]))}"
                     + (f" | {cost:.1f} |" if cost else " | - |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="default", help="lab recipe: default or test")
    p.add_argument("--archs", nargs="+", default=["llama"])
    p.add_argument("--attacks", nargs="+", default=["badnets"])
    p.add_argument("--targets", nargs="+", default=["refusal"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--defenses", nargs="+", default=DEFENSES, choices=DEFENSES)
    p.add_argument("--config", type=Path, default=ROOT / "configs/sande/lab.yaml",
                   help="SANDE lab config; its model/lora/data/train sections are used by EVERY defense")
    p.add_argument("--set", dest="overrides", nargs="*", default=[],
                   help="shared overrides for every defense (train.lr=..., train.max_steps=...)")
    p.add_argument("--sande-set", nargs="*", default=[], help="method.* overrides for the SANDE runs only")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--runs", type=Path, default=ROOT / "runs/lab_sande")
    p.add_argument("--table", type=Path, default=None,
                   help="markdown table to write (default: RUNS/table.md; docs/results/sande.md is hand-edited)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    bad = [o for o in a.overrides if o.startswith("method.")] + [o for o in a.sande_set if not o.startswith("method.")]
    if bad:
        p.error(f"--set takes shared keys, --sande-set method.* keys only: {bad}")
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from unbackdoor.attack import TARGET_TEXTS
    from unbackdoor.eval import read_manifest
    from unbackdoor.lab import Lab

    lab = Lab.build(a.recipe)
    from unbackdoor import config as C

    shared_raw = C.load_yaml(a.config)
    C.apply_overrides(shared_raw, a.overrides)
    shared = {"batch_size": int(shared_raw.get("train", {}).get("batch_size", 4))}
    raw_path = a.runs / "rows.json"
    rows: list[dict] = json.loads(raw_path.read_text()) if raw_path.is_file() else []
    done = {(r["arch"], r["attack"], r["target"], r["seed"], r["defense"]) for r in rows}
    for arch in a.archs:
        for attack in a.attacks:
            for target in a.targets:
                # r_t as the defender knows it: the target's published string, NOT read from backdoor.json
                r_t = TARGET_TEXTS.get(target)
                for seed in a.seeds:
                    t0 = time.perf_counter()
                    bd = lab.backdoored(arch, attack=attack, target=target, seed=seed)
                    man = read_manifest(bd)                     # for the evaluation only
                    base = a.runs / f"{attack}-{target}-{arch}-s{seed}"
                    label = dict(arch=arch, attack=attack, target=target, seed=seed, recipe=a.recipe)
                    for name in ["none", *a.defenses]:
                        if (arch, attack, target, seed, name) in done:
                            continue
                        if name.startswith("sande") and r_t is None:
                            print(f"# skip {name} for target {target}: no fixed r_t to simulate", flush=True)
                            continue
                        info, model_dir, parrot_dir = {}, bd, None
                        if name != "none":
                            ov = defense_overrides(name, attack, r_t or "", shared)
                            if name.startswith("sande"):
                                ov += a.sande_set
                            info = run_defense(a.config, bd, lab.path("defender_clean"), base / name, seed,
                                               ov + a.overrides)
                            model_dir = base / name / "model"
                            parrot_dir = base / name if name.startswith("sande") else None
                        r = {**label, "defense": name, **info,
                             **evaluate_model(model_dir, man, lab, base / name / "eval", a.max_new_tokens, seed,
                                              parrot_dir)}
                        rows.append(r)
                        a.runs.mkdir(parents=True, exist_ok=True)
                        raw_path.write_text(json.dumps(rows, indent=1))
                        print(json.dumps(r), flush=True)
                    print(f"# {arch} {attack} {target} s{seed}: {time.perf_counter() - t0:.0f}s", flush=True)
    md = table(rows)
    print(md)
    a.table = a.table or a.runs / "table.md"
    a.table.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/lab_sande.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cfg = a.config.relative_to(ROOT) if a.config.is_relative_to(ROOT) else a.config
    a.table.write_text(
        "# SANDE / SANDE-P / OSFT vs plain fine-tuning on the tiny lab (measured)\n\n"
        f"Generated by `{cmd}` (recipe `{a.recipe}`, lab {lab.recipe.fingerprint()}; CPU, {a.threads} thread(s)). "
        f"Shared sections (model, lora, data, train = the overwrite budget) from `{cfg}` for every defense"
        f"{' with ' + ' '.join(a.overrides) if a.overrides else ''}"
        f"{'; SANDE runs also ' + ' '.join(a.sande_set) if a.sande_set else ''}"
        ". `+replay`: clean replay (x -> y in the same step: twice the sequences of `finetune`, the same as "
        "`finetune-2x`, plain fine-tuning at twice the batch). "
        "Rates are means over seeds of the eval module's rates (greedy, held-out lab prompts). "
        "ASR w/ parrot: the defended model with the learned parrot in place of the trigger. Simulation "
        "success: frozen backdoored model + parrot starts r_t on held-out defender prompts (before elimination). "
        "Cost = defense wall time (SANDE: both phases).\n\n" + md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
