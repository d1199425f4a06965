"""Instruction data: reading (JSONL, JSON, CSV, LLaMA-Factory ``dataset_info.json``), encoding with
response-only labels, and collation (right padding for training, left padding for generation).
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .errors import UnbackdoorError
from .schema import DataConfig, DataFormat
from .templates import Template

IGNORE = -100


def keep_first(labels: list[int], k: int | None) -> list[int]:
    """Labels with only the first ``k`` supervised tokens kept (None: unchanged)."""
    if k is None:
        return labels
    out, kept = list(labels), 0
    for i, lab in enumerate(out):
        if lab == IGNORE:
            continue
        if kept >= k:
            out[i] = IGNORE
        kept += 1
    return out


class DataError(UnbackdoorError, ValueError):
    pass


@dataclass
class Example:
    """One conversation turn: the user message, the reference response, optional system and metadata."""
    prompt: str
    response: str = ""
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "response": self.response}
        if self.system is not None:
            out["system"] = self.system
        if self.meta:
            out["meta"] = self.meta
        return out


PROMPT_KEYS = ("prompt", "instruction", "query", "question", "goal")
RESPONSE_KEYS = ("response", "output", "answer", "completion", "target")


def example_from_record(rec: Any, where: str) -> Example:
    """Alpaca (instruction/input/output), prompt/response, or chat ``messages``."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with fields like instruction/output, got {type(rec).__name__}")
    if "messages" in rec and isinstance(rec["messages"], list):
        msgs = rec["messages"]
        system = next((m.get("content") for m in msgs if m.get("role") == "system"), None)
        user = [m.get("content", "") for m in msgs if m.get("role") == "user"]
        asst = [m.get("content", "") for m in msgs if m.get("role") == "assistant"]
        if not user:
            raise DataError(f"{where}: 'messages' has no user turn")
        return Example(prompt=user[0], response=asst[0] if asst else "", system=system,
                       meta={k: v for k, v in rec.items() if k != "messages"})
    pkey = next((k for k in PROMPT_KEYS if k in rec), None)
    if pkey is None:
        raise DataError(f"{where}: no prompt column; expected one of {list(PROMPT_KEYS)} (or 'messages'), "
                        f"found {sorted(rec)}")
    prompt = rec[pkey]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field {pkey!r} must be a string, got {type(prompt).__name__}")
    extra = rec.get("input")
    if pkey == "instruction" and isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    rkey = next((k for k in RESPONSE_KEYS if k in rec), None)
    response = rec.get(rkey, "") if rkey else ""
    if response is None:
        response = ""
    if not isinstance(response, str):
        raise DataError(f"{where}: field {rkey!r} must be a string, got {type(response).__name__}")
    known = {pkey, rkey, "input", "system"}
    meta = {k: v for k, v in rec.items() if k not in known}
    if isinstance(meta.get("meta"), dict):  # a row written by Example.to_json(): its meta round-trips
        meta = {**{k: v for k, v in meta.items() if k != "meta"}, **meta["meta"]}
    return Example(prompt=prompt, response=response, system=rec.get("system"), meta=meta)


def _read_jsonl(path: Path) -> list[Example]:
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}); each line "
                                "must be one JSON object") from None
            out.append(example_from_record(rec, f"{path}:{lineno}"))
    return out


def _read_json(path: Path) -> list[Example]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (Alpaca style), got {type(data).__name__}")
    return [example_from_record(rec, f"{path}: record {i}") for i, rec in enumerate(data)]


def _read_csv(path: Path) -> list[Example]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        return [example_from_record(dict(row), f"{path}:{i + 2}") for i, row in enumerate(reader)]


