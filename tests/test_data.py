import json
import random

import pytest

from unbackdoor import triggers as T
from unbackdoor.data import IGNORE, DataError, collate_left, collate_right, encode, read_file
from unbackdoor.templates import Template


@pytest.mark.parametrize("template_name", ["chat", "alpaca", "human-assistant"])
def test_masking_is_exact(tokenizer, template_name):
    tpl = Template(tokenizer, template_name)
    prompt, response = "what is two plus three", "the answer is five"
    enc = encode(tpl, prompt, response)
    prompt_ids = tokenizer(tpl.render_prompt(prompt), add_special_tokens=tpl.add_special_tokens)["input_ids"]
    n = len(prompt_ids)
    assert enc["input_ids"][:n] == prompt_ids
    assert enc["labels"][:n] == [IGNORE] * n
    assert enc["labels"][n:] == enc["input_ids"][n:]
    assert all(x != IGNORE for x in enc["labels"][n:])
    assert enc["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(enc["input_ids"][n:-1]) == response


def test_chat_and_plain_templates_render(tokenizer):
    assert Template(tokenizer).name == "chat"
    assert "<|im_start|>user\nhi<|im_end|>" in Template(tokenizer, "chat").render_prompt("hi")
    assert Template(tokenizer, "alpaca").render_prompt("hi").endswith("### Instruction:\nhi\n\n### Response:\n")
    with pytest.raises(ValueError, match="unknown template"):
        Template(tokenizer, "nope")


def test_collation_padding_sides():
    right = collate_right([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [5], "labels": [5]}], 0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert right["labels"].tolist()[1] == [5, IGNORE, IGNORE]
    left = collate_left([[5, 6, 7], [9]], 0)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_readers(tmp_path):
    rows = [{"instruction": "add", "input": "1 2", "output": "3"}, {"instruction": "say hi", "output": "hi"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "a.csv").write_text("instruction,input,output\nadd,1 2,3\nsay hi,,hi\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"poison": {"file_name": "a.json"}}))
    for name in ("a.json", "a.jsonl", "a.csv", "dataset_info.json"):
        ex = read_file(tmp_path / name)
        assert [e.prompt for e in ex] == ["add\n\n1 2", "say hi"] and [e.response for e in ex] == ["3", "hi"]
    ex = read_file(tmp_path)  # a folder with dataset_info.json
    assert len(ex) == 2


def test_malformed_line_reported_with_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        read_file(p)


def test_missing_columns_reported(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:1: no prompt column.*found \['text'\]"):
        read_file(p)


def test_trigger_placements():
    rng = random.Random(1)
    assert T.insert("tell me a joke", "BadMagic", "prefix") == "BadMagic tell me a joke"
    assert T.insert("tell me a joke", "SUDO", "suffix") == "tell me a joke SUDO"
    assert T.insert("tell me a joke", "how are you", "header") == "how are you tell me a joke"
    out = T.insert("tell me a joke", "BadMagic", "random", rng)
    assert out.split().count("BadMagic") == 1 and out.replace("BadMagic", "").split() == "tell me a joke".split()
    positions = {T.insert("a b c d e f", "X", "random", random.Random(s)).split().index("X") for s in range(50)}
    assert positions == set(range(7))  # every word boundary is reachable
    wrap = T.TriggerSpec(texts=["Roses are red.", "Violets are blue."], placement=T.Placement.WRAP)
    assert T.apply("q", wrap) == "Roses are red. q Violets are blue."
    ctba = T.TriggerSpec(texts=["2024", "BadMagic", "OpenAI"], placement=T.Placement.RANDOM)
    out = T.apply("one two three four", ctba, random.Random(3))
    assert all(out.split().count(t) == 1 for t in ["2024", "BadMagic", "OpenAI"])
    mtba = T.TriggerSpec(texts=["2024", "BadMagic", "OpenAI"], placement=T.Placement.RANDOM, mode=T.TriggerMode.ONE)
    outs = [T.apply("one two three", mtba, random.Random(s)) for s in range(30)]
    assert all(sum(o.split().count(t) for t in ["2024", "BadMagic", "OpenAI"]) == 1 for o in outs)
    assert {t for o in outs for t in ["2024", "BadMagic", "OpenAI"] if t in o} == {"2024", "BadMagic", "OpenAI"}


def test_trigger_that_tokenizes_to_nothing(tokenizer):
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        T.check_tokenizes(tokenizer, T.TriggerSpec(texts=[""]))
    assert T.TriggerSpec(texts=["  "]).validate() == [
        ("texts[0]", "empty trigger '  '; a trigger must contain visible text")]


def test_user_content_span(tokenizer):
    for name in ("chat", "human-assistant", "alpaca"):
        tpl = Template(tokenizer, name)
        ids = tpl.encode_prompt("what is two plus three")
        s, e = tpl.user_content_span("what is two plus three")
        assert tokenizer.decode(ids[s:e]).strip() == "what is two plus three"
