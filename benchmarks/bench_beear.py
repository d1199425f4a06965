"""BEEAR inner phase: time per epoch with the anchor-activation cache vs without, measured side by side.

With the cache the layers below the anchor run once per micro-batch (when the cache is built) and every
inner epoch runs only the layers from the anchor up; without it every step runs the full forward. Both give
the same δ trajectory (tests/methods/test_beear.py::test_cached_trajectory_equals_uncached); this script
also checks that on the measured run.

    .venv/bin/python benchmarks/bench_beear.py --arch llama --layers 32 --hidden 128 --anchor 9
    .venv/bin/python benchmarks/bench_beear.py --arch gpt_neox --layers 8 --repeats 3

Uses the lab's tokenizer and defender files (test recipe, built on demand) and a randomly initialised
model of the requested shape (timing does not depend on the weights).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="llama", choices=["llama", "gpt_neox", "gpt2"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--anchor", type=int, default=None, help="anchor layer (default: round(9/32 * layers))")
    ap.add_argument("--pairs", type=int, default=24, help="|S| harmful pairs")
    ap.add_argument("--batch", type=int, default=6, help="inner micro-batch")
    ap.add_argument("--epochs", type=int, default=5, help="inner epochs per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="alternating measurements per mode")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from unbackdoor.components.perturb import Delta
    from unbackdoor.lab import Lab, make_model
    from unbackdoor.methods import beear
    from unbackdoor.templates import Template

    lab = Lab.build("test")
    tok = lab.tokenizer
    template = Template(tok, "chat")
    pairs = beear.pair_examples(lab.data("sa_safe"), lab.data("sa_unwanted"))[: args.pairs]
    model = make_model(args.arch, tok, hidden=args.hidden, layers=args.layers, heads=args.heads,
                       max_positions=256, seed=0).eval()
    cfg = beear.Config(safe_path="-", unwanted_path="-", anchor_layer=args.anchor, inner_epochs=args.epochs,
                       inner_batch_size=args.batch)
    layer = beear.resolve_anchor(cfg, args.layers)
    times = {True: [], False: []}
    build = {True: [], False: []}
    trajs = {}
    for rep in range(args.repeats):
        for cache in (True, False) if rep % 2 == 0 else (False, True):   # alternate the order: fair under load
            t0 = time.perf_counter()
            batches = beear.build_inner_batches(model, template, pairs, cfg, layer, 96, cache)
            build[cache].append(time.perf_counter() - t0)
            delta, traj = Delta(cfg.rows, args.hidden), []
            t0 = time.perf_counter()
            beear.entrap(model, batches, delta, layer, cfg, lr=1e-2, trajectory=traj)
            times[cache].append((time.perf_counter() - t0) / args.epochs)
            trajs[cache] = torch.stack(traj)
    same = torch.equal(trajs[True], trajs[False])
    med = {k: statistics.median(v) for k, v in times.items()}
    bmed = {k: statistics.median(v) for k, v in build.items()}
    n_steps = -(-len(pairs) // args.batch)
    print(f"BEEAR inner phase: {args.arch}, {args.layers} layers x {args.hidden} hidden, anchor = input of layer "
          f"{layer}, |S| = {len(pairs)}, batch {args.batch} ({n_steps} steps/epoch), {args.epochs} epochs, "
          f"{args.repeats} repeats, torch threads {args.threads}")
    print("| mode | batch prep + cache (s, once per round) | time per inner epoch (s, median) | "
          f"round total {args.epochs} epochs (s) |")
    print("|---|---|---|---|")
    for cache in (False, True):
        name = "with cache" if cache else "without cache"
        print(f"| {name} | {bmed[cache]:.3f} | {med[cache]:.3f} | {bmed[cache] + args.epochs * med[cache]:.3f} |")
    print(f"per-epoch speed-up (without / with): {med[False] / med[True]:.2f}x; "
          f"round speed-up incl. cache build: "
          f"{(bmed[False] + args.epochs * med[False]) / (bmed[True] + args.epochs * med[True]):.2f}x; "
          f"identical δ trajectories: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
