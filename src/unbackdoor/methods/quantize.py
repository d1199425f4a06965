"""Quantization baseline: round-to-nearest weight quantization of the decoder blocks' linear layers.

Weights are quantized symmetrically per output channel to ``bits`` and stored back dequantized
("fake quantization"), which is exactly the arithmetic a weight-only int8/int4 kernel computes and runs on
any machine, CPU included; the saved model is an ordinary checkpoint. BackdoorLLM's DefenseBox lists
quantization among the common baselines: low-bit rounding can erase small, backdoor-carrying weight deltas.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..arch import linear_layers, weight_out_in
from ..config import help_field
from .base import DefenseContext

NAME = "quantize"
SUMMARY = "baseline: per-channel round-to-nearest weight quantization (int8/int4) of the decoder blocks"


@dataclass
class Config:
    bits: int = help_field(4, "Bits per weight (2-8), symmetric per output channel.")

    def validate(self) -> list[tuple[str, str]]:
        if not 2 <= self.bits <= 8:
            return [("bits", f"must be between 2 and 8, got {self.bits}")]
        return []


@torch.no_grad()
def quantize(model, bits: int) -> dict[str, float]:
    qmax = 2 ** (bits - 1) - 1
    err = 0.0
    mods = linear_layers(model)
    for m in mods.values():
        w = weight_out_in(m)
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / qmax
        q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale
        err += float((q - w).pow(2).mean())
        w.copy_(q)
    return {"quantized_layers": len(mods), "bits": bits, "mean_sq_error": err / max(len(mods), 1)}


def run(ctx: DefenseContext) -> dict[str, Any]:
    return quantize(ctx.model, ctx.method.bits)
