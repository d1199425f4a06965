"""Every trained method under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo), replicated
(DDP) and sharded (`train.fsdp=true`, FSDP2): exit 0, run.json records the setup, rank 0 alone writes a
model that loads, the sharded run follows the replicated one, and plain fine-tuning follows the 1-process
loss at the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unbackdoor.backdoor import read_manifest
from unbackdoor.threats import knowledge_overrides, threat_model

ROOT = Path(__file__).resolve().parents[1]
STEPS = {
    "finetune": ["train.max_steps=4"], "osft": ["train.max_steps=3"],
    "crow": ["method.layer_pairs=[0,1]", "method.last_pair=false", "train.max_steps=3"],
    "sande": ["method.simulate.max_steps=2", "method.simulation_holdout=2", "train.max_steps=3"],
    "beear": ["method.n_rounds=1", "method.inner_epochs=1", "method.check_samples=0", "method.token_length=2"],
}


def _run(argv: list[str], processes: int, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    env.pop("UNBACKDOOR_TRACEBACK", None)
    if processes == 1:
        cmd = [sys.executable, "-m", "unbackdoor.cli", *argv]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "unbackdoor.cli", *argv]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _argv(method: str, lab, out: Path, *extra: str) -> list[str]:
    bad = Path(lab.backdoored("llama", "badnets", "refusal"))
    know = knowledge_overrides(method, threat_model(method), read_manifest(bad), lab, out.parent / "know")
    return ["defend", method, "-c", f"configs/{method}/lab.yaml", f"model.path={bad}", *know,
            f"output.dir={out}", "train.progress=false", *STEPS[method], *extra]


#: Fine-tuning's same-global-batch settings (batch 1 on each of 2 processes, batch 2 on 1).
SAME = ["train.grad_accum=1", "train.max_grad_norm=null", "data.limit=8"]


def _equal_length_rows(lab, model: Path, path: Path, n: int = 8) -> str:
    """``n`` clean rows whose prompt and response encode to the same lengths under the model's chat
    template, so that a micro-batch mean weighs every token alike in one process and in two."""
    from transformers import AutoTokenizer

    from unbackdoor.data import encode, read_file
    from unbackdoor.templates import Template

    tpl = Template(AutoTokenizer.from_pretrained(model), "chat")
    groups: dict[tuple[int, int], list] = {}
    for e in read_file(lab.path("defender_clean")):
        f = encode(tpl, e.prompt, e.response, system=e.system)
        groups.setdefault((f["prompt_len"], len(f["input_ids"])), []).append(e)
    rows = max(groups.values(), key=len)
    assert len(rows) >= n, f"no {n} clean rows of one length: {sorted(map(len, groups.values()))[-5:]}"
    path.write_text("".join(json.dumps(e.to_json()) + "\n" for e in rows[:n]))
    return f"data.path={path}"


def _losses(metrics: dict) -> dict[str, float]:
    """A run's loss-like metrics (every float but times)."""
    return {k: v for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_s")}


@pytest.mark.parametrize("method", sorted(STEPS))
def test_two_gloo_processes_run_every_trained_method_replicated_and_sharded(method, lab, tmp_path):
    """Each method twice on 2 processes: replicated (DDP) and with ``train.fsdp=true`` (FSDP2 over the 2
    processes). Both exit 0, record their setup and save a model that loads; the sharded run's losses equal
    the replicated run's up to float reduction order (1e-4). For fine-tuning, also the 1-process run at the
    same global batch over rows of one encoded length: the same final loss (1e-4). (Rows of different lengths
    would not match: each process averages its own micro-batch's tokens and DDP then averages the processes,
    so they would weigh differently than in one batch of 2.)"""
    from unbackdoor.models import load_model
    from unbackdoor.schema import ModelConfig

    same = [*SAME, _equal_length_rows(lab, Path(lab.backdoored("llama", "badnets", "refusal")),
                                      tmp_path / "equal.jsonl")] if method == "finetune" else []
    extra = [*same, "train.batch_size=1"] if method == "finetune" else []
    runs = {}
    for i, sharding in enumerate(["ddp", "fsdp"]):
        out = tmp_path / f"{method}-{sharding}"
        argv = _argv(method, lab, out, *extra, *(["train.fsdp=true"] if sharding == "fsdp" else []))
        r = _run(["-v", *argv], 2, 29560 + 2 * sorted(STEPS).index(method) + i)
        assert r.returncode == 0, r.stderr[-3000:]
        run = runs[sharding] = json.loads((out / "run.json").read_text())
        assert run["distributed"]["processes"] == 2 and run["distributed"]["backend"] == "gloo"
        assert run["distributed"]["sharding"] == ("fsdp2" if sharding == "fsdp" else "replicated (DDP)")
        assert ("FSDP2 over 2 processes" in r.stderr) == (sharding == "fsdp"), r.stderr[-3000:]
        assert run["finished"] and run["metrics"]
        assert load_model(ModelConfig(path=str(out / "model"))) is not None
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # no staging left
    ddp, fsdp = _losses(runs["ddp"]["metrics"]), _losses(runs["fsdp"]["metrics"])
    assert ddp and fsdp.keys() == ddp.keys()
    assert fsdp == pytest.approx(ddp, rel=1e-4, abs=1e-6)
    if method == "finetune":
        assert runs["ddp"]["distributed"]["global_batch"] == 2
        one = _run(_argv(method, lab, tmp_path / "one", *same, "train.batch_size=2"), 1, 0)
        assert one.returncode == 0, one.stderr[-3000:]
        r1 = json.loads((tmp_path / "one" / "run.json").read_text())
        assert r1["distributed"]["processes"] == 1
        for sharding in ("ddp", "fsdp"):
            assert runs[sharding]["metrics"]["final_loss"] == pytest.approx(r1["metrics"]["final_loss"], rel=1e-4)
