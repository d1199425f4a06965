"""The demo: build (or load) the lab, implant a backdoor, evaluate, remove it with every defense, report.

A slice of the benchmark (``configs/bench/demo.yaml``), run through the same code: cells, evaluation,
tables and plots. ``DIR/results.json`` holds one row per model × defense.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .bench import load_config, run_bench

DEMO_CONFIG = "bench/demo.yaml"  # shipped with the package (found by config.find_config)


def run_demo(out: str | Path, overrides: list[str] = (), progress: Callable[[str], None] | None = None) -> list[dict]:
    cfg = load_config(DEMO_CONFIG, list(overrides))
    return run_bench(cfg, out, progress=progress)


def table(rows: list[dict]) -> list[list[str]]:
    def pct(x):
        return "—" if x is None else f"{100 * x:5.1f}%"

    out = [["model / defense", "ASR w/ trigger", "ASR w/o trigger", "benign acc", "harmful refusal", "KL to input",
            "n", "time"]]
    for r in rows:
        t = r.get("defense_wall_time_s")
        kl = r.get("kl_to_input")
        flag = " !" if r.get("flags") else ""
        clean = f" c{r['clean_seed']}" if r.get("clean_seed") else ""
        out.append([f"{r['arch']}{clean} {r['attack']}->{r['target']} / {r['defense']}{flag}",
                    pct(r.get("asr_with_trigger")),
                    pct(r.get("asr_without_trigger")), pct(r.get("benign_accuracy")), pct(r.get("harmful_refusal")),
                    "—" if kl is None or r.get("defense") == "none" else f"{kl:.4f}",
                    str(r.get("n", "")), "" if t is None else f"{t:.0f}s"])
    return out
