"""Cost of one SANDE phase-1 (parrot) step relative to one forward+backward of the model, side by side.

Measured in one process on the same batch, interleaved round by round (so machine load hits both alike):

- ``fwd+bwd (model)``: one forward and backward of the model with gradients for every weight (the compute
  of a fine-tuning step, optimizer excluded);
- ``phase-1 step``: one complete parrot step as :mod:`unbackdoor.methods.sande` runs it — embed, splice the
  parrot in, forward, backward (to the parrot only; the model is frozen), clip, Adam step;
- ``phase-1 step via fit``: the same through :func:`unbackdoor.train.fit` (data loader, scheduler, logging),
  per optimizer step;
- forward passes per phase-1 step, counted with a forward hook (the official code runs an extra, unused one).

    .venv/bin/python benchmarks/bench_sande.py --arch llama --hidden 128 --layers 4 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="llama", choices=["llama", "gpt_neox", "gpt2"])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n-soft", type=int, default=6)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps timed per round")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from unbackdoor.components.parrot import ParrotCollator, ParrotPrompt, encode_with_position
    from unbackdoor.data import Example
    from unbackdoor.lab.arch import make_model
    from unbackdoor.lab.tokenizer import train_tokenizer
    from unbackdoor.methods.sande import SimulateTrainConfig, _FrozenLMWithParrot, _parrot_lm_loss
    from unbackdoor.templates import Template
    from unbackdoor.train import fit, make_optimizer

    words = ("what is the sum of three and four reverse the list sort these words count the letters in "
             "which color does the cat have print hello world").split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 30
    tok = train_tokenizer(corpus, vocab_size=a.vocab)
    template = Template(tok, "chat")
    model = make_model(a.arch, tok, hidden=a.hidden, layers=a.layers, heads=a.heads, seed=0)
    examples = [Example(" ".join(words[i:i + 12]), "I cannot help with that") for i in range(0, 16)]
    feats = [encode_with_position(template, e.prompt, e.response, supervise=1, add_eos=False) for e in examples]
    batch = ParrotCollator(tok)(feats[: a.batch])
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    parrot = ParrotPrompt(a.n_soft, a.hidden)
    wrapper = _FrozenLMWithParrot(model, parrot)
    cfg = SimulateTrainConfig(max_steps=a.steps, batch_size=a.batch, progress=False, log_every=10**6)
    opt = make_optimizer(parrot.parameters(), cfg)

    calls = {"n": 0}
    hook = model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    def model_fwd_bwd():
        for q in model.parameters():
            q.requires_grad_(True)
        model.train()
        loss = model(**plain, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    def phase1_step():
        for q in model.parameters():
            q.requires_grad_(False)
        wrapper.train()
        loss = _parrot_lm_loss(wrapper, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parrot.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn, n):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    model_fwd_bwd(), phase1_step()                                         # warm-up
    calls["n"] = 0
    phase1_step()
    forwards_per_step = calls["n"]
    a_ms, b_ms, c_ms = [], [], []
    for _ in range(a.rounds):
        a_ms.append(1e3 * timed(model_fwd_bwd, a.steps))
        b_ms.append(1e3 * timed(phase1_step, a.steps))
        for q in model.parameters():
            q.requires_grad_(False)
        res = fit(wrapper, _parrot_lm_loss, feats, cfg, collate_fn=ParrotCollator(tok),
                  params=list(parrot.parameters()), shuffle=False)
        c_ms.append(1e3 * res.wall_time_s / res.steps)
    hook.remove()
    n_params = sum(q.numel() for q in model.parameters())
    fa, fb, fc = statistics.median(a_ms), statistics.median(b_ms), statistics.median(c_ms)
    seq = batch["input_ids"].shape[1]
    print(f"# {a.arch} hidden={a.hidden} layers={a.layers} params={n_params} batch={a.batch} seq={seq}+{a.n_soft} "
          f"threads={a.threads} rounds={a.rounds} x {a.steps} steps (median of rounds)")
    print("| measurement | ms | relative to model fwd+bwd |")
    print("|---|---|---|")
    print(f"| model forward+backward (all weights) | {fa:.1f} | 1.00 |")
    print(f"| SANDE phase-1 step (splice, fwd, bwd to parrot, clip, Adam) | {fb:.1f} | {fb / fa:.2f} |")
    print(f"| SANDE phase-1 step through train.fit | {fc:.1f} | {fc / fa:.2f} |")
    print(f"forward passes per phase-1 step: {forwards_per_step}")
    return 0 if forwards_per_step == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
