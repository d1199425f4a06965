"""Plain supervised fine-tuning on the defender's clean data: the baseline every defense is shown against.

Same data, steps and learning rate as the defense it is compared with; no trigger knowledge. Tiny
backdoors are fragile, so no removal result means anything without this number beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data import TrainCollator, encode_examples
from ..train import fit, lm_loss
from .base import DefenseContext

NAME = "finetune"
DATA = "clean data"
SUMMARY = "plain fine-tuning on clean (prompt -> reference answer) pairs; the same-budget baseline"


@dataclass
class Config:
    """No fields of its own: everything is in the shared `train`, `lora` and `data` sections."""

    def validate(self) -> list[tuple[str, str]]:
        return []


def run(ctx: DefenseContext) -> dict[str, Any]:
    ctx.need_examples("clean data")
    model = ctx.make_trainable()
    feats = encode_examples(ctx.template, ctx.examples, ctx.cfg.data.max_length)
    res = fit(model, lm_loss, feats, ctx.cfg.train, collate_fn=TrainCollator(ctx.tokenizer), seed=ctx.cfg.seed,
              out_dir=ctx.out_dir, desc="finetune")
    return {"steps": res.steps, "final_loss": res.losses[-1], "train_wall_time_s": round(res.wall_time_s, 3)}
