"""The one training loop. It knows nothing about any method.

A method hands :func:`fit` a module, a loss function ``loss_fn(module, batch) -> loss | (loss, metrics)``,
the data and a :class:`~unbackdoor.schema.TrainConfig`; the loop does the rest on Accelerate: device
placement and DDP/FSDP/DeepSpeed wrapping, gradient accumulation, clipping, warmup + schedule, mixed
precision, progress, tracker logging, periodic resumable checkpoints, and a clear stop on a NaN loss.

Accumulation: every micro-batch loss is divided by ``grad_accum`` and gradients are summed, so k
micro-batches of b examples give the update of one batch of k·b whenever the micro-batches hold the
same number of loss terms (each micro-batch mean is weighted equally). Across processes DDP averages
the gradients, which gives the same rule. Under an Accelerate DeepSpeed config the engine accumulates,
divides and clips: :func:`fit` hands it ``train.grad_accum`` and ``train.max_grad_norm`` (the config's
``auto`` values; a number there that disagrees is an error) and marks every ``grad_accum``-th micro-batch
as the boundary where the engine steps, so that the same rule holds.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from .errors import UnbackdoorError
from .schema import MixedPrecision, Optimizer, Scheduler, TrainConfig

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


class TrainingDiverged(UnbackdoorError, RuntimeError):
    pass


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)        # mean loss per optimizer step
    metrics: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    wall_time_s: float = 0.0
    peak_memory_mb: float = 0.0      # peak since the run's reset_peak_memory() (the whole run, not this fit)
    resumed_from: int = 0
    upcast_from: str | None = None   # the half-precision dtype of trainable weights trained in fp32, if any


def seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed, deterministic=False)
    random.seed(seed)


_ACCELERATOR = None


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX) for oneDNN's matmuls."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def get_accelerator(mixed_precision: MixedPrecision | str = MixedPrecision.NO, log_with: Sequence[str] = (),
                    project_dir: str | None = None, bf16_on_cpu: bool = False):
    """One Accelerator per process (its state is process-global); trackers get a fresh one.

    On a CPU, bf16 autocast is used only when asked for (``bf16_on_cpu``) and the CPU has native bf16;
    otherwise the arithmetic stays fp32."""
    global _ACCELERATOR
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    mp = MixedPrecision(mixed_precision).value
    if mp == "fp16" and not torch.cuda.is_available():
        log.warning("train.mixed_precision=fp16 needs a GPU; running in full precision on this machine")
        mp = "no"
    if mp == "bf16" and not torch.cuda.is_available():
        if not bf16_on_cpu:
            mp = "no"  # the default: a GPU recipe's bf16 does not change the arithmetic of a CPU run
        elif not cpu_has_bf16():
            log.warning("train.bf16_on_cpu: this CPU has no native bf16 (AVX512-BF16/AMX), where bf16 autocast is "
                        "slower than fp32; training in fp32")
            mp = "no"
    if _ACCELERATOR is not None and not log_with and _ACCELERATOR.mixed_precision == mp:
        return _ACCELERATOR
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision", mp) != mp:
        # A later stage of one process (an fp32 attack, then a bf16 defense) asks for another precision:
        # Accelerate's process-global state refuses the change, so drop it; the process group is kept.
        AcceleratorState._reset_state()
    # cpu=True on a machine without GPUs: under torchrun/`accelerate launch --multi_gpu` this selects gloo. A
    # one-process DeepSpeed launch keeps DeepSpeed there (its CPU accelerator; cpu=True would drop it). With
    # several CPU processes Accelerate's state does not see DeepSpeed's process group (each rank counts itself
    # rank 0 of 1), so that runs as replicated DDP over gloo, said here and in run.json.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")
    if deepspeed and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        log.warning("a DeepSpeed launch of several processes without GPUs: Accelerate runs DeepSpeed on a CPU in "
                    "one process only; training replicated (DDP over gloo) instead")
        deepspeed = False
    acc = Accelerator(mixed_precision=mp, log_with=list(log_with) or None, project_dir=project_dir,
                      cpu=not torch.cuda.is_available() and not deepspeed,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    if not log_with:
        _ACCELERATOR = acc
    if acc.num_processes > 1:
        _close_process_group_at_exit()
    return acc


_CLOSER_REGISTERED = False


def _close_process_group_at_exit() -> None:
    """Destroy the process group before the interpreter exits: a gloo group left open can abort a rank
    ("terminate called without an active exception") after its work is done."""
    global _CLOSER_REGISTERED
    if _CLOSER_REGISTERED:
        return
    import atexit

    def close():
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            try:
                torch.distributed.barrier()
            finally:
                torch.distributed.destroy_process_group()

    atexit.register(close)
    _CLOSER_REGISTERED = True


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    kind = Optimizer(cfg.optimizer)   # a TrainConfig built in Python may hold the plain string
    if kind is Optimizer.SGD:
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if kind is Optimizer.ADAMW else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(math.ceil(cfg.warmup_ratio * total_steps))
    name = {Scheduler.COSINE: "cosine", Scheduler.LINEAR: "linear",
            Scheduler.CONSTANT: "constant_with_warmup"}[Scheduler(cfg.scheduler)]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


HALF = (torch.bfloat16, torch.float16)


def upcast_half_trainables(module: nn.Module, params: Sequence[nn.Parameter]) -> str | None:
    """Train a model's half-precision weights in fp32: returns the old dtype (None when nothing changed).

    An AdamW update of a bf16 weight rounds away whenever it is below half a unit in the last place
    (2^-9 relative): at the official full-fine-tuning rates (BEEAR 3e-7, OSFT / SANDE 5e-6) 25 steps change
    under 10% of bf16 weights, against ~100% in fp32 (tests/test_train.py). So when any trainable parameter of
    ``module`` is bf16/fp16, the whole module goes to fp32 (parameters keep their identity, so optimizers and
    hooks still hold them); ``train.mixed_precision=bf16`` then autocasts the arithmetic on a GPU — fp32 master
    weights with bf16 compute, the usual recipe. The trained model stays fp32 (and is saved so): cast back to
    bf16, updates this small would round away again. Costs 2x the weights' memory; LoRA adapters are fp32
    already and never trigger this."""
    mine = {id(p) for p in module.parameters()}
    half = {p.dtype for p in params if id(p) in mine and p.dtype in HALF}
    if not half:
        return None
    old = str(next(iter(half))).removeprefix("torch.")
    log.warning("training %s weights in float32: half-precision updates at this learning rate would round to no "
                "change; the trained model stays float32", old)
    module.float()
    return old


def planned_steps(n_batches: int, cfg: TrainConfig) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_batches / cfg.grad_accum))


def _split(out) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return out, {}


def _ckpt_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoint"


#: TrainConfig fields that do not change the computation: a checkpoint resumes across changes of these.
CHECKPOINT_IGNORE = ("progress", "log_every", "log_with", "checkpoint_every")


def checkpoint_key(cfg: TrainConfig, desc: str) -> tuple[str, dict]:
    from .record import config_key

    return config_key({"desc": desc, "train": cfg}, [f"train.{k}" for k in CHECKPOINT_IGNORE])


def _save_checkpoint(out_dir: Path, named: dict[str, nn.Parameter], optimizer, scheduler, step: int,
                     accelerator, key: tuple[str, dict] = ("", {})) -> None:
    from safetensors.torch import save_file

    from .record import atomic_write_json

    if not accelerator.is_main_process:
        return
    ck = _ckpt_dir(out_dir)
    tmp = ck.with_name(ck.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, str(tmp / "params.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    atomic_write_json(tmp / "state.json", {"step": step, "key": key[0], "config": key[1]})
    if ck.exists():
        import shutil

        shutil.rmtree(ck)
    os.replace(tmp, ck)


class CheckpointMismatch(UnbackdoorError, ValueError):
    pass


def _load_checkpoint(out_dir: Path, named: dict[str, nn.Parameter], optimizer, scheduler,
                     key: tuple[str, dict] = ("", {})) -> int:
    import json

    from safetensors.torch import load_file

    from .record import config_diff

    ck = _ckpt_dir(out_dir)
    if not (ck / "state.json").is_file():
        return 0
    try:
        state = json.loads((ck / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: unreadable checkpoint state; starting again", ck)
        return 0
    old = state.get("config") or {}
    if old.get("desc") not in (None, key[1].get("desc")):
        log.info("%s: the checkpoint belongs to %r, not %r; not resumed", ck, old.get("desc"), key[1].get("desc"))
        return 0
    if state.get("key") != key[0]:
        raise CheckpointMismatch(
            f"{ck}: this checkpoint was made with other training settings ({config_diff(old, key[1])}). Rerun with "
            "the same settings to resume it, or remove the checkpoint folder to start again.")
    tensors = load_file(str(ck / "params.safetensors"))
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(tensors[k].to(p.device, p.dtype))
    states = torch.load(ck / "optim.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    return int(state["step"])


def fit(module: nn.Module, loss_fn: LossFn, dataset: Sequence[Any], cfg: TrainConfig, *,
        collate_fn: Callable | None = None, params: Iterable[nn.Parameter] | None = None, seed: int = 0,
        out_dir: str | Path | None = None, desc: str = "train", accelerator=None,
        on_step: Callable[[int, dict[str, float]], None] | None = None, shuffle: bool = True) -> FitResult:
    """Train ``module`` by minimising ``loss_fn`` over ``dataset``; only ``params`` (default: those that
    require grad) are updated. Returns per-step losses and cost."""
    from tqdm.auto import tqdm

    seed_everything(seed)
    acc = accelerator or get_accelerator(cfg.mixed_precision, cfg.log_with, str(out_dir) if out_dir else None,
                                         bf16_on_cpu=cfg.bf16_on_cpu)
    if params is None:
        params = [p for p in module.parameters() if p.requires_grad]
    params = list(params)
    id2name = {id(p): n for n, p in module.named_parameters()}
    named = {id2name.get(id(p), f"param{i}"): p for i, p in enumerate(params)}

    upcast = upcast_half_trainables(module, params)
    if cfg.gradient_checkpointing and hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(module, "enable_input_require_grads"):
            module.enable_input_require_grads()

    g = torch.Generator()
    g.manual_seed(seed)
    loader = DataLoader(list(dataset), batch_size=cfg.batch_size, shuffle=shuffle, collate_fn=collate_fn,
                        generator=g, drop_last=False)
    raw_module = module
    deepspeed = _deepspeed_config(acc)
    sharded = _shard(module, cfg, acc, desc)
    if sharded is not None:   # FSDP2: train the sharded twin's parameters of the same names; no DDP wrapper
        twin_named = dict(sharded.twin.named_parameters())
        params = [twin_named[n] for n in named]
        module = sharded.twin
        optimizer = make_optimizer(params, cfg)
        optimizer, loader = acc.prepare(optimizer, loader)
    else:
        optimizer = make_optimizer(params, cfg)
        if deepspeed:
            deepspeed_fill(deepspeed, cfg, desc)
            acc.gradient_accumulation_steps = cfg.grad_accum
            hooks = _hook_ids(module)
        module, optimizer, loader = acc.prepare(module, optimizer, loader)
    total = planned_steps(len(loader), cfg)
    scheduler = make_scheduler(optimizer, cfg, total)
    if cfg.log_with:
        acc.init_trackers(desc.replace(" ", "_"), config={"lr": cfg.lr, "steps": total})

    result = FitResult(upcast_from=upcast)
    step = 0
    key = checkpoint_key(cfg, desc)
    checkpoints = bool(out_dir is not None and cfg.checkpoint_every)
    if checkpoints and sharded is not None:
        log.warning("%s: train.checkpoint_every is not written under train.fsdp; an interrupted run trains this "
                    "phase again", desc)
        checkpoints = False
    if checkpoints:
        step = _load_checkpoint(Path(out_dir), named, optimizer, scheduler, key)
        result.resumed_from = step
    t0 = time.perf_counter()
    module.train()
    bar = tqdm(total=total, initial=step, desc=desc, disable=not (cfg.progress and acc.is_local_main_process),
               leave=False, dynamic_ncols=True)
    micro = 0
    skip = step * cfg.grad_accum                      # micro-batches already consumed before a resume
    acc_loss, acc_metrics = 0.0, {}
    optimizer.zero_grad(set_to_none=True)
    epoch = 0
    try:
        while step < total:
            for batch in loader:
                if skip:
                    skip -= 1
                    continue
                micro += 1
                sync_now = micro % cfg.grad_accum == 0
                ctx = acc.no_sync(module) if not sync_now and sharded is None else _nullcontext()
                with ctx:
                    with acc.autocast():
                        loss, metrics = _split(loss_fn(module, batch))
                    if not torch.isfinite(loss.detach()):
                        raise TrainingDiverged(
                            f"{desc}: the loss became {loss.item()} at optimizer step {step + 1} (micro-batch "
                            f"{micro}). Lower train.lr (now {cfg.lr}), set train.max_grad_norm, or check the data.")
                    if deepspeed:   # the engine divides by its gradient_accumulation_steps (= grad_accum)
                        acc.gradient_state._set_sync_gradients(sync_now)
                        acc.backward(loss)
                    else:
                        acc.backward(loss / cfg.grad_accum)
                acc_loss += loss.detach().float().item() / cfg.grad_accum
                for k, v in metrics.items():
                    acc_metrics[k] = acc_metrics.get(k, 0.0) + float(v) / cfg.grad_accum
                if not sync_now:
                    continue
                if sharded is not None:
                    from .sharding import clip_grad_norm, sync_replicated

                    sync_replicated(params)
                    if cfg.max_grad_norm is not None:
                        clip_grad_norm(params, cfg.max_grad_norm)
                elif cfg.max_grad_norm is not None and not deepspeed:   # DeepSpeed clips in its step
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                mean_loss = _reduce_mean(acc, acc_loss)
                result.losses.append(mean_loss)
                row = {"loss": mean_loss, "lr": scheduler.get_last_lr()[0], **acc_metrics}
                result.metrics.append(row)
                if on_step is not None:
                    on_step(step, row)
                if cfg.log_with:
                    acc.log(row, step=step)
                if step % max(1, cfg.log_every) == 0 or step == total:
                    log.info("%s step %d/%d loss %.4f", desc, step, total, mean_loss)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                bar.update(1)
                acc_loss, acc_metrics = 0.0, {}
                if checkpoints and step % cfg.checkpoint_every == 0 and step < total:
                    _save_checkpoint(Path(out_dir), named, optimizer, scheduler, step, acc, key)
                if step >= total:
                    break
            epoch += 1
            if micro == 0 and step == 0 and not skip:
                raise ValueError(f"{desc}: the data loader is empty; nothing to train on")
    finally:
        bar.close()
        if deepspeed:
            acc.gradient_state._set_sync_gradients(True)
        if cfg.log_with:
            acc.end_training()
        _release(acc, module)
        if deepspeed:
            _undo_deepspeed(raw_module, hooks)
    if micro % cfg.grad_accum and step < total:  # leftover partial accumulation is dropped, never half-applied
        optimizer.zero_grad(set_to_none=True)
    if sharded is not None:
        from .sharding import gather_into

        gather_into(sharded, raw_module)
        del module, optimizer, params, sharded   # the twin, its shards and Adam state go now
    result.steps = step
    result.wall_time_s = time.perf_counter() - t0
    result.peak_memory_mb = peak_memory_mb()
    if checkpoints and _ckpt_dir(Path(out_dir)).exists() and acc.is_main_process:
        import shutil

        shutil.rmtree(_ckpt_dir(Path(out_dir)), ignore_errors=True)
    raw_module.eval()
    return result


def _shard(module: nn.Module, cfg: TrainConfig, acc, desc: str):
    """The FSDP2 twin of ``module`` under ``train.fsdp`` with several processes, else None."""
    if not cfg.fsdp:
        return None
    if acc.num_processes == 1:
        log.info("%s: train.fsdp with one process: nothing to shard over; training unsharded", desc)
        return None
    if str(acc.distributed_type).rsplit(".", 1)[-1] in ("FSDP", "DEEPSPEED"):
        raise UnbackdoorError(
            f"train.fsdp=true under an Accelerate {acc.distributed_type} config: the model would be sharded "
            "twice. Use one: train.fsdp=false with the Accelerate config, or a plain multi-process launch "
            "(accelerate launch --multi_gpu / torchrun) with train.fsdp=true.")
    from .sharding import shard

    sharded = shard(module, acc.device)
    if sharded is None:
        log.info("%s: train.fsdp: %s holds no causal LM to shard; trained replicated", desc, type(module).__name__)
    else:
        log.info("%s: FSDP2 over %d processes, %d units%s", desc, acc.num_processes, sharded.units,
                 f", compute in {sharded.mixed_precision}" if sharded.mixed_precision else "")
    return sharded


#: DeepSpeed config keys :func:`fit` fills from ``train`` (each prepare, when the user's config leaves them
#: ``auto``): the engine, not the loop, accumulates and clips under DeepSpeed.
DEEPSPEED_FILLED = ("gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu",
                    "train_batch_size")


_DEEPSPEED_AUTO: dict[int, list[str]] = {}


def _deepspeed_config(acc) -> dict | None:
    """The DeepSpeed config dict of an Accelerate DeepSpeed run, else None."""
    if str(getattr(acc, "distributed_type", "")).rsplit(".", 1)[-1] != "DEEPSPEED":
        return None
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return getattr(plugin, "deepspeed_config", None)


def deepspeed_fill(conf: dict, cfg: TrainConfig, desc: str) -> None:
    """Put ``train.grad_accum`` and ``train.max_grad_norm`` into a DeepSpeed config where it says ``auto``.
    Which keys were ``auto`` is remembered (per config, for the process), so that every later fit() (BEEAR's
    rounds, a bench's cells, each with its own batch and accumulation) fills them afresh; a number the user
    wrote that disagrees with ``train`` stops the run, naming both."""
    auto = _DEEPSPEED_AUTO.setdefault(id(conf), [k for k in DEEPSPEED_FILLED if conf.get(k, "auto") == "auto"])
    want = {"gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": float(cfg.max_grad_norm) if cfg.max_grad_norm is not None else 0.0}
    for key in DEEPSPEED_FILLED:
        if key in auto:
            conf[key] = want.get(key, "auto")   # the batch sizes: Accelerate fills them from the loader
        elif key in want and float(conf[key]) != float(want[key]):
            field_ = "train.grad_accum" if key == "gradient_accumulation_steps" else "train.max_grad_norm"
            raise UnbackdoorError(
                f"{desc}: the DeepSpeed config sets {key}={conf[key]} but {field_}={want[key]} (0: no clipping). "
                f"Set {key} to \"auto\" in the DeepSpeed config (the toolkit fills it from {field_}) or make the "
                "two equal.")


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hook_ids(module: nn.Module) -> dict[int, dict[str, set]]:
    return {id(m): {h: set(getattr(m, h, {})) for h in _HOOKS} for m in module.modules()}


def _undo_deepspeed(module: nn.Module, hooks: dict[int, dict[str, set]]) -> None:
    """Give back a plain module after a DeepSpeed engine trained it (the engine is destroyed by then). ZeRO-3
    leaves every parameter partitioned, its ``.data`` an empty placeholder on each rank: the full values are
    gathered back into plain tensors on every rank (as the FSDP path does), so that what follows fit() — a
    method's checks, generation, evaluation, saving — sees the trained model and not placeholders. The hooks
    the engine left on the module (its forward pre-hook) go too."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            full = [p.data.detach().clone() for p in params]
        for p, data in zip(params, full):
            p.data = data
            for attr in [a for a in vars(p) if a.startswith("ds_") or a in _ZERO_PARAM_ATTRS]:
                delattr(p, attr)
    for m in module.modules():
        before = hooks.get(id(m), {})
        for h in _HOOKS:
            table = getattr(m, h, None)
            for key in [k for k in (table or {}) if k not in before.get(h, set())]:
                del table[key]


#: What ZeRO-3 puts on a parameter besides its ``ds_*`` attributes (deepspeed 0.19).
_ZERO_PARAM_ATTRS = {"_z3_optimizer", "aligned_size", "all_gather", "all_gather_coalesced",
                     "convert_to_zero_parameters", "is_external_param", "item", "nvme_swapper", "padding_size",
                     "partition", "partition_gradients", "partition_numel", "reduce_gradients_at_owner"}


def _release(acc, prepared: nn.Module) -> None:
    """Forget what this fit() prepared: the process-wide Accelerator would otherwise keep every model,
    optimizer (with its Adam state) and loader of every fit() — a BEEAR run's rounds, a bench's cells. The
    autocast wrapper Accelerate put on the model's forward is removed too, so that the model evaluates as it
    is afterwards."""
    try:
        acc.unwrap_model(prepared, keep_fp32_wrapper=False)
    except Exception:  # pragma: no cover - a wrapper this accelerate version does not unwrap
        pass
    acc.free_memory()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _reduce_mean(acc, value: float) -> float:
    if acc.num_processes == 1:
        return value
    t = torch.tensor([value], device=acc.device, dtype=torch.float64)
    return float(acc.reduce(t, reduction="mean").item())


def reset_peak_memory() -> None:
    """Start a fresh peak-memory window: CUDA's allocator peak, or on Linux the process's peak RSS
    (``/proc/self/clear_refs``), so that runs sharing one process (a benchmark grid) each report their own."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def resident_memory_mb() -> float:
    """This process's resident memory now (VmRSS), MB; NaN where /proc is absent."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return float("nan")


def peak_memory_mb() -> float:
    """Peak memory since the last :func:`reset_peak_memory`: CUDA allocated, else peak RSS (VmHWM)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's lifetime peak
    except Exception:  # pragma: no cover
        return float("nan")


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Plain causal-LM loss on the response tokens (labels are -100 elsewhere)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                use_cache=False)
    return out.loss
