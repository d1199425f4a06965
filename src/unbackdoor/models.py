"""Loading suspect models safely, LoRA, adapters, and atomic saving.

Models handled here are suspect by definition: weights load from safetensors unless the user opts in to
pickle, and ``trust_remote_code`` stays off unless the user opts in.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import lora_targets
from .errors import UnbackdoorError
from .record import public_mode
from .schema import QLORA_NEEDS_LORA, AdapterMode, Dtype, LoraConfig, ModelConfig

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


def looks_local(path: str) -> bool:
    """Whether ``path`` can only mean a local file or folder (a hub id is ``name`` or ``owner/name``)."""
    p = str(path)
    return (p.startswith((".", "/", "~")) or "\\" in p or p.count("/") > 1 or Path(p).suffix in PICKLE_SUFFIXES
            or p.endswith((".gguf", ".safetensors", ".json")))


def _check_weights(path: Path, allow_pickle: bool, gguf_file: str | None, field: str = "model.path") -> None:
    if not path.exists():
        if looks_local(str(path)):
            raise ModelLoadError(f"{field}={path}: no such file or folder. Point {field} at a Hugging Face model "
                                 "folder (the one with config.json) or give a hub id such as owner/name.")
        return  # a hub id: from_pretrained(use_safetensors=True) enforces it
    if not path.is_dir():
        raise ModelLoadError(f"{field}={path}: a file, not a model folder. Point {field} at the folder that holds "
                             "config.json and the weights" + (" (and set model.gguf_file to the file's name)"
                                                               if path.suffix == ".gguf" else "") + ".")
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise ModelLoadError(f"{path}: no GGUF file {gguf_file!r} in the folder; set model.gguf_file to one of "
                                 f"{sorted(p.name for p in path.glob('*.gguf')) or 'the .gguf files there'}")
        return
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a Hugging Face model folder (no config.json). Point {field} at the "
                             "folder that holds config.json and the weights.")
    safes = list(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES]
    if not safes and pickles and not allow_pickle:
        raise ModelLoadError(
            f"{path}: only pickle weights found ({', '.join(sorted(p.name for p in pickles))}). Pickle files can "
            "run arbitrary code when loaded, and a suspect model is untrusted. Convert them to safetensors, or, "
            "if you trust the file, pass model.allow_pickle=true.")
    if not safes and not pickles:
        raise ModelLoadError(f"{path}: no weights found (*.safetensors, or pickle *.bin/*.pt with "
                             "model.allow_pickle=true). Is this the right folder?")


def _load_error(what: str, exc: BaseException) -> ModelLoadError:
    """A loading failure of transformers/torch as one paragraph that says what to set."""
    text = str(exc)
    if "trust_remote_code" in text or "custom code" in text:
        return ModelLoadError(f"{what}: the checkpoint ships its own modelling code, which would run on this "
                              "machine. unbackdoor does not run it by default; if you trust the model, set "
                              "model.trust_remote_code=true.")
    if not Path(what).exists():
        return ModelLoadError(f"{what}: not a local folder, and not loadable as a hub id ({text.splitlines()[0]}). "
                              "Check model.path (a folder with config.json, or owner/name of a hub model).")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ModelLoadError(f"{what}: could not load the model ({first}). Check model.path and model.dtype.")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    src = cfg.tokenizer or cfg.path
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.gguf_file and not cfg.tokenizer:
        kwargs["gguf_file"] = cfg.gguf_file
    p = Path(src)
    key = "model.tokenizer" if cfg.tokenizer else "model.path"
    if p.is_file():
        raise ModelLoadError(f"{key}={src}: a file, not a model folder. Point {key} at the folder that holds the "
                             "tokenizer files" + (" (and set model.gguf_file to the file's name)"
                                                  if p.suffix == ".gguf" else "") + ".")
    if p.is_dir() and cfg.gguf_file and not cfg.tokenizer and not (p / cfg.gguf_file).is_file():
        _check_weights(p, cfg.allow_pickle, cfg.gguf_file)
    if p.is_dir() and not cfg.gguf_file and not any(
            (p / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")):
        raise ModelLoadError(f"{p}: no tokenizer files (tokenizer.json / tokenizer_config.json) in the model folder. "
                             "Save the tokenizer next to the model or set model.tokenizer=/path/to/tokenizer.")
    if not p.exists() and looks_local(str(src)):
        raise ModelLoadError(f"{key}={src}: no such file or folder. Point it at a model folder with tokenizer "
                             "files, or give a hub id such as owner/name.")
    try:
        tok = AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        if "trust_remote_code" in str(exc):
            raise _load_error(str(src), exc) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{src}: could not load a tokenizer ({first}). Set model.tokenizer to a folder with "
                             "tokenizer.json, or check model.path.") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def inference_device(cfg: ModelConfig | None = None) -> torch.device:
    """The device a model runs on outside training (``model.device``): 'auto' is this process's GPU
    (``cuda:LOCAL_RANK``, the one Accelerate trains on) when CUDA is available, else the CPU."""
    name = cfg.device if cfg is not None else "auto"
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


@contextmanager
def _whole_weights():
    """Under a DeepSpeed ZeRO-3 launch transformers would load the model already partitioned (``zero.Init``):
    every weight an empty placeholder outside the engine. The methods here read and call the model outside the
    engine (SANDE's and BEEAR's embeddings, the checks, generation), so it loads whole and the engine partitions
    it when fit() prepares it (and fit() gathers it back after)."""
    try:
        from accelerate.state import AcceleratorState

        plugin = AcceleratorState().deepspeed_plugin if AcceleratorState._shared_state else None
    except Exception:   # no Accelerate state yet, or none of DeepSpeed
        plugin = None
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()   # what transformers reads to choose zero.Init
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def load_model(cfg: ModelConfig, *, device: torch.device | str | None = None) -> nn.Module:
    """Load a causal LM by local path or hub id, safetensors only unless ``cfg.allow_pickle``.

    ``device``: where to put it (``"auto"``: :func:`inference_device`); None keeps it where it loads (the CPU),
    for training, where Accelerate places it. ``model.device_map`` (inference of large models) overrides."""
    from transformers import AutoModelForCausalLM

    path = Path(cfg.path)
    _check_weights(path, cfg.allow_pickle, cfg.gguf_file)
    dtype = resolve_dtype(cfg.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.device_map and device is not None and not cfg.gguf_file:
        kwargs["device_map"] = cfg.device_map
    if cfg.quantization:
        kwargs["quantization_config"] = _bnb_config(cfg.quantization, dtype)
        if not cfg.device_map or device is None:
            # quantized weights are placed at load (they do not move with .to()): where they run, also to train
            kwargs["device_map"] = {"": str(inference_device(cfg))}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    else:
        kwargs["use_safetensors"] = not cfg.allow_pickle or None
    try:
        with _whole_weights():
            model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    except pickle.UnpicklingError:
        raise ModelLoadError(
            f"{cfg.path}: torch's safe loader (weights_only) refused the pickle weights: "
            "they hold objects other than tensors, which is how a malicious pickle runs code. unbackdoor will not "
            "load them even with model.allow_pickle=true; convert the weights to safetensors with a tool you "
            "trust.") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise _load_error(str(cfg.path), exc) from None
    if cfg.gguf_file:
        model = dequantized_copy(model)
    if cfg.quantization:
        _quantized_fixups(model, cfg)
    if cfg.adapter:
        model = attach_adapter(model, cfg.adapter, cfg.adapter_mode)
    if device is not None and not (cfg.device_map and not cfg.gguf_file) and not cfg.quantization:
        model.to(inference_device(cfg) if str(device) == "auto" else device)
    return model


def _bnb_config(kind: str, dtype: torch.dtype):
    """The bitsandbytes config of ``model.quantization``: 4-bit as QLoRA loads it (double quantization,
    computing in the model's dtype), or LLM.int8()."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"model.quantization={kind} needs the bitsandbytes package: pip install "
                             "'unbackdoor[qlora]' (or drop model.quantization)") from None
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _quantized_fixups(model: nn.Module, cfg: ModelConfig) -> None:
    """Remember the full-precision source (saving merges the adapter into it, :func:`unwrap_for_save`), and
    keep bitsandbytes' repacked CPU inference kernel off layers it cannot repack: it needs the input width to be
    a multiple of the quantization block (measured, bitsandbytes 0.50: a 96-wide layer fails to reshape)."""
    import dataclasses

    import bitsandbytes as bnb

    # an adapter that training continues is the trained one (merged at save), not part of the source
    merged = cfg.adapter if AdapterMode(cfg.adapter_mode) is AdapterMode.MERGE else None
    model._unbackdoor_full_precision = dataclasses.replace(cfg, quantization=None, device="cpu", device_map=None,
                                                           adapter=merged)
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            state = getattr(mod.weight, "quant_state", None)
            if state is None or mod.in_features % int(getattr(state, "blocksize", 64) or 64):
                mod.support_avx512bf16_for_cpu = False


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (or the base of a PEFT model) was loaded with ``model.quantization``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "_unbackdoor_full_precision", None) is not None


