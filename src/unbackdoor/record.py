"""Run records and atomic file output.

Every run writes, beside its outputs, the resolved config and ``run.json``: versions, git hash,
chat-template hash, seeds, start/end time — so that every number can be traced and re-run.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .config import to_dict

log = logging.getLogger(__name__)

PACKAGES = ("unbackdoor", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers")


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


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    run = out_dir / "run.json"
    if run.is_file():
        finished = json.loads(run.read_text()).get("finished")
        if finished and not overwrite:
            raise FileExistsError(f"{out_dir}: a finished run is already there ({finished}). Pass "
                                  "output.overwrite=true to replace it, or choose another output.dir.")
        if not finished:
            log.info("%s: an unfinished run is there; starting it again", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


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
