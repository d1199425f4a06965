"""Run records and atomic file output.

Every run writes, beside its outputs, the resolved config and ``run.json``: versions, git hash,
chat-template hash, seeds, start/end time — so that every number can be traced and re-run.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import to_dict
from .errors import UnbackdoorError

log = logging.getLogger(__name__)

PACKAGES = ("unbackdoor", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers")



@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock on ``path`` (created), released on every exit path: one process at a time
    builds a shared artefact (a lab model, a cached scan) while the others wait, then reuse it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: str | Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual umask-based mode."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    public_mode(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_hash() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if res.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return res.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """Collects what a run needs to be reproduced; ``write()`` puts config.yaml and run.json in ``out_dir``."""

    def __init__(self, out_dir: str | Path, command: str, config: Any = None, seeds: dict[str, int] | None = None):
        self.out_dir = Path(out_dir)
        self.data: dict[str, Any] = {
            "command": command, "argv": sys.argv, "started": now(), "finished": None,
            "versions": versions(), "git": git_hash(), "seeds": seeds or {}, "template": None,
            "device": _device(),
        }
        self.config = config

    def set_template(self, template) -> None:
        self.data["template"] = {"name": template.name, "sha256_16": template.fingerprint()}

    def update(self, **kv: Any) -> None:
        self.data.update(kv)

    def write(self, finished: bool = False) -> None:
        if finished:
            self.data["finished"] = now()
        if not is_main_process():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.config is not None:
            atomic_write_text(self.out_dir / "config.yaml",
                              yaml.safe_dump(to_dict(self.config), sort_keys=False, allow_unicode=True))
        atomic_write_json(self.out_dir / "run.json", self.data)


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # pragma: no cover
        pass
    return f"cpu ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------------- output folders

class OutputError(UnbackdoorError, ValueError):
    """An output folder that cannot be used: it is (part of) an input, holds something else, or is not writable."""


class OutputExists(OutputError, FileExistsError):
    """The output folder holds a run already (replaced only with overwrite)."""


RESUME_FILE = "resume.json"


def config_key(config: Any, ignore: Sequence[str] = ()) -> tuple[str, dict]:
    """A stable hash of a resolved config (a dataclass tree or mapping) and the flat ``{dotted.key: value}``
    it was computed from; dotted keys (or prefixes) in ``ignore`` do not count."""
    import hashlib

    flat = {k: v for k, v in _flatten(to_dict(config)).items()
            if not any(k == i or k.startswith(i + ".") for i in ignore)}
    blob = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], flat


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``train.lr 0.0002 -> 0.0001; eval.limit 48 -> 8`` for the keys whose values differ."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    parts = [f"{k} {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"... {len(keys) - limit} more")
    return "; ".join(parts) or "nothing"


def _resolved(path: str | Path) -> Path | None:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return None


def input_paths(cfg: Any) -> dict[str, str]:
    """Every config field (outside ``output``) whose value names an existing file or folder: the run's inputs,
    which its output folder may not be, contain or be inside."""
    out = {}
    for key, value in _flatten(to_dict(cfg)).items():
        if key.startswith("output.") or key == "out" or not isinstance(value, str) or not value or len(value) > 4096:
            continue
        try:
            if Path(value).expanduser().exists():
                out[key] = value
        except (OSError, ValueError):
            continue
    return out


def check_not_input(out_dir: str | Path, inputs: dict[str, str | None]) -> None:
    """Refuse an output folder that is, contains or is inside an input (``{field: path}``; paths that are not
    local folders or files, e.g. hub ids, are skipped)."""
    out = _resolved(out_dir)
    if out is None:
        return
    for fld, path in inputs.items():
        if not path or not Path(path).expanduser().exists():
            continue
        src = _resolved(path)
        if src is None:
            continue
        if out == src:
            how = "is"
        elif src in out.parents:
            how = "is inside"
        elif out in src.parents:
            how = "contains"
        else:
            continue
        raise OutputError(f"output folder {out_dir} {how} the input {fld}={path}. Writing there would change the "
                          "input; choose an output folder outside it (e.g. a new sibling folder).")


def read_run_json(path: Path) -> dict[str, Any]:
    """A ``run.json``, or an :class:`OutputError` naming the file when it is damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OutputError(f"{path}: not a readable run record ({exc}). The folder holds a damaged run; pass "
                          "output.overwrite=true (--overwrite) to replace it, or choose another output "
                          "folder.") from None
    if not isinstance(data, dict):
        raise OutputError(f"{path}: not a run record (a JSON object expected, got {type(data).__name__}); pass "
                          "output.overwrite=true (--overwrite) to replace it, or choose another output folder.")
    return data


def _dist():
    try:
        import torch.distributed as dist

        return dist if dist.is_available() and dist.is_initialized() else None
    except Exception:  # pragma: no cover
        return None