def prepare_quantized(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """A quantized model made ready for LoRA training (PEFT's k-bit preparation: frozen weights, norms and
    the rest of the non-quantized parameters in fp32, input embeddings that carry gradients)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def merged_full_precision(model: nn.Module) -> nn.Module:
    """The trained LoRA adapter of a PEFT model on quantized weights, merged into the full-precision model it
    was quantized from (loaded again, on the CPU): merging into 4-bit weights would round the update away."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    source = model.get_base_model()._unbackdoor_full_precision
    plain = load_model(source)
    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
    fresh = get_peft_model(plain, model.peft_config[name])
    trained = get_peft_model_state_dict(model, adapter_name=name)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in trained.items()}
    result = set_peft_model_state_dict(fresh, state)
    if getattr(result, "unexpected_keys", None):
        raise ModelLoadError(f"merging the adapter into {source.path}: keys that fit no layer of the full-precision "
                             f"model: {result.unexpected_keys[:3]}")
    return fresh.merge_and_unload()


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
    if not apath.exists() and looks_local(adapter):
        raise ModelLoadError(f"model.adapter={adapter}: no such folder. Point it at a PEFT adapter folder "
                             "(with adapter_config.json).")
    if apath.is_dir() and not (apath / "adapter_config.json").is_file():
        raise ModelLoadError(f"{apath}: not a PEFT adapter folder (no adapter_config.json).")
    try:
        if AdapterMode(mode) is AdapterMode.CONTINUE:
            return PeftModel.from_pretrained(model, adapter, is_trainable=True)
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        text = str(exc)
        shape = next((line.strip() for line in text.splitlines() if "size mismatch" in line), None)
        detail = shape or (text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
        base = getattr(model.config, "_name_or_path", "")
        raise ModelLoadError(
            f"model.adapter={adapter}: the adapter does not fit the base model {base!r} "
            f"({detail}). Load it on the base model it was trained from (model.path), or drop model.adapter.") from None


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


def make_trainable(model: nn.Module, cfg: LoraConfig, gradient_checkpointing: bool = False) -> nn.Module:
    """A fresh LoRA adapter on ``model`` (``cfg.enabled``; on quantized weights after PEFT's k-bit
    preparation), else every weight unfrozen."""
    if cfg.enabled:
        if is_quantized(model) and not hasattr(model, "peft_config"):
            model = prepare_quantized(model, gradient_checkpointing)
        return apply_lora(model, cfg)
    if is_quantized(model):
        raise ModelLoadError(f"lora.enabled=false with model.quantization: {QLORA_NEEDS_LORA}")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


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
        return merged_full_precision(model) if is_quantized(model) else model.merge_and_unload()
    if is_quantized(model) and not isinstance(model, PeftModel):
        raise ModelLoadError("a model loaded with model.quantization is saved only as its trained LoRA adapter merged "
                             "into the full-precision weights; this one carries no adapter (set lora.enabled=true)")
    return model


def save_model(model: nn.Module, tokenizer, folder: str | Path, *, merge: bool = True) -> Path:
    """Save model + tokenizer as safetensors into ``folder`` (a folder of the run's staging area); a write
    that fails (a full disk, a read-only folder) becomes one :class:`ModelLoadError` naming the folder."""
    from .record import is_main_process

    folder = Path(folder)
    if not is_main_process():   # one writer in a distributed run: rank 0 (DDP replicas hold the same weights)
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        to_save = unwrap_for_save(model, merge)
        to_save.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    except Exception as exc:  # OSError, or safetensors' SafetensorError (a plain Exception) on a full disk
        if not isinstance(exc, OSError) and type(exc).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(f"{folder}: could not write the model ({str(exc).strip() or type(exc).__name__}). "
                             "Free disk space or choose another output folder; nothing of an earlier run there "
                             "was replaced.") from None
    return folder


def save_model_atomic(model: nn.Module, tokenizer, out_dir: str | Path, *, input_path: str | None = None,
                      merge: bool = True) -> Path:
    """Save model + tokenizer as safetensors into ``out_dir`` via a temp folder and a rename.

    Never writes into the input model's folder.
    """
    from .record import check_not_input

    out_dir = Path(out_dir)
    if input_path:
        check_not_input(out_dir, {"model.path": input_path})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    public_mode(tmp, directory=True)
    try:
        save_model(model, tokenizer, tmp, merge=merge)
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
