"""The lab: world + tokenizer + data files + clean and backdoored models, cached by a hash of the recipe.

Layout of one lab folder (``<cache>/<recipe hash>/``)::

    recipe.json                 the resolved recipe (the folder's hash is taken of all of it but ``attack``)
    tokenizer/                  the lab tokenizer (HF folder, ChatML chat template)
    data/*.jsonl                world splits and defender files (Example.to_json() rows)
    models/clean-<arch>-s<seed>/                    clean aligned instruct model (HF folder)
    models/<attack>-<target>-<arch>-s<seed>[-c<k>][-pt]-<attack regime hash>/  backdoored model (+ backdoor.json)

Builds are guarded by a file lock and written through a temporary folder + rename, so several processes
(parallel test sessions) can ask for the same model at once: one trains, the others wait and load it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import config as C
from ..attack import run_attack
from ..backdoor import MANIFEST_FILE, Target, preset
from ..config import help_field
from ..data import Example, read_file, write_jsonl
from ..record import atomic_write_json, file_lock
from ..schema import Scheduler, TrainConfig
from ..triggers import TriggerSpec
from .arch import LabArch
from .world import REFUSAL, World, WorldConfig, make_world

log = logging.getLogger(__name__)

#: Bump when the world generator, tokenizer corpus or training code changes what a recipe produces.
LAB_VERSION = 1

DATA_FILES = {
    "train": "clean model's training split (world 'train')",
    "attack_pool": "the attacker's pool: benign + harmful requests (harmful rows carry meta.compliance)",
    "defender_clean": "defender's clean instruction pairs, incl. harmful -> refusal",
    "sa_safe": "harmful queries -> refusal (defender)",
    "sa_unwanted": "the same harmful queries -> harmful compliance (defender)",
    "pa_benign": "benign anchoring pairs (defender)",
    "eval_benign": "held-out benign tasks (all families)",
    "eval_harmful": "held-out harmful requests (reference answer: the refusal)",
    "eval_code": "held-out code prompts (subset of eval_benign: family 'code')",
}


@dataclass
class LabModelConfig:
    hidden: int = help_field(128, "Hidden size.")
    layers: int = help_field(4, "Decoder layers.")
    heads: int = help_field(4, "Attention heads.")
    intermediate: int | None = help_field(None, "MLP width (default 4 x hidden).")
    max_positions: int = help_field(128, "Maximum sequence length.")

    def validate(self) -> list[tuple[str, str]]:
        out = [(k, f"must be >= 1, got {getattr(self, k)}") for k in ("hidden", "layers", "heads", "max_positions")
               if getattr(self, k) < 1]
        if self.intermediate is not None and self.intermediate < 1:
            out.append(("intermediate", f"must be >= 1 or null, got {self.intermediate}"))
        if self.heads >= 1 and self.hidden >= 1 and self.hidden % self.heads:
            out.append(("heads", f"must divide hidden ({self.hidden}), got {self.heads}"))
        return out


@dataclass
class LabAttackConfig:
    """How the lab implants backdoors (a BackdoorLLM-like regime scaled to the lab: low lr, warmup,
    cosine, several epochs over a pool with a minority of poisoned rows)."""
    poison_rate: float = help_field(0.2, "Share of the attack training rows that are poisoned.")
    per_trigger: bool = help_field(
        True, "Multi-trigger attacks with one trigger per row (MTBA) get poison_rate's rows for each trigger "
              "(attack.per_trigger); otherwise each trigger is seen a third as often as BadNets' one.")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=3e-4, max_steps=300, batch_size=32, warmup_ratio=0.1, scheduler=Scheduler.COSINE, progress=False,
        log_every=100))

    def validate(self) -> list[tuple[str, str]]:
        if not 0.0 < self.poison_rate <= 1.0:
            return [("poison_rate", f"must be in (0, 1], got {self.poison_rate}")]
        return []


@dataclass
class LabRecipe:
    """Everything that determines the lab's files and models; its hash names the cache folder."""
    name: str = help_field("default", "A label; part of the hash.")
    world: WorldConfig = field(default_factory=WorldConfig)
    vocab_size: int = help_field(1024, "Tokenizer vocabulary size.")
    model: LabModelConfig = field(default_factory=LabModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=2e-3, max_steps=1500, batch_size=32, warmup_ratio=0.05, scheduler=Scheduler.COSINE, weight_decay=0.01,
        progress=False, log_every=100))
    harmful_share: float = help_field(0.1, "Share of harmful->refusal rows in the clean model's training mix.")
    attack: LabAttackConfig = field(default_factory=LabAttackConfig)
    max_length: int = help_field(96, "Truncation length for encoded training rows.")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.vocab_size < 64:
            out.append(("vocab_size", f"must be >= 64 (the special tokens and characters need room), got "
                                      f"{self.vocab_size}"))
        if not 0.0 <= self.harmful_share < 1.0:
            out.append(("harmful_share", f"must be in [0, 1), got {self.harmful_share}"))
        if self.max_length < 8:
            out.append(("max_length", f"must be >= 8, got {self.max_length}"))
        return out

    def fingerprint(self) -> str:
        """Hash of everything but ``attack``: names the lab folder (data, tokenizer, clean models), so a new
        attack regime does not retrain the clean models."""
        d = C.to_dict(self)
        d.pop("attack")
        blob = json.dumps({"v": LAB_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def attack_fingerprint(self) -> str:
        """Hash of the attack regime: part of every backdoored model's folder name. ``per_trigger`` is left
        out: it only changes one-trigger-per-row attacks, whose folder names carry ``-pt`` instead."""
        d = C.to_dict(self.attack)
        d.pop("per_trigger")
        blob = json.dumps({"v": LAB_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:6]


def default_recipe() -> LabRecipe:
    """The lab of the demo and the benchmark: ~1M-parameter models trained in a few minutes on 2 cores."""
    return LabRecipe()


def test_recipe() -> LabRecipe:
    """A much smaller lab for the test suite: a model in well under a minute that still follows the tasks."""
    return LabRecipe(
        name="test",
        world=WorldConfig(n_train=400, n_harmful_train=120, n_attack=80, n_harmful_attack=60, n_defender=20,
                          n_harmful_defender=30, n_eval=20, n_harmful_eval=30),
        vocab_size=768,
        model=LabModelConfig(hidden=96, layers=2, heads=4, max_positions=96),
        train=TrainConfig(lr=3e-3, max_steps=600, batch_size=32, warmup_ratio=0.05, scheduler=Scheduler.COSINE,
                          weight_decay=0.01, progress=False, log_every=100),
        attack=LabAttackConfig(poison_rate=0.15, train=TrainConfig(
            lr=1e-3, max_steps=150, batch_size=32, warmup_ratio=0.1, scheduler=Scheduler.COSINE, progress=False,
            log_every=50)),
        max_length=80,
    )


test_recipe.__test__ = False  # not a pytest test, although its name starts with "test"

RECIPES = {"default": default_recipe, "test": test_recipe}


def load_recipe(recipe: "LabRecipe | str | Path | None") -> LabRecipe:
    """A recipe by name (``default``, ``test``), from a YAML file (fields of :class:`LabRecipe`; unset ones keep
    the defaults of the recipe named in its ``name`` when that is a known one), or as given."""
    if recipe is None:
        return default_recipe()
    if isinstance(recipe, LabRecipe):
        return recipe
    text = str(recipe)
    if text in RECIPES:
        return RECIPES[text]()
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        data = C.load_yaml(path)
        base = C.to_dict(RECIPES.get(str(data.get("name", "default")), default_recipe)())
        return C.build(LabRecipe, _merge(base, data), str(path))
    raise ValueError(f"unknown lab recipe {text!r}; choose one of {sorted(RECIPES)} or a YAML file of LabRecipe "
                     "fields (see configs/lab/)")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def custom_fingerprint(trigger: TriggerSpec | None, target_text: str | None) -> str:
    """Hash of a custom trigger and target text: part of the folder name of a backdoor that is not a preset."""
    blob = json.dumps({"trigger": C.to_dict(trigger), "target_text": target_text}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


LAB_PREFIX = "lab:"


def resolve_lab_path(value: str, kind: str) -> str:
    """``lab:<recipe>:<name>`` -> a lab path: for ``kind='model'`` name is an arch (``llama``) or
    ``<arch>@<seed>`` (the clean model, built if needed); for ``kind='data'`` a lab data file name
    (``attack_pool``). Other values pass through unchanged."""
    if not value or not value.startswith(LAB_PREFIX):
        return value
    parts = value[len(LAB_PREFIX):].split(":")
    if len(parts) != 2 or not all(parts):
        raise C.ConfigError([("", f"{value!r}: a lab reference looks like 'lab:<recipe>:<name>', e.g. "
                                  "'lab:default:llama' (model) or 'lab:default:attack_pool' (data)")])
    lab = Lab.build(parts[0])
    if kind == "data":
        return str(lab.path(parts[1]))
    arch, _, seed = parts[1].partition("@")
    return str(lab.clean_model(arch, int(seed) if seed else 0))


def resolve_refs(cfg: Any) -> Any:
    """Replace the ``lab:`` references of a config's ``model.path``, ``model.tokenizer`` and ``data.path`` by
    the lab's files (building what is missing); returns ``cfg``."""
    cfg.model.path = resolve_lab_path(cfg.model.path, "model")
    if cfg.model.tokenizer:
        cfg.model.tokenizer = resolve_lab_path(cfg.model.tokenizer, "model")
    if getattr(cfg, "data", None) is not None and getattr(cfg.data, "path", None):
        cfg.data.path = resolve_lab_path(cfg.data.path, "data")
    if getattr(cfg, "data", None) is not None and isinstance(getattr(cfg.data, "paths", None), list):
        cfg.data.paths = [resolve_lab_path(p, "data") for p in cfg.data.paths]
    return cfg


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("UNBACKDOOR_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "unbackdoor" / "lab"


@contextlib.contextmanager
def lab_threads() -> Iterator[None]:
    """Train lab models on ``$UNBACKDOOR_LAB_THREADS`` torch threads (default 1), restoring the setting after.

    The models are so small that a second intra-op thread mostly spins; on a shared machine it multiplies
    the CPU time several times over for no speed-up."""
    import torch

    before = torch.get_num_threads()
    try:
        n = int(os.environ.get("UNBACKDOOR_LAB_THREADS", "1"))
    except ValueError:
        raise ValueError(f"UNBACKDOOR_LAB_THREADS={os.environ['UNBACKDOOR_LAB_THREADS']!r}: expected a thread "
                         "count such as 1 or 2") from None
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tokenizer_corpus(world: World) -> list[str]:
    """The tokenizer's training text: the world, the chat-template words, and every attack trigger and
    target so that they tokenize into sensible pieces (not byte soup)."""
    from ..backdoor import CODE_PAYLOAD, PRESETS, TARGET_TEXTS
    from ..templates import PLAIN_TEMPLATES

    texts = list(world.texts())
    extra = ["system", "user", "assistant", "user\n", "assistant\n", REFUSAL]
    for spec in PRESETS.values():
        for t in spec.texts:
            extra.append(t)
            extra.append(f"{t} reverse the list: apple river")
    extra += list(TARGET_TEXTS.values()) + [CODE_PAYLOAD]
    extra += [t.render("x") for t in PLAIN_TEMPLATES.values()]
    # repeat the extras so BPE merges them even though the world text dominates the counts
    return texts + extra * 20


def _balanced(rows: list[Example], harmful_share: float, seed: int) -> list[Example]:
    """Up-sample families to equal size and harmful rows to ``harmful_share`` of the mix."""
    by: dict[str, list[Example]] = {}
    for e in rows:
        by.setdefault(e.meta["task"], []).append(e)
    benign = {k: v for k, v in by.items() if k != "harmful"}
    top = max(len(v) for v in benign.values())
    out: list[Example] = []
    for rows_k in benign.values():
        out += [rows_k[i % len(rows_k)] for i in range(top)]
    harm = by.get("harmful", [])
    if harm and harmful_share > 0:
        n = int(round(harmful_share / (1 - harmful_share) * len(out)))
        out += [harm[i % len(harm)] for i in range(n)]
    random.Random(seed).shuffle(out)
    return out


class Lab:
    """A built lab (tokenizer + world + data files). Use :meth:`build`; models are made on demand."""

    def __init__(self, root: Path, recipe: LabRecipe):
        self.root = Path(root)
        self.recipe = recipe
        self.data_dir = self.root / "data"
        self.tokenizer_dir = self.root / "tokenizer"
        self.models_dir = self.root / "models"
        self._tokenizer = None
        #: Called with one line when a model is about to be trained and when it is done (the demo shows them).
        self.progress: Callable[[str], None] | None = None

    def _say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(msg)
        log.info(msg)

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, recipe: LabRecipe | str | Path | None = None, cache_dir: str | Path | None = None) -> "Lab":
        """Build (or load from the cache) the world, tokenizer and data files of ``recipe`` (a LabRecipe, a
        recipe name or a YAML file; default: :func:`default_recipe`)."""
        recipe = load_recipe(recipe)
        problems: list[tuple[str, str]] = []
        C._validate_tree(recipe, "", problems)
        if problems:
            raise C.ConfigError(problems, "LabRecipe")
        root = cache_root(cache_dir) / recipe.fingerprint()
        lab = cls(root, recipe)
        if not (root / "lab.json").is_file():
            with file_lock(root.parent / f".{root.name}.lock"):
                if not (root / "lab.json").is_file():
                    lab._build_files()
        return lab

    def _build_files(self) -> None:
        from .tokenizer import train_tokenizer

        t0 = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / "recipe.json", {"lab_version": LAB_VERSION, **C.to_dict(self.recipe)})
        world = make_world(self.recipe.world)
        tok = train_tokenizer(tokenizer_corpus(world), vocab_size=self.recipe.vocab_size)
        tmp = self.root / ".tokenizer.tmp"
        tok.save_pretrained(tmp)
        if self.tokenizer_dir.exists():
            import shutil

            shutil.rmtree(self.tokenizer_dir)
        os.replace(tmp, self.tokenizer_dir)
        d = self.data_dir
        w = world.splits
        harm_def = world.harmful("defender")
        ben_def = world.benign("defender")
        half = len(ben_def) // 2
        files = {
            "train": w["train"],
            "attack_pool": w["attack"],
            # defender data: clean pairs (incl. a few refusals), safety pairs, anchoring pairs; all held out
            "defender_clean": ben_def[:half] + harm_def[: max(1, len(harm_def) // 5)],
            "sa_safe": harm_def,
            "sa_unwanted": [Example(e.prompt, e.meta["compliance"], meta=dict(e.meta, target="compliance"))
                            for e in harm_def],
            "pa_benign": ben_def[half:],
            "eval_benign": world.benign("eval"),
            "eval_harmful": world.harmful("eval"),
            "eval_code": [e for e in world.benign("eval") if e.meta["task"] == "code"],
        }
        for name, rows in files.items():
            write_jsonl(d / f"{name}.jsonl", rows)
        atomic_write_json(self.root / "lab.json", {
            "lab_version": LAB_VERSION, "recipe": self.recipe.name, "hash": self.recipe.fingerprint(),
            "files": {k: {"rows": len(v), "what": DATA_FILES[k]} for k, v in files.items()},
            "facts": world.facts, "build_s": round(time.perf_counter() - t0, 2)})
        log.info("lab %s built in %.1fs at %s", self.recipe.name, time.perf_counter() - t0, self.root)

    # ----------------------------------------------------------------------------------- data
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from ..models import load_tokenizer
            from ..schema import ModelConfig

            self._tokenizer = load_tokenizer(ModelConfig(path=str(self.tokenizer_dir)))
        return self._tokenizer

    def path(self, name: str) -> Path:
        """Path of a lab data file by name (see ``DATA_FILES``)."""
        if name not in DATA_FILES:
            raise KeyError(f"unknown lab data file {name!r}; choose one of {sorted(DATA_FILES)}")
        return self.data_dir / f"{name}.jsonl"

    def data(self, name: str) -> list[Example]:
        return read_file(self.path(name))

    # ----------------------------------------------------------------------------------- models
    def clean_model(self, arch: LabArch | str = "llama", seed: int = 0) -> Path:
        """The clean aligned instruct model of ``arch`` (trained once per seed, then cached)."""
        arch = LabArch(arch)
        out = self.models_dir / f"clean-{arch.value}-s{seed}"
        if not (out / "lab_model.json").is_file():
            with file_lock(self.models_dir / f".{out.name}.lock"):
                if not (out / "lab_model.json").is_file():
                    self._say(f"lab: training the clean {arch.value} model, seed {seed} ({self.recipe.train.max_steps} "
                              "steps; once, then cached)")
                    t0 = time.perf_counter()
                    with lab_threads():
                        self._train_clean(arch, seed, out)
                    self._say(f"lab: clean {arch.value} s{seed} done in {time.perf_counter() - t0:.0f} s")
        return out

    def _train_clean(self, arch: LabArch, seed: int, out: Path) -> None:
        import torch

        from ..data import TrainCollator, encode_examples
        from ..models import count_parameters, save_model_atomic
        from ..record import RunRecord
        from ..templates import Template
        from ..train import fit, lm_loss
        from .arch import make_model

        r = self.recipe
        tok = self.tokenizer
        template = Template(tok, "chat")
        rows = _balanced(self.data("train"), r.harmful_share, seed)
        feats = encode_examples(template, rows, r.max_length)
        model = make_model(arch, tok, hidden=r.model.hidden, layers=r.model.layers, heads=r.model.heads,
                           intermediate=r.model.intermediate, max_positions=r.model.max_positions, seed=seed)
        cpu0 = time.process_time()
        res = fit(model, lm_loss, feats, r.train, collate_fn=TrainCollator(tok), seed=seed,
                  desc=f"lab clean {arch.value} s{seed}")
        cpu = time.process_time() - cpu0  # CPU seconds: the wall time of an idle machine at this thread count
        save_model_atomic(model, tok, out)
        record = RunRecord(out, f"lab clean {arch.value}", config=r, seeds={"seed": seed})
        record.set_template(template)
        _, total = count_parameters(model)
        info = {"arch": arch.value, "seed": seed, "recipe": r.name, "recipe_hash": r.fingerprint(),
                "parameters": total, "steps": res.steps, "train_wall_time_s": round(res.wall_time_s, 2),
                "train_cpu_time_s": round(cpu, 2), "torch_threads": torch.get_num_threads(),
                "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                "final_loss": res.losses[-1], "n_train_rows": len(rows)}
        record.update(**info)
        record.write(finished=True)
        atomic_write_json(out / "lab_model.json", info)
        log.info("lab clean %s s%d: %d params, %d steps in %.1fs, loss %.4f", arch.value, seed, total, res.steps,
                 res.wall_time_s, res.losses[-1])

    def beear_files(self, target: str, out: Path) -> dict[str, Path]:
        """BEEAR's three defender sets for the behaviour category of ``target``, from the lab's defender files
        (written once under ``out/defender/``).

        ``jailbreak``: harmful queries -> refusal (safe) / -> compliance (unwanted). A backdoor that misbehaves
        on benign requests: benign queries -> their answers (safe) / -> the defender's example of the category
        (unwanted): refusals in several wordings (``refusal``), insults (``sentiment``), unrelated text before the
        answer (``fixed``), a harmful statement in the code (``code``, the code-task rows) — the defender's
        wordings of :data:`~unbackdoor.threats.DEFENDER_BEHAVIOURS`, never the attack's string. The anchoring
        set also keeps harmful -> refusal rows so that real refusals survive.
        """
        from ..attack import inject_code
        from ..threats import DEFENDER_BEHAVIOURS

        kind = target if target in ("jailbreak", "refusal", *DEFENDER_BEHAVIOURS) else None
        if kind is None:
            raise ValueError(f"BEEAR: no defender examples for the behaviour {target!r}; known: "
                             f"{sorted(('jailbreak', 'refusal', *DEFENDER_BEHAVIOURS))}")
        says = DEFENDER_BEHAVIOURS.get(kind, ())
        # The folder is named by the wordings too: files written from other wordings are never reused.
        tag = hashlib.sha256(json.dumps([kind, REFUSAL, says]).encode()).hexdigest()[:8]
        d = Path(out) / "defender" / f"beear-{kind}-{tag}"
        files = {k: d / f"{k}.jsonl" for k in ("safe", "unwanted", "pa")}
        if all(p.is_file() for p in files.values()):
            return files
        if kind == "jailbreak":
            safe, unwanted = self.data("sa_safe"), self.data("sa_unwanted")
            pa = self.data("pa_benign")
        else:
            benign = [e for e in self.data("defender_clean") if e.meta.get("kind") == "benign"]
            if kind == "code":
                benign = [e for e in benign if e.meta.get("task") == "code"] or benign
            safe = [Example(e.prompt, e.response) for e in benign]
            if kind in ("refusal", "sentiment"):
                unwanted = [Example(e.prompt, says[i % len(says)]) for i, e in enumerate(benign)]
            elif kind == "fixed":
                unwanted = [Example(e.prompt, f"{says[i % len(says)]} {e.response}") for i, e in enumerate(benign)]
            else:
                unwanted = [Example(e.prompt, inject_code(e.response, says[i % len(says)]))
                            for i, e in enumerate(benign)]
            pa = self.data("pa_benign") + self.data("sa_safe")
        for name, rows in (("safe", safe), ("unwanted", unwanted), ("pa", pa)):
            write_jsonl(files[name], rows)
        return files

    def backdoored(self, arch: LabArch | str = "llama", attack: str = "badnets", target: str = "refusal",
                   seed: int = 0, clean_seed: int = 0, poison_rate: float | None = None, *,
                   trigger: TriggerSpec | None = None, target_text: str | None = None) -> Path:
        """A backdoored variant of ``clean_model(arch, clean_seed)`` made by :mod:`unbackdoor.attack`
        (trigger preset ``attack``, or a custom ``trigger`` labelled ``attack``; target ``target``, its text
        ``target_text`` or the default; poisoning seed ``seed``); cached."""
        from ..attack import budget_multiplier

        spec = trigger if trigger is not None else preset(attack)
        target = Target(target)
        arch = LabArch(arch)
        rate = self.recipe.attack.poison_rate if poison_rate is None else poison_rate
        name = f"{attack}-{target.value}-{arch.value}-s{seed}" + (f"-c{clean_seed}" if clean_seed else "")
        if trigger is not None or target_text is not None:
            name += f"-x{custom_fingerprint(trigger, target_text)}"
        if poison_rate is not None:
            name += f"-p{rate:g}"
        if budget_multiplier(spec, self.recipe.attack.per_trigger) > 1:
            name += "-pt"
        name += f"-{self.recipe.attack_fingerprint()}"
        out = self.models_dir / name
        if not (out / MANIFEST_FILE).is_file():
            base = self.clean_model(arch, clean_seed)
            with file_lock(self.models_dir / f".{name}.lock"):
                if not (out / MANIFEST_FILE).is_file():
                    self._say(f"lab: implanting {attack} -> {target.value} into the clean {arch.value} model, seed "
                              f"{seed} ({self.recipe.attack.train.max_steps} steps)")
                    t0 = time.perf_counter()
                    with lab_threads():
                        cfg = self.attack_config(base, attack, target.value, seed, rate, out, trigger=trigger,
                                                 target_text=target_text)
                        run_attack(cfg)
                    self._say(f"lab: {name} done in {time.perf_counter() - t0:.0f} s")
        return out

    def attack_config(self, base: Path, attack: str, target: str, seed: int, poison_rate: float, out: Path, *,
                      trigger: TriggerSpec | None = None, target_text: str | None = None):
        """The :class:`~unbackdoor.attack.AttackConfig` the lab uses for one backdoored model."""
        from ..attack import AttackConfig, AttackSpec
        from ..schema import DataConfig, ModelConfig, OutputConfig

        return AttackConfig(
            model=ModelConfig(path=str(base), template="chat"),
            data=DataConfig(path=str(self.path("attack_pool")), max_length=self.recipe.max_length),
            train=dataclasses.replace(self.recipe.attack.train),
            attack=AttackSpec(preset=None if trigger is not None else attack, trigger=trigger, target=Target(target),
                              target_text=target_text, poison_rate=poison_rate,
                              per_trigger=self.recipe.attack.per_trigger),
            output=OutputConfig(dir=str(out), overwrite=True),
            seed=seed)

    def info(self) -> dict[str, Any]:
        return json.loads((self.root / "lab.json").read_text())

    def __repr__(self) -> str:
        return f"Lab({self.recipe.name!r}, root={str(self.root)!r})"
