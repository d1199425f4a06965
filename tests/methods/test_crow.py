"""CROW: the loss against the 3-forward reference, accumulation exactness, padding, LoRA/full runs, data layout."""
import json
from pathlib import Path

import pytest
import torch

from unbackdoor.data import TrainCollator, collate_right, encode
from unbackdoor.lab.arch import make_model
from unbackdoor.methods import crow
from unbackdoor.schema import Optimizer, TrainConfig
from unbackdoor.templates import Template
from unbackdoor.train import fit

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [("what is two plus three", "the answer is five"), ("reverse the list a b c", "c b a"),
         ("write a line that prints hello", "print('hello')"), ("hello there", "I cannot help with that")]


def _model(tokenizer, arch, layers=4, seed=0):
    m = make_model(arch, tokenizer, hidden=32, layers=layers, heads=2, seed=seed)
    for mod in m.modules():  # GPT-2 has dropout on by default; the equality tests need determinism
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return m


def _padded_batch(tokenizer):
    tpl = Template(tokenizer)
    feats = [encode(tpl, p, r) for p, r in PAIRS]
    assert len({len(f["input_ids"]) for f in feats}) > 1  # really padded
    return collate_right(feats, tokenizer.pad_token_id)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
@pytest.mark.parametrize("faithful", [False, True])
def test_two_forward_loss_equals_three_forward_reference(tokenizer, arch, faithful):
    model = _model(tokenizer, arch)
    batch = _padded_batch(tokenizer)
    loss, metrics = crow.CrowLoss(eps=0.1, alpha=5.5, faithful=faithful)(model, batch)
    loss.backward()
    g2 = _grads(model)
    model.zero_grad(set_to_none=True)
    ref = crow.crow_loss_reference(model, batch, eps=0.1, alpha=5.5, faithful=faithful)
    ref.backward()
    g3 = _grads(model)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert g2.keys() == g3.keys() and g2
    for n in g2:
        torch.testing.assert_close(g2[n], g3[n], rtol=1e-4, atol=1e-6, msg=n)
    # a small sign step really ascends Lc (eps=0.1 is 5x the random init's embedding scale: no guarantee there)
    small = crow.CrowLoss(eps=1e-3, alpha=5.5, faithful=faithful)(model, batch)[1]
    assert small["consistency_adv"] > small["consistency_clean"]
    # the perturbation matters: a different eps gives a different loss
    assert crow.CrowLoss(eps=0.5, alpha=5.5, faithful=faithful)(model, batch)[0].item() != pytest.approx(loss.item())


def test_direction_touches_no_parameter_gradient(tokenizer):
    """autograd.grad w.r.t. e only: the loss leaves .grad of every parameter as it was (None here)."""
    model = _model(tokenizer, "llama")
    batch = _padded_batch(tokenizer)
    crow.CrowLoss()(model, batch)
    assert all(p.grad is None for p in model.parameters())


def _equal_length_feats(n=8, length=14, prompt=6, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "attention_mask": [1] * length})
    return feats


class _OfficialStyle(crow.CrowLoss):
    """The official pattern: Lc.backward() then model.zero_grad() inside the loss (wipes accumulation)."""

    def __call__(self, model, batch):
        model.zero_grad(set_to_none=True)
        return super().__call__(model, batch)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_grad_accumulation_equals_big_batch(tokenizer, arch):
    feats = _equal_length_feats()
    # SGD: Adam's first step is lr*sign(g), which turns rounding noise in near-zero gradients into 2*lr
    common = dict(lr=0.5, max_steps=2, optimizer=Optimizer.SGD, warmup_ratio=0.0, max_grad_norm=None, progress=False)

    def train(loss_fn, batch_size, accum):
        model = _model(tokenizer, arch)
        fit(model, loss_fn, feats, TrainConfig(batch_size=batch_size, grad_accum=accum, **common),
            collate_fn=TrainCollator(tokenizer), seed=3)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    big = train(crow.CrowLoss(), 4, 1)
    acc = train(crow.CrowLoss(), 2, 2)
    official = train(_OfficialStyle(), 2, 2)
    start = {n: p.detach() for n, p in _model(tokenizer, arch).named_parameters()}
    assert any(not torch.equal(big[n], start[n]) for n in big)
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-4, atol=1e-5, msg=n)
    # the sensitivity check: the official in-loss zero_grad gives another update
    assert max((official[n] - big[n]).abs().max().item() for n in big) > 1e-4


