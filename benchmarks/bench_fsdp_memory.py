"""Peak memory per process of full fine-tuning, replicated (DDP) vs sharded (``train.fsdp``), side by side.

    python benchmarks/bench_fsdp_memory.py [--processes 2] [--hidden 512] [--layers 8] [--steps 3]

Launches ``accelerate launch --multi_gpu`` twice on this machine's CPUs (gloo), once per mode, on a randomly
initialised Llama-shaped model (no download), AdamW on every weight; each process reports its peak resident
memory (VmHWM) over the training and the bytes of the weights it held at the start. Blocks of 64 KiB and more
are mmapped (``MALLOC_MMAP_THRESHOLD_``) unless ``--glibc-default``: with glibc's default, the heap keeps the
freed per-layer gather buffers of FSDP and RSS overstates what is held (a CPU artefact; a GPU's caching
allocator reuses them). Printed: the peak of
each mode, its ratio, and what a model of this size needs in fp32 (weights W, gradients W, Adam 2W).
Replicated, each process holds W + gradients + Adam state (+ DDP's gradient buckets); sharded, the
original W (kept plain outside training) plus 1/N of the twin's weights, gradients and Adam state, and
briefly 2W while the twin is copied before it is sharded.
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


def worker(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from unbackdoor.schema import TrainConfig
    from unbackdoor.train import fit, get_accelerator, lm_loss, peak_memory_mb, reset_peak_memory, resident_memory_mb

    torch.set_num_threads(1)
    acc = get_accelerator()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=128, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 8000, (16, 64), generator=g)
    feats = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]

    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    before = resident_memory_mb()
    reset_peak_memory()
    tc = TrainConfig(lr=1e-4, max_steps=args.steps, batch_size=1, progress=False, fsdp=args.mode == "fsdp",
                     max_grad_norm=1.0)
    res = fit(model, lm_loss, feats, tc, collate_fn=collate, seed=0, accelerator=acc)
    row = {"rank": acc.process_index, "mode": args.mode, "weights_mb": round(weights_mb, 1),
           "rss_before_mb": round(before, 1), "peak_mb": round(peak_memory_mb(), 1),
           "final_loss": res.losses[-1]}
    Path(args.report).with_suffix(f".{acc.process_index}.json").write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--glibc-default", action="store_true",
                    help="keep glibc's default mmap threshold (freed blocks stay in the heap and count in RSS)")
    ap.add_argument("--mode", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return worker(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    if not args.glibc_default:
        # Blocks of 64 KiB and more are mmapped and given back when freed, so RSS counts what is held, not
        # what glibc's heap kept after FSDP's per-layer gather buffers came and went.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, mode in enumerate(["ddp", "fsdp"]):
            report = Path(tmp) / mode
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(args.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(29710 + i), __file__, "--mode", mode, "--report", str(report),
                   "--hidden", str(args.hidden), "--layers", str(args.layers), "--steps", str(args.steps)]
            subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            rows[mode] = [json.loads(report.with_suffix(f".{r}.json").read_text()) for r in range(args.processes)]
    w = rows["ddp"][0]["weights_mb"]
    print(f"model: Llama-shaped, hidden {args.hidden}, {args.layers} layers; fp32 weights W = {w:.0f} MB; "
          f"{args.processes} gloo processes, AdamW on every weight, {args.steps} steps; glibc mmap threshold "
          f"{'default' if args.glibc_default else '64 KiB'}")
    print(f"{'mode':<6} {'rank':>4} {'RSS before fit':>15} {'peak RSS':>10} {'peak - before':>14} {'final loss':>11}")
    for mode in ("ddp", "fsdp"):
        for r in rows[mode]:
            print(f"{mode:<6} {r['rank']:>4} {r['rss_before_mb']:>12.0f} MB {r['peak_mb']:>7.0f} MB "
                  f"{r['peak_mb'] - r['rss_before_mb']:>11.0f} MB {r['final_loss']:>11.4f}")
    grow = {m: max(r["peak_mb"] - r["rss_before_mb"] for r in rows[m]) for m in rows}
    print(f"training's added peak, sharded / replicated: {grow['fsdp'] / grow['ddp']:.2f} "
          f"({grow['fsdp']:.0f} MB vs {grow['ddp']:.0f} MB; W = {w:.0f} MB)")


if __name__ == "__main__":
    main()
