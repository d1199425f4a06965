"""Rows of the ``unbackdoor_mc`` lm-eval task, read from a JSONL file beside this module.

lm-eval calls :func:`load` (the task's ``custom_dataset``) with the task's ``dataset_kwargs`` and metadata.
A relative ``data_files`` path is resolved against this folder rather than the working directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-blank line."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load(data_files: str = "unbackdoor_mc.jsonl", **_: Any):
    """A ``DatasetDict`` with a single ``test`` split holding the rows of ``data_files``."""
    import datasets

    path = Path(data_files)
    if not path.is_absolute():
        path = HERE / path
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_rows(path))})