def test_padding_mask(tokenizer):
    model = _model(tokenizer, "llama")
    tpl = Template(tokenizer)
    feats = [encode(tpl, p, r) for p, r in PAIRS]
    masked, faithful = crow.CrowLoss(mask_padding=True), crow.CrowLoss(mask_padding=False)
    # unpadded batch (one example): the mask changes nothing
    one = collate_right(feats[:1], tokenizer.pad_token_id)
    assert masked(model, one)[0].item() == pytest.approx(faithful(model, one)[0].item(), rel=1e-6)
    # padded batch: masked loss is invariant to extra padding columns, the unmasked one is not
    batch = collate_right(feats, tokenizer.pad_token_id)
    extra = {k: torch.cat([v, torch.full((v.shape[0], 5), tokenizer.pad_token_id if k == "input_ids" else
                                         (-100 if k == "labels" else 0), dtype=v.dtype)], 1)
             for k, v in batch.items() if k != "prompt_len"}
    assert masked(model, batch)[0].item() == pytest.approx(masked(model, extra)[0].item(), rel=1e-5)
    assert faithful(model, batch)[0].item() != pytest.approx(faithful(model, extra)[0].item(), rel=1e-4)
    assert masked(model, batch)[0].item() != pytest.approx(faithful(model, batch)[0].item(), rel=1e-4)


def test_layer_pairs(tokenizer):
    assert crow.resolve_pairs(5) == [1, 2, 3]
    assert crow.resolve_pairs(5, [0, 4]) == [0, 4]
    with pytest.raises(ValueError, match="L=2.*L >= 3.*method.layer_pairs"):
        crow.resolve_pairs(2)
    with pytest.raises(ValueError, match=r"layer_pairs has \[4\].*0\.\.3"):
        crow.resolve_pairs(4, [1, 4])
    # last_pair: every block but the first, at any depth
    assert crow.resolve_pairs(4, last_pair=True) == [1, 2, 3]
    assert crow.resolve_pairs(32, last_pair=True) == list(range(1, 32))
    assert crow.resolve_pairs(2, last_pair=True) == [1]
    assert crow.resolve_pairs(4, [0, 3], last_pair=True) == [0, 3]
    model = _model(tokenizer, "llama")
    batch = _padded_batch(tokenizer)
    a = crow.CrowLoss(layer_pairs=[0])(model, batch)[1]["consistency_clean"]
    b = crow.CrowLoss()(model, batch)[1]["consistency_clean"]
    assert a != pytest.approx(b)
    c = crow.CrowLoss(last_pair=True)(model, batch)[1]["consistency_clean"]
    d = crow.CrowLoss(layer_pairs=crow.resolve_pairs(crow.anatomy(model).num_layers, last_pair=True))(
        model, batch)[1]["consistency_clean"]
    assert c == pytest.approx(d) and c != pytest.approx(b)


def test_config_validation_and_official_yaml():
    from unbackdoor.config import ConfigError
    from unbackdoor.defend import load_config, resolve

    with pytest.raises(ConfigError) as err:
        resolve({"method": {"name": "crow", "eps": 0, "alpha": -1, "layer_pairs": [-1]},
                 "model": {"path": "x"}, "output": {"dir": "y"}})
    msg = str(err.value)
    assert "method.eps" in msg and "method.alpha" in msg and "method.layer_pairs" in msg
    cfg = load_config(ROOT / "configs/crow/official.yaml", ["model.path=m", "output.dir=o", "data.path=d"])
    m, t, lo = cfg.method, cfg.train, cfg.lora
    assert (m.eps, m.alpha, m.layer_pairs, m.faithful) == (0.1, 5.5, None, False)
    assert (lo.enabled, lo.r, lo.alpha, lo.dropout, lo.target_modules) == (True, 8, 16, 0.0, ["all-linear"])
    assert (t.lr, t.scheduler.value, t.warmup_ratio, t.epochs, t.batch_size, t.grad_accum, t.weight_decay) == (
        1e-3, "cosine", 0.1, 5, 2, 4, 0.0)
    assert cfg.data.limit == 100
    lab = load_config(ROOT / "configs/crow/lab.yaml", ["model.path=m", "output.dir=o", "data.path=d"])
    ft = load_config(ROOT / "configs/finetune/lab.yaml", ["model.path=m", "output.dir=o", "data.path=d"])
    assert lab.method.name == "crow" and ft.method.name == "finetune"
    for k in ("lr", "epochs", "max_steps", "batch_size", "grad_accum", "scheduler", "warmup_ratio"):
        assert getattr(lab.train, k) == getattr(ft.train, k), k  # the baseline has the same budget
    assert lab.data.limit == ft.data.limit and lab.lora == ft.lora
    assert lab.method.last_pair and not cfg.method.last_pair  # official pairs unless the config says so
    with pytest.raises(ConfigError, match="method.last_pair"):
        resolve({"method": {"name": "crow", "last_pair": True, "faithful": True},
                 "model": {"path": "x"}, "output": {"dir": "y"}})


