"""The defense driver: load the suspect model and the defender's data, run one method, save the result.

Every method module plugs in through :class:`~unbackdoor.methods.base.DefenseContext`; the driver owns what
they share — safe loading, seeding, LoRA, output folders written atomically, the run record.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from . import config as C
from .data import check_examples, load_examples
from .methods import get_method, method_names
from .methods.base import DefenseContext
from .models import load_model, load_tokenizer, save_model
from .record import OutputFolder, RunRecord, input_paths
from .schema import DefendConfig
from .templates import Template
from .threats import threat_model

log = logging.getLogger(__name__)


def resolve(data: dict, source: str | None = None) -> DefendConfig:
    """Build a DefendConfig, with the ``method:`` section typed by the method's own Config."""
    data = dict(data or {})
    method = data.pop("method", None)
    problems: list[tuple[str, str]] = []
    try:
        cfg = C.build(DefendConfig, data, source)
    except C.ConfigError as exc:
        problems.extend(exc.problems)
        cfg = None
    if not isinstance(method, dict) or "name" not in method:
        problems.append(("method", f"missing or without `name`; set method.name to one of {method_names()}"))
    else:
        method = dict(method)
        name = method.pop("name")
        try:
            mod = get_method(str(name))
        except KeyError as exc:
            problems.append(("method.name", str(exc.args[0])))
        else:
            try:
                mcfg = C.build(mod.Config, method)
                mcfg.name = name  # type: ignore[attr-defined]
                if cfg is not None:
                    cfg.method = mcfg
                    need = data_needed(mod, mcfg)
                    if need and not cfg.data.path:
                        problems.append(("data.path", f"{name} needs {need}; set data.path=/path/to/data.jsonl"))
            except C.ConfigError as exc:
                problems.extend((f"method.{loc}", msg) for loc, msg in exc.problems)
    if problems:
        raise C.ConfigError(problems, source)
    return cfg


def data_needed(mod: Any, method_cfg: Any) -> str | None:
    """What data a method needs (its module's ``DATA``: a text, or a function of its config), or None."""
    need = getattr(mod, "DATA", None)
    return need(method_cfg) if callable(need) else need


#: Fields a shipped defend config leaves to the command line (model.path=..., output.dir=...).
COMMAND_LINE_FIELDS = (("model", "path"), ("output", "dir"), ("data", "path"))


def command_line_gaps(data: dict) -> list[str]:
    """The fields a config leaves to the command line: model.path, output.dir, data.path when the method
    needs data, and the method's own (BEEAR's safe_path, unwanted_path)."""
    gaps = []
    method = data.get("method") if isinstance(data.get("method"), dict) else {}
    mod = get_method(method["name"]) if method.get("name") in method_names() else None
    for section, key in COMMAND_LINE_FIELDS:
        node = data.get(section) or {}
        if isinstance(node, dict) and not node.get(key):
            if (section, key) == ("data", "path"):
                try:
                    mcfg = C.build(mod.Config, {k: v for k, v in method.items() if k != "name"}) if mod else None
                except C.ConfigError:
                    mcfg = None
                if mod is None or mcfg is None or not data_needed(mod, mcfg):
                    continue
            gaps.append(f"{section}.{key}")
    if mod is not None:
        gaps += [f"method.{key}" for key in getattr(mod, "COMMAND_LINE_FIELDS", ()) if not method.get(key)]
    return gaps


def resolve_shipped(data: dict, source: str | None = None) -> DefendConfig:
    """Validate a config file meant to be completed on the command line: the fields of
    :func:`command_line_gaps` may be absent (placeholders stand in); every other problem is reported."""
    import copy

    data = copy.deepcopy(data or {})
    for gap in command_line_gaps(data):
        node = data
        *parents, key = gap.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = f"<{gap} from the command line>"
    return resolve(data, source)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> DefendConfig:
    data = C.load_yaml(path) if path else {}
    C.apply_overrides(data, list(overrides))
    return resolve(data, str(path) if path else None)


