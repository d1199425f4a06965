"""Pruning baseline (BackdoorLLM DefenseBox): zero a share of the weights of every linear layer in the
decoder blocks.

- ``magnitude``: the smallest |W| per layer (unstructured).
- ``wanda`` (Sun et al., 2023, arXiv 2306.11695): score |W_ij| · ||X_j||_2 with input-feature norms X_j
  collected on the defender's clean prompts, pruned per output row.
No training; embeddings, norms and the LM head are left alone.
"""
from __future__ import annotations

import enum
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..arch import linear_layers, weight_out_in
from ..config import help_field
from ..data import collate_right, encode_examples, pad_id_of
from .base import DefenseContext

NAME = "prune"


def DATA(cfg) -> str | None:
    """Wanda needs calibration prompts; magnitude pruning needs nothing."""
    return "clean calibration prompts (criterion wanda)" if Criterion(cfg.criterion) is Criterion.WANDA else None


SUMMARY = "baseline: magnitude or Wanda pruning of the decoder blocks' linear layers (no training)"


class Criterion(str, enum.Enum):
    MAGNITUDE = "magnitude"
    WANDA = "wanda"


@dataclass
class Config:
    sparsity: float = help_field(0.3, "Share of weights set to zero in each linear layer.")
    criterion: Criterion = help_field(Criterion.MAGNITUDE, "'magnitude' or 'wanda' (needs data.path).")
    calibration_samples: int = help_field(32, "Clean examples used for Wanda's activation norms.")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not 0.0 < self.sparsity < 1.0:
            out.append(("sparsity", f"must be in (0, 1), got {self.sparsity}"))
        if self.calibration_samples < 1:
            out.append(("calibration_samples", f"must be >= 1, got {self.calibration_samples}"))
        return out


@contextmanager
def _input_norms(modules: dict[str, nn.Module], norms: dict[str, torch.Tensor]):
    handles = []

    def make(name):
        def hook(mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            norms[name] = norms.get(name, 0) + (x ** 2).sum(0)
        return hook

    try:
        for name, m in modules.items():
            handles.append(m.register_forward_pre_hook(make(name)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def prune(model: nn.Module, sparsity: float, criterion: Criterion = Criterion.MAGNITUDE,
          calibration: list[dict] | None = None, pad_id: int = 0) -> dict[str, float]:
    modules = linear_layers(model)
    norms: dict[str, torch.Tensor] = {}
    if Criterion(criterion) is Criterion.WANDA:
        if not calibration:
            raise ValueError("prune criterion 'wanda' needs clean calibration data: set data.path")
        with _input_norms(modules, norms):
            for i in range(0, len(calibration), 8):
                batch = collate_right(calibration[i:i + 8], pad_id)
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    zeroed = total = 0
    for name, m in modules.items():
        w = weight_out_in(m)
        if Criterion(criterion) is Criterion.WANDA:
            score = w.abs().float() * norms[name].sqrt().to(w.device)[None, :]
            k = int(w.shape[1] * sparsity)
            if k == 0:
                continue
            idx = torch.topk(score, k, dim=1, largest=False).indices
            mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)
        else:
            k = int(w.numel() * sparsity)
            if k == 0:
                continue
            thresh = torch.kthvalue(w.abs().float().flatten(), k).values
            mask = w.abs() <= thresh
        w.masked_fill_(mask, 0.0)
        zeroed += int(mask.sum())
        total += w.numel()
    return {"pruned_layers": len(modules), "achieved_sparsity": zeroed / max(total, 1)}


def run(ctx: DefenseContext) -> dict[str, Any]:
    cfg: Config = ctx.method
    calib = None
    if cfg.criterion is Criterion.WANDA:
        calib = encode_examples(ctx.template, ctx.examples[: cfg.calibration_samples], ctx.cfg.data.max_length)
    ctx.model.eval()
    return prune(ctx.model, cfg.sparsity, cfg.criterion, calib, pad_id_of(ctx.tokenizer))
