"""``unbackdoor plan``: the peak memory a defense will need, per phase, before any weight is loaded.

The estimate is built from the model's own ``config.json`` and the defend config, not from constants:

- **weights**: every parameter of the architecture (instantiated on the meta device, so a 70B costs
  nothing), frozen ones in the load dtype, trainable ones in fp32 (LoRA adapters are fp32; a half-precision
  model fully fine-tuned is trained in fp32, :func:`unbackdoor.train.upcast_half_trainables`);
- **gradients and optimizer state**: 4 bytes per trainable parameter, and 8 more for Adam's two moments;
- **activations**: the bytes autograd saves for backward in one forward of a micro-batch of
  ``train.batch_size`` rows of ``data.max_length`` tokens, counted by running that forward on the meta device
  under :func:`torch.autograd.graph.saved_tensors_hooks` with the phase's trainable set (LoRA, full, or a
  frozen model with a trainable input as SANDE's parrot and BEEAR's δ), in the compute dtype, with the
  attention of a fused kernel (SDPA's flash or memory-efficient path: q, k, v, output and log-sum-exp are
  kept, not the seq x seq probabilities; ``attn_implementation: eager`` keeps those too and needs more). With
  ``train.gradient_checkpointing`` only each layer's input is kept, plus one layer's saved tensors while it is
  recomputed — in the phases that train the model; SANDE's phase 1 and BEEAR's inner phase run the frozen
  model in eval mode, where transformers does not recompute. Each method multiplies this by the forwards
  whose graphs are alive at its backward (CROW 2: the clean pass, retained, and the adversarial one, which
  keeps one position's logits; BEEAR's inner and outer steps 2; SANDE's phase 2 2 with clean replay), and
  BEEAR's inner phase runs only the layers from the anchor up (their inputs are cached);
- **transient**: backward's working set at its start — two tensors the size of the largest saved one (the
  gradients of the log-softmax's output and input: the logits).

It is a per-process estimate: replicated training (DDP) by default; with ``train.fsdp`` and ``--processes N``
the weights, gradients and optimizer state of the phases that train the model divide by N, plus two decoder
layers gathered whole at a time. It does not count the CUDA context, the allocator's fragmentation,
evaluation or generation. ``benchmarks/plan_vs_measured.py`` compares it with measured peaks.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import UnbackdoorError

GiB = 2**30


class PlanError(UnbackdoorError, ValueError):
    pass


@dataclass
class PhaseEstimate:
    phase: str
    trainable: str               # what is trained: lora, full, upper, input (a soft prompt / δ)
    batch: int
    seq_len: int
    forwards: int                # forward graphs alive at backward
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    transient_gib: float
    total_gib: float


def load_config_json(path: str):
    """The model's transformers config from a folder (or a config.json) or a hub id; no weights."""
    from transformers import AutoConfig

    p = Path(path)
    try:
        if p.is_file():
            return AutoConfig.from_pretrained(str(p.parent))
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: no readable model config.json ({str(exc).splitlines()[0]}). Give a model folder, "
                        "a config.json, or a hub id on a machine with hub access.") from None


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (SDPA's flash / memory-efficient, on a GPU and on a CPU) keeps for
    backward: q, k, v, the output and the row log-sum-exp — not the seq x seq probabilities that the meta
    device's decomposition of SDPA would save."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):   # pragma: no cover - plan never runs backward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _fused_attention(module, query, key, value, attention_mask, **kwargs):
    out = _FusedAttention.apply(query, key, value)          # [batch, heads, seq, head_dim]
    return out.transpose(1, 2).contiguous(), None


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("unbackdoor_plan", _fused_attention)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="unbackdoor_plan")


def _config_key(config, keys: tuple[str, ...], what: str) -> str:
    for k in keys:
        if getattr(config, k, None):
            return k
    raise PlanError(f"{getattr(config, 'model_type', '?')}: the config names no {what}")


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")


def _num_layers(config) -> int:
    return int(getattr(config, _config_key(config, LAYER_KEYS, "layer count")))


def _hidden(config) -> int:
    return int(getattr(config, _config_key(config, HIDDEN_KEYS, "hidden size")))


