"""Registry of removal methods (recipes). Each method is one module of this package exposing (the
:class:`~unbackdoor.methods.base.Method` protocol):

- ``NAME`` and ``SUMMARY`` (one line);
- ``Config``: a dataclass of the method's own fields (the ``method:`` section of a defend config);
- ``run(ctx: DefenseContext) -> dict``: modify ``ctx.model`` in place (or set it) and return metrics
  for the run record.

What each method may know is its row in :data:`unbackdoor.threats.THREAT_MODELS`. Reusable pieces live in
:mod:`unbackdoor.components`; no method imports another. Modules are imported lazily so the CLI starts fast.
Adding a method: CONTRIBUTING.md.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..config import suggest

if TYPE_CHECKING:
    from .base import Method

METHODS: dict[str, str] = {
    "finetune": "unbackdoor.methods.finetune",
    "crow": "unbackdoor.methods.crow",
    "osft": "unbackdoor.methods.osft",
    "sande": "unbackdoor.methods.sande",
    "beear": "unbackdoor.methods.beear",
    "prune": "unbackdoor.methods.prune",
    "quantize": "unbackdoor.methods.quantize",
}


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> "Method":
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}.{suggest(name, METHODS)} Available: {', '.join(method_names())}")
    return importlib.import_module(METHODS[name])  # type: ignore[return-value]  (a module of the Method shape)
