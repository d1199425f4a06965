"""QLoRA: a suspect model loaded in 4 bits (bitsandbytes), a LoRA adapter trained on it, and the adapter merged
into the *full-precision* weights for the saved model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parents[1]


def _defend(lab, out: Path, *extra: str) -> subprocess.CompletedProcess:
    bad = Path(lab.backdoored("llama", "badnets", "refusal"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cli = [sys.executable, "-m", "unbackdoor.cli", "defend", "finetune", "-c", "configs/finetune/lab.yaml"]
    return subprocess.run([*cli, f"model.path={bad}", f"data.path={lab.path('defender_clean')}", f"output.dir={out}",
                           "train.progress=false", "train.max_steps=10", *extra],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_qlora_trains_on_4bit_weights_and_saves_the_merge_into_full_precision(lab, tmp_path):
    from safetensors.torch import load_file

    bad = Path(lab.backdoored("llama", "badnets", "refusal"))
    p = _defend(lab, tmp_path / "q", "model.quantization=nf4", "lora.enabled=true", "lora.r=4",
                "lora.target_modules=[q_proj,v_proj]")
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "q" / "model"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    before, after = load_file(bad / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(after) == set(before) and all(t.dtype == torch.float32 for t in after.values())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # only the adapted layers moved (4-bit weights rounding back would move every linear layer) ...
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), sorted(changed)[:6]
    # ... each by a rank-4 update: the adapter's B @ A, not quantization noise (which is full rank)
    for k in sorted(changed)[:2]:
        delta = (after[k] - before[k]).double()
        assert torch.linalg.matrix_rank(delta, rtol=1e-6).item() <= 4, k


def test_quantized_weights_without_lora_are_refused_naming_the_field(lab, tmp_path):
    p = _defend(lab, tmp_path / "q", "model.quantization=nf4", "lora.enabled=false")
    assert p.returncode != 0 and "lora.enabled" in p.stderr and "QLoRA" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    p = _defend(lab, tmp_path / "q", "model.quantization=int4")
    assert p.returncode != 0 and "model.quantization" in p.stderr and "'int4'" in p.stderr, p.stderr[-2000:]