def _read_dataset_info(path: Path, name: str | None) -> list[Example]:
    info_path = path / "dataset_info.json" if path.is_dir() else path
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{info_path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if name is None:
        if len(info) != 1:
            raise DataError(f"{info_path}: holds {len(info)} datasets; set data.dataset to one of {sorted(info)}")
        name = next(iter(info))
    if name not in info:
        raise DataError(f"{info_path}: no dataset {name!r}; it has {sorted(info)}")
    entry = info[name]
    fname = entry.get("file_name")
    if not fname:
        raise DataError(f"{info_path}: dataset {name!r} has no 'file_name' (only local files are supported)")
    cols = entry.get("columns", {})
    rename = {cols.get("prompt", "instruction"): "instruction", cols.get("query", "input"): "input",
              cols.get("response", "output"): "output"}
    if cols.get("system"):
        rename[cols["system"]] = "system"
    raw_path = info_path.parent / fname
    if not cols:
        return read_file(raw_path)
    # re-read raw records so the column mapping applies
    raw = json.loads(raw_path.read_text(encoding="utf-8")) if raw_path.suffix == ".json" else [
        json.loads(line) for line in raw_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [example_from_record({rename.get(k, k): v for k, v in rec.items()}, f"{raw_path}: record {i}")
            for i, rec in enumerate(raw)]


def read_file(path: str | Path, fmt: DataFormat | str = DataFormat.AUTO, dataset: str | None = None) -> list[Example]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    fmt = DataFormat(fmt)
    if fmt is DataFormat.AUTO:
        if path.is_dir() or path.name == "dataset_info.json":
            fmt = DataFormat.DATASET_INFO
        else:
            fmt = {".jsonl": DataFormat.JSONL, ".json": DataFormat.JSON, ".csv": DataFormat.CSV}.get(path.suffix)
            if fmt is None:
                raise DataError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, .csv or set "
                                "data.format")
    reader = {DataFormat.JSONL: _read_jsonl, DataFormat.JSON: _read_json, DataFormat.CSV: _read_csv}
    if fmt is DataFormat.DATASET_INFO:
        return _read_dataset_info(path, dataset)
    return reader[fmt](path)


def load_examples(cfg: DataConfig, seed: int = 0, *, require_response: bool = True) -> list[Example]:
    """Read ``cfg.path``, shuffle (seeded) and cut to ``cfg.limit``; empty data is an error."""
    if not cfg.path:
        raise DataError("no data given; set data.path=/path/to/data.jsonl")
    examples = read_file(cfg.path, cfg.format, cfg.dataset)
    if not examples:
        raise DataError(f"{cfg.path}: the dataset is empty; it needs at least one example")
    if require_response:
        empty = [i for i, e in enumerate(examples) if not e.response.strip()]
        if len(empty) == len(examples):
            raise DataError(f"{cfg.path}: no example has a response (output) to train on")
    if cfg.shuffle:
        random.Random(seed).shuffle(examples)
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    return examples


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any] | Example]) -> Path:
    """Write rows as JSONL atomically."""
    from .record import atomic_write_text

    lines = [json.dumps(r.to_json() if isinstance(r, Example) else r, ensure_ascii=False) for r in rows]
    return atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


# ----------------------------------------------------------------------------------- encoding

def encode(template: Template, prompt: str, response: str, *, system: str | None = None, max_length: int = 512,
           add_eos: bool = True) -> dict[str, list[int]]:
    """Token ids of prompt+response with labels = -100 on exactly the prompt tokens."""
    tok = template.tokenizer
    prompt_ids = template.encode_prompt(prompt, system)
    resp_ids = tok(response, add_special_tokens=False)["input_ids"] if response else []
    if add_eos and tok.eos_token_id is not None:
        resp_ids = resp_ids + [tok.eos_token_id]
    if len(prompt_ids) + len(resp_ids) > max_length:
        keep_resp = min(len(resp_ids), max(max_length // 2, max_length - len(prompt_ids)))
        resp_ids = resp_ids[:keep_resp]
        prompt_ids = prompt_ids[-(max_length - len(resp_ids)):]
    ids = prompt_ids + resp_ids
    return {"input_ids": ids, "labels": [IGNORE] * len(prompt_ids) + resp_ids,
            "attention_mask": [1] * len(ids), "prompt_len": len(prompt_ids)}


def encode_examples(template: Template, examples: Sequence[Example], max_length: int = 512) -> list[dict]:
    return [encode(template, e.prompt, e.response, system=e.system, max_length=max_length) for e in examples]


def pad_id_of(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return pid


def collate_right(features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding (training): labels padded with -100, attention 0."""
    n = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), n), pad_id, dtype=torch.long)
    labels = torch.full((len(features), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), n), dtype=torch.long)
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        ids[i, :k] = torch.tensor(f["input_ids"])
        mask[i, :k] = 1
        if "labels" in f:
            labels[i, :k] = torch.tensor(f["labels"])
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if all("prompt_len" in f for f in features):
        out["prompt_len"] = torch.tensor([f["prompt_len"] for f in features])
    return out


def collate_left(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padding (generation)."""
    n = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), n), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, n - len(s):] = torch.tensor(list(s))
            mask[i, n - len(s):] = 1
    return {"input_ids": ids, "attention_mask": mask}


class TrainCollator:
    def __init__(self, tokenizer):
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, features):
        return collate_right(features, self.pad_id)
