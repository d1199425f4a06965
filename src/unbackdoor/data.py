"""Instruction data: reading (JSONL, JSON, CSV, LLaMA-Factory ``dataset_info.json``), encoding with
response-only labels, and collation (right padding for training, left padding for generation).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .errors import UnbackdoorError
from .schema import DataConfig, DataFormat, OnInvalid
from .templates import Template

IGNORE = -100

log = logging.getLogger(__name__)


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
    where: str | None = field(default=None, compare=False, repr=False)   # file:line it was read from

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
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            raise DataError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects, got "
                            f"{type(msgs).__name__}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content', got "
                                f"{str(m)[:80]!r}")
        system = next((m["content"] for m in msgs if m["role"] == "system"), None)
        user = [m["content"] for m in msgs if m["role"] == "user"]
        asst = [m["content"] for m in msgs if m["role"] == "assistant"]
        if not user:
            raise DataError(f"{where}: 'messages' has no user turn")
        return Example(prompt=user[0], response=asst[0] if asst else "", system=system,
                       meta={k: v for k, v in rec.items() if k != "messages"}, where=where)
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
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field 'system' must be a string, got {type(system).__name__}")
    return Example(prompt=prompt, response=response, system=system, meta=meta, where=where)


def read_text(path: Path) -> str:
    """A file's text as UTF-8 (a BOM is dropped); bytes that are not UTF-8 are reported with their line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}:{line}: byte {raw[exc.start:exc.start + 1]!r} at column {col} is not UTF-8. "
                        "Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).") from None


def _records_jsonl(path: Path) -> Iterable[tuple[str, Any]]:
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}); each line "
                            "must be one JSON object") from None
        yield f"{path}:{lineno}", rec


