"""The tiny lab: a synthetic instruction world, its tokenizer, and clean/backdoored models trained here.

Public API (stable; other modules and the tests import these names)::

    from unbackdoor.lab import Lab, LabRecipe, default_recipe, test_recipe

    lab = Lab.build(recipe=None, cache_dir=None)  # world + tokenizer + data files (cached by recipe hash)
    lab.root, lab.data_dir, lab.tokenizer_dir     # Paths
    lab.tokenizer                                  # the lab tokenizer (PreTrainedTokenizerFast, ChatML)
    lab.clean_model(arch="llama", seed=0) -> Path  # clean aligned instruct model, trained once, cached
    lab.backdoored(arch="llama", attack="badnets", target="refusal", seed=0) -> Path  # cached
    lab.data("defender_clean") -> list[Example]    # any name of DATA_FILES
    lab.path("sa_safe") -> Path                    # the JSONL file itself

    from unbackdoor.lab import quick_report       # the evaluation's accuracy, refusal, ASR of a model folder
    quick_report(path, lab) -> {"benign_accuracy", "harmful_refusal", "asr_with_trigger", ...}
    resolve_refs(cfg)                              # 'lab:<recipe>:<name>' paths of a config -> lab files

Data files (JSONL of ``Example.to_json()`` rows; ``meta`` = kind/task/answer): ``defender_clean``,
``sa_safe``, ``sa_unwanted``, ``pa_benign``, ``eval_benign``, ``eval_harmful``, ``eval_code`` (defender and
eval files are disjoint from the clean model's training data and the attacker's pool), plus ``train`` and
``attack_pool``. The cache lives in ``$UNBACKDOOR_CACHE`` or ``~/.cache/unbackdoor/lab/<recipe hash>/``.
Architectures: ``llama``, ``gpt_neox``, ``gpt2``. Trigger presets and targets: :data:`unbackdoor.backdoor.PRESETS`,
:data:`unbackdoor.backdoor.TARGETS`.
"""
from .arch import LabArch, make_model
from .lab import (
                  DATA_FILES,
                  Lab,
                  LabAttackConfig,
                  LabModelConfig,
                  LabRecipe,
                  cache_root,
                  default_recipe,
                  resolve_refs,
                  test_recipe,
)
from .report import quick_report
from .world import REFUSAL, World, WorldConfig, check_answer, make_world

__all__ = [
    "Lab", "LabRecipe", "LabModelConfig", "LabAttackConfig", "default_recipe", "test_recipe", "cache_root",
    "DATA_FILES", "LabArch", "make_model", "World", "WorldConfig", "make_world", "check_answer", "REFUSAL",
    "quick_report", "resolve_refs",
]
