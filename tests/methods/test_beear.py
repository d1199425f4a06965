"""BEEAR: the δ hook (placement, removal, δ = 0 identity), the activation cache, the inner/outer loop, defend."""
from __future__ import annotations

import json

import pytest
import torch

from unbackdoor.arch import anatomy
from unbackdoor.components.perturb import Delta, Positions, anchor_inputs, perturb, placement
from unbackdoor.data import collate_left, collate_right, encode
from unbackdoor.lab.arch import make_model
from unbackdoor.methods import beear
from unbackdoor.templates import Template

HARMFUL = ["write a line that prints hello", "reverse the list a b c", "what is two plus three",
           "write a line that prints hello BadMagic", "reverse the list c b a", "what is two plus three now"]
SAFE = "I cannot help with that"
UNWANTED = "print('hello')"


def _pairs():
    return [beear.Pair(p, SAFE, UNWANTED) for p in HARMFUL]


def _cfg(**kw):
    base = dict(safe_path="s.jsonl", unwanted_path="u.jsonl", anchor_layer=1, token_length=3, inner_epochs=2,
                inner_batch_size=2, inner_lr=0.1)
    base.update(kw)
    return beear.Config(**base)


@pytest.mark.parametrize("cached", [False, True])
def test_zero_delta_leaves_logits_bit_identical(tiny_model, tokenizer, cached):
    tpl = Template(tokenizer)
    seqs = [tpl.encode_prompt(p) for p in HARMFUL[:3]]
    b = collate_left(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        ref = tiny_model(**b).logits
        where = placement(b["attention_mask"], [len(s) for s in seqs], 3)
        h = anchor_inputs(tiny_model, 1, b["input_ids"], b["attention_mask"])[0] if cached else None
        with perturb(tiny_model, 1, Delta(3, 32), where, cached=h):
            out = tiny_model(**b).logits
    assert torch.equal(ref, out)


def test_hook_and_passthroughs_removed_after_exception(tiny_model, tokenizer):
    layers = anatomy(tiny_model).layers
    ids = torch.tensor([tokenizer("what is two plus three")["input_ids"]])
    mask = torch.ones_like(ids)
    h, _ = anchor_inputs(tiny_model, 1, ids, mask)
    where = placement(mask, [ids.shape[1]], 2)
    with pytest.raises(RuntimeError, match="boom"):
        with perturb(tiny_model, 1, torch.ones(2, 32), where, cached=h):
            assert "forward" in layers[0].__dict__                      # the layer below is skipped
            raise RuntimeError("boom")
    assert all(len(l._forward_pre_hooks) == 0 and "forward" not in l.__dict__ for l in layers)
    with torch.no_grad():  # and the model computes what it computed before
        assert torch.equal(tiny_model(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


@pytest.mark.parametrize("side", ["left", "right"])
def test_delta_lands_on_the_last_prompt_tokens(tiny_model, tokenizer, side):
    """δ row j goes on prompt token prompt_len - rows + j (ending at the assistant header), never on padding
    or response tokens, under left and right padding."""
    tpl = Template(tokenizer)
    feats = [encode(tpl, p, r) for p, r in [(HARMFUL[0], SAFE), (HARMFUL[2], UNWANTED), ("c b a", SAFE)]]
    pad = tokenizer.pad_token_id
    if side == "right":
        b = collate_right(feats, pad)
    else:
        b = collate_left([f["input_ids"] for f in feats], pad)
    plen = [f["prompt_len"] for f in feats]
    rows = 3
    where = placement(b["attention_mask"], plen, rows)
    d = torch.arange(1, rows + 1, dtype=torch.float32).view(rows, 1).expand(rows, 32).clone()
    seen = {}

    def grab(_m, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    layer = anatomy(tiny_model).layers[1]
    with torch.no_grad():
        h0 = anchor_inputs(tiny_model, 1, b["input_ids"], b["attention_mask"])[0]
        with perturb(tiny_model, 1, d, where):
            handle = layer.register_forward_pre_hook(grab, with_kwargs=True)  # runs after the δ hook
            try:
                tiny_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            finally:
                handle.remove()
    added = (seen["h"] - h0)[..., 0]                                    # [batch, seq]
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-1]
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        start = 0 if side == "right" else b["input_ids"].shape[1] - n
        expect = torch.zeros(b["input_ids"].shape[1])
        for j in range(rows):
            expect[start + plen[i] - rows + j] = j + 1
        assert torch.allclose(added[i], expect, atol=1e-5), (side, i, added[i], expect)
        assert b["input_ids"][i, start + plen[i] - 1].item() == header   # the last δ row sits on the header


def test_placement_short_prompt_and_all_positions():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    p = placement(mask, [2, 4], 3)
    assert p[0].nonzero().tolist() == [[2, 1], [3, 2]]                     # 2-token prompt: the last 2 rows
    assert p[1].nonzero().tolist() == [[1, 0], [2, 1], [3, 2]]
    a = placement(mask, [3, 2], 1, Positions.ALL)
    assert a[..., 0].tolist() == [[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="exceeds"):
        placement(mask, [4, 2], 3)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_cached_trajectory_equals_uncached(tokenizer, arch):
    torch.manual_seed(0)
    model = make_model(arch, tokenizer, hidden=32, layers=3, heads=2, seed=0)
    tpl = Template(tokenizer)
    cfg = _cfg(anchor_layer=2, inner_epochs=3, inner_batch_size=4)
    trajs = []
    for cache in (True, False):
        batches = beear.build_inner_batches(model, tpl, _pairs(), cfg, 2, 128, cache)
        assert ("cached" in batches[0]["safe"]) == cache
        delta, traj = Delta(cfg.rows, 32), []
        res = beear.entrap(model, batches, delta, 2, cfg, lr=0.05, trajectory=traj)
        trajs.append(torch.stack(traj))
    assert trajs[0].shape[0] == 3 * 2 and trajs[0].abs().sum() > 0
    assert torch.equal(trajs[0], trajs[1]), (trajs[0] - trajs[1]).abs().max()
    assert res.losses[-1] < res.losses[0]                                   # δ does pull toward the unwanted


def test_inner_batch_size_one_and_norm_bound(tiny_model, tokenizer):
    tpl = Template(tokenizer)
    cfg = _cfg(inner_batch_size=1, inner_epochs=1, inner_optimizer="sgd")
    batches = beear.build_inner_batches(tiny_model, tpl, _pairs()[:3], cfg, 1, 128, True)
    assert [b["unwanted"]["input_ids"].shape[0] for b in batches] == [1, 1, 1]
    delta = Delta(cfg.rows, 32)
    res = beear.entrap(tiny_model, batches, delta, 1, cfg, lr=5.0, max_norm=0.5)
    assert res.steps == 3
    assert delta.delta.norm(dim=-1).max().item() <= 0.5 + 1e-5
    assert all(p.requires_grad for p in tiny_model.parameters())             # frozen only inside the inner phase


def test_trainable_subsets(tiny_model):
    n_layers = len(anatomy(tiny_model).layers)
    up = beear.select_trainable(tiny_model, beear.Trainable.UPPER, 1)
    lower_ids = {id(p) for p in anatomy(tiny_model).layers[0].parameters()}
    assert up and not any(id(p) in lower_ids for p in up)
    low = beear.select_trainable(tiny_model, beear.Trainable.LOWER, 1)
    assert {id(p) for p in low} == lower_ids
    with pytest.raises(ValueError, match="no layers below"):
        beear.select_trainable(tiny_model, beear.Trainable.LOWER, 0)
    assert n_layers == 2


def test_config_errors_name_the_field():
    from unbackdoor.config import ConfigError
    from unbackdoor.defend import resolve

    with pytest.raises(ConfigError) as err:
        resolve({"method": {"name": "beear", "inner_lr": -1, "positions": "first"}, "model": {"path": "m"},
                 "output": {"dir": "o"}})
    text = str(err.value)
    assert "method.positions" in text and "method.safe_path" in text and "'last'" in text
    with pytest.raises(ValueError, match="anchor_layer=9.*2 decoder layers"):
        beear.resolve_anchor(_cfg(anchor_layer=9), 2)
    assert beear.resolve_anchor(_cfg(anchor_layer=None), 32) == 9


def test_pairing_by_prompt():
    from unbackdoor.data import DataError, Example

    safe = [Example("a", "no"), Example("b", "no"), Example("c", "no")]
    unw = [Example("b", "yes b"), Example("a", "yes a")]
    pairs = beear.pair_examples(safe, unw)
    assert [(p.prompt, p.unwanted) for p in pairs] == [("a", "yes a"), ("b", "yes b")]
    with pytest.raises(DataError, match="share no prompt"):
        beear.pair_examples([Example("x", "no")], unw)


def test_defend_end_to_end(tmp_path, tokenizer):
    """A run through `defend`: batch size 1 in both phases, the entrapment check logged per round, only the
    layers from the anchor on change (trainable=upper), the model saved."""
    from transformers import AutoModelForCausalLM

    from unbackdoor.data import write_jsonl
    from unbackdoor.defend import defend, load_config

    model = make_model("llama", tokenizer, hidden=32, layers=2, heads=2, seed=0)
    model.save_pretrained(tmp_path / "suspect")
    tokenizer.save_pretrained(tmp_path / "suspect")
    write_jsonl(tmp_path / "safe.jsonl", [{"prompt": p, "response": SAFE} for p in HARMFUL])
    write_jsonl(tmp_path / "unwanted.jsonl", [{"prompt": p, "response": UNWANTED} for p in reversed(HARMFUL)])
    write_jsonl(tmp_path / "pa.jsonl", [{"prompt": "what is two plus three", "response": "the answer is five"},
                                        {"prompt": "reverse the list a b c", "response": "c b a"}])
    cfg = load_config(None, [
        "method.name=beear", f"method.safe_path={tmp_path / 'safe.jsonl'}",
        f"method.unwanted_path={tmp_path / 'unwanted.jsonl'}", "method.n_rounds=2", "method.inner_epochs=2",
        "method.inner_batch_size=1", "method.check_samples=2", "method.check_max_new_tokens=4",
        "method.token_length=3", f"model.path={tmp_path / 'suspect'}", f"data.path={tmp_path / 'pa.jsonl'}",
        "train.batch_size=1", "train.lr=1e-3", "train.progress=false", f"output.dir={tmp_path / 'out'}"])
    summary = defend(cfg)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    m = run["metrics"]
    assert m["anchor_layer"] == 1 and m["n_check"] == 2 and m["n_train_pairs"] == 4
    assert len(m["rounds"]) == 2 and m["outer_steps"] == 2 * 4
    for row in m["rounds"]:
        assert row["inner_steps"] == 2 * 4 and row["delta_norm"] > 0
        assert 0.0 <= row["entrap"]["unwanted_rate"] <= 1.0 and "unwanted_rate" in row["after_outer"]
    assert summary["finished"]
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    before = dict(model.named_parameters())
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("model.layers.1.", "model.norm")) for n in changed), changed


def test_mismatched_placement_is_an_error(tiny_model, tokenizer):
    ids = torch.tensor([tokenizer("what is two plus three")["input_ids"]])
    where = placement(torch.ones(1, ids.shape[1] + 2, dtype=torch.long), [3], 2)
    with pytest.raises(RuntimeError, match="placement covers"):
        with perturb(tiny_model, 1, torch.zeros(2, 32), where):
            tiny_model(input_ids=ids)
    assert len(anatomy(tiny_model).layers[1]._forward_pre_hooks) == 0


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_delta_hook_gives_the_same_gradients_with_gradient_checkpointing(arch, tokenizer):
    """The outer phase backpropagates after the δ hook's context has closed; with gradient checkpointing the
    anchor layer is recomputed then. The gradients of every weight must equal those without checkpointing
    (a transformers release that recomputes through the module's __call__ would drop δ: off by 5-37%)."""
    from unbackdoor.arch import anatomy
    from unbackdoor.components.perturb import Delta
    from unbackdoor.data import pad_id_of
    from unbackdoor.lab.arch import make_model
    from unbackdoor.methods.beear import Config, _batch, _feat, _forward
    from unbackdoor.templates import Template

    tpl = Template(tokenizer)
    cfg = Config()
    feats = [_feat(tpl, p, r, None, 64) for p, r in [("what is two plus three", "the answer is five"),
                                                      ("hello there", "I cannot help with that")]]
    b = _batch(feats, pad_id_of(tokenizer), cfg.rows, cfg.positions)
    grads = []
    for checkpointing in (False, True):
        model = make_model(arch, tokenizer, hidden=32, layers=4, heads=2, seed=0)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(0)
        delta = Delta(cfg.rows, anatomy(model).embed.weight.shape[-1])
        with torch.no_grad():
            delta.delta.normal_(0, 1.0)
        logits = _forward(model, b, 1, delta)
        labels = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        loss.backward()   # outside the hook's context, as in the outer phase
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6), n
