"""Every inference path puts the model on the run's device (model.device), chosen in one place."""
from __future__ import annotations

from pathlib import Path

import torch

from unbackdoor import models as M
from unbackdoor.schema import ModelConfig


def test_inference_device_is_this_process_gpu_or_the_cpu(monkeypatch):
    assert M.inference_device(ModelConfig(path="m")) == torch.device("cpu") or torch.cuda.is_available()
    assert M.inference_device(ModelConfig(path="m", device="cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert M.inference_device(ModelConfig(path="m")) == torch.device("cuda", 1)
    assert M.inference_device(ModelConfig(path="m", device="cuda:0")) == torch.device("cuda", 0)


def test_eval_prune_quantize_and_reports_load_onto_the_inference_device(lab, tmp_path, monkeypatch):
    from unbackdoor import defend as D
    from unbackdoor.eval.evaluate import evaluate_dir
    from unbackdoor.lab.report import quick_report

    calls = []
    real = M.load_model

    def spy(cfg, *, device=None):
        model = real(cfg, device=device)
        calls.append((device, next(model.parameters()).device))
        return model

    monkeypatch.setattr(M, "load_model", spy)
    monkeypatch.setattr(D, "load_model", spy)
    bad = Path(lab.backdoored("llama", "badnets", "refusal"))
    res = evaluate_dir(bad, lab.data_dir, tmp_path / "eval", limit=2, max_new_tokens=4)
    assert res.to_dict() and calls[-1] == ("auto", M.inference_device())
    for method in ("prune", "quantize"):
        cfg = D.load_config(f"configs/{method}/lab.yaml", [f"model.path={bad}", f"output.dir={tmp_path / method}",
                                                           f"data.path={lab.path('defender_clean')}"])
        run = D.defend(cfg)
        assert calls[-1] == ("auto", M.inference_device()) and run["model_device"] == str(M.inference_device())
    quick_report(bad, lab)
    assert calls[-1] == ("auto", M.inference_device())


def test_generation_and_perplexity_back_off_when_memory_runs_out(tiny_model, tokenizer, caplog):
    """A model that runs out of memory on batches above 2: generation and perplexity halve their batch size
    and give the results of an unconstrained run; at batch 1 the error names what to change."""
    import pytest

    from unbackdoor.data import Example
    from unbackdoor.eval.metrics import perplexity
    from unbackdoor.generate import generate
    from unbackdoor.templates import Template

    tpl = Template(tokenizer)
    prompts = ["what is two plus three", "c b a", "reverse the list a b c", "hello", "say hi", "a b"]
    refs = [Example(p, "the answer is five") for p in prompts]
    free_gen = generate(tiny_model, tpl, prompts, max_new_tokens=4, batch_size=8)
    free_ppl = perplexity(tiny_model, tpl, refs, batch_size=8)["nll"]

    real_forward = tiny_model.forward
    limit = {"rows": 2}

    def tight(*a, **k):
        ids = k.get("input_ids") if k.get("input_ids") is not None else k.get("inputs_embeds")
        if ids.shape[0] > limit["rows"]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(*a, **k)

    tiny_model.forward = tight
    with caplog.at_level("WARNING"):
        assert generate(tiny_model, tpl, prompts, max_new_tokens=4, batch_size=8) == free_gen
        assert perplexity(tiny_model, tpl, refs, batch_size=8)["nll"] == pytest.approx(free_ppl, rel=1e-5)
    assert "batch size lowered to 2" in caplog.text
    limit["rows"] = 0
    with pytest.raises(torch.OutOfMemoryError, match="batch size 1"):
        generate(tiny_model, tpl, prompts, max_new_tokens=4, batch_size=8)