@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    m = make_model("llama", tokenizer, hidden=32, layers=4, heads=2, seed=0)
    m.save_pretrained(tmp_path / "suspect")
    tokenizer.save_pretrained(tmp_path / "suspect")
    return tmp_path / "suspect"


def _run(model_dir, out, data_path, *overrides):
    from unbackdoor.defend import defend, load_config

    cfg = load_config(None, ["method.name=crow", f"model.path={model_dir}", f"output.dir={out}",
                             f"data.path={data_path}", "train.max_steps=3", "train.batch_size=2", "train.lr=1e-2",
                             "train.progress=false", *overrides])
    return defend(cfg)


@pytest.mark.parametrize("lora", [True, False])
def test_defend_runs_lora_and_full(tmp_path, model_dir, lora):
    from unbackdoor.models import load_model
    from unbackdoor.schema import ModelConfig

    data = tmp_path / "clean.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in PAIRS) + "\n")
    out = tmp_path / "out"
    rec = _run(model_dir, out, data, f"lora.enabled={str(lora).lower()}", "lora.r=4")
    assert rec["metrics"]["steps"] == 3 and rec["metrics"]["layer_pairs"] == [1, 2]
    assert rec["metrics"]["consistency_adv_first"] > 0
    train, total = rec["trainable_parameters"], rec["total_parameters"]
    assert (train < total / 2) if lora else (train == total)
    before = load_model(ModelConfig(path=str(model_dir)))
    after = load_model(ModelConfig(path=str(out / "model")))
    sd_b, sd_a = before.state_dict(), after.state_dict()
    assert sd_b.keys() == sd_a.keys()  # LoRA merged away
    assert any(not torch.equal(sd_b[k], sd_a[k]) for k in sd_b)
    import yaml

    assert json.loads((out / "run.json").read_text())["finished"]
    assert yaml.safe_load((out / "config.yaml").read_text())["method"]["name"] == "crow"


def test_backdoorllm_dataset_info_layout(tmp_path, model_dir):
    """Alpaca JSON registered in a LLaMA-Factory dataset_info.json (the BackdoorLLM layout) as data.path."""
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"instruction": p, "input": "", "output": r} for p, r in PAIRS]
    rows.append({"instruction": "reverse the list", "input": "a b c", "output": "c b a"})
    (d / "alpaca_clean.json").write_text(json.dumps(rows))
    (d / "dataset_info.json").write_text(json.dumps({
        "alpaca_clean": {"file_name": "alpaca_clean.json",
                         "columns": {"prompt": "instruction", "query": "input", "response": "output"}},
        "other": {"file_name": "missing.json"}}))
    rec = _run(model_dir, tmp_path / "out", d, "data.dataset=alpaca_clean", "model.template=alpaca",
               "lora.enabled=true")
    assert rec["n_defender_examples"] == 5 and rec["metrics"]["steps"] == 3


