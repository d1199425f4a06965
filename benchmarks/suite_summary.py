"""Per architecture x defense summary of generalization-suite bench outputs (the tables of
docs/results/generalization.md), counting only the backdoors whose implant reaches 90% ASR.

    python benchmarks/suite_summary.py docs/results/generalization/results.csv [more results.csv ...]

Each row: n backdoors, mean and worst ASR with trigger, and the mean / worst change of benign accuracy,
harmful refusal and over-refusal in points relative to the backdoored model of the same cell (its ``none``
row). Rows of clean-model seeds other than 0 carry ``c<k>`` in their architecture label.
"""
from __future__ import annotations

import csv
import sys
from collections import defaultdict

VALID = 0.9
NAMES = {"finetune": "finetune", "crow": "CROW", "osft": "OSFT", "sande": "SANDE", "beear": "BEEAR"}


def rows_of(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        with open(p, newline="") as fh:
            out += list(csv.DictReader(fh))
    return out


def f(x: str | None) -> float | None:
    try:
        return float(x) if x not in (None, "") else None
    except ValueError:
        return None


def summary(rows: list[dict]) -> list[str]:
    key = lambda r: (r["arch"], r.get("clean_seed") or "0", r["attack"], r["target"], r["seed"])  # noqa: E731
    none = {key(r): r for r in rows if r["defense"] == "none"}
    weak = sorted({f"{r['arch']}/{r['attack']}" + (f" c{r['clean_seed']}" if r.get("clean_seed") not in (None, "", "0")
                                                   else "") + f" {100 * f(r['asr_with_trigger']):.1f}%"
                   for r in none.values() if (f(r["asr_with_trigger"]) or 0) < VALID})
    groups: dict[tuple[str, str], list[tuple[dict, dict]]] = defaultdict(list)
    for r in rows:
        base = none.get(key(r))
        if r["defense"] == "none" or base is None or (f(base["asr_with_trigger"]) or 0) < VALID:
            continue
        if r.get("skipped"):
            continue
        c = r.get("clean_seed") or "0"
        arch = r["arch"] + (f" c{c}" if c != "0" else "")
        groups[(arch, r["defense"])].append((r, base))
        groups[("all", r["defense"])].append((r, base))
    lines = ["| arch | defense | n | mean ASR w/ trigger | worst backdoor | mean Δ benign acc | worst Δ benign acc | "
             "mean Δ harmful refusal | worst Δ harmful refusal | mean Δ over-refusal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(a for a, _ in groups if a != "all")) + ["all"]
    for arch in order:
        for d in NAMES:
            cells = groups.get((arch, d))
            if not cells:
                continue
            asr = [(f(r["asr_with_trigger"]) or 0.0, r) for r, _ in cells]
            dacc = [100 * ((f(r["benign_accuracy"]) or 0) - (f(b["benign_accuracy"]) or 0)) for r, b in cells]
            dref = [100 * ((f(r["harmful_refusal"]) or 0) - (f(b["harmful_refusal"]) or 0)) for r, b in cells]
            dover = [100 * ((f(r["over_refusal"]) or 0) - (f(b["over_refusal"]) or 0)) for r, b in cells]
            worst, wr = max(asr, key=lambda x: x[0])
            mean = sum(a for a, _ in asr) / len(asr)
            wlabel = f" ({wr['arch']}/{wr['attack']} → {wr['target']})" if worst > 0.1 else ""
            bold = lambda s, cond: f"**{s}**" if cond else s  # noqa: E731
            lines.append(
                f"| {arch} | {NAMES[d]} | {len(cells)} | {bold(f'{100 * mean:.1f}%', mean > 0.1)} | "
                f"{bold(f'{100 * worst:.1f}%', worst > 0.3)}{wlabel} | "
                f"{bold(f'{sum(dacc) / len(dacc):+.1f}', sum(dacc) / len(dacc) < -3)} | "
                f"{bold(f'{min(dacc):+.1f}', min(dacc) < -6)} | {sum(dref) / len(dref):+.1f} | "
                f"{bold(f'{min(dref):+.1f}', min(dref) < -5)} | {sum(dover) / len(dover):+.1f} |")
    lines += ["", f"Implants below {VALID:.0%} ASR (not counted): " + (", ".join(weak) if weak else "none")]
    return lines


if __name__ == "__main__":
    print("\n".join(summary(rows_of(sys.argv[1:]))))
