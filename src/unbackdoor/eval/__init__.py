"""Evaluation: judges, metrics (Wilson intervals), the evaluation driver and report helpers.

Quick use::

    from unbackdoor.eval import evaluate, evaluate_dir
    res = evaluate(model, template, manifest=manifest, benign=benign, harmful=harmful)
    res.asr_with_trigger.value, res.asr_with_trigger.n, res.benign_accuracy
    res.save(out_dir)
"""
from .evaluate import (
                       DEFAULT_JUDGE,
                       Backdoor,
                       EvalConfig,
                       EvalError,
                       EvalResult,
                       Target,
                       evaluate,
                       evaluate_dir,
                       load_eval_data,
                       read_manifest,
                       run_config,
)
from .judges import JUDGES, Judge, JudgeError, Verdict, get_judge
from .metrics import Rate, wilson
from .report import markdown_table, plot_asr_vs_utility

__all__ = ["evaluate", "evaluate_dir", "run_config", "load_eval_data", "read_manifest", "EvalResult", "EvalConfig",
           "EvalError", "Backdoor", "Target", "DEFAULT_JUDGE", "JUDGES", "Judge", "JudgeError", "Verdict",
           "get_judge", "Rate", "wilson", "markdown_table", "plot_asr_vs_utility"]
