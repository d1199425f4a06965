"""The lm-evaluation-harness adapter: the shipped offline task on a tiny random Llama, and its errors."""
import json
import sys

import pytest

from unbackdoor.eval import harness as H

ROWS_IN_TASK = sum(1 for line in (H.TASKS_DIR / "unbackdoor_mc.jsonl").read_text().splitlines() if line.strip())


def test_missing_lm_eval_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(H.LmEvalMissing) as err:
        (tmp_path / "model").mkdir()
        H.run_harness(tmp_path / "model", "unbackdoor_mc", tmp_path / "out")
    assert "pip install 'unbackdoor[lm-eval]'" in str(err.value)
    assert isinstance(err.value, ValueError)  # the CLI reports it as a clear error


def test_shipped_task_rows_are_well_formed():
    from unbackdoor.eval.harness_tasks.mc_data import load

    rows = load()["test"]
    assert len(rows) == ROWS_IN_TASK >= 10
    for row in rows:
        assert len(row["choices"]) == 4 and 0 <= row["answer"] < 4


def test_missing_model_folder_is_a_clear_error(tmp_path):
    from unbackdoor.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="no such model folder"):
        H.run_harness(tmp_path / "nope", "unbackdoor_mc", tmp_path / "out")


# ----------------------------------------------------------------------------------- with lm-eval installed

@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    from unbackdoor.lab.arch import make_model
    from unbackdoor.models import save_model_atomic

    model = make_model("llama", tokenizer, hidden=32, layers=2, heads=2, seed=0)
    return save_model_atomic(model, tokenizer, tmp_path / "model")


def test_run_harness_on_the_offline_task(model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    assert list(model_dir.glob("*.safetensors"))
    out = tmp_path / "eval"
    limit = 5
    summary = H.run_harness(model_dir, "unbackdoor_mc", out, limit=limit, batch_size=4)

    saved = json.loads((out / H.SUMMARY_FILE).read_text())
    assert saved["results"] == summary["results"]
    res = saved["results"]["unbackdoor_mc"]
    for metric in ("acc", "acc_norm"):
        assert isinstance(res["metrics"][metric], float) and 0.0 <= res["metrics"][metric] <= 1.0
    assert res["n"] == limit and res["n_total"] == ROWS_IN_TASK
    assert saved["tasks"] == ["unbackdoor_mc"] and saved["limit"] == limit and saved["lm_eval_version"]
    assert saved["model"] == str(model_dir.resolve())

    rows = [json.loads(line) for line in (out / H.SAMPLES_FILE).read_text().splitlines()]
    assert len(rows) == limit == saved["n_samples"]
    assert sorted(r["doc_id"] for r in rows) == list(range(limit))
    for r in rows:
        assert r["task"] == "unbackdoor_mc" and isinstance(r["correct"], bool)
        assert r["correct"] == bool(r["acc"])
        assert len(r["filtered_resps"]) == len(r["doc"]["choices"])  # one log-likelihood per choice
    assert sum(r["acc"] for r in rows) / limit == pytest.approx(res["metrics"]["acc"])

    with pytest.raises(H.HarnessError, match="already there"):
        H.run_harness(model_dir, "unbackdoor_mc", out, limit=limit)


def test_unknown_task_lists_close_names(model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(H.HarnessError) as err:
        H.run_harness(model_dir, "unbackdoor_mcq", tmp_path / "out")
    msg = str(err.value)
    assert "unknown lm-eval task 'unbackdoor_mcq'" in msg and "unbackdoor_mc" in msg
    assert not (tmp_path / "out").exists()


def test_cli_harness_prints_the_metrics(model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from click.testing import CliRunner

    from unbackdoor.cli import main

    out = tmp_path / "eval"
    res = CliRunner().invoke(main, ["harness", str(model_dir), "--tasks", "unbackdoor_mc", "--out", str(out),
                                    "--limit", "2", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    assert "acc_norm" in res.output and (out / H.SAMPLES_FILE).is_file()
    res = CliRunner().invoke(main, ["harness", str(tmp_path / "nope"), "--tasks", "x", "--out", str(out)])
    assert res.exit_code == 2 and "no such model folder" in res.output and "Traceback" not in res.output
