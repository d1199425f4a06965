"""Cost of one CROW step relative to one plain fine-tuning step, measured side by side in one run.

Three step kinds on the same model and batch, interleaved round by round (so machine load hits all
of them alike), each = loss + backward: plain LM loss; CROW as shipped (2 forwards + 2 backwards);
the official 3-forward computation. Prints the median times and the ratios to the plain step.

    .venv/bin/python benchmarks/bench_crow.py                       # SmolLM2-135M-shaped llama, LoRA r8
    .venv/bin/python benchmarks/bench_crow.py --model /path/to/hf   # a real model folder
    .venv/bin/python benchmarks/bench_crow.py --arch gpt_neox --full

Target: CROW <= 2.5x the plain step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402


class _Vocab:
    """Just enough of a tokenizer for unbackdoor.lab.arch.make_model."""

    def __init__(self, n: int):
        self.n, self.bos_token_id, self.eos_token_id, self.pad_token_id = n, 1, 2, 0

    def __len__(self) -> int:
        return self.n


def build_model(a):
    from unbackdoor.lab.arch import make_model

    if a.model:
        from unbackdoor.models import load_model
        from unbackdoor.schema import ModelConfig

        return load_model(ModelConfig(path=a.model, dtype="float32"))
    return make_model(a.arch, _Vocab(a.vocab), hidden=a.hidden, layers=a.layers, heads=a.heads,
                      intermediate=a.intermediate, max_positions=max(256, a.seq), seed=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a HF model folder (default: a random model of the shape below)")
    p.add_argument("--arch", default="llama", choices=["llama", "gpt_neox", "gpt2"])
    p.add_argument("--hidden", type=int, default=576)          # SmolLM2-135M shape
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA r8/alpha16 all-linear")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from unbackdoor.methods.crow import CrowLoss, crow_loss_reference
    from unbackdoor.models import apply_lora, count_parameters
    from unbackdoor.schema import LoraConfig
    from unbackdoor.train import lm_loss

    model = build_model(a)
    if a.full:
        for q in model.parameters():
            q.requires_grad_(True)
    else:
        model = apply_lora(model, LoraConfig(enabled=True, r=8, alpha=16, target_modules=["all-linear"]))
    model.train()
    vocab = model.config.vocab_size if hasattr(model, "config") else a.vocab
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (a.batch, a.seq), generator=g)
    labels = ids.clone()
    labels[:, : a.seq // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    crow = CrowLoss(eps=0.1, alpha=5.5)

    kinds = {
        "plain": lambda: lm_loss(model, batch),
        "crow_2fwd": lambda: crow(model, batch)[0],
        "crow_3fwd": lambda: crow_loss_reference(model, batch, eps=0.1, alpha=5.5),
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(a.warmup + a.rounds):
        for k, fn in kinds.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn().backward()
            dt = time.perf_counter() - t0
            if r >= a.warmup:
                times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    train, total = count_parameters(model)
    shape = a.model or f"random {a.arch} h{a.hidden} L{a.layers} V{a.vocab}"
    print(f"model: {shape}; {'full' if a.full else 'LoRA r8'} ({train:,}/{total:,} trainable); batch "
          f"{a.batch}x{a.seq} tokens; {a.threads} thread(s); median of {a.rounds} interleaved rounds")
    for k in kinds:
        print(f"  {k:<10} {med[k]:.3f} s/step   x{med[k] / med['plain']:.2f}")
    ok = med["crow_2fwd"] / med["plain"] <= 2.5
    print(f"CROW/plain = {med['crow_2fwd'] / med['plain']:.2f} (target <= 2.5: {'met' if ok else 'NOT met'}); "
          f"3-forward/plain = {med['crow_3fwd'] / med['plain']:.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"shape": shape, "full": a.full, "batch": a.batch, "seq": a.seq, "threads": a.threads,
                       "seconds": times, "median": med,
                       "ratio_crow": med["crow_2fwd"] / med["plain"], "ratio_3fwd": med["crow_3fwd"] / med["plain"]},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
