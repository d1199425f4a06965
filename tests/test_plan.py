"""`unbackdoor plan`: memory estimates from a model's config.json, counted on the meta device."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from unbackdoor.cli import main
from unbackdoor.defend import resolve
from unbackdoor.plan import count_saved, meta_model, plan, saved_bytes

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_7B = ROOT / "docs" / "results" / "plan" / "llama-2-7b"


def _real_saved(model, batch: int, seq: int) -> int:
    ids = torch.randint(3, model.config.vocab_size, (batch, seq))
    with count_saved(model) as seen:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2", "qwen2", "gemma3"])
def test_meta_device_count_equals_what_a_real_forward_saves(family, tokenizer):
    """The bytes autograd saves, counted on the meta device (no memory) with the fused-attention stand-in,
    are those a real CPU forward with SDPA saves, for five families."""
    from unbackdoor.lab.arch import make_model

    model = make_model(family, tokenizer, hidden=32, layers=2, heads=2, seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    meta = meta_model(model.config, torch.float32)
    for p in meta.parameters():
        p.requires_grad_(True)
    counted, largest = saved_bytes(meta, 3, 40)
    assert counted == _real_saved(model, 3, 40)
    assert 0 < largest < counted


def _cfg(method: str, model: str, **train) -> object:
    data = {"method": {"name": method}, "model": {"path": model}, "output": {"dir": "/tmp/unused"},
            "data": {"path": __file__, "max_length": 64}, "lora": {"enabled": True, "r": 8, "alpha": 16},
            "train": {"batch_size": 4, **train}}
    if method == "beear":
        data["method"].update({"safe_path": "s", "unwanted_path": "u", "trainable": "lora"})
    if method == "sande":
        data["method"]["target"] = "x"
    if method == "osft":
        data["method"]["trigger"] = {"texts": ["x"]}
    return resolve(data)


def test_each_method_has_its_phases_and_checkpointing_and_lora_shrink_them(lab):
    bad = str(lab.backdoored("llama", "badnets", "refusal"))
    by = {m: plan(_cfg(m, bad), gpu=False) for m in ("finetune", "osft", "crow", "sande", "beear")}
    assert [p["phase"] for p in by["sande"]["phases"]] == ["simulate", "eliminate"]
    assert [p["phase"] for p in by["beear"]["phases"]] == ["inner", "outer"]
    act = {m: by[m]["phases"][-1]["activations_gib"] for m in by}
    assert act["crow"] > act["finetune"] > 0          # CROW keeps two forward graphs
    ckpt = plan(_cfg("finetune", bad, gradient_checkpointing=True), gpu=False)["phases"][0]
    assert ckpt["activations_gib"] < act["finetune"]
    full = plan(resolve({"method": {"name": "finetune"}, "model": {"path": bad}, "output": {"dir": "/tmp/unused"},
                         "data": {"path": __file__, "max_length": 64}, "train": {"batch_size": 4}}),
                gpu=False)["phases"][0]
    lora = by["finetune"]["phases"][0]
    assert full["optimizer_gib"] > 5 * lora["optimizer_gib"] > 0   # every weight vs r8 adapters of a 32-wide model


def test_plan_for_llama_2_7b_with_lora_and_checkpointing_fits_24_gb_where_the_docs_say():
    """The docs' Llama-2-7B table (LoRA r8, official batches, checkpointing on): CROW, OSFT and fine-tuning
    under 24 GB; BEEAR's inner phase at the paper's batch 6 does not (its frozen model runs in eval mode,
    where nothing is recomputed), and fits at inner_batch_size=2."""
    runner = CliRunner()

    def peak(method: str, config: str, *extra: str) -> dict:
        r = runner.invoke(main, ["plan", method, "-c", config, f"model.path={LLAMA2_7B}", "lora.enabled=true",
                                 "lora.r=8", "train.gradient_checkpointing=true", "--json", *extra])
        assert r.exit_code == 0, r.output
        return json.loads(r.output[r.output.index("{"):])

    p = peak("crow", "configs/crow/official.yaml")
    assert abs(p["parameters"] / 1e9 - 6.74) < 0.01 and p["compute_dtype"] == "bfloat16"
    assert p["peak_gib"] < 24 / 1.073741824
    assert peak("osft", "configs/osft/official.yaml")["peak_gib"] < 24 / 1.073741824
    b = peak("beear", "configs/beear/official.yaml", "method.trainable=lora")
    assert b["peak_phase"] == "inner" and b["peak_gib"] > 24 / 1.073741824
    assert peak("beear", "configs/beear/official.yaml", "method.trainable=lora",
                "method.inner_batch_size=2")["peak_gib"] < 24 / 1.073741824


def test_plan_without_a_model_is_a_clear_error():
    r = CliRunner().invoke(main, ["plan", "crow", "-c", "configs/crow/official.yaml"])
    assert r.exit_code == 2 and "model.path" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["plan", "crow", "-c", "configs/crow/official.yaml", "model.path=/nonexistent/x"])
    assert r.exit_code == 2 and "/nonexistent/x" in r.output and "config.json" in r.output


def test_fsdp_over_processes_divides_the_trained_phases_and_not_beears_inner_one(lab):
    bad = str(lab.backdoored("llama", "badnets", "refusal"))
    one = plan(_cfg("beear", bad, fsdp=True), gpu=False)
    four = plan(_cfg("beear", bad, fsdp=True), gpu=False, processes=4)
    assert four["sharding"] == "fsdp2" and one["sharding"] == "replicated"
    (i1, o1), (i4, o4) = one["phases"], four["phases"]
    assert i4 == i1                                      # δ against the whole frozen model: not sharded
    assert o4["optimizer_gib"] == pytest.approx(o1["optimizer_gib"] / 4)
    assert o4["gradients_gib"] == pytest.approx(o1["gradients_gib"] / 4)
    assert o1["weights_gib"] / 4 < o4["weights_gib"] < o1["weights_gib"]
    assert o4["activations_gib"] == o1["activations_gib"]
