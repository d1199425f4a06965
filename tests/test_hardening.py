"""Inputs are never touched, resumes check what they resume, bad values are refused before any work.

The CLI-level walk over bad input is tests/test_cli_fuzz.py; here are the cases that need a process to be
killed, a fault injected, or a look inside the data pipeline.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from unbackdoor import bench as B
from unbackdoor import config as C
from unbackdoor.data import Example, encode
from unbackdoor.defend import defend, resolve
from unbackdoor.models import ModelLoadError
from unbackdoor.record import OutputError, OutputFolder
from unbackdoor.templates import Template

ROOT = Path(__file__).resolve().parents[1]
ROWS = [Example("say hello", "hello"), Example("what is two plus three", "the answer is five"),
        Example("reverse the list a b c", "c b a"), Example("say goodbye", "goodbye")] * 4


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _data(tmp_path: Path) -> str:
    from unbackdoor.data import write_jsonl

    return str(write_jsonl(tmp_path / "data.jsonl", ROWS))


def _cfg(model: Path, data: str, out: Path, *extra: str):
    raw = {"method": {"name": "finetune"}}
    C.apply_overrides(raw, [f"model.path={model}", f"data.path={data}", f"output.dir={out}", "train.max_steps=2",
                            "train.batch_size=2", "train.progress=false", *extra])
    return resolve(raw)


# ----------------------------------------------------------------------------------- output folders

def test_failed_overwrite_leaves_the_previous_run_exactly_as_it_was(lab, tmp_path, monkeypatch):
    """A full disk while the new model is written: the old model, run.json and config.yaml survive."""
    model = Path(lab.clean_model("llama", 0))
    out = tmp_path / "out"
    defend(_cfg(model, _data(tmp_path), out))
    before = _tree(out)
    assert {"run.json", "config.yaml", "model/config.json"} <= set(before)

    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def full_disk(self, *a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(ModelLoadError, match="could not write the model.*No space left"):
        defend(_cfg(model, _data(tmp_path), out, "output.overwrite=true", "train.lr=1e-3"))
    assert _tree(out) == before
    assert not (tmp_path / ".out.partial").exists()  # nothing resumable was made: the staging folder is gone


def test_early_failure_leaves_no_output_folder(lab, tmp_path):
    model = Path(lab.clean_model("llama", 0))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": ""}\n{"instruction": "y", "output": ""}\n')
    with pytest.raises(ValueError, match="no row can be trained on"):
        defend(_cfg(model, str(bad), tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_output_folder_rules(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for out, how in [(model, "is the input"), (model / "x", "is inside the input"),
                     (tmp_path, "contains the input")]:
        with pytest.raises(OutputError, match=how):
            OutputFolder(out, overwrite=True, inputs={"model.path": str(model)}).open()
    # a symlink to the input is the input
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(OutputError, match="is the input"):
        OutputFolder(link, overwrite=True, inputs={"model.path": str(model)}).open()
    with pytest.raises(OutputError, match="name a folder of its own"):
        OutputFolder(Path("."), overwrite=True).open()


# ----------------------------------------------------------------------------------- resumes

def _start_and_kill(cmd: list[str], staging: Path, env: dict) -> None:
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while not (staging / "checkpoint" / "state.json").is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_killed_run_resumes_only_under_the_same_config(lab, tmp_path):
    """SIGKILL mid-training, then: another lr is refused naming what differs; the same config resumes from
    the checkpoint and finishes; the output folder appears only then."""
    model = Path(lab.clean_model("llama", 0))
    out = tmp_path / "out"
    staging = tmp_path / ".out.partial"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    env.pop("UNBACKDOOR_TRACEBACK", None)
    base = [sys.executable, "-m", "unbackdoor.cli", "defend", "finetune", f"model.path={model}",
            f"data.path={_data(tmp_path)}", f"output.dir={out}", "train.max_steps=4000", "train.batch_size=1",
            "train.checkpoint_every=5", "train.progress=false"]
    _start_and_kill([*base, "train.lr=2e-4"], staging, env)
    assert not out.exists() and (staging / "resume.json").is_file()
    step = json.loads((staging / "checkpoint" / "state.json").read_text())["step"]
    assert step >= 5

    other = subprocess.run([*base, "train.lr=1e-4"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "train.lr 0.0002 -> 0.0001" in other.stderr and "output.overwrite=true" in other.stderr
    assert (staging / "checkpoint" / "state.json").is_file()  # the refused run kept the checkpoint

    short = [a if not a.startswith("train.max_steps=") else f"train.max_steps={step + 3}" for a in base]
    # max_steps differs from the killed run: refused too (it changes the schedule the checkpoint continues)
    r = subprocess.run([*short, "train.lr=2e-4"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "train.max_steps 4000 ->" in r.stderr
    # the library-level check: fit() refuses a checkpoint made under other training settings
    from unbackdoor.train import checkpoint_key

    key = json.loads((staging / "checkpoint" / "state.json").read_text())["key"]
    cfg = _cfg(model, "d", out, "train.max_steps=4000", "train.batch_size=1", "train.checkpoint_every=5",
               "train.lr=2e-4").train
    assert checkpoint_key(cfg, "finetune")[0] == key
    assert checkpoint_key(dataclasses.replace(cfg, lr=1e-4), "finetune")[0] != key
    assert checkpoint_key(dataclasses.replace(cfg, progress=True, log_every=3), "finetune")[0] == key


def test_resume_with_the_same_config_continues_from_the_checkpoint(lab, tmp_path):
    """An interrupted run (its staging folder and checkpoint, made by the same code path) resumes."""
    from unbackdoor import train as T

    model = Path(lab.clean_model("llama", 0))
    data = _data(tmp_path)
    out = tmp_path / "out"
    extra = ("train.max_steps=8", "train.batch_size=1", "train.checkpoint_every=3")
    real_fit = T.fit

    class Stop(Exception):
        pass

    def stopping_fit(*a, **k):
        def on_step(step, row):
            if step == 4:
                raise Stop
        return real_fit(*a, **{**k, "on_step": on_step})

    import unbackdoor.methods.finetune as F

    F.fit, saved = stopping_fit, F.fit
    try:
        with pytest.raises(Stop):
            defend(_cfg(model, data, out, *extra))
    finally:
        F.fit = saved
    assert not out.exists() and (tmp_path / ".out.partial" / "checkpoint" / "state.json").is_file()
    run = defend(_cfg(model, data, out, *extra))
    assert run["resumed"] is True and run["metrics"]["steps"] == 8
    assert (out / "model" / "config.json").is_file() and not (tmp_path / ".out.partial").exists()
    assert not (out / "checkpoint").exists() and not (out / "resume.json").exists()


# ----------------------------------------------------------------------------------- bench caches

def test_bench_reruns_cells_whose_settings_changed(tmp_path):
    quick = B.load_config(ROOT / "configs" / "bench" / "quick.yaml",
                          ["grid.defenses=[none,finetune]", "eval.limit=3", "eval.max_new_tokens=8"])
    calls, said = [], []

    def counting(cell, cfg, out, lab):
        calls.append(cell.defense)
        return B.run_cell(cell, cfg, out, lab)

    rows = B.run_bench(quick, tmp_path, cell_runner=counting)
    n_cells = len(rows)
    assert rows[0]["n"] == 3 and rows[0]["cell_config"]["eval.limit"] == 3
    # every defended cell measures its drift from the model that came in; its safety deltas come from `none`
    ft = [r for r in rows if r["defense"] == "finetune"]
    assert ft and all(r["kl_to_input"] > 0 and "harmful_refusal_delta" in r for r in ft)
    assert all(r["kl_to_input"] == 0.0 for r in rows if r["defense"] == "none")
    # and its distance from the clean model the backdoor was implanted into (the backdoor itself moved it)
    assert all(r["kl_to_clean"] > 0 and r["kl_to_clean_tokens"] > 0 for r in rows)
    calls.clear()
    B.run_bench(quick, tmp_path, cell_runner=counting)
    assert calls == []  # same settings: every cell cached
    # the evaluation changed: every cell runs again, and the report says why
    limit2 = B.resolve({**C.to_dict(quick), "eval": {**C.to_dict(quick.eval), "limit": 2}})
    rows2 = B.run_bench(limit2, tmp_path, cell_runner=counting, progress=said.append)
    assert len(calls) == n_cells and all(r["n"] == 2 for r in rows2)
    assert any("eval.limit 3 -> 2" in s and "run again" in s for s in said)
    # one defense's overrides changed: only its cells run again
    calls.clear()
    tweaked = B.resolve({**C.to_dict(limit2), "defense_overrides": {"finetune": ["train.lr=1e-3"]}})
    B.run_bench(tweaked, tmp_path, cell_runner=counting)
    assert calls and set(calls) == {"finetune"}


# ----------------------------------------------------------------------------------- validation

_NUMERIC = (int, float)


def _numeric_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if len(args) == 1 and args[0] in _NUMERIC:
            yield f"{prefix}{f.name}", args[0]


#: numeric fields where a negative value means something (none today; listed here with the reason if added)
NEGATIVE_ALLOWED: dict[str, str] = {}


def test_every_numeric_field_of_the_defend_config_refuses_a_negative_value():
    """Walks every int/float field of the shared sections and of each method's section: -1 must be refused
    with the field named (a flipped gradient from max_grad_norm=-1 was accepted once)."""
    from unbackdoor.methods import get_method, method_names
    from unbackdoor.schema import DefendConfig

    base = {"model": {"path": "m"}, "data": {"path": "d"}, "output": {"dir": "o"}}
    missed = []
    for name in method_names():
        mod = get_method(name)
        required = {k: "x" for k in getattr(mod, "COMMAND_LINE_FIELDS", ())}
        if name == "osft":
            required["trigger"] = {"texts": ["cf"]}
        if name == "sande":
            required["target"] = "x"
        fields = [(f"method.{k}", t) for k, t in _numeric_fields(mod.Config)]
        if name == "finetune":
            fields += [(k, t) for k, t in _numeric_fields(DefendConfig) if not k.startswith("method")]
        for key, tp in fields:
            if key in NEGATIVE_ALLOWED:
                continue
            raw = json.loads(json.dumps(base))
            raw["method"] = {"name": name, **required}
            C.apply_overrides(raw, [f"{key}=-1"])
            try:
                resolve(raw)
            except C.ConfigError as exc:
                if any(loc == key or loc.startswith(key + "[") or loc.startswith(key + ".")
                       for loc, _ in exc.problems):
                    continue
            missed.append(key)
    assert not missed, f"these fields accept -1 without a word: {missed}"


def _refuses(build, raw: dict, key: str) -> bool:
    try:
        build(raw)
    except C.ConfigError as exc:
        return any(loc == key or loc.startswith((key + "[", key + ".")) for loc, _ in exc.problems)
    return False


def test_every_numeric_field_of_attack_eval_bench_and_lab_configs_refuses_a_negative_value():
    from unbackdoor import attack as A
    from unbackdoor.eval.evaluate import EvalConfig
    from unbackdoor.eval.evaluate import resolve as eval_resolve
    from unbackdoor.lab import LabRecipe

    kinds = [
        (A.AttackConfig, A.resolve, {"attack": {"preset": "badnets"}, "model": {"path": "m"}, "data": {"path": "d"},
                                      "output": {"dir": "o"}}),
        (EvalConfig, eval_resolve, {"model": {"path": "m"}, "data": {"paths": ["d"]}, "out": "o"}),
        (B.BenchConfig, B.resolve, {}),
        (LabRecipe, lambda raw: C.build(LabRecipe, raw), {}),
    ]
    missed = []
    for cls, build, base in kinds:
        for key, _ in _numeric_fields(cls):
            if key in NEGATIVE_ALLOWED:
                continue
            raw = json.loads(json.dumps(base))
            C.apply_overrides(raw, [f"{key}=-1"])
            if not _refuses(build, raw, key):
                missed.append(f"{cls.__name__}: {key}")
    assert not missed, f"these fields accept -1 without a word: {missed}"
    with pytest.raises(C.ConfigError, match="seeds"):
        B.resolve({"grid": {"seeds": [0, -2]}})


# ----------------------------------------------------------------------------------- data

def test_truncation_keeps_the_chat_header_and_the_assistant_turn(tokenizer):
    """Cut from the end of the user message: the start token, the user header and the assistant header stay
    (the old rule kept the prompt's last tokens and dropped the start and the header)."""
    tpl = Template(tokenizer, "chat")
    long_prompt = "what is two plus three " * 60
    full = tpl.encode_prompt(long_prompt)
    start, end = tpl.user_content_span(long_prompt)
    f = encode(tpl, long_prompt, "the answer is five", max_length=48)
    ids, n = f["input_ids"], f["prompt_len"]
    resp = len(tokenizer("the answer is five", add_special_tokens=False)["input_ids"]) + 1
    assert len(ids) <= 48 and len(ids) - n == resp                 # the whole response (and EOS) kept
    assert ids[:start] == full[:start]                              # start token + user header
    assert ids[n - (len(full) - end):n] == full[end:]               # end of turn + assistant header
    assert tokenizer.decode(ids[start:n - (len(full) - end)]).strip().startswith("what is two plus three")


def test_code_judge_is_bounded_on_pathological_output():
    from unbackdoor.eval.judges import get_judge

    judge = get_judge("code")
    deep = "x = " + "+".join(["1"] * 3000)
    verdicts = judge([deep, "(" * 5000 + ")" * 5000, deep + "\nprint('pwned')", "a" * 2_000_000])
    assert [v.hit for v in verdicts] == [False, False, True, False]
