"""Where the parts of a causal LM live: decoder layers, token embedding, final norm, LoRA targets.

One table keyed by ``config.model_type``; model types not in the table are matched by structure
against the known layouts, and anything else fails loudly with the supported list.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnbackdoorError


@dataclass(frozen=True)
class Layout:
    body: str          # attribute path from the causal-LM to the module holding layers/embedding/norm
    layers: str        # attribute of the body: nn.ModuleList of decoder layers
    embed: str         # attribute of the body: token embedding
    norm: str | None   # attribute of the body: final norm (None if the architecture has none)
    lora_targets: tuple[str, ...]


LLAMA = Layout("model", "layers", "embed_tokens", "norm",
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
GPT_NEOX = Layout("gpt_neox", "layers", "embed_in", "final_layer_norm",
                  ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"))
GPT2 = Layout("transformer", "h", "wte", "ln_f", ("c_attn", "c_proj", "c_fc"))

#: model_type -> layout. Llama-style covers the many families with `model.layers`.
LAYOUTS: dict[str, Layout] = {
    **{t: LLAMA for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "gemma", "gemma2",
                          "gemma3_text", "phi3", "olmo", "olmo2", "granite", "starcoder2", "smollm3", "cohere",
                          "stablelm")},
    "gpt_neox": GPT_NEOX,
    "gpt2": GPT2,
}


#: Linear layers that fuse several projections into one weight, and how many they fuse (GPT-NeoX/Falcon
#: ``query_key_value``, GPT-2 ``c_attn``, Phi-3 ``qkv_proj`` / ``gate_up_proj``, Baichuan ``W_pack``, MPT/Phi
#: ``Wqkv``). A rank-r LoRA on such a layer shares one r-dimensional input subspace between all of them.
FUSED_PROJECTIONS: dict[str, int] = {"query_key_value": 3, "c_attn": 3, "qkv_proj": 3, "W_pack": 3, "Wqkv": 3,
                                     "gate_up_proj": 2}


def fused_linear_names(model: nn.Module) -> dict[str, int]:
    """Leaf names of the model's fused linear layers (see :data:`FUSED_PROJECTIONS`) -> projections fused."""
    found = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in FUSED_PROJECTIONS and hasattr(module, "weight"):
            found[leaf] = FUSED_PROJECTIONS[leaf]
    return found


@dataclass
class Anatomy:
    layers: nn.ModuleList
    embed: nn.Module
    norm: nn.Module | None
    layout: Layout
    model_type: str

    @property
    def num_layers(self) -> int:
        return len(self.layers)


class UnsupportedArchitecture(UnbackdoorError, ValueError):
    pass


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def base_model(model: nn.Module) -> nn.Module:
    """Unwrap PEFT and distributed wrappers down to the transformers causal-LM."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            break
    return model


def _matches(model: nn.Module, layout: Layout) -> bool:
    try:
        body = _get(model, layout.body)
        return isinstance(getattr(body, layout.layers), nn.ModuleList) and isinstance(
            getattr(body, layout.embed), nn.Module)
    except AttributeError:
        return False


def layout_for(model: nn.Module) -> Layout:
    base = base_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    layout = LAYOUTS.get(model_type)
    if layout is not None and _matches(base, layout):
        return layout
    for candidate in (LLAMA, GPT_NEOX, GPT2):
        if _matches(base, candidate):
            return candidate
    raise UnsupportedArchitecture(
        f"unbackdoor does not know where the decoder layers of {type(base).__name__} "
        f"(model_type={model_type!r}) live. Supported layouts: Llama-style `model.layers` "
        f"({', '.join(t for t, l in LAYOUTS.items() if l is LLAMA)}), GPT-NeoX `gpt_neox.layers`, GPT-2 "
        "`transformer.h`. Add a Layout for it to unbackdoor.arch.LAYOUTS.")


def anatomy(model: nn.Module) -> Anatomy:
    """Decoder layers, token embedding and final norm of any supported causal LM (PEFT-wrapped or not)."""
    base = base_model(model)
    layout = layout_for(base)
    body = _get(base, layout.body)
    norm = getattr(body, layout.norm, None) if layout.norm else None
    return Anatomy(layers=getattr(body, layout.layers), embed=getattr(body, layout.embed), norm=norm,
                   layout=layout, model_type=getattr(base.config, "model_type", "?"))


def lora_targets(model: nn.Module) -> list[str]:
    """LoRA target module names for a model: from the table, else every linear layer of the blocks."""
    try:
        return list(layout_for(model).lora_targets)
    except UnsupportedArchitecture:
        return ["all-linear"]


# ----------------------------------------------------------------------------------- linear layers

def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def weight_out_in(m: nn.Module) -> torch.Tensor:
    """Weight viewed as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return m.weight.t() if type(m).__name__ == "Conv1D" else m.weight


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of the decoder blocks by ``layers.<i>.<name>`` (nn.Linear and GPT-2's Conv1D)."""
    return {f"layers.{i}.{n}": m for i, layer in enumerate(anatomy(model).layers)
            for n, m in layer.named_modules() if _is_linear(m)}