def method_dict(cfg: DefendConfig) -> dict:
    d = C.to_dict(cfg)
    d["method"] = {"name": getattr(cfg.method, "name", "?"), **C.to_dict(cfg.method)}
    return d


#: Config keys that do not change what a run computes: an interrupted run resumes across changes of these.
RESUME_IGNORE = ("output", "train.progress", "train.log_every", "train.log_with", "train.checkpoint_every")


def distributed_setup(cfg: DefendConfig) -> dict[str, Any]:
    """Under ``accelerate launch``/``torchrun`` (WORLD_SIZE > 1), join the process group now, so that the
    output folder is prepared by rank 0 while the others wait; returns what run.json records of the setup."""
    import os

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 and not deepspeed:
        return {"processes": 1, "type": "single"}
    from .train import get_accelerator

    acc = get_accelerator(cfg.train.mixed_precision, bf16_on_cpu=cfg.train.bf16_on_cpu)
    import torch.distributed as tdist

    kind = str(acc.distributed_type).rsplit(".", 1)[-1]
    if kind == "DEEPSPEED":
        stage = (getattr(acc.state.deepspeed_plugin, "deepspeed_config", {}) or {}).get("zero_optimization", {})
        sharding = f"deepspeed zero-{stage.get('stage', 0)}"
    else:
        sharding = "fsdp2" if cfg.train.fsdp else "replicated (DDP)"
    return {"processes": acc.num_processes, "type": kind, "sharding": sharding,
            "backend": tdist.get_backend() if tdist.is_initialized() else None,
            "global_batch": cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes}


def defend(cfg: DefendConfig) -> dict[str, Any]:
    """Run the configured method; return the run summary (also written to ``output.dir/run.json``).

    Everything is checked before the model is loaded: the output folder (never an input, a finished run is
    replaced only with ``output.overwrite``), the data (read, truncation reported). The run works in a
    staging folder that becomes ``output.dir`` only when the model and the record are written; an interrupted
    run resumes there when rerun with the same config."""
    from .train import peak_memory_mb, reset_peak_memory, seed_everything

    reset_peak_memory()
    mod = get_method(cfg.method.name)
    resolved = method_dict(cfg)
    dist = distributed_setup(cfg)
    folder = OutputFolder(cfg.output.dir, overwrite=cfg.output.overwrite, inputs=input_paths(cfg), config=resolved,
                          ignore=RESUME_IGNORE)
    with folder as stage:
        record = RunRecord(stage, f"defend {cfg.method.name}", seeds={"seed": cfg.seed})
        record.config = resolved
        seed_everything(cfg.seed)
        tokenizer = load_tokenizer(cfg.model)
        template = Template(tokenizer, cfg.model.template, cfg.model.system_prompt)
        record.set_template(template)
        report: dict[str, Any] = {}
        examples = load_examples(cfg.data, cfg.seed, report=report) if cfg.data.path else []
        if examples:
            record.update(data=check_examples(examples, template, cfg.data, report))
        model = load_model(cfg.model, device="auto")
        loaded_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        ctx = DefenseContext(cfg=cfg, model=model, tokenizer=tokenizer, template=template, examples=examples,
                             out_dir=stage, record=record)
        t0 = time.perf_counter()
        metrics = mod.run(ctx) or {}
        wall = time.perf_counter() - t0
        record.update(method=cfg.method.name, knows=threat_model(cfg.method.name).summary, metrics=metrics,
                      defense_wall_time_s=round(wall, 3), peak_memory_mb=round(peak_memory_mb(), 1),
                      n_defender_examples=len(examples), resumed=folder.resumed or None, distributed=dist,
                      model_device=str(next(ctx.model.parameters()).device),
                      model_dtype={"loaded": loaded_dtype,
                                   "saved": str(next(ctx.model.parameters()).dtype).removeprefix("torch.")})
        if cfg.output.save_model:
            save_model(ctx.model, tokenizer, stage / "model", merge=cfg.lora.merge)
        record.write(finished=True)
        folder.commit()
    return record.data
