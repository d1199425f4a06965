"""OSFT: the known trigger goes where the config says, clean replay pairs twins in one batch, the loss can be
cut to the first k response tokens, and the method runs end to end through the defend driver."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unbackdoor import config as C
from unbackdoor.data import IGNORE, Example, write_jsonl
from unbackdoor.defend import defend, load_config, resolve
from unbackdoor.methods import osft
from unbackdoor.templates import Template
from unbackdoor.threats import THREAT_MODELS
from unbackdoor.triggers import Placement, TriggerMode, TriggerSpec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [Example(f"reverse the list a b c number {i} please", "c b a") for i in range(30)]


def _cfg(**kw) -> osft.Config:
    return C.build(osft.Config, kw)


def test_prefix_header_and_suffix_placement(tokenizer):
    t = Template(tokenizer, "chat")
    for placement, check in [("prefix", lambda p, e: p == f"BadMagic {e.prompt}"),
                             ("header", lambda p, e: p == f"BadMagic {e.prompt}"),
                             ("suffix", lambda p, e: p == f"{e.prompt} BadMagic")]:
        cfg = _cfg(trigger={"texts": ["BadMagic"], "placement": placement})
        trig = osft.triggered_examples(EXAMPLES[:3], cfg.trigger)
        assert all(check(x.prompt, e) and x.response == e.response for x, e in zip(trig, EXAMPLES))
    # in the encoded training row the trigger sits right after the user-turn header, and only the
    # reference answer (plus EOS) carries labels
    cfg = _cfg(trigger={"texts": ["BadMagic"], "placement": "header"}, clean_replay=False)
    item = osft.build_dataset(t, EXAMPLES[:1], cfg)[0]
    assert osft.build_dataset(t, EXAMPLES[:1], _cfg(trigger={"texts": ["BadMagic"]}))[0][0]["input_ids"] != \
        osft.build_dataset(t, EXAMPLES[:1], _cfg(trigger={"texts": ["BadMagic"]}))[0][1]["input_ids"]  # replay
    text = tokenizer.decode(item["input_ids"])
    assert text.startswith("<s><|im_start|>user\nBadMagic reverse the list")
    supervised = [x for x in item["labels"] if x != IGNORE]
    assert tokenizer.decode(supervised) == "c b a<|im_end|>"


def test_random_placement_is_a_word_boundary_and_seeded():
    cfg = _cfg(trigger={"texts": ["BadMagic"], "placement": "random"})
    trig = osft.triggered_examples(EXAMPLES, cfg.trigger, seed=3)
    positions = set()
    for x, e in zip(trig, EXAMPLES):
        words = x.prompt.split(" ")
        assert words.count("BadMagic") == 1
        positions.add(words.index("BadMagic"))
        assert [w for w in words if w != "BadMagic"] == e.prompt.split(" ")
    assert len(positions) > 3                      # positions vary across examples
    again = osft.triggered_examples(EXAMPLES, cfg.trigger, seed=3)
    assert [x.prompt for x in again] == [x.prompt for x in trig]


def test_mode_one_draws_one_known_trigger_per_example_and_mode_all_inserts_all():
    texts = ["2024", "BadMagic", "OpenAI"]
    spec = _cfg(trigger={"texts": texts, "placement": "random", "mode": "one"}).trigger
    one = osft.triggered_examples(EXAMPLES, spec)
    seen = set()
    for x in one:
        present = [t for t in texts if t in x.prompt.split(" ")]
        assert len(present) == 1
        seen.update(present)
    assert seen == set(texts)
    every = osft.triggered_examples(EXAMPLES[:5], _cfg(trigger={"texts": texts, "placement": "random"}).trigger)
    assert all(all(t in x.prompt.split(" ") for t in texts) for x in every)
    wrap = osft.triggered_examples(EXAMPLES[:1], TriggerSpec(["Before.", "After."], Placement.WRAP))
    assert wrap[0].prompt == f"Before. {EXAMPLES[0].prompt} After."


def test_clean_replay_puts_twins_in_one_batch_and_k_overwrite_cuts_the_loss(tokenizer):
    t = Template(tokenizer, "chat")
    cfg = _cfg(trigger={"texts": ["BadMagic"], "placement": "prefix"}, clean_replay=True, k_overwrite=2)
    items = osft.build_dataset(t, EXAMPLES[:4], cfg)
    batch = osft.PairCollator(tokenizer)(items[:2])
    assert batch["input_ids"].shape[0] == 4
    texts = [tokenizer.decode(row[m.bool()]) for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    assert "BadMagic" in texts[0] and "BadMagic" not in texts[1] and "BadMagic" in texts[2]
    assert texts[0].replace("BadMagic ", "") == texts[1]
    assert ((batch["labels"] != IGNORE).sum(1) == 2).all()


def test_config_needs_a_trigger():
    with pytest.raises(C.ConfigError, match=r"method\.trigger\.texts"):
        resolve({"method": {"name": "osft"}, "model": {"path": "m"}, "output": {"dir": "o"}})
    with pytest.raises(C.ConfigError, match=r"method\.k_overwrite"):
        resolve({"method": {"name": "osft", "trigger": {"texts": ["x"]}, "k_overwrite": 0},
                 "model": {"path": "m"}, "output": {"dir": "o"}})


def test_configs_load():
    cfg = load_config(ROOT / "configs/osft/official.yaml", ["model.path=m", "output.dir=o", "data.path=d"])
    assert cfg.method.trigger.texts == ["how are you", "how is it going", "what is up"]
    assert cfg.method.trigger.placement is Placement.HEADER and cfg.method.trigger.mode is TriggerMode.ONE
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size) == (5e-6, 25, 4)
    for path in sorted((ROOT / "configs/osft").glob("*.yaml")):
        load_config(path, ["model.path=m", "output.dir=o", "data.path=d"])


def test_osft_end_to_end_through_the_driver(tokenizer, tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "bad")
    tokenizer.save_pretrained(tmp_path / "bad")
    write_jsonl(tmp_path / "clean.jsonl", EXAMPLES[:8])
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cfg = resolve({"method": {"name": "osft", "trigger": {"texts": ["BadMagic"], "placement": "random"}},
                   "model": {"path": str(tmp_path / "bad")}, "data": {"path": str(tmp_path / "clean.jsonl")},
                   "train": {"lr": 1e-2, "max_steps": 2, "batch_size": 4, "progress": False},
                   "output": {"dir": str(tmp_path / "out")}})
    summary = defend(cfg)
    assert summary["metrics"]["steps"] == 2 and summary["metrics"]["trigger"] == "random:BadMagic"
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["finished"] and run["knows"] == THREAT_MODELS["osft"].summary and "trigger" in run["knows"]
    from transformers import AutoModelForCausalLM

    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
