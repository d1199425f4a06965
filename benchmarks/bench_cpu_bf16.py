"""CPU bf16 autocast (``train.bf16_on_cpu``) against fp32, measured side by side in one run.

The same model and batch, interleaved round by round (so machine load hits both alike), each step =
loss + backward, for a plain LM-loss LoRA step and a CROW step, once in fp32 and once under
``torch.autocast("cpu", torch.bfloat16)`` (what Accelerate's ``mixed_precision="bf16"`` does). Prints the
median times, the speed-up, and how far the bf16 loss is from the fp32 one.

    .venv/bin/python benchmarks/bench_cpu_bf16.py                       # SmolLM2-135M-shaped llama, LoRA r8
    .venv/bin/python benchmarks/bench_cpu_bf16.py --model /path/to/hf   # a real model folder
    .venv/bin/python benchmarks/bench_cpu_bf16.py --threads 1

Only CPUs with native bf16 (AVX512-BF16 or AMX) gain; elsewhere bf16 autocast is slower than fp32, and
``train.bf16_on_cpu`` falls back to fp32 with a warning.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_crow import build_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a HF model folder (default: a random model of the shape below)")
    p.add_argument("--arch", default="llama", choices=["llama", "gpt_neox", "gpt2"])
    p.add_argument("--hidden", type=int, default=576)          # SmolLM2-135M shape
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from unbackdoor.methods.crow import CrowLoss
    from unbackdoor.models import apply_lora
    from unbackdoor.schema import LoraConfig
    from unbackdoor.train import cpu_has_bf16, lm_loss

    model = apply_lora(build_model(a), LoraConfig(enabled=True, r=8, alpha=16, target_modules=["all-linear"]))
    model.train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (a.batch, a.seq), generator=g)
    labels = ids.clone()
    labels[:, : a.seq // 3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    crow = CrowLoss(eps=0.1, alpha=5.5)
    steps = {"lora": lambda: lm_loss(model, batch), "crow": lambda: crow(model, batch)[0]}
    precisions = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    times: dict[str, list[float]] = {f"{s}_{q}": [] for s in steps for q in precisions}
    losses: dict[str, float] = {}
    for r in range(a.warmup + a.rounds):
        for s, fn in steps.items():
            for q, ctx in precisions.items():
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                with ctx():
                    loss = fn()
                loss.backward()
                dt = time.perf_counter() - t0
                losses[f"{s}_{q}"] = float(loss.detach())
                if r >= a.warmup:
                    times[f"{s}_{q}"].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    shape = a.model or f"random {a.arch} h{a.hidden} L{a.layers} V{a.vocab}"
    print(f"model: {shape}; LoRA r8; batch {a.batch}x{a.seq} tokens; {a.threads} thread(s); median of {a.rounds} "
          f"interleaved rounds; native CPU bf16: {cpu_has_bf16()}")
    ratios = {}
    for s in steps:
        fp, bf = med[f"{s}_fp32"], med[f"{s}_bf16"]
        ratios[s] = fp / bf
        print(f"  {s:<5} fp32 {fp:.3f} s/step   bf16 {bf:.3f} s/step   speed-up x{fp / bf:.2f}   loss "
              f"{losses[f'{s}_fp32']:.4f} -> {losses[f'{s}_bf16']:.4f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"shape": shape, "batch": a.batch, "seq": a.seq, "threads": a.threads, "seconds": times,
                       "median": med, "speedup": ratios, "losses": losses, "native_bf16": cpu_has_bf16()}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