@contextmanager
def count_saved(model: nn.Module) -> Iterator[dict[int, int]]:
    """Within the context, bytes of every tensor autograd saves for backward, by tensor id; ``model``'s
    parameters (and views of them) are not counted."""
    params = {id(p) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if id(t) not in params and not (t._base is not None and id(t._base) in params):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def saved_bytes(model: nn.Module, batch: int, seq: int, *, input_grad: bool = False) -> tuple[int, int]:
    """(total, largest) bytes autograd saves in one forward + loss of ``batch`` x ``seq`` tokens on the meta
    device; parameters (and views of them) are not counted. ``input_grad``: the input embeddings require a
    gradient (a trainable soft prompt or δ on a frozen model)."""
    dtype = next(model.parameters()).dtype
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    # a 4-D mask: transformers' 2-D mask handling reads values, which the meta device has not
    mask = torch.zeros(batch, 1, seq, seq, dtype=dtype, device="meta")
    kwargs: dict[str, Any] = {"attention_mask": mask, "labels": ids, "use_cache": False}
    with count_saved(model) as seen:
        if input_grad:
            e = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            model(inputs_embeds=e, **kwargs)
        else:
            model(input_ids=ids, **kwargs)
    return sum(seen.values()), max(seen.values(), default=0)


def _set_trainable(model: nn.Module, which: str, lora_cfg, anchor: int | None = None) -> nn.Module:
    """``which``: lora, full, upper (layers from ``anchor`` on and the final norm), or input (all frozen)."""
    from .arch import anatomy
    from .models import apply_lora

    for p in model.parameters():
        p.requires_grad_(False)
    if which == "lora":
        model = apply_lora(model, lora_cfg)
    elif which == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif which == "upper":
        parts = anatomy(model)
        for layer in list(parts.layers)[anchor or 0:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        if parts.norm is not None:
            for p in parts.norm.parameters():
                p.requires_grad_(True)
    return model


def _phase(config, name: str, which: str, *, lora_cfg, batch: int, seq: int, forwards: int, load_dtype,
           compute_dtype, checkpointing: bool, optimizer: str, layers_from: int = 0,
           anchor: int | None = None, outside_forwards: int | None = None) -> PhaseEstimate:
    from .schema import Optimizer

    model = _set_trainable(meta_model(config, compute_dtype), which, lora_cfg, anchor)
    n_layers = _num_layers(config)
    act, largest = saved_bytes(model, batch, seq, input_grad=which == "input")
    # one layer's share, from a one-layer model of the same shapes
    one = config.__class__.from_dict({**config.to_dict(), _config_key(config, LAYER_KEYS, "layer count"): 1})
    m1 = _set_trainable(meta_model(one, compute_dtype), which, lora_cfg, 0)
    act1, _ = saved_bytes(m1, batch, seq, input_grad=which == "input")
    per_layer = max(0, (act - act1) / max(1, n_layers - 1))
    outside = max(0, act1 - per_layer)
    run_layers = n_layers - layers_from
    if checkpointing:
        per_token = _hidden(config) * torch.finfo(compute_dtype).bits // 8
        layer_part = run_layers * batch * seq * per_token + per_layer
    else:
        layer_part = run_layers * per_layer
    activations = forwards * layer_part + (forwards if outside_forwards is None else outside_forwards) * outside
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    load_bytes = torch.finfo(load_dtype).bits // 8
    weights = frozen * load_bytes + trainable * 4
    grads = trainable * 4
    opt = 0 if Optimizer(optimizer) is Optimizer.SGD else trainable * 8
    # backward's working set at its start: the gradients of the log-softmax's output and input, two tensors
    # the size of the largest saved one (the logits)
    transient = 2 * largest
    total = weights + grads + opt + activations + transient
    return PhaseEstimate(phase=name, trainable=which, batch=batch, seq_len=seq, forwards=forwards,
                         weights_gib=weights / GiB, gradients_gib=grads / GiB, optimizer_gib=opt / GiB,
                         activations_gib=activations / GiB, transient_gib=transient / GiB, total_gib=total / GiB)


def _dtypes(cfg, config, gpu: bool) -> tuple[torch.dtype, torch.dtype]:
    """(load dtype, compute dtype) of a defense run on a GPU or on a CPU."""
    from .models import resolve_dtype
    from .schema import Dtype, MixedPrecision

    if Dtype(cfg.model.dtype) is Dtype.AUTO:   # what resolve_dtype picks on the machine planned for
        load = torch.bfloat16 if gpu else torch.float32
    else:
        load = resolve_dtype(cfg.model.dtype)
    mp = MixedPrecision(cfg.train.mixed_precision)
    compute = load
    if gpu and mp is not MixedPrecision.NO:
        compute = torch.bfloat16 if mp is MixedPrecision.BF16 else torch.float16
    return load, compute


def _sharded(ph: PhaseEstimate, processes: int, unit_gib: float) -> PhaseEstimate:
    """The phase under ``train.fsdp`` over ``processes``: weights, gradients and optimizer state divided,
    plus two units gathered whole at a time (the one computed and the one prefetched)."""
    w, g, o = (x / processes for x in (ph.weights_gib, ph.gradients_gib, ph.optimizer_gib))
    w += 2 * unit_gib
    total = w + g + o + ph.activations_gib + ph.transient_gib
    return PhaseEstimate(**{**asdict(ph), "weights_gib": w, "gradients_gib": g, "optimizer_gib": o,
                            "total_gib": total})


def plan(cfg, *, gpu: bool = True, processes: int = 1) -> dict[str, Any]:
    """Per-phase peak-memory estimates of the defense ``cfg`` (a resolved DefendConfig) on one process of
    ``processes`` (which matters under ``train.fsdp``: the phases that train the model are sharded; BEEAR's
    inner phase trains δ against the whole frozen model and is not)."""
    from .methods.beear import resolve_anchor

    config = load_config_json(cfg.model.path)
    load, compute = _dtypes(cfg, config, gpu)
    method = cfg.method.name
    t = cfg.train
    which = "lora" if cfg.lora.enabled else "full"
    common = dict(lora_cfg=cfg.lora, seq=cfg.data.max_length, load_dtype=load, compute_dtype=compute,
                  checkpointing=t.gradient_checkpointing, optimizer=t.optimizer)
    phases: list[PhaseEstimate] = []
    m = cfg.method
    if method in ("finetune", "osft"):
        phases.append(_phase(config, "train", which, batch=t.batch_size, forwards=1, **common))
    elif method == "crow":
        # the adversarial pass keeps the logits of one position only (logits_to_keep=1)
        phases.append(_phase(config, "train", which, batch=t.batch_size, forwards=2, outside_forwards=1, **common))
    elif method == "sande":
        s = m.simulate
        # the frozen model stays in eval mode in phase 1, where transformers does not recompute
        phases.append(_phase(config, "simulate", "input", batch=s.batch_size, forwards=1,
                             **{**common, "checkpointing": False, "optimizer": s.optimizer}))
        if not m.skip_elimination:
            phases.append(_phase(config, "eliminate", which, batch=t.batch_size,
                                 forwards=2 if m.clean_replay else 1, **common))
    elif method == "beear":
        k = resolve_anchor(m, _num_layers(config))
        # the inner phase runs the frozen model in eval mode, where transformers does not recompute
        phases.append(_phase(config, "inner", "input", batch=m.inner_batch_size, forwards=2, layers_from=k,
                             **{**common, "checkpointing": False, "optimizer": m.inner_optimizer}))
        outer = {"lora": "lora", "all": "full", "upper": "upper", "lower": "full"}[m.trainable.value]
        phases.append(_phase(config, "outer", outer, batch=t.batch_size, forwards=2, anchor=k, **common))
    else:
        raise PlanError(f"plan: {method} trains nothing (or is not a training method); its peak is the model's "
                        "weights and one evaluation batch")
    if t.fsdp and processes > 1:
        from .arch import anatomy

        layer = list(anatomy(meta_model(config, load)).layers)[0]
        unit = sum(p.numel() for p in layer.parameters()) * (torch.finfo(load).bits // 8) / GiB
        phases = [ph if ph.phase == "inner" else _sharded(ph, processes, unit) for ph in phases]
    peak = max(phases, key=lambda p: p.total_gib)
    n_params = sum(p.numel() for p in meta_model(config, load).parameters())
    return {"model": cfg.model.path, "model_type": getattr(config, "model_type", "?"), "parameters": n_params,
            "method": method, "device": "gpu" if gpu else "cpu", "load_dtype": str(load).removeprefix("torch."),
            "compute_dtype": str(compute).removeprefix("torch."),
            "gradient_checkpointing": t.gradient_checkpointing,
            "processes": processes, "sharding": "fsdp2" if t.fsdp and processes > 1 else "replicated",
            "phases": [asdict(p) for p in phases],
            "peak_phase": peak.phase, "peak_gib": peak.total_gib}


def format_plan(p: dict[str, Any]) -> str:
    lines = [f"{p['model']} ({p['model_type']}, {p['parameters'] / 1e9:.2f}B parameters), {p['method']} on a "
             f"{p['device']}: load {p['load_dtype']}, compute {p['compute_dtype']}, gradient checkpointing "
             f"{'on' if p['gradient_checkpointing'] else 'off'}; {p['processes']} process(es), {p['sharding']}",
             "| phase | trains | batch x tokens | forwards | weights | grads | optimizer | activations | transient "
             "| total |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ph in p["phases"]:
        lines.append(f"| {ph['phase']} | {ph['trainable']} | {ph['batch']} x {ph['seq_len']} | {ph['forwards']} | "
                     f"{ph['weights_gib']:.2f} | {ph['gradients_gib']:.2f} | {ph['optimizer_gib']:.2f} | "
                     f"{ph['activations_gib']:.2f} | {ph['transient_gib']:.2f} | **{ph['total_gib']:.2f}** |")
    lines.append(f"peak: {p['peak_gib']:.2f} GiB per process ({p['peak_phase']}); not counted: the CUDA "
                 "context, allocator fragmentation, evaluation")
    return "\n".join(lines)