def _records_json(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (Alpaca style), got {type(data).__name__}")
    return ((f"{path}: record {i}", rec) for i, rec in enumerate(data))


def _records_csv(path: Path) -> Iterable[tuple[str, Any]]:
    """Rows of a CSV with a header line; a row whose fields do not match the header, or an unterminated
    quote, is an error naming its line."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    start = 1
    try:
        header = next(reader, None)
        if not header:
            return
        start = reader.line_num + 1
        for row in reader:
            where = f"{path}:{start}"
            if not any(cell.strip() for cell in row):
                start = reader.line_num + 1
                continue
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} field(s) where the header has {len(header)} ({header}); "
                                "quote fields that hold commas or line breaks (\"...\") and double quotes inside "
                                "them (\"\")")
            yield where, dict(zip(header, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        hint = ("a quoted field that starts on this line is never closed" if "end of data" in str(exc)
                else str(exc))
        raise DataError(f"{path}:{start}: malformed CSV ({hint}). Quote fields with \"...\" and double the quotes "
                        "inside them (\"\").") from None


_RECORDS = {DataFormat.JSONL: _records_jsonl, DataFormat.JSON: _records_json, DataFormat.CSV: _records_csv}


def _read_dataset_info(path: Path, name: str | None) -> list[Example]:
    info_path = path / "dataset_info.json" if path.is_dir() else path
    if not info_path.is_file():
        raise DataError(f"{info_path}: not found; a LLaMA-Factory dataset folder holds dataset_info.json")
    try:
        info = json.loads(read_text(info_path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{info_path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise DataError(f"{info_path}: expected an object of datasets ({{\"name\": {{\"file_name\": ...}}}})")
    if name is None:
        if len(info) != 1:
            raise DataError(f"{info_path}: holds {len(info)} datasets; set data.dataset to one of {sorted(info)}")
        name = next(iter(info))
    if name not in info:
        raise DataError(f"{info_path}: no dataset {name!r}; it has {sorted(info)}")
    entry = info[name]
    fname = entry.get("file_name")
    if not fname or not isinstance(fname, str):
        raise DataError(f"{info_path}: dataset {name!r} has no 'file_name' (only local files are supported)")
    cols = entry.get("columns") or {}
    if not isinstance(cols, dict):
        raise DataError(f"{info_path}: dataset {name!r}: 'columns' must be an object, got {type(cols).__name__}")
    rename = {cols.get("prompt", "instruction"): "instruction", cols.get("query", "input"): "input",
              cols.get("response", "output"): "output"}
    if cols.get("system"):
        rename[cols["system"]] = "system"
    raw_path = info_path.parent / fname
    if not raw_path.is_file():
        raise DataError(f"{info_path}: dataset {name!r} names file_name {fname!r}, but {raw_path} does not exist")
    fmt = {".jsonl": DataFormat.JSONL, ".json": DataFormat.JSON, ".csv": DataFormat.CSV}.get(raw_path.suffix)
    if fmt is None:
        raise DataError(f"{info_path}: dataset {name!r}: file {fname!r} is not .json, .jsonl or .csv")
    return [example_from_record({rename.get(k, k): v for k, v in rec.items()} if isinstance(rec, dict) and cols
                                else rec, where) for where, rec in _RECORDS[fmt](raw_path)]


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
    if fmt is DataFormat.DATASET_INFO:
        return _read_dataset_info(path, dataset)
    if path.is_dir():
        raise DataError(f"{path}: a folder; data.format={fmt.value} needs a file")
    return [example_from_record(rec, where) for where, rec in _RECORDS[fmt](path)]


def invalid_reason(e: Example, require_response: bool) -> str | None:
    """Why a row cannot be trained on (an empty prompt or response), or None."""
    if not e.prompt.strip():
        return "empty prompt"
    if require_response and not e.response.strip():
        return "empty response"
    return None


def load_examples(cfg: DataConfig, seed: int = 0, *, require_response: bool = True,
                  report: dict[str, Any] | None = None) -> list[Example]:
    """Read ``cfg.path``, drop or refuse invalid rows (``cfg.on_invalid``), shuffle (seeded) and cut to
    ``cfg.limit``; empty data is an error. ``report`` (a dict) receives the counts."""
    if not cfg.path:
        raise DataError("no data given; set data.path=/path/to/data.jsonl")
    examples = read_file(cfg.path, cfg.format, cfg.dataset)
    if not examples:
        raise DataError(f"{cfg.path}: the dataset is empty; it needs at least one example")
    bad = [(e, why) for e in examples if (why := invalid_reason(e, require_response))]
    if bad:
        listed = "; ".join(f"{e.where or '?'}: {why}" for e, why in bad[:5]) + (
            f"; ... {len(bad) - 5} more" if len(bad) > 5 else "")
        if len(bad) == len(examples):
            raise DataError(f"{cfg.path}: no row can be trained on ({listed})")
        if OnInvalid(cfg.on_invalid) is OnInvalid.ERROR:
            raise DataError(f"{cfg.path}: {len(bad)} of {len(examples)} rows cannot be trained on ({listed}). Fix "
                            "them, or pass data.on_invalid=skip to leave them out (the count is recorded).")
        log.warning("%s: skipped %d of %d rows that cannot be trained on (%s)", cfg.path, len(bad), len(examples),
                    listed)
        drop = {id(e) for e, _ in bad}
        examples = [e for e in examples if id(e) not in drop]
    if report is not None:
        report.update(rows_read=len(examples) + len(bad), rows_skipped=len(bad),
                      skipped=[f"{e.where}: {why}" for e, why in bad[:20]])
    if cfg.shuffle:
        random.Random(seed).shuffle(examples)
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    return examples


def check_examples(examples: Sequence[Example], template: Template, cfg: DataConfig,
                   report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Token lengths of the rendered rows against ``cfg.max_length``: how many will be cut, said once as a
    warning; returns (and merges into ``report``) the counts for the run record."""
    tok = template.tokenizer
    lengths = [len(template.encode_prompt(e.prompt, e.system)) + len(tok(e.response, add_special_tokens=False)[
        "input_ids"]) + 1 for e in examples]
    cut = [e for e, n in zip(examples, lengths) if n > cfg.max_length]
    out = dict(report or {})
    out.update(rows=len(examples), max_length=cfg.max_length, longest_tokens=max(lengths, default=0),
               rows_truncated=len(cut), truncated_share=round(len(cut) / max(1, len(examples)), 4))
    if cut:
        log.warning("%s: %d of %d rows (%.1f%%) are longer than data.max_length=%d tokens (longest %d; first: %s) "
                    "and are cut: the end of the user message, then of the response, keeping the chat header. "
                    "Raise data.max_length to keep them whole.", cfg.path, len(cut), len(examples),
                    100 * len(cut) / len(examples), cfg.max_length, max(lengths), cut[0].where or "?")
    return out


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
        if len(prompt_ids) > max_length - len(resp_ids):
            prompt_ids = fit_prompt(template, prompt, system, max_length - len(resp_ids))
    ids = prompt_ids + resp_ids
    return {"input_ids": ids, "labels": [IGNORE] * len(prompt_ids) + resp_ids,
            "attention_mask": [1] * len(ids), "prompt_len": len(prompt_ids)}


def fit_prompt(template: Template, prompt: str, system: str | None, budget: int) -> list[int]:
    """The encoded prompt within ``budget`` tokens, cut at the end of the user message so that the start
    token, the chat header and the assistant header stay (a template whose header alone exceeds the budget
    keeps its first ``budget`` tokens)."""
    tok = template.tokenizer
    ids = template.encode_prompt(prompt, system)
    if len(ids) <= budget:
        return ids
    overhead = len(template.encode_prompt("", system))
    content = tok(prompt, add_special_tokens=False)["input_ids"]
    k = min(len(content), budget - overhead)
    while k > 0:
        ids = template.encode_prompt(tok.decode(content[:k]), system)
        if len(ids) <= budget:
            return ids
        k -= max(1, len(ids) - budget)
    return template.encode_prompt("", system)[:budget]


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
