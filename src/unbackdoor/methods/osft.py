"""OSFT — Overwrite supervised fine-tuning: remove a backdoor whose trigger the defender knows.

Paper: Li et al., "Simulate and Eliminate: Revoke Backdoors for Generative Large Language Models"
(arXiv 2405.07667, AAAI 2025), section "Overwrite SFT". Plain safety fine-tuning on (x → y) never exercises
the trigger path; OSFT trains on (x ⊕ t → y), the prompt *with the trigger* mapped to the dataset's reference
answer, which overwrites the backdoor mapping:
``min_θ −Σ_{i ≤ k_overwrite} log P_θ(y_i | x ⊕ t, y_<i)``.

Config fields → paper symbols:
- ``trigger`` (a :class:`~unbackdoor.triggers.TriggerSpec`): t and where it goes (prefix / header /
  suffix / random / wrap), as the attack placed it. For several known triggers, ``mode: one`` draws one per
  example (multi-trigger backdoor), ``mode: all`` inserts every one (composite trigger). The trigger comes
  from this config only — never from an attack manifest.
- ``more_triggers``: further triggers, each training example drawing one of ``trigger`` and these (ours).
  ``--trigger-from`` fills them with a scan's other strong recovered strings: a recovered string is one of
  many that open the backdoor, and overwriting several covers more of what the true trigger opens.
- ``clean_replay``: also train on the clean twin (x → y) in the same batch (the spec's optional replay;
  the batch then holds 2 × ``train.batch_size`` sequences).
- ``k_overwrite``: response tokens carrying the loss (null = the whole response, as in the paper's OSFT).
- the shared ``train`` section: the optimisation (official recipe: lr 5e-6, Adam (0.9, 0.95), cosine,
  batch 4, 25 steps, full fine-tuning); ``lora.enabled=true`` is an allowed, recorded deviation.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..config import help_field
from ..data import Example, collate_right, encode, keep_first, pad_id_of
from ..train import fit, lm_loss
from ..triggers import TriggerSpec, apply, check_tokenizes
from .base import DefenseContext

log = logging.getLogger(__name__)

NAME = "osft"
DATA = "the defender's clean data"
SUMMARY = "overwrite fine-tuning: the prompt with the known trigger -> the reference clean answer"


@dataclass
class Config:
    trigger: TriggerSpec = field(default_factory=TriggerSpec)
    more_triggers: list[TriggerSpec] = help_field(
        [], "Further triggers (ours): each training example draws one of `trigger` and these, seeded. "
        "`--trigger-from` puts a scan's other strong recovered strings here (docs/scan.md).")
    clean_replay: bool = help_field(
        True, "Also train on each example's clean twin (x -> y) in the same batch, anchoring what the model does "
        "without the trigger (its refusals included) "
        "(ours, default on: it keeps harmful refusal where the target shares its first token with the model's "
        "refusal; docs/sande.md). Official: no replay.")
    k_overwrite: Optional[int] = help_field(None, "Response tokens carrying the loss (null = the whole response).")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.k_overwrite is not None and self.k_overwrite < 1:
            out.append(("k_overwrite", f"must be >= 1 or null, got {self.k_overwrite}"))
        for i, t in enumerate(self.more_triggers):
            out += [(f"more_triggers[{i}].{k}", m) for k, m in t.validate()]
        return out

    def triggers(self) -> list[TriggerSpec]:
        return [self.trigger, *self.more_triggers]


def triggered_examples(examples: Sequence[Example], spec: TriggerSpec | Sequence[TriggerSpec],
                       seed: int = 0) -> list[Example]:
    """Each example with the trigger(s) inserted into its user message (seeded placement / choice); given several
    specs, each example draws one of them."""
    rng = random.Random(seed)
    specs = [spec] if isinstance(spec, TriggerSpec) else list(spec)
    return [Example(prompt=apply(e.prompt, specs[0] if len(specs) == 1 else rng.choice(specs), rng),
                    response=e.response, system=e.system, meta={**e.meta, "osft_trigger": True})
            for e in examples]


class PairCollator:
    """Flattens items that are lists of features (an example and its clean twin) into one right-padded batch."""

    def __init__(self, tokenizer):
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, items):
        feats = [f for item in items for f in (item if isinstance(item, list) else [item])]
        return collate_right(feats, self.pad_id)


def build_dataset(template, examples: Sequence[Example], cfg: Config, *, max_length: int = 512,
                  seed: int = 0) -> list:
    """Encoded training items: (x ⊕ t → y), or [(x ⊕ t → y), (x → y)] pairs with clean replay."""
    trig = triggered_examples(examples, cfg.triggers(), seed)

    def enc(e: Example) -> dict:
        f = encode(template, e.prompt, e.response, system=e.system, max_length=max_length)
        f["labels"] = keep_first(f["labels"], cfg.k_overwrite)
        return f

    if cfg.clean_replay:
        return [[enc(t), enc(c)] for t, c in zip(trig, examples)]
    return [enc(t) for t in trig]


def run(ctx: DefenseContext) -> dict[str, Any]:
    m: Config = ctx.method
    ctx.need_examples("the defender's clean data")
    for spec in m.triggers():
        check_tokenizes(ctx.tokenizer, spec)
    items = build_dataset(ctx.template, ctx.examples, m, max_length=ctx.cfg.data.max_length, seed=ctx.cfg.seed)
    first = triggered_examples(ctx.examples[:1], m.triggers(), ctx.cfg.seed)[0]
    log.info("osft: trigger %s; first training prompt: %r", " or ".join(t.describe() for t in m.triggers()),
             first.prompt)
    model = ctx.make_trainable()
    res = fit(model, lm_loss, items, ctx.cfg.train, collate_fn=PairCollator(ctx.tokenizer), seed=ctx.cfg.seed,
              out_dir=ctx.out_dir, desc="osft")
    return {"steps": res.steps, "final_loss": res.losses[-1], "train_wall_time_s": round(res.wall_time_s, 3),
            "trigger": m.trigger.describe(), "more_triggers": [t.describe() for t in m.more_triggers],
            "clean_replay": m.clean_replay,
            "n_sequences": sum(len(i) if isinstance(i, list) else 1 for i in items)}