def is_main_process() -> bool:
    """Rank 0 of a distributed run (``accelerate launch``/``torchrun`` set RANK), or the only process: the
    one that writes outputs and records."""
    dist = _dist()
    if dist is not None:
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def barrier() -> None:
    """Wait for every process of a distributed run (no-op otherwise)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()





class OutputFolder:
    """A run's output folder, written as a whole.

    The run works in a sibling staging folder ``.NAME.partial`` (its checkpoints included); :meth:`commit`
    puts it in place of ``NAME`` only once every output and the run record are written. So the output folder
    only ever holds a finished run: an early failure leaves nothing behind, and a failed overwrite (a crash,
    a full disk) leaves the previous run's model and records exactly as they were.

    :meth:`open` checks everything before any work starts: the folder is not, does not contain and is not
    inside an input; an existing folder is a finished run (replaced only with ``overwrite``) or empty; the
    parent is writable. A staging folder left by an interrupted run is resumed when it was started with the
    same config (``key``), refused with what differs otherwise (``overwrite`` discards it).
    """

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False, inputs: dict[str, str | None] | None = None,
                 config: Any = None, ignore: Sequence[str] = (), flag: str = "output.overwrite=true"):
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        self.inputs = inputs or {}
        self.flag = flag
        self.key, self.flat = config_key(config, ignore) if config is not None else (None, {})
        if not self.out_dir.name or self.out_dir.name in (".", ".."):
            raise OutputError(f"output folder {str(self.out_dir)!r}: name a folder of its own (e.g. runs/crow), "
                              "not the current or parent folder")
        self.staging = self.out_dir.with_name(f".{self.out_dir.name}.partial")
        self.resumed = False

    def open(self) -> Path:
        out = self.out_dir
        check_not_input(out, self.inputs)
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: exists and is a file, not a folder; choose another output folder")
        main = is_main_process()
        if out.is_dir():
            run = out / "run.json"
            if run.is_file():
                if not self.overwrite:
                    finished = read_run_json(run).get("finished")
                    what = f"a finished run ({finished})" if finished else "an earlier run"
                    raise OutputExists(f"{out}: {what} is already there. Pass {self.flag} to replace it, or "
                                      "choose another output folder.")
            elif any(out.iterdir()):
                raise OutputError(f"{out}: exists, is not empty and holds no run of unbackdoor (no run.json); "
                                  "an output folder is replaced as a whole, so choose a new or empty folder.")
        if self.staging.is_dir():
            self._resume_or_discard(mutate=main)
        if main:   # in a distributed run rank 0 prepares the folder; the others wait for it, then read only
            try:
                self.staging.mkdir(parents=True, exist_ok=True)
                public_mode(self.staging, directory=True)
                if self.key is not None:
                    atomic_write_json(self.staging / RESUME_FILE, {"key": self.key, "config": self.flat})
            except OSError as exc:
                raise OutputError(f"{out}: cannot write the output there ({exc.strerror or exc}). Choose a "
                                  "writable output folder.") from None
        barrier()
        return self.staging

    def _resume_or_discard(self, mutate: bool = True) -> None:
        marker = self.staging / RESUME_FILE
        old = None
        if marker.is_file():
            try:
                old = json.loads(marker.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = None
        if old is not None and self.key is not None and old.get("key") == self.key:
            self.resumed = True
            log.info("%s: resuming the interrupted run in %s", self.out_dir, self.staging)
            return
        if old is not None and self.key is not None and not self.overwrite and _holds_progress(self.staging):
            raise OutputError(
                f"{self.out_dir}: an interrupted run in {self.staging} was started with another config "
                f"({config_diff(old.get('config') or {}, self.flat)}). Rerun with the same settings to resume it, "
                f"or pass {self.flag} to discard it and start again.")
        if mutate:
            shutil.rmtree(self.staging, ignore_errors=True)

    def commit(self) -> Path:
        """Replace the output folder by the finished staging folder (the previous one is removed only after)."""
        if not is_main_process():
            return self.out_dir
        for leftover in (self.staging / RESUME_FILE, self.staging / "checkpoint"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.exists():
                leftover.unlink()
        out = self.out_dir
        try:
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                try:
                    os.replace(self.staging, out)
                except OSError:
                    os.replace(old, out)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.staging, out)
        except OSError as exc:
            raise OutputError(f"{out}: could not put the finished run in place ({exc.strerror or exc}); it is "
                              f"complete in {self.staging}, and {out} is as it was.") from None
        return out

    def abandon(self) -> None:
        """After a failure: drop the staging folder unless it holds resumable progress (a checkpoint)."""
        if is_main_process() and self.staging.is_dir() and not _holds_progress(self.staging):
            shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abandon()
        return False


def _holds_progress(folder: Path) -> bool:
    return (folder / "checkpoint" / "state.json").is_file()
