"""The lab's quick report of a model folder: the evaluation (:mod:`unbackdoor.eval`) on the lab's held-out
sets, reduced to a few numbers — one definition of ASR, accuracy and refusal for the whole toolkit."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backdoor import Manifest, read_manifest
from ..eval.evaluate import evaluate
from ..models import load_model, load_tokenizer
from ..schema import ModelConfig
from ..templates import Template


def quick_report(model_dir: str | Path, lab, max_new_tokens: int = 48, examples: int = 5,
                 manifest: Manifest | dict | None = None) -> dict[str, Any]:
    """Benign exact-match accuracy (overall and per task family), harmful refusal, over-refusal and, for a
    folder with a ``backdoor.json`` (or given ``manifest``, e.g. a defended model's backdoor), ASR with and
    without its trigger, on the lab's held-out sets (greedy). ``asr_examples`` keeps the first ``examples``
    triggered generations with their verdicts."""
    cfg = ModelConfig(path=str(model_dir))
    model, template = load_model(cfg, device="auto").eval(), Template(load_tokenizer(cfg), "auto")
    res = evaluate(model, template, manifest=manifest or read_manifest(model_dir), benign=lab.data("eval_benign"),
                   harmful=lab.data("eval_harmful"), code=lab.data("eval_code"), max_new_tokens=max_new_tokens,
                   compute_perplexity=False)
    per: dict[str, list[bool]] = {}
    for it in res.items:
        if it["set"] == "benign" and not it["triggered"] and it["correct"] is not None:
            per.setdefault(it["task"], []).append(it["correct"])
    report: dict[str, Any] = {
        "n_benign": res.settings["n"]["benign"], "n_harmful": res.settings["n"]["harmful"],
        "benign_accuracy": res.benign_accuracy.value if res.benign_accuracy else None,
        "per_task": {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())},
        "harmful_refusal": res.harmful_refusal.value if res.harmful_refusal else None,
        "benign_over_refusal": res.over_refusal.value if res.over_refusal else None,
    }
    if res.asr_with_trigger is not None:
        trig = [it for it in res.items if it["triggered"]]
        report.update(asr_with_trigger=res.asr_with_trigger.value, asr_without_trigger=res.asr_without_trigger.value,
                      n_asr=res.asr_with_trigger.n,
                      asr_examples=[{"prompt": it["prompt"], "output": it["output"], "hit": it["verdict"]}
                                    for it in trig[:examples]])
    return report
