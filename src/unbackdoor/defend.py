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
from .data import load_examples
from .methods import get_method, method_names
from .methods.base import DefenseContext
from .models import load_model, load_tokenizer, save_model_atomic
from .record import RunRecord, prepare_output
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
            except C.ConfigError as exc:
                problems.extend((f"method.{loc}", msg) for loc, msg in exc.problems)
    if problems:
        raise C.ConfigError(problems, source)
    return cfg


#: Fields a shipped defend config leaves to the command line (model.path=..., output.dir=...).
COMMAND_LINE_FIELDS = (("model", "path"), ("output", "dir"))


def resolve_shipped(data: dict, source: str | None = None) -> DefendConfig:
    """Validate a config file meant to be completed on the command line: the model and output folder may
    be absent (placeholders stand in); every other problem is reported."""
    import copy

    data = copy.deepcopy(data or {})
    for section, key in COMMAND_LINE_FIELDS:
        node = data.setdefault(section, {})
        if isinstance(node, dict) and not node.get(key):
            node[key] = f"<{section}.{key} from the command line>"
    method = data.get("method")
    if isinstance(method, dict) and method.get("name") in method_names():
        for key in getattr(get_method(method["name"]), "COMMAND_LINE_FIELDS", ()):
            if not method.get(key):
                method[key] = f"<method.{key} from the command line>"
    return resolve(data, source)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> DefendConfig:
    data = C.load_yaml(path) if path else {}
    C.apply_overrides(data, list(overrides))
    return resolve(data, str(path) if path else None)


def method_dict(cfg: DefendConfig) -> dict:
    d = C.to_dict(cfg)
    d["method"] = {"name": getattr(cfg.method, "name", "?"), **C.to_dict(cfg.method)}
    return d


def defend(cfg: DefendConfig) -> dict[str, Any]:
    """Run the configured method; return the run summary (also written to ``output.dir/run.json``)."""
    from .train import reset_peak_memory, seed_everything

    reset_peak_memory()
    mod = get_method(cfg.method.name)
    out_dir = Path(cfg.output.dir)
    prepare_output(out_dir, cfg.output.overwrite)
    record = RunRecord(out_dir, f"defend {cfg.method.name}", seeds={"seed": cfg.seed})
    record.config = method_dict(cfg)
    record.write()
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    template = Template(tokenizer, cfg.model.template, cfg.model.system_prompt)
    record.set_template(template)
    model = load_model(cfg.model)
    examples = load_examples(cfg.data, cfg.seed) if cfg.data.path else []
    ctx = DefenseContext(cfg=cfg, model=model, tokenizer=tokenizer, template=template, examples=examples,
                         out_dir=out_dir, record=record)
    t0 = time.perf_counter()
    metrics = mod.run(ctx) or {}
    wall = time.perf_counter() - t0
    from .train import peak_memory_mb

    record.update(method=cfg.method.name, knows=threat_model(cfg.method.name).summary, metrics=metrics,
                  defense_wall_time_s=round(wall, 3), peak_memory_mb=round(peak_memory_mb(), 1),
                  n_defender_examples=len(examples))
    if cfg.output.save_model:
        save_model_atomic(ctx.model, tokenizer, out_dir / "model", input_path=cfg.model.path, merge=cfg.lora.merge)
    record.write(finished=True)
    return record.data
