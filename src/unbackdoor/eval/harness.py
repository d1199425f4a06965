"""Score a model folder on EleutherAI lm-evaluation-harness tasks (the optional ``lm-eval`` extra).

:func:`run_harness` loads the model the way the rest of the toolkit does (safetensors only,
``trust_remote_code`` off unless asked), wraps it in lm-eval's ``HFLM`` and runs ``simple_evaluate``.
It writes two files into ``out_dir``, beside the toolkit's own ``results.json``:

- ``harness.json``: per task metrics (with stderr where lm-eval gives one), samples scored, few-shot count,
  task version, and the run settings (tasks, limit, seed, model path, lm-eval and library versions);
- ``harness_samples.jsonl``: one row per scored document: the document, the requests sent to the model,
  its answers (log-likelihoods for multiple-choice tasks, generations for generative ones), the per-item
  metric values and ``correct``.

Tasks are looked up in the tasks shipped with this package (``harness_tasks/``, e.g. ``unbackdoor_mc``),
in ``include_path`` and, only when a name is not found there, in lm-eval's built-in task list.
"""
from __future__ import annotations

import difflib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import UnbackdoorError
from ..record import atomic_write_json, atomic_write_text, git_hash, now, versions

log = logging.getLogger(__name__)

#: Folder of the lm-eval tasks shipped with the package.
TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"
SUMMARY_FILE, SAMPLES_FILE = "harness.json", "harness_samples.jsonl"
INSTALL_HINT = "pip install 'unbackdoor[lm-eval]'"


class HarnessError(UnbackdoorError, ValueError):
    """A problem running lm-evaluation-harness: unknown task, bad folder, results already present."""


class LmEvalMissing(HarnessError):
    """lm-evaluation-harness (the ``lm_eval`` package) is not installed."""


# ----------------------------------------------------------------------------------- lm-eval import

def import_lm_eval():
    """The ``lm_eval`` module, or :class:`LmEvalMissing` saying how to install it."""
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401  (fails early on a broken install)
    except ImportError as exc:
        raise LmEvalMissing(f"lm-evaluation-harness is not installed ({exc}). Install it with: {INSTALL_HINT}") \
            from exc
    return lm_eval


def lm_eval_version() -> str:
    """The installed lm-eval version string."""
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:  # pragma: no cover - imported but without metadata
        return "unknown"


# ----------------------------------------------------------------------------------- tasks

def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from a comma-separated string or a sequence; blanks dropped, order and duplicates kept once."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for t in items if t and t.strip()]
    if not names:
        raise HarnessError("no task given; pass task names, e.g. tasks=['unbackdoor_mc'] (--tasks unbackdoor_mc)")
    return list(dict.fromkeys(names))


def _include_paths(include_path: str | Path | Sequence[str | Path] | None) -> list[str]:
    """The shipped task folder followed by the user's folders, each checked to exist."""
    extra = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, Path)) else list(include_path))
    for p in extra:
        if not Path(p).is_dir():
            raise HarnessError(f"{p}: include_path is not a folder of lm-eval task YAMLs")
    return [str(TASKS_DIR)] + [str(Path(p).resolve()) for p in extra]


def _missing(names: Iterable[str], known: set[str]) -> list[str]:
    """Names that are neither registered in ``known`` nor a path to a task YAML file."""
    return [n for n in names if n not in known and not (n.endswith((".yaml", ".yml")) and Path(n).is_file())]


def _unknown_task_message(missing: list[str], all_names: Sequence[str], local: Sequence[str]) -> str:
    parts = []
    for name in missing:
        close = difflib.get_close_matches(name, all_names, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "no close name"
        parts.append(f"{name!r} ({hint})")
    return (f"unknown lm-eval task {'; '.join(parts)}. Tasks shipped here or in include_path: "
            f"{', '.join(sorted(local)) or 'none'}; `lm-eval ls tasks` lists the built-in ones.")


def task_manager(names: Sequence[str], include_path: str | Path | Sequence[str | Path] | None = None):
    """An lm-eval ``TaskManager`` that knows every name in ``names``, else :class:`HarnessError`.

    The local folders are indexed first; lm-eval's built-in tasks (thousands of YAMLs, slow to index) are
    added only when a name is not found locally.
    """
    from lm_eval.tasks import TaskManager

    paths = _include_paths(include_path)
    local = TaskManager(include_path=paths, include_defaults=False)
    if not _missing(names, set(local.all_tasks)):
        return local
    full = TaskManager(include_path=paths, include_defaults=True)
    missing = _missing(names, set(full.all_tasks))
    if missing:
        raise HarnessError(_unknown_task_message(missing, full.all_tasks, local.all_tasks))
    return full


# ----------------------------------------------------------------------------------- model

def _check_model_dir(model_dir: str | Path) -> Path:
    from ..models import ModelLoadError

    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such model folder (expected a Hugging Face folder with config.json "
                             "and *.safetensors)")
    return path


def wrap_model(model_dir: Path, *, batch_size: int, device: str, trust_remote_code: bool):
    """Load ``model_dir`` with the toolkit's safe loader and wrap it as an lm-eval ``HFLM``."""
    from lm_eval.models.huggingface import HFLM

    from ..models import load_model, load_tokenizer
    from ..schema import ModelConfig

    cfg = ModelConfig(path=str(model_dir), trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, device=device)
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, trust_remote_code=trust_remote_code)


