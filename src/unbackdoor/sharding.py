"""``train.fsdp``: FSDP2 (``fully_shard``) inside :func:`unbackdoor.train.fit`, under any launcher.

Accelerate shards only on GPUs and only for a model it prepares itself; the methods also call parts of the
model outside its forward (CROW and SANDE the token embedding) and train plain tensors beside it (BEEAR's δ,
SANDE's parrot). So the toolkit shards on its own, the same way on gloo (CPU) and NCCL (GPU):

- :func:`shard` makes a training twin of the module ``fit()`` was given (built on the meta device, then
  filled with each process's part of the weights, while the original's are released): each decoder layer from
  the layout table is one FSDP unit, the token embedding (with an output head tied to it) is another, so a
  call of the embedding outside the model's forward gathers its own weights, and the causal LM is the root.
  Parameters outside the causal LM (a δ, a soft prompt) stay plain and replicated; :func:`sync_replicated`
  averages their gradients over the processes, as DDP would.
- :func:`clip_grad_norm` clips sharded and replicated gradients by their one global norm.
- :func:`gather_into` copies the trained weights, gathered whole, back into the module ``fit()`` was given,
  so that outside ``fit()`` every process holds a plain model again (checks, generation, saving and
  evaluation work as under DDP) and the twin is dropped.

While ``fit()`` runs a process holds 1/N of the weights, gradients and optimizer state (plus the gathered
weights of the unit being computed); the original's weights come back whole when it ends. A run that fails
inside ``fit()`` leaves the original's causal-LM weights released (empty). Gradients are reduced
(averaged) after every micro-batch, so gradient accumulation gives the same update as under DDP, and a
process count changes the global batch the same way.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Sharded:
    """The training twin and what :func:`gather_into` needs to bring its weights back."""
    twin: nn.Module
    units: int                                   # FSDP units (decoder layers, the embedding group, the root)
    mixed_precision: str | None = None           # the compute dtype when the weights' dtypes differ
    released: dict[str, torch.Size] = field(default_factory=dict)  # original weights released while training


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _causal_lm(module: nn.Module) -> nn.Module | None:
    """The outermost submodule (``module`` itself first) that the layout table can take apart."""
    from .arch import UnsupportedArchitecture, anatomy

    for m in module.modules():
        if not hasattr(m, "get_input_embeddings"):
            continue
        try:
            anatomy(m)
        except (UnsupportedArchitecture, AttributeError, TypeError):
            continue
        return m
    return None


def _mp_policy(params: list[nn.Parameter]):
    """Mixed precision when the weights have more than one floating dtype (a bf16 model with fp32 LoRA
    adapters): compute in the narrowest, reduce gradients in fp32. FSDP gathers one dtype per unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtypes = {p.dtype for p in params if p.is_floating_point()}
    if len(dtypes) <= 1:
        return MixedPrecisionPolicy(), None
    narrow = min(dtypes, key=lambda d: torch.finfo(d).bits)
    return MixedPrecisionPolicy(param_dtype=narrow, reduce_dtype=torch.float32), str(narrow).removeprefix("torch.")


