"""Metrics: rates with Wilson 95% intervals, exact-match task accuracy, perplexity of reference answers,
refusal rates.

A :class:`Rate` keeps its numerator and denominator next to the interval, so no reported share loses
its ``n``. Empty generations are counted in every denominator (see :mod:`unbackdoor.eval.judges`).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from ..data import IGNORE, Example, TrainCollator, encode
from ..generate import batched_with_backoff
from ..templates import Template

#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` (Wilson 1927). ``n == 0`` -> (0, 1)."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson(k={k}, n={n}): need 0 <= k <= n")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` with its Wilson 95% interval ``[lo, hi]``; ``value`` is None when ``n == 0``."""
    k: int
    n: int
    lo: float
    hi: float

    @classmethod
    def of(cls, hits: Iterable[bool]) -> "Rate":
        flags = [bool(h) for h in hits]
        return cls.from_counts(sum(flags), len(flags))

    @classmethod
    def from_counts(cls, k: int, n: int) -> "Rate":
        lo, hi = wilson(k, n)
        return cls(k, n, lo, hi)

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    def as_dict(self) -> dict:
        return {"rate": self.value, "k": self.k, "n": self.n, "lo": self.lo, "hi": self.hi}

    def __str__(self) -> str:
        if not self.n:
            return "n/a (n=0)"
        return f"{100 * self.value:.1f}% [{100 * self.lo:.1f}, {100 * self.hi:.1f}] ({self.k}/{self.n})"


# ----------------------------------------------------------------------------------- task accuracy

def normalize_answer(text: str) -> str:
    """Case-folded, whitespace runs collapsed, stripped. Nothing else: the lab's answers are exact."""
    return re.sub(r"\s+", " ", text or "").strip().casefold()


def reference_answer(ex: Example) -> str | None:
    """``meta.answer`` (the lab's exact reference), else the reference response, else None."""
    ans = ex.meta.get("answer") if ex.meta else None
    if ans is not None and str(ans).strip():
        return str(ans)
    return ex.response if ex.response.strip() else None


def exact_match(outputs: Sequence[str], answers: Sequence[str | None]) -> list[bool | None]:
    """Per item: output == answer after :func:`normalize_answer`; None where there is no reference."""
    if len(outputs) != len(answers):
        raise ValueError(f"exact_match: {len(outputs)} outputs but {len(answers)} answers")
    return [None if a is None else normalize_answer(o) == normalize_answer(a) for o, a in zip(outputs, answers)]


def token_f1(output: str, answer: str) -> float:
    """SQuAD-style token F1 between an output and a reference (bag of case-folded word tokens).

    Graded agreement for free-form answers (a real model's own pre-attack answers), where exact match is
    too strict: one changed word costs a little, a different answer costs everything."""
    a, b = re.findall(r"\w+", (output or "").casefold()), re.findall(r"\w+", (answer or "").casefold())
    if not a or not b:
        return float(a == b)
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def task_accuracy(outputs: Sequence[str], examples: Sequence[Example]) -> Rate:
    """Exact-match accuracy over the examples that have a reference answer (all of the lab's do)."""
    flags = exact_match(outputs, [reference_answer(e) for e in examples])
    return Rate.of(f for f in flags if f is not None)


def refusal_rate(outputs: Sequence[str], judge: str = "refusal") -> Rate:
    from .judges import get_judge

    return Rate.of(v.hit for v in get_judge(judge)(list(outputs)))


# ----------------------------------------------------------------------------------- perplexity

@torch.no_grad()
def perplexity(model: nn.Module, template: Template, examples: Sequence[Example], *, batch_size: int = 16,
               max_length: int = 512) -> dict:
    """Perplexity of the reference responses given their prompts: exp(mean NLL over response tokens only,
    EOS included), i.e. token-weighted over the whole set. Examples without a response are skipped and
    counted in ``skipped``. Returns ``{"perplexity", "nll", "tokens", "n", "skipped"}``.
    """
    feats = [encode(template, e.prompt, e.response, system=e.system, max_length=max_length)
             for e in examples if e.response.strip()]
    feats.sort(key=lambda f: len(f["input_ids"]))  # batches of similar length: little padding
    skipped = len(examples) - len(feats)
    if not feats:
        return {"perplexity": None, "nll": None, "tokens": 0, "n": 0, "skipped": skipped}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = TrainCollator(template.tokenizer)
    total = [0.0, 0]

    def run(span: range) -> None:
        batch = collate([feats[j] for j in span])
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits
        shift_labels = labels[:, 1:]
        keep = shift_labels != IGNORE
        # only the response positions go to fp32: a 32 x 512 batch on a 152k vocabulary would need ~10 GiB
        picked = logits[:, :-1][keep].float()
        nll = torch.nn.functional.cross_entropy(picked, shift_labels[keep], reduction="sum")
        total[0] += float(nll)
        total[1] += int(keep.sum())

    try:
        batched_with_backoff(len(feats), batch_size, run, "perplexity")
    finally:
        if was_training:
            model.train()
    total_nll, total_tok = total
    mean = total_nll / max(total_tok, 1)
    return {"perplexity": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "tokens": total_tok,
            "n": len(feats), "skipped": skipped}
