"""The command line: help on every command, every shipped config validates, errors are clear."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from unbackdoor.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, prefix + (name,))


@pytest.mark.parametrize("path", list(_commands(main)), ids=lambda p: " ".join(p))
def test_help_on_every_command(path):
    res = CliRunner().invoke(main, [*path, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output


@pytest.mark.parametrize("cfg", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_validates(cfg):
    res = CliRunner().invoke(main, ["validate", str(cfg)])
    assert res.exit_code == 0, res.output


def test_validate_reports_every_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: {name: finetune}\nmodel: {path: m, dtype: fp33}\ntrain: {lr: -1, batchsize: 2}\n"
                   "output: {dir: o}\n")
    res = CliRunner().invoke(main, ["validate", str(bad)])
    assert res.exit_code == 1
    for needle in ("model.dtype", "train.lr", "train.batchsize", "Did you mean 'batch_size'", "3 configuration error"):
        assert needle in res.output


def test_ls_lists_methods():
    res = CliRunner().invoke(main, ["ls", "methods"])
    assert res.exit_code == 0, res.output
    assert "finetune" in res.output


@pytest.mark.parametrize("kind,field", [("defend", "method.eps"), ("attack", "attack.per_trigger"),
                                        ("eval", "generation.max_new_tokens"), ("bench", "jobs"),
                                        ("lab", "attack.poison_rate")])
def test_explain_lists_every_config_kind(kind, field):
    args = ["explain", kind] + (["--method", "crow"] if kind == "defend" else [])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert any(line.split()[0] == field for line in r.output.splitlines() if line.strip())


def test_defend_bad_input_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["defend", "finetune", f"model.path={tmp_path}/nope", "data.path=x.jsonl",
                                    f"output.dir={tmp_path}/o"])
    assert res.exit_code == 2
    assert "error:" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("args", [
    ["attack", "-c", "configs/attacks/lab_badnets_refusal.yaml", "attack.preset=badnet"],
    ["defend", "crow", "-c", "configs/crow/lab.yaml", "method.epss=1", "model.path=m", "output.dir=o"],
    ["bench", "configs/bench/quick.yaml", "--out", "o", "grid.archs=[lama]"],
    ["demo", "--out", "o", "grid.defenses=[crowe]"],
    ["eval", "nope", "--data", "nope", "--out", "o"],
    ["lab", "build", "--recipe", "tset"],
])
def test_every_command_turns_bad_input_into_one_message_and_exit_2(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # shipped configs are found from any folder
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and "Traceback" not in res.output, res.output


def test_shipped_configs_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["validate", "configs/crow/official.yaml", "crow/lab", "bench/demo.yaml"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["validate", "configs/crow/offical.yaml"])
    assert res.exit_code == 1 and "Did you mean the shipped config 'crow/official.yaml'" in res.output
    res = CliRunner().invoke(main, ["ls", "configs"])
    assert "configs/bench/lab_sande.yaml" in res.output