@pytest.mark.slow  # ~1 min with the lab's test models cached; a cold cache trains them first (minutes)
def test_crow_removes_lab_backdoor_better_than_finetune(tmp_path):
    """The lab's test recipe: a BadNets -> refusal backdoor; CROW and plain fine-tuning at the same budget."""
    from unbackdoor.defend import defend, load_config
    from unbackdoor.lab import Lab, quick_report, test_recipe

    lab = Lab.build(test_recipe())
    bd = lab.backdoored("llama", attack="badnets", target="refusal", seed=0)
    man = json.loads((bd / "backdoor.json").read_text())  # the evaluation's knowledge, not the defense's

    def asr(model_dir):
        return quick_report(model_dir, lab, manifest=man)["asr_with_trigger"]

    before = asr(bd)
    assert before > 0.8
    after = {}
    for name in ("finetune", "crow"):
        # full fine-tuning for both (same budget): the test recipe's 2-layer model is too small for LoRA r8 to
        # move it in 42 steps, with or without CROW
        ov = [f"model.path={bd}", f"data.path={lab.path('defender_clean')}", f"output.dir={tmp_path / name}",
              "lora.enabled=false"]
        if name == "crow":
            # the test recipe's models have 2 layers, where the official pairs 1..L-2 are empty
            ov.append("method.layer_pairs=[0,1]")
        rec = defend(load_config(ROOT / f"configs/{name}/lab.yaml", ov))
        after[name] = (asr(tmp_path / name / "model"), rec["metrics"]["steps"])
    assert after["crow"][1] == after["finetune"][1]  # same budget
    assert after["crow"][0] <= 0.1 and after["crow"][0] <= after["finetune"][0] - 0.15, (before, after)


def test_continue_an_existing_adapter(tmp_path, model_dir, tokenizer):
    """The official run resumes the attacker's LoRA: model.adapter + adapter_mode=continue + lora.enabled."""
    from unbackdoor.models import apply_lora, load_model
    from unbackdoor.schema import LoraConfig, ModelConfig

    peft_model = apply_lora(load_model(ModelConfig(path=str(model_dir))), LoraConfig(enabled=True, r=4))
    peft_model.save_pretrained(tmp_path / "adapter")
    data = tmp_path / "clean.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in PAIRS) + "\n")
    rec = _run(model_dir, tmp_path / "out", data, f"model.adapter={tmp_path / 'adapter'}",
               "model.adapter_mode=continue", "lora.enabled=true", "lora.r=8")
    n_lora4 = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert rec["trainable_parameters"] == n_lora4  # the given r=4 adapter was trained, no fresh r=8 one
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_fgsm_probe_picks_eps_from_the_models_embedding_scale(tmp_path, model_dir, tokenizer):
    """eps_rule=fgsm_probe: ε is a multiple of the embeddings' RMS at which FGSM still beats a random step;
    the same model with its embeddings scaled 10x gets a 10x larger ε (the rule follows the model)."""
    from unbackdoor.methods.crow import probe_eps

    model = _model(tokenizer, "llama")
    batch = _padded_batch(tokenizer)
    r = probe_eps(model, [batch], [1, 2], [0.25, 0.5, 1.0, 2.0], ratio=1.5)
    assert [t["factor"] for t in r["table"]] == [0.25, 0.5, 1.0, 2.0]
    assert r["eps"] in [t["eps"] for t in r["table"]] and r["rms"] > 0
    picked = next(t for t in r["table"] if t["eps"] == r["eps"])
    assert (picked["ratio"] >= 1.5) == r["met_ratio"]
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    r10 = probe_eps(model, [batch], [1, 2], [0.25, 0.5, 1.0, 2.0], ratio=1.5)
    assert r10["rms"] == pytest.approx(10 * r["rms"], rel=1e-4)
    impossible = probe_eps(model, [batch], [1, 2], [0.5, 1.0], ratio=1e12)
    assert not impossible["met_ratio"] or all(t["ratio"] == float("inf") for t in impossible["table"])
    data = tmp_path / "clean.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in PAIRS) + "\n")
    rec = _run(model_dir, tmp_path / "out", data, "method.eps_rule=fgsm_probe")
    assert rec["metrics"]["eps"] == rec["metrics"]["eps_probe"]["eps"] != 0.1
    from unbackdoor.config import ConfigError
    from unbackdoor.defend import load_config

    with pytest.raises(ConfigError, match="eps_rule"):
        load_config(None, ["method.name=crow", "method.eps_rule=guess", "model.path=x", "data.path=y",
                           "output.dir=z"])
