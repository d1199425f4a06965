"""What every removal method receives and provides: :class:`DefenseContext` and the :class:`Method` protocol.

A method is a module (registered by name in :mod:`unbackdoor.methods`) with ``NAME``, ``SUMMARY``, a
``Config`` dataclass (its ``method:`` section) and ``run(ctx: DefenseContext) -> dict``: it changes
``ctx.model`` in place (or replaces it) and returns the metrics for the run record. The driver
(:mod:`unbackdoor.defend`) owns what methods share — safe loading, seeding, LoRA, the output folder, the run
record; what the defender may know under each method's threat model is in :mod:`unbackdoor.threats`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from ..data import Example
from ..errors import UnbackdoorError
from ..models import count_parameters, make_trainable
from ..record import RunRecord
from ..schema import DefendConfig
from ..templates import Template


class DefenseError(UnbackdoorError, ValueError):
    """A method cannot run with what it was given (missing data, incompatible settings)."""


@dataclass
class DefenseContext:
    """The suspect model and everything a method may use, loaded by the driver."""
    cfg: DefendConfig
    model: nn.Module
    tokenizer: Any
    template: Template
    examples: list[Example]
    out_dir: Path
    record: RunRecord
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> Any:
        """The method's own config section (its ``Config``)."""
        return self.cfg.method

    def need_examples(self, what: str) -> list[Example]:
        """The defender's examples (``data.path``), or a :class:`DefenseError` saying what the method needs."""
        if not self.examples:
            raise DefenseError(f"{self.cfg.method.name} needs {what}: set data.path=/path/to/data.jsonl")
        return self.examples

    def make_trainable(self) -> nn.Module:
        """Apply LoRA (``cfg.lora``) or unfreeze every weight; returns (and stores) the trainable model."""
        self.model = make_trainable(self.model, self.cfg.lora, self.cfg.train.gradient_checkpointing)
        train, total = count_parameters(self.model)
        self.record.update(trainable_parameters=train, total_parameters=total)
        return self.model


@runtime_checkable
class Method(Protocol):
    """The shape of a method module (checked by the registry's conformance tests)."""
    NAME: str
    SUMMARY: str
    Config: type

    def run(self, ctx: DefenseContext) -> dict[str, Any]: ...
