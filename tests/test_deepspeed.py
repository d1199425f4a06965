"""The training loop under an Accelerate DeepSpeed config (ZeRO 0/2/3, one CPU process): the engine, not the
loop, accumulates and clips, so fit() hands it train.grad_accum and train.max_grad_norm and marks the
accumulation boundaries; the updates then equal those of the plain loop. Skipped where deepspeed is not
installed (`pip install unbackdoor[deepspeed]`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, os, sys, torch
from torch import nn
stage, ds_gas = sys.argv[1], sys.argv[2]
from accelerate import Accelerator
if stage == "none":
    acc = Accelerator(cpu=True)
else:
    from accelerate.utils import DeepSpeedPlugin
    # ZeRO-3 partitions every parameter (none is small enough to stay whole)
    conf = {"zero_optimization": {"stage": int(stage), "stage3_param_persistence_threshold": 0},
            "gradient_accumulation_steps": ds_gas, "gradient_clipping": "auto",
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}
    if ds_gas != "auto":
        conf["gradient_accumulation_steps"] = int(ds_gas)
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=conf))
from unbackdoor import train as T
from unbackdoor.errors import UnbackdoorError
from unbackdoor.schema import TrainConfig
out = {"type": str(acc.distributed_type), "runs": []}
data = [{"x": torch.randn(4, generator=torch.Generator().manual_seed(i)), "y": torch.tensor([float(i % 3)])}
        for i in range(16)]
col = lambda b: {"x": torch.stack([d["x"] for d in b]), "y": torch.stack([d["y"] for d in b])}
loss = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean()
# two fits in one process, with different batches and accumulation (as BEEAR's rounds): each is filled afresh
for batch, accum, clip in ((2, 4, 0.05), (2, 4, None), (4, 2, None)):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    cfg = TrainConfig(lr=0.2, batch_size=batch, grad_accum=accum, max_steps=2, optimizer="sgd", scheduler="constant",
                      warmup_steps=0, progress=False, max_grad_norm=clip)
    try:
        r = T.fit(m, loss, data, cfg, collate_fn=col, accelerator=acc, shuffle=False)
    except UnbackdoorError as exc:
        out["error"] = str(exc)
        break
    out["runs"].append({"losses": r.losses, "weights": [p.detach().flatten().tolist() for p in m.parameters()]})
# the module fit() gives back is a plain one: whole weights, no engine hooks, trainable again and usable after
if "error" not in out:
    r = T.fit(m, loss, data, cfg, collate_fn=col, accelerator=acc, shuffle=False)
    out["again"] = {"losses": r.losses, "out": m(data[0]["x"]).tolist(),
                    "hooks": sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in m.modules()),
                    "ds_attrs": sum(hasattr(p, "ds_id") for p in m.parameters())}
print("RESULT " + json.dumps(out))
'''


def _run(tmp_path: Path, stage: str, gas: str = "auto") -> dict:
    script = tmp_path / "fit_ds.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29640 + (hash(stage + gas) % 200)), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    p = subprocess.run([sys.executable, str(script), stage, gas], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert p.returncode == 0 and line, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


@pytest.mark.slow
def test_deepspeed_accumulates_and_clips_as_the_plain_loop(tmp_path):
    plain = _run(tmp_path, "none")
    assert len(plain["runs"]) == 3
    for stage in ("0", "2", "3"):
        ds = _run(tmp_path, stage)
        assert ds["type"].endswith("DEEPSPEED") and "error" not in ds, ds
        for a, b in zip(ds["runs"], plain["runs"]):
            assert _close(a["losses"], b["losses"]), (stage, a["losses"], b["losses"])
            for wa, wb in zip(a["weights"], b["weights"]):
                assert _close(wa, wb), (stage, wa[:4], wb[:4])
        assert ds["again"]["hooks"] == 0 and ds["again"]["ds_attrs"] == 0, ds["again"]
        assert _close(ds["again"]["losses"], plain["again"]["losses"]) and _close(ds["again"]["out"],
                                                                                 plain["again"]["out"]), ds["again"]
    # the clip of the first fit engaged (without it the same fit ends elsewhere), so DeepSpeed clipped too
    assert not _close(plain["runs"][0]["weights"][0], plain["runs"][1]["weights"][0])


@pytest.mark.slow
def test_a_deepspeed_accumulation_that_disagrees_with_train_is_refused(tmp_path):
    ds = _run(tmp_path, "2", gas="3")
    assert "gradient_accumulation_steps=3" in ds["error"] and "train.grad_accum=4" in ds["error"], ds


def _ds_launch_config(tmp_path: Path, stage: int) -> Path:
    ds = tmp_path / f"zero{stage}.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                              "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}))
    cfg = tmp_path / f"zero{stage}.yaml"
    cfg.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
                   f"  deepspeed_config_file: {ds}\n  zero3_init_flag: false\nnum_machines: 1\nnum_processes: 1\n"
                   f"use_cpu: false\nmain_process_port: {29800 + stage}\n")
    return cfg


@pytest.mark.slow
def test_methods_that_use_the_model_outside_the_engine_run_under_zero3_as_without_it(lab, tmp_path):
    """SANDE (its parrot reads the embedding table), BEEAR (δ at a layer, checks by generation) and CROW (a
    backward to the embeddings for its direction) under an `accelerate launch` of a DeepSpeed ZeRO-3 config:
    the model loads whole (not zero.Init-partitioned), the engine partitions it for each fit() and gives it
    back whole; every metric equals the plain run's."""
    from test_distributed import _argv

    cfg = _ds_launch_config(tmp_path, 3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    env.pop("UNBACKDOOR_TRACEBACK", None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "-m", "unbackdoor.cli"]
    for method in ("sande", "beear", "crow"):
        runs = {}
        for mode in ("plain", "zero3"):
            out = tmp_path / f"{method}-{mode}"
            cmd = ([sys.executable, "-m", "unbackdoor.cli"] if mode == "plain" else launch) + _argv(method, lab, out)
            p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stderr[-3000:]
            runs[mode] = json.loads((out / "run.json").read_text())
        assert runs["zero3"]["distributed"]["sharding"] == "deepspeed zero-3", runs["zero3"]["distributed"]
        plain = {k: v for k, v in runs["plain"]["metrics"].items() if isinstance(v, float) and not k.endswith("_s")}
        ds = {k: runs["zero3"]["metrics"][k] for k in plain}
        assert plain and ds == pytest.approx(plain, rel=1e-5, abs=1e-7), (method, ds, plain)
