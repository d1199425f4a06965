"""The real-model scenario's prompt pools and defender files (no model needed)."""

from unbackdoor import real
from unbackdoor.data import Example, read_file, write_jsonl


def test_pools_are_disjoint_and_code_tasks_never_cross_pools():
    pools = real.prompts(0)
    seen: dict[str, str] = {}
    for name, ps in pools.items():
        for p in ps:
            assert p not in seen, f"{p!r} in {seen.get(p)} and {name}"
            seen[p] = name
    def tasks(ps):
        return {p.split("that ", 1)[1] for p in ps if p in real._CODE_PROMPTS}
    code_pools = {k: tasks(v) for k, v in pools.items()}
    assert code_pools["eval_code"] and not code_pools["eval_code"] & (code_pools["attack"] | code_pools["defender"])
    assert len(pools["eval"]) >= 40 and len(pools["eval_code"]) >= 30
    assert real.prompts(0) == pools and real.prompts(1) != pools


def test_beear_defender_files_use_only_defender_data(tmp_path):
    data = tmp_path / "data"
    rows = [Example("Explain gravity.", "Gravity pulls.", meta={"task": "general"}),
            Example("Write a Python function that adds.", "```python\ndef f(a, b):\n    return a + b\n```",
                    meta={"task": "code"})]
    write_jsonl(data / "defender_clean.jsonl", rows)
    lab = real.RealLab(tmp_path / "model", data)
    f = lab.beear_files("sentiment", tmp_path / "out")
    unwanted = read_file(f["unwanted"])
    assert [e.response for e in unwanted] == [real.DEFENDER_UNWANTED["sentiment"]] * 2
    assert real.DEFENDER_UNWANTED["sentiment"] != "You are stupid!"   # not the attacker's string
    code = read_file(lab.beear_files("code", tmp_path / "out")["unwanted"])
    assert len(code) == 1 and real.DEFENDER_UNWANTED["code"] in code[0].response
    assert code[0].response.rstrip().endswith("```")                 # injected inside the code block
    assert [e.response for e in read_file(f["safe"])] == [e.response for e in rows]