def _meta_twin(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are on the meta device (ties kept); buffers are copied."""
    memo: dict[int, nn.Parameter] = {}
    for p in module.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(module, memo)


def _local_chunk(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's part of ``full`` under FSDP's dim-0 sharding (``torch.chunk``; trailing parts may be
    empty)."""
    chunks = list(torch.chunk(full, world, dim=0))
    return chunks[rank] if rank < len(chunks) else full.new_empty((0, *full.shape[1:]))


def shard(module: nn.Module, device: torch.device) -> Sharded | None:
    """A twin of ``module`` with its causal LM under FSDP2 over every process, or None when ``module``
    holds no causal LM (BEEAR's δ: it is trained replicated, as under DDP).

    The twin is built on the meta device and sharded there, then each process copies in only its part of
    the original's weights; the original causal LM's weights are then released until :func:`gather_into`
    puts the trained ones back, so a process holds 1/N of the weights while it trains."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .arch import anatomy

    lm = _causal_lm(module)
    if lm is None:
        return None
    policy, mp = _mp_policy(list(lm.parameters()))
    twin = _meta_twin(module)
    root = _causal_lm(twin)
    parts = anatomy(root)
    mesh = init_device_mesh(device.type, (world_size(),))
    units = 0
    for layer in parts.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
        units += 1
    group = [parts.embed]
    head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is parts.embed.weight:
        group.append(head)   # a tied head shares the embedding's weight: one unit for both
    fully_shard(group, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    units += 2
    twin.to_empty(device=device)
    rank, world = dist.get_rank(), world_size()
    originals = dict(module.named_parameters())
    with torch.no_grad():
        for name, t in twin.named_parameters():
            full = originals[name].detach()
            if _is_dtensor(t):
                local = t.to_local()
                part = _local_chunk(full, rank, world)
                if local.shape != part.shape:   # pragma: no cover - a sharding other than FSDP's dim-0 chunks
                    raise RuntimeError(f"FSDP shard of {name}: local {tuple(local.shape)}, expected "
                                       f"{tuple(part.shape)} of {tuple(full.shape)}")
                local.copy_(part.to(local.device, local.dtype))
            else:
                t.copy_(full.to(t.device, t.dtype))
        buffers = dict(module.named_buffers())
        for name, b in twin.named_buffers():
            b.copy_(buffers[name].to(b.device, b.dtype))
    # The root must be initialised before the embedding is called on its own (CROW, SANDE), or FSDP would
    # take the first module called for the root.
    root._get_fsdp_state()._lazy_init()
    sharded = Sharded(twin=twin, units=units, mixed_precision=mp)
    # Release the original causal LM's weights while the twin trains (gather_into brings them back).
    lm_ids = {id(p) for p in lm.parameters()}
    for name, p in originals.items():
        if id(p) in lm_ids:
            sharded.released[name] = p.shape
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return sharded


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def sync_replicated(params: list[nn.Parameter]) -> None:
    """Average the gradients of the plain (replicated) trainable tensors over the processes."""
    import torch.distributed as dist

    n = world_size()
    for p in params:
        if p.grad is not None and not _is_dtensor(p):
            dist.all_reduce(p.grad)
            p.grad.div_(n)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip sharded and replicated gradients together by their global L2 norm; returns the norm."""
    import torch.distributed as dist

    sharded, plain = None, None
    for p in params:
        if p.grad is None:
            continue
        if _is_dtensor(p.grad):
            s = p.grad.to_local().detach().float().pow(2).sum()
            sharded = s if sharded is None else sharded + s
        else:
            s = p.grad.detach().float().pow(2).sum()
            plain = s if plain is None else plain + s
    dev = next((p.grad.device for p in params if p.grad is not None), torch.device("cpu"))
    sq = torch.zeros((), device=dev) if sharded is None else sharded.to(dev)
    dist.all_reduce(sq)          # the shards partition the sharded gradients: their squares add up
    if plain is not None:
        sq = sq + plain.to(dev)  # replicated gradients are equal on every process: counted once
    total = float(sq.sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total


def gather_into(sharded: Sharded, module: nn.Module) -> None:
    """Put the twin's weights, gathered whole, back into ``module`` (the one :func:`shard` was given): the
    released weights of its causal LM and every trained tensor beside it. Every process calls it (the
    gathers are collective)."""
    twin = dict(sharded.twin.named_parameters())
    with torch.no_grad():
        for name, p in module.named_parameters():
            t = twin[name]
            if name in sharded.released:
                full = t.full_tensor() if _is_dtensor(t) else t.detach().clone()
                p.data = full.to(p.device, p.dtype).reshape(sharded.released[name])
            elif p.requires_grad:
                p.copy_(t.detach().to(p.device, p.dtype))
