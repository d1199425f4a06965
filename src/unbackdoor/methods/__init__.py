"""Registry of removal methods. Each method is one module exposing:

- ``NAME`` and ``SUMMARY`` (one line), ``KNOWS`` (what the defender may know under its threat model);
- ``Config``: a dataclass of the method's own fields (the ``method:`` section of a defend config);
- ``run(ctx: DefenseContext) -> dict``: modify ``ctx.model`` in place (or set it) and return metrics
  for the run record.

Modules are imported lazily so the CLI starts fast. To add a method: write the module, add one line here,
ship a config under ``configs/``, and add it to the test matrix in ``tests/methods``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

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


def get_method(name: str) -> ModuleType:
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown method {name!r}.{hint} Available: {', '.join(method_names())}")
    return importlib.import_module(METHODS[name])
