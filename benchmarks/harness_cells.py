"""Score every model of a finished bench run on lm-evaluation-harness tasks (default: the local
multiple-choice task ``unbackdoor_mc``), as a utility column beside the bench's own evaluation.

    python benchmarks/harness_cells.py runs/real                     # every cell of that bench output
    python benchmarks/harness_cells.py runs/real --tasks unbackdoor_mc --table docs/results/real/harness.md

Each model is the one the cell evaluated (``eval/results.json`` "model": the backdoored model for ``none``,
the original for ``clean``, the defended model otherwise); one model is scored once even when several cells
share it. Writes ``<cell>/harness/harness.json`` + per-question samples, and a markdown table. Needs the
``lm-eval`` extra. Resumable: a cell with a harness.json is not rescored.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bench_out", type=Path)
    p.add_argument("--tasks", default="unbackdoor_mc")
    p.add_argument("--table", type=Path, default=None, help="default: BENCH_OUT/harness.md")
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)
    from unbackdoor.eval.harness import metric_rows, run_harness

    cells = sorted(a.bench_out.glob("cells/**/cell.json"))
    if not cells:
        p.error(f"{a.bench_out}: no cells/**/cell.json; run `unbackdoor bench ... --out {a.bench_out}` first")
    by_model: dict[str, dict] = {}
    lines = ["| cell | model | task | metric | value | stderr | n |", "|---|---|---|---|---|---|---|"]
    for cj in cells:
        cell = json.loads(cj.read_text())
        if cell.get("skipped"):
            continue
        res = cj.parent / "eval" / "results.json"
        model = json.loads(res.read_text())["model"]
        out = cj.parent / "harness"
        if (out / "harness.json").is_file():
            summary = json.loads((out / "harness.json").read_text())
        elif model in by_model:
            summary = by_model[model]
        else:
            summary = run_harness(model, a.tasks, out, batch_size=a.batch_size, overwrite=True)
        by_model[model] = summary
        rel = cj.parent.relative_to(a.bench_out)
        for task, metric, value, stderr, n in metric_rows(summary):
            lines.append(f"| {rel} | {Path(model).name} | {task} | {metric} | {value:.3f} | "
                         f"{'-' if stderr is None else f'{stderr:.3f}'} | {n} |")
        print(lines[-1], flush=True)
    table = a.table or a.bench_out / "harness.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(f"# lm-evaluation-harness on every cell of `{a.bench_out}` (tasks: {a.tasks})\n\n"
                     + "\n".join(lines) + "\n")
    print(f"wrote {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
