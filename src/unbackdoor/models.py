"""Loading suspect models safely, LoRA, adapters, and atomic saving.

Models handled here are suspect by definition: weights load from safetensors unless the user opts in to
pickle, and ``trust_remote_code`` stays off unless the user opts in.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import lora_targets
from .errors import UnbackdoorError
from .record import public_mode
from .schema import AdapterMode, Dtype, LoraConfig, ModelConfig

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelLoadError(UnbackdoorError, ValueError):
    pass


def resolve_dtype(dtype: Dtype | str) -> torch.dtype:
    dtype = Dtype(dtype)
    if dtype is Dtype.AUTO:
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {Dtype.FLOAT32: torch.float32, Dtype.BFLOAT16: torch.bfloat16, Dtype.FLOAT16: torch.float16}[dtype]


def _check_weights(path: Path, allow_pickle: bool, gguf_file: str | None) -> None:
    if not path.is_dir():
        return  # a hub id: from_pretrained(use_safetensors=True) enforces it
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise ModelLoadError(f"{path}: no GGUF file {gguf_file!r} in the folder; set model.gguf_file to one of "
                                 f"{sorted(p.name for p in path.glob('*.gguf')) or 'the .gguf files there'}")
        return
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a Hugging Face model folder (no config.json). Point model.path at the "
                             "folder that holds config.json and the weights.")
    safes = list(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and "weight" in p.name.lower()
               or p.name.startswith("pytorch_model")]
    if not safes and pickles and not allow_pickle:
        raise ModelLoadError(
            f"{path}: only pickle weights found ({', '.join(sorted(p.name for p in pickles))}). Pickle files can "
            "run arbitrary code when loaded, and a suspect model is untrusted. Convert them to safetensors, or, "
            "if you trust the file, pass model.allow_pickle=true.")
    if not safes and not pickles:
        raise ModelLoadError(f"{path}: no weights found (*.safetensors). Is this the right folder?")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    src = cfg.tokenizer or cfg.path
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.gguf_file and not cfg.tokenizer:
        kwargs["gguf_file"] = cfg.gguf_file
    p = Path(src)
    if p.is_dir() and not cfg.gguf_file and not any(
            (p / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")):
        raise ModelLoadError(f"{p}: no tokenizer files (tokenizer.json / tokenizer_config.json) in the model folder. "
                             "Save the tokenizer next to the model or set model.tokenizer=/path/to/tokenizer.")
    try:
        tok = AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{src}: could not load a tokenizer ({exc}). Set model.tokenizer to a folder with "
                             "tokenizer.json, or check model.path.") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(cfg: ModelConfig, *, device: torch.device | str | None = None) -> nn.Module:
    """Load a causal LM by local path or hub id, safetensors only unless ``cfg.allow_pickle``."""
    from transformers import AutoModelForCausalLM

    path = Path(cfg.path)
    _check_weights(path, cfg.allow_pickle, cfg.gguf_file)
    dtype = resolve_dtype(cfg.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    else:
        kwargs["use_safetensors"] = not cfg.allow_pickle or None
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{cfg.path}: could not load the model: {exc}") from None
    if cfg.gguf_file:
        model = dequantized_copy(model)
    if cfg.adapter:
        model = attach_adapter(model, cfg.adapter, cfg.adapter_mode)
    if device is not None:
        model.to(device)
    return model


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A model loaded from GGUF refuses `save_pretrained`; rebuild a plain model from its config + weights."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]
    if missing:
        raise ModelLoadError(f"GGUF conversion left weights unset: {missing[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain


def attach_adapter(model: nn.Module, adapter: str, mode: AdapterMode) -> nn.Module:
    from peft import PeftModel

    apath = Path(adapter)
    if apath.is_dir() and not (apath / "adapter_config.json").is_file():
        raise ModelLoadError(f"{apath}: not a PEFT adapter folder (no adapter_config.json).")
    if AdapterMode(mode) is AdapterMode.CONTINUE:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Add a fresh LoRA adapter (no-op when disabled or when the model already carries a trainable adapter)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if not cfg.enabled or isinstance(model, PeftModel):
        return model
    targets: Any = list(cfg.target_modules)
    if targets == ["auto"]:
        targets = lora_targets(model)
    if targets == ["all-linear"]:
        targets = "all-linear"
    fan_in_fan_out = getattr(model.config, "model_type", "") == "gpt2"
    ranks = lora_rank_pattern(model, cfg)
    alphas = {k: cfg.alpha * r / cfg.r for k, r in ranks.items()}
    pcfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out, rank_pattern=ranks,
                          alpha_pattern=alphas)
    return get_peft_model(model, pcfg)


def lora_rank_pattern(model: nn.Module, cfg: LoraConfig) -> dict[str, int]:
    """PEFT rank_pattern from ``cfg``: fused layers at r x projections (when ``fused_rank``), then the
    explicit ``rank_pattern`` entries. Alpha follows each rank, so alpha / r is the same everywhere."""
    from .arch import fused_linear_names

    ranks: dict[str, int] = {}
    if cfg.fused_rank:
        ranks.update({name: cfg.r * n for name, n in fused_linear_names(model).items()})
    ranks.update(cfg.rank_pattern)
    return ranks


def unwrap_for_save(model: nn.Module, merge: bool = True) -> nn.Module:
    from peft import PeftModel

    if isinstance(model, PeftModel) and merge:
        return model.merge_and_unload()
    return model


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def save_model_atomic(model: nn.Module, tokenizer, out_dir: str | Path, *, input_path: str | None = None,
                      merge: bool = True) -> Path:
    """Save model + tokenizer as safetensors into ``out_dir`` via a temp folder and a rename.

    Never writes into the input model's folder.
    """
    out_dir = Path(out_dir)
    if input_path and (_same_path(out_dir, Path(input_path)) or
                       (Path(input_path).exists() and Path(input_path).resolve() in out_dir.resolve().parents)):
        raise ModelLoadError(f"{out_dir}: the output folder is (inside) the input model folder {input_path}; "
                             "choose another output.dir so the input model stays untouched.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    public_mode(tmp, directory=True)
    try:
        to_save = unwrap_for_save(model, merge)
        to_save.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total