# ----------------------------------------------------------------------------------- results

def _metric_label(metric: str, filt: str) -> str:
    """The metric's name, with its filter appended (``metric,filter``) unless the filter is ``none``."""
    return metric if filt == "none" else f"{metric},{filt}"


def task_metrics(entry: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metric values and their stderrs from one entry of lm-eval's ``results`` (keys ``metric,filter`` and
    ``metric_stderr,filter``)."""
    values: dict[str, Any] = {}
    stderrs: dict[str, Any] = {}
    for key, value in entry.items():
        if "," not in key:
            continue  # alias, name, sample_len
        metric, _, filt = key.partition(",")
        if metric.endswith("_stderr"):
            stderrs[_metric_label(metric[:-len("_stderr")], filt)] = value
        else:
            values[_metric_label(metric, filt)] = value
    return values, stderrs


def summarize(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task (and group) metrics, stderrs, samples scored and few-shot count from ``simple_evaluate``'s
    output."""
    out: dict[str, dict[str, Any]] = {}
    for task, entry in res.get("results", {}).items():
        values, stderrs = task_metrics(entry)
        counts = res.get("n-samples", {}).get(task, {})
        out[task] = {
            "metrics": values, "stderr": stderrs,
            "n": counts.get("effective", entry.get("sample_len")), "n_total": counts.get("original"),
            "num_fewshot": res.get("n-shot", {}).get(task), "version": res.get("versions", {}).get(task),
            "higher_is_better": res.get("higher_is_better", {}).get(task),
        }
    return out


def _correct(sample: dict[str, Any]) -> bool | None:
    """Whether the item was answered right: its ``acc`` (multiple choice) or ``exact_match`` (generation)."""
    for metric in ("acc", "exact_match"):
        value = sample.get(metric)
        if isinstance(value, (bool, int, float)) and value in (0, 1):
            return bool(value)
    return None


def sample_rows(samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One flat row per scored document, tagged with its task and ``correct``."""
    rows = []
    for task, items in samples.items():
        for item in items:
            rows.append({"task": task, **item, "correct": _correct(item)})
    return rows


def _write_samples(path: Path, rows: list[dict[str, Any]]) -> None:
    lines = [json.dumps(r, ensure_ascii=False, default=str) for r in rows]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


# ----------------------------------------------------------------------------------- driver

def run_harness(model_dir: str | Path, tasks: str | Sequence[str], out_dir: str | Path, *,
                include_path: str | Path | Sequence[str | Path] | None = None, limit: int | float | None = None,
                batch_size: int = 8, num_fewshot: int | None = None, device: str = "cpu",
                trust_remote_code: bool = False, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Score ``model_dir`` on lm-eval ``tasks``; write ``harness.json`` and ``harness_samples.jsonl``.

    ``limit`` (lm-eval's meaning: first N documents per task, or a fraction when below 1) and
    ``num_fewshot`` (None: each task's own default) are recorded. ``seed`` seeds Python, NumPy, torch and
    the few-shot sampler. Returns the summary written to ``harness.json``.
    """
    model_path = _check_model_dir(model_dir)
    names = parse_tasks(tasks)
    out = Path(out_dir)
    from ..record import check_not_input

    check_not_input(out, {"MODEL_DIR": str(model_dir)})   # harness files go beside an eval's, never into a model
    if (out / SUMMARY_FILE).is_file() and not overwrite:
        raise HarnessError(f"{out}: {SUMMARY_FILE} is already there; pass overwrite=True (--overwrite) to replace it")
    lm_eval = import_lm_eval()
    manager = task_manager(names, include_path)
    lm = wrap_model(model_path, batch_size=batch_size, device=device, trust_remote_code=trust_remote_code)

    started, t0 = now(), time.time()
    res = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
        device=device, log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed)
    if res is None:  # pragma: no cover - only on non-zero ranks of a distributed run
        raise HarnessError("lm-eval returned no results (not the main process)")

    rows = sample_rows(res.get("samples", {}))
    summary = {
        "model": str(model_path.resolve()), "tasks": names, "limit": limit, "num_fewshot": num_fewshot,
        "batch_size": batch_size, "device": device, "seed": seed, "trust_remote_code": trust_remote_code,
        "include_path": _include_paths(include_path), "lm_eval_version": lm_eval_version(),
        "results": summarize(res), "n_samples": len(rows), "samples_file": SAMPLES_FILE,
        "started": started, "finished": now(), "wall_time_s": round(time.time() - t0, 3),
        "versions": versions(), "git": git_hash(),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_samples(out / SAMPLES_FILE, rows)
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def metric_rows(summary: dict[str, Any]) -> list[tuple[str, str, Any, Any, Any]]:
    """``(task, metric, value, stderr, n)`` for every metric in a :func:`run_harness` summary."""
    rows = []
    for task, entry in summary.get("results", {}).items():
        for metric, value in entry["metrics"].items():
            rows.append((task, metric, value, entry["stderr"].get(metric), entry.get("n")))
    return rows
