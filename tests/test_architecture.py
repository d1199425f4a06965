"""The package's import structure: no cycle, no upward import, counting imports inside functions too.

Layers (lower first; a module may import its own layer or lower ones, never a higher one):

    0  errors, config
    1  schema, triggers, record, arch, templates
    2  backdoor (the vocabulary), data, models, generate, train, sharding, gguf
    3  components.*, eval.*
    4  methods.* (recipes), attack
    5  defend, threats, lab.*, real, scan, plan
    6  bench, benchreport
    7  demo, cli

Also: attack and eval never import each other; no method imports another method (only methods.base and
the registry); components import no method.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "unbackdoor"

LAYERS = [
    ["errors", "config"],
    ["schema", "triggers", "record", "arch", "templates"],
    ["backdoor", "data", "models", "generate", "train", "sharding", "gguf"],
    ["components", "eval"],
    ["methods", "attack"],
    ["defend", "threats", "lab", "real", "scan", "plan"],
    ["bench", "benchreport"],
    ["demo", "cli"],
]


def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for p in sorted((SRC / PKG).rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def import_edges(mods: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """module -> package modules it imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    edges: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    while target and target not in mods:
                        target = target.rpartition(".")[0]
                    if target:
                        found.add(target)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith(PKG):
                    continue
                for alias in node.names:  # `from . import config` imports the module unbackdoor.config
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in mods else target)
        found.discard(name)
        edges[name] = {m for m in found if m in mods}
    return edges


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    if not top:
        return 0
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in the layer table of tests/test_architecture.py; add it")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def edges():
    return import_edges(modules())


def test_the_checker_sees_imports_inside_functions():
    g = {"unbackdoor.a": ({"unbackdoor.b"}), "unbackdoor.b": {"unbackdoor.a"}, "unbackdoor.c": set()}
    assert cycles(g) == [["unbackdoor.a", "unbackdoor.b"]]
    mods = modules()
    e = import_edges(mods)
    # bench imports the evaluation only inside run_cell's helpers: the edge must still be there
    assert "unbackdoor.eval.evaluate" in e["unbackdoor.bench"]
    assert "unbackdoor.config" in e["unbackdoor.defend"]  # `from . import config as C`


def test_no_import_cycle(edges):
    assert cycles(edges) == []


def test_no_upward_import(edges):
    bad = [(m, t) for m, ts in edges.items() for t in ts if layer_of(t) > layer_of(m)]
    assert bad == [], "imports from a higher layer: " + ", ".join(f"{m} -> {t}" for m, t in bad)


def test_attack_and_eval_are_independent_and_methods_do_not_import_each_other(edges):
    bad = []
    for m, ts in edges.items():
        for t in ts:
            if (m == "unbackdoor.attack" and t.startswith("unbackdoor.eval")) or \
               (m.startswith("unbackdoor.eval") and t == "unbackdoor.attack"):
                bad.append((m, t))
            if m.startswith("unbackdoor.methods.") and t.startswith("unbackdoor.methods.") and \
               t not in ("unbackdoor.methods.base", "unbackdoor.methods") and m != "unbackdoor.methods.base":
                bad.append((m, t))
            if m.startswith("unbackdoor.components") and t.startswith("unbackdoor.methods"):
                bad.append((m, t))
    assert bad == []
