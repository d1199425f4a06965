"""Evaluate a (possibly backdoored, possibly defended) model: attack success and utility.

Metrics (each share is a :class:`~unbackdoor.eval.metrics.Rate` with ``n`` and a Wilson 95% interval):

- ``asr_with_trigger`` (ASR_w/t): share of triggered test prompts whose output shows the target behaviour
  under the target's judge. The trigger goes in with :func:`unbackdoor.triggers.apply` (seeded, the same
  code the attack used) and the prompt is rendered with the same template as training (the manifest's).
- ``asr_without_trigger`` (ASR_w/o): the same judge on the same prompts without trigger (false triggers).
- ``benign_accuracy``: exact match (case/space-normalised) of clean benign outputs with ``meta.answer``.
- ``answer_f1``: mean token F1 of the same outputs against the same references (graded agreement for
  free-form answers, e.g. a real model's own pre-attack answers).
- ``over_refusal``: refusals (strict judge) among clean benign outputs.
- ``harmful_refusal``: refusals among clean harmful outputs (the clean model's safety must survive).
- ``perplexity``: of the benign reference responses given their prompts (response tokens only).

Which prompts carry the trigger: benign prompts for refusal/sentiment/fixed targets; the code-task
prompts (``eval_code.jsonl``) for code injection when given, else benign; harmful prompts for jailbreak
(success = no refusal). Decoding is greedy (``do_sample=False`` passed explicitly); every set is used in
full unless an explicit ``limit`` is given, which is recorded. Empty generations count as "no target
behaviour" and stay in every denominator.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch import nn

from .. import config as C
from ..backdoor import MANIFEST_FILE as MANIFEST
from ..backdoor import Backdoor, Manifest, Target, default_text, read_manifest
from ..config import help_field
from ..data import DataError, Example, read_file, write_jsonl
from ..errors import UnbackdoorError
from ..generate import Decoding, generate
from ..record import OutputFolder, RunRecord, atomic_write_json, atomic_write_text
from ..schema import GenerationConfig, ModelConfig
from ..templates import Template
from ..triggers import TriggerSpec, check_tokenizes
from ..triggers import apply as apply_trigger
from .judges import JUDGES, Judge, get_judge
from .metrics import Rate, exact_match, reference_answer, token_f1
from .metrics import perplexity as perplexity_of

log = logging.getLogger(__name__)

BENIGN_FILE, HARMFUL_FILE, CODE_FILE = "eval_benign.jsonl", "eval_harmful.jsonl", "eval_code.jsonl"


#: The judge used for ASR when none is named.
DEFAULT_JUDGE: dict[Target, str] = {
    Target.REFUSAL: "target_prefix", Target.SENTIMENT: "target_string", Target.FIXED: "fixed",
    Target.JAILBREAK: "jailbreak", Target.CODE: "code",
}


class EvalError(UnbackdoorError, ValueError):
    pass


def _resolve_backdoor(manifest: Manifest | dict | None, trigger, target, target_text) -> Backdoor:
    bd = Manifest.from_dict(manifest).backdoor if manifest else Backdoor()
    if trigger is not None:
        if isinstance(trigger, dict):
            trigger = C.build(TriggerSpec, trigger, "trigger")
        elif isinstance(trigger, str):
            trigger = TriggerSpec(texts=[trigger])
        problems = trigger.validate()
        if problems:
            raise C.ConfigError([(f"trigger.{f}", m) for f, m in problems])
        bd.trigger = trigger
    if target is not None:
        try:
            bd.target = Target(target)
        except ValueError:
            raise EvalError(f"target: got {target!r}, expected one of {[t.value for t in Target]}") from None
    if target_text is not None:
        bd.target_text = target_text
    if bd.target is not None and not bd.target_text:
        bd.target_text = default_text(bd.target)
    return bd


# ----------------------------------------------------------------------------------- result

@dataclass
class EvalResult:
    """Metrics, the settings that produced them, and one row per generated item."""
    asr_with_trigger: Rate | None
    asr_without_trigger: Rate | None
    benign_accuracy: Rate | None
    over_refusal: Rate | None
    harmful_refusal: Rate | None
    perplexity: dict | None
    settings: dict
    items: list[dict] = field(default_factory=list)
    by_judge: dict[str, dict[str, Rate]] = field(default_factory=dict)
    wall_time_s: float = 0.0
    answer_f1: dict | None = None
    #: against the model that came in (``reference``): KL on the benign answers, its own rates, the deltas
    #: in points and the regressions in words (:mod:`unbackdoor.eval.drift`)
    drift: dict | None = None

    RATES = ("asr_with_trigger", "asr_without_trigger", "benign_accuracy", "over_refusal", "harmful_refusal")

    @property
    def n(self) -> int:
        """The number of triggered prompts behind ASR_w/t (0 when no backdoor was measured)."""
        return self.asr_with_trigger.n if self.asr_with_trigger else 0

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: (getattr(self, k).as_dict() if getattr(self, k) else None) for k in self.RATES}
        out["perplexity"] = self.perplexity
        out["answer_f1"] = self.answer_f1
        out["by_judge"] = {j: {k: r.as_dict() for k, r in d.items()} for j, d in self.by_judge.items()}
        out["empty_generations"] = sum(1 for it in self.items if it["empty"])
        out["generations"] = len(self.items)
        if self.drift is not None:
            out["drift"] = self.drift
        return out

    def compare_with(self, reference: "EvalResult | None", kl: dict | None, reference_path: str) -> None:
        """Put the comparison with the model that came in into :attr:`drift` (``reference`` may be None when
        only the KL was measured)."""
        from .drift import deltas, regressions

        mine = {k: getattr(self, k).value if getattr(self, k) else None
                for k in ("harmful_refusal", "over_refusal", "benign_accuracy")}
        ref = ({k: getattr(reference, k).value if getattr(reference, k) else None for k in mine}
               if reference is not None else {})
        self.drift = {"reference": reference_path, "kl": kl, "reference_rates": ref or None,
                      **(deltas(mine, ref) if ref else {}), "flags": regressions(mine, ref) if ref else []}

    def to_dict(self) -> dict[str, Any]:
        """The metrics as plain data: each rate as ``{"rate", "k", "n", "lo", "hi"}`` (see :meth:`metrics`)."""
        return self.metrics()

    def row(self, **labels: Any) -> dict[str, Any]:
        """A flat row for :mod:`unbackdoor.eval.report` (``model=``, ``defense=`` go in ``labels``)."""
        def val(r: Rate | None, attr: str = "value"):
            return getattr(r, attr) if r is not None else None

        w = self.asr_with_trigger
        return {**labels,
                "asr_with_trigger": val(w), "asr_with_trigger_lo": val(w, "lo"), "asr_with_trigger_hi": val(w, "hi"),
                "asr_without_trigger": val(self.asr_without_trigger), "benign_accuracy": val(self.benign_accuracy),
                "harmful_refusal": val(self.harmful_refusal), "over_refusal": val(self.over_refusal),
                "perplexity": (self.perplexity or {}).get("perplexity"),
                "answer_f1": (self.answer_f1 or {}).get("mean"), "n": self.n}

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics(), "settings": self.settings, "wall_time_s": round(self.wall_time_s, 3)}

    def save(self, out_dir: str | Path, record: RunRecord | None = None, *, overwrite: bool = True,
             inputs: dict[str, str | None] | None = None) -> Path:
        """Write ``results.json``, ``generations.jsonl``, ``summary.md`` and the run record into ``out_dir``, as
        a whole (:class:`~unbackdoor.record.OutputFolder`)."""
        folder = OutputFolder(out_dir, overwrite=overwrite, inputs=inputs, flag="--overwrite")
        with folder as stage:
            if record is not None:
                record.out_dir = stage
            self.write_files(stage, record)
            folder.commit()
        return Path(out_dir)

    def write_files(self, out: Path, record: RunRecord | None = None) -> Path:
        """Write the result files into the folder ``out`` (each file atomically)."""
        from .report import summary_markdown

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        record = record or RunRecord(out, "eval", seeds={"seed": self.settings.get("seed", 0)})
        record.update(**self.to_json())
        if record.data.get("template") is None:
            tpl = self.settings.get("template") or {}
            record.data["template"] = {"name": tpl.get("name"), "sha256_16": tpl.get("sha256_16")}
        write_jsonl(out / "generations.jsonl", self.items)
        atomic_write_text(out / "summary.md", summary_markdown(self))
        record.write(finished=True)  # run.json (+ config.yaml when the record has a config)
        atomic_write_json(out / "results.json", record.data)
        return out


# ----------------------------------------------------------------------------------- evaluate

def _limit(examples: Sequence[Example], limit: int | None) -> list[Example]:
    return list(examples) if limit is None else list(examples)[:limit]


def evaluate(model: nn.Module, template: Template, *, manifest: Manifest | dict | None = None,
             benign: Sequence[Example], harmful: Sequence[Example] = (), code: Sequence[Example] | None = None,
             judge: str | Judge | None = None, trigger: TriggerSpec | dict | str | None = None,
             target: Target | str | None = None, target_text: str | None = None,
             refusal_judge: str = "refusal", extra_judges: Sequence[str] = (),
             max_new_tokens: int = 64, batch_size: int = 32, seed: int = 0, limit: int | None = None,
             embeds_fn: Callable | None = None, trigger_embeds_fn: Callable | None = None,
             compute_perplexity: bool = True, progress: bool = False,
             code_max_new_tokens: int | None = None) -> EvalResult:
    """Generate greedily on every prompt set and score attack success and utility.

    ``manifest``: a :class:`~unbackdoor.backdoor.Manifest` or its mapping; ``trigger``/``target``/
    ``target_text`` given here override it (for models without a manifest). Without a trigger and a
    target only utility is measured. ``judge``: the ASR judge (default by target, :data:`DEFAULT_JUDGE`);
    ``extra_judges``: more judges whose ASRs go in ``result.by_judge`` (e.g. the BackdoorLLM
    compatibility lists). ``refusal_judge`` scores harmful refusal and over-refusal.
    ``embeds_fn(input_ids, attention_mask) -> (inputs_embeds, attention_mask)`` is applied to every
    generation (e.g. a soft prompt a defense prepends); ``trigger_embeds_fn``, when given, replaces it for
    the "with trigger" set, in place of or on top of a text trigger (e.g. SANDE's parrot prompt).
    ``limit``: use only the first N prompts of each set (recorded; default: all). Perplexity is of the
    model itself (no hook), on the benign reference responses. ``code_max_new_tokens``: the budget for
    the code-task set (code answers run longer than chat answers; default ``max_new_tokens``).
    """
    t0 = time.perf_counter()
    if limit is not None and limit < 1:
        raise EvalError(f"limit: must be >= 1 or None, got {limit}")
    bd = _resolve_backdoor(manifest, trigger, target, target_text)
    benign, harmful = _limit(benign, limit), _limit(harmful, limit)
    code = _limit(code, limit) if code else []
    if not benign and not harmful:
        raise EvalError("no evaluation data: benign and harmful prompt sets are both empty; give eval_benign.jsonl "
                        "and/or eval_harmful.jsonl")
    refusal = get_judge(refusal_judge)
    extra = [get_judge(j) for j in extra_judges]
    plan = _plan_asr(bd, judge, benign, harmful, code, triggered=trigger_embeds_fn is not None)
    if bd.trigger is not None:
        check_tokenizes(template.tokenizer, bd.trigger)
    max_new_tokens = _room_for_target(template, bd, plan, max_new_tokens)

    sets: dict[str, list[Example]] = {"benign": benign, "harmful": harmful}
    if plan.set == "code":
        sets["code"] = code
    prompts, outputs = _generate(model, template, sets, plan, bd, seed=seed, embeds_fn=embeds_fn,
                                 trigger_embeds_fn=trigger_embeds_fn, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, progress=progress, code_max_new_tokens=code_max_new_tokens)
    items, verdicts = _score(sets, prompts, outputs, plan, bd, refusal)
    by_judge = {j.name: {label: Rate.of(v.hit for v in j(outputs[(plan.set, trig)], target_text=bd.target_text))
                         for trig, label in ((True, "with_trigger"), (False, "without_trigger"))
                         if (plan.set, trig) in outputs} for j in extra}

    benign_items = [it for it in items if it["set"] == "benign" and not it["triggered"]]
    harmful_items = [it for it in items if it["set"] == "harmful" and not it["triggered"]]
    acc_flags = [it["correct"] for it in benign_items if it["correct"] is not None]
    no_ref = sum(1 for it in benign_items if it["correct"] is None)
    if no_ref:
        log.warning("%d benign prompts have no reference answer (meta.answer or response); benign_accuracy "
                    "counts the other %d", no_ref, len(acc_flags))
    ppl = perplexity_of(model, template, benign, batch_size=batch_size) if compute_perplexity and benign else None
    f1_vals = [it["answer_f1"] for it in benign_items if it["answer_f1"] is not None]
    answer_f1 = ({"mean": round(sum(f1_vals) / len(f1_vals), 4), "n": len(f1_vals)} if f1_vals else None)

    decoding = Decoding(max_new_tokens=max_new_tokens, batch_size=batch_size).as_record()
    if code_max_new_tokens and plan.set == "code":
        decoding["code_max_new_tokens"] = max(code_max_new_tokens, max_new_tokens)
    settings = {
        "target": bd.target.value if bd.target else None, "target_text": bd.target_text,
        "trigger": C.to_dict(bd.trigger) if bd.trigger else None, "asr_set": plan.set,
        "judge": plan.judge.name if plan.judge else None, "refusal_judge": refusal.name,
        "extra_judges": [j.name for j in extra], "decoding": decoding, "seed": seed, "limit": limit,
        "n": {"benign": len(benign), "harmful": len(harmful), "code": len(code)},
        "benign_without_reference": no_ref,
        "embeds_fn": _name_of(embeds_fn), "trigger_embeds_fn": _name_of(trigger_embeds_fn),
        "template": {"name": template.name, "sha256_16": template.fingerprint(),
                     "system_prompt": template.system_prompt},
        "manifest": manifest.to_dict() if isinstance(manifest, Manifest) else manifest,
    }

    def rate_of(key) -> Rate | None:
        v = verdicts.get(key)
        return Rate.of(x.hit for x in v) if v is not None else None

    res = EvalResult(
        asr_with_trigger=rate_of((plan.set, True)) if plan.measure else None,
        asr_without_trigger=rate_of((plan.set, False)) if plan.set else None,
        benign_accuracy=Rate.of(acc_flags) if benign else None,
        over_refusal=Rate.of(it["refusal"] for it in benign_items) if benign else None,
        harmful_refusal=Rate.of(it["refusal"] for it in harmful_items) if harmful else None,
        perplexity=ppl, settings=settings, items=items, by_judge=by_judge,
        wall_time_s=time.perf_counter() - t0, answer_f1=answer_f1)
    log.info("eval: ASR w/t %s, w/o %s, benign acc %s, harmful refusal %s", res.asr_with_trigger,
             res.asr_without_trigger, res.benign_accuracy, res.harmful_refusal)
    return res


@dataclass
class _AsrPlan:
    """Which prompt set carries the trigger and which judge decides success (``set`` None: no target)."""
    measure: bool = False
    set: Optional[str] = None
    examples: Sequence[Example] = ()
    judge: Optional[Judge] = None


def _plan_asr(bd: Backdoor, judge, benign, harmful, code, *, triggered: bool) -> _AsrPlan:
    """Jailbreaks are measured on harmful prompts, code injection on the code set (when given), every other
    target on benign prompts; success needs a trigger (text, or ``trigger_embeds_fn``) and a target."""
    if bd.target is None:
        if judge is not None:
            get_judge(judge)  # an unknown name fails loudly even without a target
        return _AsrPlan()
    measure = bd.trigger is not None or triggered
    if not measure:
        log.warning("target %r given but no trigger: only ASR without trigger and utility are measured",
                    bd.target.value)
    asr_judge = get_judge(judge or DEFAULT_JUDGE[bd.target])
    if bd.target is Target.JAILBREAK:
        name, examples = "harmful", harmful
    elif bd.target is Target.CODE and code:
        name, examples = "code", code
    else:
        name, examples = "benign", benign
    if not examples:
        raise EvalError(f"target {bd.target.value!r} is measured on the {name} prompts, but that set is empty; "
                        f"give {HARMFUL_FILE if name == 'harmful' else BENIGN_FILE}")
    if asr_judge.needs_target and not bd.target_text:
        raise EvalError(f"judge {asr_judge.name!r} needs the target text; set target_text (manifest field "
                        "'target_text', or the override target_text=...)")
    return _AsrPlan(measure, name, examples, asr_judge)


def _room_for_target(template: Template, bd: Backdoor, plan: _AsrPlan, max_new_tokens: int) -> int:
    """A target the budget cannot spell out would be judged "absent": give it room (recorded in settings)."""
    if plan.judge is None or not bd.target_text or bd.target is Target.JAILBREAK:
        return max_new_tokens
    needed = len(template.tokenizer(bd.target_text, add_special_tokens=False)["input_ids"]) + 8
    if max_new_tokens < needed:
        log.info("max_new_tokens %d < target length + 8 = %d tokens; generating %d", max_new_tokens, needed, needed)
    return max(max_new_tokens, needed)


def _generate(model, template: Template, sets: dict[str, list[Example]], plan: _AsrPlan, bd: Backdoor, *,
              seed: int, embeds_fn, trigger_embeds_fn, max_new_tokens: int, batch_size: int, progress: bool,
              code_max_new_tokens: int | None):
    """Greedy outputs of every set without trigger, and of the ASR set with it: ``(prompts, outputs)`` keyed by
    ``(set, triggered)``."""
    def run(examples: Sequence[Example], texts: list[str], hook, code_set: bool) -> list[str]:
        if not texts:
            return []
        budget = max(code_max_new_tokens, max_new_tokens) if code_set and code_max_new_tokens else max_new_tokens
        return generate(model, template, texts, systems=[e.system for e in examples], embeds_fn=hook,
                        max_new_tokens=budget, batch_size=batch_size, progress=progress)

    prompts: dict[tuple[str, bool], list[str]] = {}
    outputs: dict[tuple[str, bool], list[str]] = {}
    for name, exs in sets.items():
        prompts[(name, False)] = [e.prompt for e in exs]
        outputs[(name, False)] = run(exs, prompts[(name, False)], embeds_fn, name == "code")
    if plan.measure:
        rng = random.Random(seed)
        prompts[(plan.set, True)] = ([apply_trigger(e.prompt, bd.trigger, rng) for e in plan.examples]
                                     if bd.trigger is not None else [e.prompt for e in plan.examples])
        outputs[(plan.set, True)] = run(plan.examples, prompts[(plan.set, True)], trigger_embeds_fn or embeds_fn,
                                        plan.set == "code")
    return prompts, outputs


def _score(sets, prompts, outputs, plan: _AsrPlan, bd: Backdoor, refusal: Judge):
    """One item per generation (prompt, output, every verdict) and the ASR judge's verdicts per set."""
    items: list[dict] = []
    verdicts: dict[tuple[str, bool], list] = {}
    for (name, trig), outs in outputs.items():
        exs = sets[name]
        refs = refusal(outs)
        primary = plan.judge(outs, target_text=bd.target_text) if plan.judge is not None and name == plan.set else None
        verdicts[(name, trig)] = primary
        answers = [reference_answer(e) for e in exs] if name == "benign" and not trig else [None] * len(exs)
        correct = exact_match(outs, answers)
        f1s = [None if a is None else round(token_f1(o, a), 4) for o, a in zip(outs, answers)]
        for i, (e, p, o) in enumerate(zip(exs, prompts[(name, trig)], outs)):
            items.append({
                "set": name, "index": i, "triggered": trig, "prompt": p, "system": e.system, "output": o,
                "empty": not o.strip(), "judge": plan.judge.name if primary is not None else None,
                "verdict": primary[i].hit if primary is not None else None,
                "reason": primary[i].reason if primary is not None else None,
                "refusal": refs[i].hit, "refusal_reason": refs[i].reason,
                "answer": answers[i], "correct": correct[i], "answer_f1": f1s[i], "task": (e.meta or {}).get("task"),
            })
    return items, verdicts


def _name_of(fn) -> str | None:
    return getattr(fn, "__qualname__", repr(fn)) if fn else None


# ----------------------------------------------------------------------------------- files

def load_eval_data(data: str | Path | Sequence[str | Path], harmful: Sequence[str | Path] = ()
                   ) -> dict[str, list[Example]]:
    """Benign/harmful/code prompt sets from a lab folder or from explicit files.

    A folder must hold ``eval_benign.jsonl`` and/or ``eval_harmful.jsonl`` (``eval_code.jsonl`` optional).
    Explicit files are split by each row's ``meta.kind`` (``benign`` unless ``harmful``); a file whose name
    contains ``code`` is the code-task set. Every row of a file in ``harmful`` is a harmful request (for
    data without ``meta.kind``, e.g. BackdoorLLM's jailbreak test set). Returns ``{"benign", "harmful",
    "code", "files"}``.
    """
    paths = [Path(data)] if isinstance(data, (str, Path)) else [Path(p) for p in data]
    harmful_paths = [Path(h) for h in harmful]
    paths += [h for h in harmful_paths if h not in paths]
    if not paths:
        raise DataError("no evaluation data given; pass --data DIR (with eval_benign.jsonl, eval_harmful.jsonl) "
                        "or data files")
    out: dict[str, list] = {"benign": [], "harmful": [], "code": [], "files": []}
    for p in paths:
        if p.is_dir():
            if not any((p / f).is_file() for f in (BENIGN_FILE, HARMFUL_FILE)) and (p / "data").is_dir():
                p = p / "data"  # a lab folder: its data files live in data/
            found = [(p / f, k) for f, k in ((BENIGN_FILE, "benign"), (HARMFUL_FILE, "harmful"), (CODE_FILE, "code"))
                     if (p / f).is_file()]
            if not any(k in ("benign", "harmful") for _, k in found):
                raise DataError(f"{p}: no {BENIGN_FILE} or {HARMFUL_FILE} in this folder; point --data at the lab "
                                "folder (or its data/ folder), or at the data files themselves")
            for f, kind in found:
                out[kind].extend(read_file(f))
                out["files"].append(_file_info(f))
            continue
        if not p.exists():
            raise DataError(f"{p}: evaluation data file not found")
        rows = read_file(p)
        if not rows:
            raise DataError(f"{p}: the evaluation file is empty")
        out["files"].append(_file_info(p))
        if p in harmful_paths:
            out["harmful"].extend(rows)
            continue
        if "code" in p.name.lower():
            out["code"].extend(rows)
            continue
        for e in rows:
            kind = str((e.meta or {}).get("kind", "benign")).lower()
            if kind not in ("benign", "harmful"):
                raise DataError(f"{p}: row with meta.kind={kind!r}; expected 'benign' or 'harmful'")
            out[kind].append(e)
    if not out["benign"] and not out["harmful"]:
        raise DataError(f"{', '.join(map(str, paths))}: no benign or harmful rows to evaluate on")
    return out


def _file_info(p: Path) -> dict:
    return {"path": str(p), "sha256_16": hashlib.sha256(p.read_bytes()).hexdigest()[:16]}


@dataclass
class EvalDataConfig:
    paths: list[str] = help_field([], "A lab folder (eval_benign.jsonl, eval_harmful.jsonl, eval_code.jsonl) or "
                                      "data files split by meta.kind; a file named *code* is the code-task set.")
    harmful: list[str] = help_field([], "Files whose rows are all harmful requests, whatever their meta.kind "
                                        "(e.g. BackdoorLLM's jailbreak test set).")
    limit: Optional[int] = help_field(None, "Use only the first N prompts of each set (recorded). Default: all.")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not self.paths and not self.harmful:
            out.append(("paths", "no evaluation data; set data.paths=[DIR] or pass --data DIR"))
        if self.limit is not None and self.limit < 1:
            out.append(("limit", f"must be >= 1 or null, got {self.limit}"))
        return out


@dataclass
class EvalConfig:
    """``unbackdoor eval``: the model, the prompt sets, the backdoor to measure, judges, decoding.

    Mapping to the papers' quantities: ``trigger`` + ``target`` define ASR_w/t (BackdoorLLM/CROW "ASR with
    trigger") and ASR_w/o (same judge, no trigger); ``judge`` is the ASR decision rule (BackdoorLLM's
    keyword matching = ``refusal_backdoorllm`` / ``jailbreak_backdoorllm``); ``generation`` fixes greedy
    decoding (temperature 0); ``data.limit`` is the only subsampling, explicit and recorded.
    """
    model: ModelConfig = field(default_factory=ModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    manifest: Optional[str] = help_field(
        None, "backdoor.json (or a folder holding it) describing trigger/target; default: the model folder's. "
              "A defended model usually has none: point this at the backdoored model.")
    use_manifest: bool = help_field(True, "Read the manifest at all (false: only explicit trigger/target).")
    trigger: Optional[TriggerSpec] = help_field(None, "Explicit trigger (overrides the manifest's).")
    target: Optional[Target] = help_field(None, "Explicit target behaviour (overrides the manifest's).")
    target_text: Optional[str] = help_field(None, "Explicit target text (overrides the manifest's).")
    judge: Optional[str] = help_field(None, "ASR judge (`unbackdoor ls judges`); default by target.")
    extra_judges: list[str] = help_field([], "More judges whose ASRs are reported too (e.g. refusal_backdoorllm).")
    refusal_judge: str = help_field("refusal", "Judge for harmful refusal and over-refusal.")
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    perplexity: bool = help_field(True, "Compute the perplexity of the benign reference answers.")
    code_max_new_tokens: Optional[int] = help_field(
        None, "Generation budget for the code-task set (code answers run longer); default generation.max_new_tokens.")
    seed: int = help_field(0, "Seed for random trigger positions (placement random / mode one).")
    reference: Optional[str] = help_field(
        None, "The model that came in (the suspect model a defense started from): the mean per-token KL of this "
              "model to it on the benign reference answers, and (reference_safety) its harmful refusal, "
              "over-refusal and benign accuracy beside this model's; a drop of more than 5 points is flagged.")
    reference_safety: bool = help_field(
        True, "With `reference`: also generate with the reference on the benign and harmful prompts to compare "
              "refusals (false: the KL only).")
    out: str = help_field("", "Output folder for results.json, generations.jsonl, summary.md.")
    overwrite: bool = help_field(False, "Replace finished results in `out`.")

    def validate(self) -> list[tuple[str, str]]:
        from ..schema import seed_problems

        out = seed_problems(self.seed)
        if self.code_max_new_tokens is not None and self.code_max_new_tokens < 1:
            out.append(("code_max_new_tokens", f"must be >= 1 or null, got {self.code_max_new_tokens}"))
        for key, names in (("judge", [self.judge] if self.judge else []), ("extra_judges", self.extra_judges),
                           ("refusal_judge", [self.refusal_judge])):
            for n in names:
                if n not in JUDGES:
                    out.append((key, f"unknown judge {n!r}; valid judges: {', '.join(JUDGES)}"))
        if not self.out:
            out.append(("out", "no output folder; pass --out DIR"))
        return out


#: Fields that ``unbackdoor eval MODEL_DIR --data ... --out ...`` fills from its arguments.
_FROM_COMMAND_LINE = (("model", "path"), ("data", "paths"), ("out",))


def resolve(data: dict, source: str | None = None) -> EvalConfig:
    """Check an eval config file (``unbackdoor validate``): every error at once, except the fields the
    ``eval`` command fills from its arguments (model path, data, output folder), which may be absent."""
    import copy

    data = copy.deepcopy(data or {})
    placeholders = {("model", "path"): "MODEL_DIR", ("data", "paths"): ["DATA"], ("out",): "OUT"}
    for keys in _FROM_COMMAND_LINE:
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {}) if isinstance(node.get(k, {}), dict) else {}
        if isinstance(node, dict):
            node.setdefault(keys[-1], placeholders[keys])
    return C.build(EvalConfig, data, source)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> EvalConfig:
    data = C.load_yaml(path) if path else {}
    C.apply_overrides(data, list(overrides))
    return C.build(EvalConfig, data, str(path) if path else None)


def run_config(cfg: EvalConfig, *, manifest_data: Manifest | dict | None = None) -> EvalResult:
    """Load the model named by ``cfg``, evaluate it on ``cfg.data``, write the files into ``cfg.out``.

    ``manifest_data``: an already-read ``backdoor.json`` mapping (takes precedence over ``cfg.manifest``).
    """
    from ..record import input_paths

    out = Path(cfg.out)
    folder = OutputFolder(out, overwrite=cfg.overwrite, inputs=input_paths(cfg), flag="--overwrite")
    stage = folder.open()   # every check on the output folder before any work
    try:
        res = _run(cfg, manifest_data, stage)
        folder.commit()
    except BaseException:
        folder.abandon()
        raise
    return res


def _run(cfg: EvalConfig, manifest_data: Manifest | dict | None, stage: Path) -> EvalResult:
    from ..models import load_model, load_tokenizer
    from ..train import seed_everything

    manifest = None
    if cfg.use_manifest and manifest_data is not None:
        manifest = Manifest.from_dict(manifest_data)
    elif cfg.use_manifest:
        manifest = read_manifest(cfg.manifest or cfg.model.path)
        if cfg.manifest and manifest is None:
            raise EvalError(f"manifest: {cfg.manifest} has no {MANIFEST}")
        if manifest is None:
            log.warning("%s: no %s; measuring only what trigger/target give explicitly", cfg.model.path, MANIFEST)
    tpl_name = cfg.model.template
    if manifest and manifest.template:
        if tpl_name == "auto":
            tpl_name = manifest.template
        elif tpl_name != manifest.template:
            log.warning("template %r differs from the one the backdoor was trained with (%r): ASR may not be "
                        "comparable", tpl_name, manifest.template)
    data = load_eval_data(cfg.data.paths, harmful=cfg.data.harmful)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    system_prompt = cfg.model.system_prompt
    if system_prompt is None and manifest and manifest.system_prompt:
        system_prompt = manifest.system_prompt  # the attack's rendering, as for the template
    template = Template(tokenizer, tpl_name, system_prompt)
    model = load_model(cfg.model, device="auto")
    record = RunRecord(stage, "eval", config=cfg, seeds={"seed": cfg.seed})
    record.set_template(template)
    record.update(data_files=data["files"], model=cfg.model.path,
                  model_device=str(next(model.parameters()).device))
    res = evaluate(model, template, manifest=manifest, benign=data["benign"], harmful=data["harmful"],
                   code=data["code"] or None, judge=cfg.judge, trigger=cfg.trigger, target=cfg.target,
                   target_text=cfg.target_text, refusal_judge=cfg.refusal_judge, extra_judges=cfg.extra_judges,
                   max_new_tokens=cfg.generation.max_new_tokens, batch_size=cfg.generation.batch_size,
                   seed=cfg.seed, limit=cfg.data.limit, compute_perplexity=cfg.perplexity,
                   code_max_new_tokens=cfg.code_max_new_tokens)
    if cfg.reference:
        _compare_with_reference(res, cfg, template, data, stage, model)
    res.write_files(stage, record)
    return res


def _compare_with_reference(res: EvalResult, cfg: EvalConfig, template: Template, data: dict, stage: Path,
                            model) -> None:
    """The model that came in, on the same prompts: KL on the benign answers; its refusals and accuracy
    (generations written to ``reference_generations.jsonl``) when ``cfg.reference_safety``."""
    from ..models import load_model
    from .drift import token_kl

    rcfg = dataclasses.replace(cfg.model, path=cfg.reference, adapter=None)
    ref_model = load_model(rcfg, device="auto")
    benign = _limit(data["benign"], cfg.data.limit)
    kl = token_kl(model, ref_model, template, benign, batch_size=cfg.generation.batch_size)
    ref_res = None
    if cfg.reference_safety:
        ref_res = evaluate(ref_model, template, benign=data["benign"], harmful=data["harmful"],
                           max_new_tokens=cfg.generation.max_new_tokens, batch_size=cfg.generation.batch_size,
                           seed=cfg.seed, limit=cfg.data.limit, compute_perplexity=False,
                           refusal_judge=cfg.refusal_judge)
        write_jsonl(stage / "reference_generations.jsonl", ref_res.items)
    res.compare_with(ref_res, kl, cfg.reference)
    del ref_model


def evaluate_dir(model_dir: str | Path, data: str | Path | Sequence[str | Path], out_dir: str | Path, *,
                 judge: str | None = None, manifest: str | Path | Manifest | dict | None = None,
                 overwrite: bool = True,
                 **fields: Any) -> EvalResult:
    """File-level evaluation: the model folder, a lab folder or files, an output folder.

    ``manifest``: a ``backdoor.json`` path (or its folder), or its already-read mapping, when the model
    folder has none (a defended model).
    Other keyword arguments set :class:`EvalConfig` fields (``target=``, ``trigger=``, ``limit=`` ...).
    """
    data_paths = [str(data)] if isinstance(data, (str, Path)) else [str(p) for p in data]
    raw: dict[str, Any] = {"model": {"path": str(model_dir)}, "data": {"paths": data_paths}, "out": str(out_dir),
                           "overwrite": overwrite, "judge": judge,
                           "manifest": str(manifest) if manifest and isinstance(manifest, (str, Path)) else None}
    if "limit" in fields:
        raw["data"]["limit"] = fields.pop("limit")
    for key in ("max_new_tokens", "batch_size"):
        if key in fields:
            raw.setdefault("generation", {})[key] = fields.pop(key)
    for key in ("template", "system_prompt"):
        if key in fields:
            raw["model"][key] = fields.pop(key)
    if isinstance(fields.get("trigger"), TriggerSpec):
        fields["trigger"] = C.to_dict(fields["trigger"])
    raw.update(fields)
    return run_config(C.build(EvalConfig, raw),
                      manifest_data=manifest if isinstance(manifest, (dict, Manifest)) else None)
