"""Run many `unbackdoor` command lines in one process and report, for each, what a user would see.

Usage: python tests/cli_walk.py CASES.json RESULTS.json

CASES.json is a list of {"name", "argv", "watch": [paths]}. Each command runs through the CLI's entry
point exactly as the `unbackdoor` script calls it; its stdout and stderr are captured, an exception that
escapes the CLI is printed as Python would print it (a traceback, exit code 1), and every path in
``watch`` is hashed (names, sizes and contents of every file under it) before and after. One process
for all commands keeps the walk to seconds: importing torch and transformers once, not fifty times.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path


def tree_hash(path: str) -> str | None:
    p = Path(path)
    if not p.exists():
        return None
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*"))
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def run_one(argv: list[str]) -> tuple[int, str]:
    from unbackdoor.cli import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handler = logging.StreamHandler(err)
    root.addHandler(handler)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main.main(args=argv, prog_name="unbackdoor", standalone_mode=True)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # what the interpreter would print for an exception escaping the CLI
                traceback.print_exc()
                code = 1
    finally:
        root.removeHandler(handler)
    return code, out.getvalue() + err.getvalue()


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    logging.basicConfig(level=logging.WARNING, stream=sys.__stderr__)  # before the CLI's own basicConfig
    results = []
    for case in cases:
        before = {w: tree_hash(w) for w in case.get("watch", [])}
        t0 = time.perf_counter()
        code, text = run_one(case["argv"])
        after = {w: tree_hash(w) for w in case.get("watch", [])}
        results.append({"name": case["name"], "code": code, "output": text[-6000:],
                        "changed": [w for w in before if before[w] != after[w]],
                        "seconds": round(time.perf_counter() - t0, 2)})
        print(f"{case['name']}: exit {code} ({results[-1]['seconds']}s)", file=sys.__stderr__, flush=True)
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
