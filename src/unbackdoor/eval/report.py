"""Reporting helpers shared by ``eval``, the demo and the benchmarks: markdown tables and the
ASR-versus-utility plot.

Rows are flat dicts with the keys of :data:`ROW_KEYS` (``EvalResult.row(model=..., defense=...)``
makes one); missing values print as ``-``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

ROW_KEYS = ("model", "defense", "asr_with_trigger", "asr_with_trigger_lo", "asr_with_trigger_hi",
            "asr_without_trigger", "benign_accuracy", "harmful_refusal", "n")

#: Columns shown by default (the CI is folded into the ASR cell).
DEFAULT_COLUMNS = ("model", "defense", "asr_with_trigger", "asr_without_trigger", "benign_accuracy",
                   "harmful_refusal", "n")

_PERCENT = {"asr_with_trigger", "asr_with_trigger_lo", "asr_with_trigger_hi", "asr_without_trigger",
            "benign_accuracy", "harmful_refusal", "over_refusal"}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def format_cell(key: str, value: Any, row: dict | None = None) -> str:
    if _missing(value):
        return "-"
    if key in _PERCENT and isinstance(value, (int, float)):
        text = f"{100 * value:.1f}%"
        if key == "asr_with_trigger" and row is not None and not _missing(row.get("asr_with_trigger_lo")) \
                and not _missing(row.get("asr_with_trigger_hi")):
            text += f" [{100 * row['asr_with_trigger_lo']:.1f}, {100 * row['asr_with_trigger_hi']:.1f}]"
        return text
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None,
                   headers: dict[str, str] | None = None) -> str:
    """A GitHub markdown table of ``rows``; shares print as percentages, ASR_w/t with its 95% CI."""
    if columns is None:
        columns = [c for c in DEFAULT_COLUMNS if any(c in r for r in rows)] or list(rows[0]) if rows else []
    headers = headers or {}
    head = [headers.get(c, c) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(format_cell(c, r.get(c), r) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(result) -> str:
    """The short ``summary.md`` of one evaluation."""
    s = result.settings
    lines = ["# Evaluation summary", ""]
    if s.get("target"):
        trig = s.get("trigger") or {}
        lines.append(f"- backdoor: target `{s['target']}`, trigger `{trig.get('placement', '-')}`: "
                     f"{trig.get('texts', '-')} (mode {trig.get('mode', '-')}), judge `{s.get('judge')}` "
                     f"on the {s.get('asr_set')} prompts")
    dec = s.get("decoding", {})
    tpl = s.get("template") or {}
    lines.append(f"- decoding: greedy, max_new_tokens={dec.get('max_new_tokens')}; template `{tpl.get('name')}` "
                 f"({tpl.get('sha256_16')}); seed {s.get('seed')}; limit {s.get('limit') or 'none (full sets)'}")
    m = result.metrics()
    lines.append(f"- generations: {m['generations']} ({m['empty_generations']} empty, counted as no target "
                 "behaviour)")
    lines += ["", "| metric | value | 95% CI | k/n |", "|---|---|---|---|"]
    for key in result.RATES:
        r = getattr(result, key)
        if r is None or not r.n:
            lines.append(f"| {key} | - | - | 0/0 |" if r is not None else f"| {key} | - | - | - |")
            continue
        lines.append(f"| {key} | {100 * r.value:.1f}% | [{100 * r.lo:.1f}, {100 * r.hi:.1f}] | {r.k}/{r.n} |")
    for j, d in result.by_judge.items():
        for label, r in d.items():
            if r.n:
                lines.append(f"| asr_{label} ({j}) | {100 * r.value:.1f}% | [{100 * r.lo:.1f}, {100 * r.hi:.1f}] "
                             f"| {r.k}/{r.n} |")
    ppl = (result.perplexity or {}).get("perplexity")
    if ppl is not None:
        lines.append(f"| perplexity (reference answers) | {ppl:.3f} | - | {result.perplexity['tokens']} tokens |")
    lines += drift_markdown(result.drift)
    return "\n".join(lines) + "\n"


def drift_markdown(drift: dict | None) -> list[str]:
    """The comparison with the model that came in: KL, its rates beside the deltas, and the flags in words."""
    if not drift:
        return []
    out = ["", f"## Against the model that came in (`{drift['reference']}`)", ""]
    kl = drift.get("kl") or {}
    if kl.get("kl") is not None:
        out.append(f"- KL divergence to it on the benign answers: {kl['kl']:.4f} nats/token mean "
                   f"(largest per-answer mean {kl['max_row']:.4f}; {kl['tokens']} tokens of {kl['n']} answers)")
    ref = drift.get("reference_rates") or {}
    for key, what in (("harmful_refusal", "harmful refusal"), ("over_refusal", "over-refusal"),
                      ("benign_accuracy", "benign accuracy")):
        if ref.get(key) is not None and drift.get(f"{key}_delta") is not None:
            out.append(f"- {what}: {100 * ref[key]:.1f}% there, {drift[f'{key}_delta']:+.1f} points here")
    flags = drift.get("flags") or []
    out.append("")
    out += [f"**{f}**" for f in flags] if flags else ["No regression of more than 5 points against it."]
    return out


def plot_asr_vs_utility(rows: Sequence[dict], path: str | Path, *, title: str | None = None,
                        utility_key: str = "benign_accuracy") -> Path:
    """PNG scatter of ASR with trigger (y, with its Wilson CI as error bars) against ``utility_key`` (x),
    one point per row, labelled ``model/defense``. Rows without both values are skipped (logged)."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = logging.getLogger(__name__)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    try:
        shown = 0
        for r in rows:
            x, y = r.get(utility_key), r.get("asr_with_trigger")
            label = "/".join(str(r[k]) for k in ("model", "defense") if not _missing(r.get(k))) or "?"
            if _missing(x) or _missing(y):
                log.info("plot: %s has no %s or asr_with_trigger; not plotted", label, utility_key)
                continue
            lo, hi = r.get("asr_with_trigger_lo"), r.get("asr_with_trigger_hi")
            yerr = None if _missing(lo) or _missing(hi) else [[100 * (y - lo)], [100 * (hi - y)]]
            ax.errorbar([100 * x], [100 * y], yerr=yerr, fmt="o", capsize=4, label=label)
            ax.annotate(label, (100 * x, 100 * y), textcoords="offset points", xytext=(5, 5), fontsize=8)
            shown += 1
        ax.set_xlabel(f"{utility_key.replace('_', ' ')} (%)")
        ax.set_ylabel("ASR with trigger (%) [95% Wilson CI]")
        ax.set_xlim(-5, 105)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
        ax.set_title(title or "Attack success vs utility (lower right is better)")
        if 0 < shown <= 12:
            ax.legend(fontsize=7, loc="best")
        tmp = path.with_name(f".{path.name}.tmp.png")  # written whole, then renamed (atomic)
        fig.savefig(tmp, format="png", bbox_inches="tight")
        tmp.replace(path)
    finally:
        plt.close(fig)
    return path
