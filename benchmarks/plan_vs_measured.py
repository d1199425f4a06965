"""`unbackdoor plan`'s estimate beside the measured peak of the same training, side by side, on this CPU.

    python benchmarks/plan_vs_measured.py [--steps 2]

For two randomly initialised models of different families (Llama-shaped and GPT-NeoX-shaped, ~30M
parameters, saved with their config.json only as far as plan is concerned), fine-tuning, CROW and SANDE's
phase 1 are run by `fit()` in a fresh process each — LoRA and full fine-tuning, gradient checkpointing off
and on — and the process's peak resident memory added by training (VmHWM after the model is built, blocks of
64 KiB and more mmapped so that RSS counts what is held) is printed beside plan's estimate of the same
quantity (its total less the frozen weights, which are resident before training starts), with the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    "llama": dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=8000, max_position_embeddings=512,
                  tie_word_embeddings=True),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                     num_attention_heads=8, vocab_size=8000, max_position_embeddings=512,
                     tie_word_embeddings=False),
}
CASES = [  # (method, lora, checkpointing)
    ("finetune", True, False), ("finetune", False, False), ("finetune", True, True), ("crow", True, False),
    ("sande", True, False),
]
BATCH, SEQ = 4, 256


def worker(arch: str, method: str, lora: bool, ckpt: bool, steps: int, folder: str, out: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from unbackdoor.methods.crow import CrowLoss
    from unbackdoor.models import apply_lora
    from unbackdoor.schema import LoraConfig, TrainConfig
    from unbackdoor.train import fit, lm_loss, peak_memory_mb, reset_peak_memory, resident_memory_mb

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    ids = torch.randint(5, 8000, (BATCH * steps, SEQ), generator=torch.Generator().manual_seed(1))
    feats = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]

    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    loss = lm_loss
    params = None
    if method == "sande":          # phase 1: the model frozen, a trainable input (the parrot's role)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        soft = torch.nn.Parameter(torch.zeros(model.config.hidden_size))
        emb = model.get_input_embeddings()

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model, self.soft = model, soft

            def forward(self, input_ids, attention_mask, labels):
                e = emb(input_ids) + self.soft
                return self.model(inputs_embeds=e, attention_mask=attention_mask, labels=labels, use_cache=False).loss

        module = Wrapper()
        loss, params = (lambda m, b: m(**b)), [soft]
    else:
        module = apply_lora(model, LoraConfig(enabled=True, r=8, alpha=16, target_modules=["all-linear"])) \
            if lora else model
        if not lora:
            for p in module.parameters():
                p.requires_grad_(True)
        if method == "crow":
            loss = CrowLoss(eps=0.1, alpha=5.5)
    before = resident_memory_mb()
    reset_peak_memory()
    fit(module, loss, feats, TrainConfig(lr=1e-4, max_steps=steps, batch_size=BATCH, progress=False,
                                         gradient_checkpointing=ckpt), collate_fn=collate, params=params, seed=0)
    Path(out).write_text(json.dumps({"added_mb": peak_memory_mb() - before}))


def estimate(arch: str, method: str, lora: bool, ckpt: bool, folder: str) -> float:
    from unbackdoor.defend import resolve
    from unbackdoor.plan import plan

    data = {"method": {"name": method}, "model": {"path": folder, "dtype": "float32"},
            "output": {"dir": "/tmp/unused"}, "data": {"path": __file__, "max_length": SEQ},
            "lora": {"enabled": lora, "r": 8, "alpha": 16, "target_modules": ["all-linear"]},
            "train": {"batch_size": BATCH, "gradient_checkpointing": ckpt}}
    if method == "sande":
        data["method"].update({"skip_elimination": True, "target": "x", "simulate": {"batch_size": BATCH}})
    p = plan(resolve(data), gpu=False)
    ph = p["phases"][0]
    frozen = ph["weights_gib"] - ph["gradients_gib"]          # trainables are counted at 4 bytes = their grads
    resident = frozen if lora or method == "sande" else ph["weights_gib"]   # in memory before fit() starts
    return (ph["total_gib"] - resident) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        arch, method, lora, ckpt, folder, out = args.worker
        return worker(arch, method, lora == "1", ckpt == "1", args.steps, folder, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "MALLOC_MMAP_THRESHOLD_": "65536"}
    print(f"micro-batch {BATCH} x {SEQ} tokens, fp32 on this CPU, AdamW; MB")
    print("| model | method | trains | checkpointing | plan | measured | plan / measured |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoConfig

        for arch, shape in MODELS.items():
            folder = Path(tmp) / arch
            folder.mkdir()
            AutoConfig.for_model(**shape).save_pretrained(folder)
            for method, lora, ckpt in CASES:
                out = Path(tmp) / "row.json"
                subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", arch, method,
                                str(int(lora)), str(int(ckpt)), str(folder), str(out)], env=env, check=True,
                               capture_output=True, text=True)
                measured = json.loads(out.read_text())["added_mb"]
                est = estimate(arch, method, lora, ckpt, str(folder))
                trains = "input" if method == "sande" else ("lora" if lora else "full")
                print(f"| {arch} | {method} | {trains} | {'on' if ckpt else 'off'} | {est:.0f} | {measured:.0f} | "
                      f"{est / measured:.2f} |", flush=True)


if __name__ == "__main__":
    main()
