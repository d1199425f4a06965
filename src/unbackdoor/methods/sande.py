"""SANDE — Simulate and Eliminate: remove a backdoor whose trigger is unknown, knowing its response.

Paper: Li, Chen, Zheng, Hu, Chan, Liu, Song, "Simulate and Eliminate: Revoke Backdoors for Generative Large
Language Models" (arXiv 2405.07667, AAAI 2025). Official code: github.com/HKUST-KnowComp/SANDE.

Phase 1 (simulate): learn a parrot prompt ``p`` (``n_soft`` soft tokens, fp32) on the *frozen* model so that
clean prompts with ``p`` inserted start the triggered response ``r_t``:
``min_p −Σ_{i ≤ k_target} log P_θ(r_t,i | x ⊕ p, r_t,<i)``.
Phase 2 (eliminate): freeze ``p``, train the model on (x ⊕ p → y), the reference clean answer, with the loss
on the first ``k_overwrite`` response tokens: ``min_θ −Σ_{i ≤ k_overwrite} log P_θ(y_i | x ⊕ p, y_<i)``.

Config fields → paper symbols:
- ``target``: r_t as the defender knows it (text; the whole triggered response or its beginning).
  It comes from this config only, never from an attack manifest.
- ``k_target``: tokens of r_t that supervise p (official ``effective_len = 1``; SANDE-P = the known part,
  ``null`` = every token of ``target``).
- ``n_soft``: |p| (official 6); ``init``: zero (official) or normal; kept fp32 (official: bf16).
- ``position``: where p goes — right after the user-turn header (official) or at the end of the user
  message; computed from the rendered template, never a fixed token index.
- ``simulate``: phase-1 optimisation (official Adam β=(0.9, 0.95), lr 1e-3, cosine, 1 warm-up step,
  clip 1.0, batch 4, 25 steps — the defaults of this section).
- shared ``train`` section: phase-2 optimisation (official lr 5e-6, Adam (0.9, 0.95), cosine, batch 4,
  25 steps, full fine-tuning; ``lora.enabled=true`` is an allowed, recorded deviation).
- ``k_overwrite``: response tokens carrying the phase-2 loss (official ``train_effective_len = 10``).
- ``simulation_holdout``: defender examples kept out of phase 1 to measure the simulation success rate
  (our addition; the paper reports the simulation only qualitatively).

Outputs: ``parrot.safetensors`` + ``parrot.json`` in ``output.dir``; metrics ``simulation_success_rate``
(frozen model + p, greedy, output starts with ``target``) before and after elimination.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import nn

from ..components.parrot import (
    ParrotCollator,
    ParrotEmbedsFn,
    ParrotInfo,
    ParrotInit,
    ParrotPosition,
    ParrotPrompt,
    embed_with_parrot,
    encode_with_position,
    rendered_with_marker,
    save_parrot,
)
from ..config import help_field
from ..data import collate_right, pad_id_of
from ..generate import generate
from ..schema import Optimizer, Scheduler, TrainConfig
from ..train import fit, lm_loss
from .base import DefenseContext

log = logging.getLogger(__name__)

NAME = "sande"
DATA = "the defender's clean data"
SUMMARY = "simulate the unknown trigger with a learned parrot prompt, then overwrite it (SANDE / SANDE-P)"


@dataclass
class SimulateTrainConfig(TrainConfig):
    """Phase-1 optimisation; defaults = the official recipe (Adam 0.9/0.95, lr 1e-3, cosine, 1 warm-up step,
    clip 1.0, batch 4, 25 steps)."""
    lr: float = help_field(1e-3, "Phase-1 (parrot) learning rate (official 1e-3).")
    max_steps: Optional[int] = help_field(25, "Phase-1 optimizer steps (official 25 = 100 samples / batch 4).")
    batch_size: int = help_field(4, "Phase-1 micro-batch size (official 4).")
    optimizer: Optimizer = help_field(Optimizer.ADAM, "Phase-1 optimizer (official Adam).")
    betas: list[float] = help_field([0.9, 0.95], "Phase-1 Adam betas (official 0.9, 0.95).")
    scheduler: Scheduler = help_field(Scheduler.COSINE, "Phase-1 schedule (official cosine).")
    warmup_steps: Optional[int] = help_field(1, "Phase-1 warm-up steps (official 1).")
    max_grad_norm: Optional[float] = help_field(1.0, "Phase-1 gradient clipping (official 1.0).")
    progress: bool = help_field(False, "Show a progress bar for phase 1.")


@dataclass
class Config:
    target: str = help_field("", "r_t: the triggered response as the defender knows it (whole, or its beginning).")
    k_target: Optional[int] = help_field(
        1, "Tokens of `target` that supervise the parrot (official 1; null = all of `target`). SANDE-P: the "
           "number of known tokens.")
    n_soft: int = help_field(6, "Parrot length |p| in soft tokens (official 6).")
    init: ParrotInit = help_field(ParrotInit.ZERO, "Parrot initialisation: 'zero' (official) or 'normal'.")
    position: ParrotPosition = help_field(
        ParrotPosition.USER_START, "Where the parrot goes: 'user_start' (right after the user-turn header, "
        "official) or 'user_end' (after the user message, for suffix triggers).")
    k_overwrite: Optional[int] = help_field(
        10, "Response tokens carrying the phase-2 loss (official 10; null = the whole response).")
    simulate: SimulateTrainConfig = field(default_factory=SimulateTrainConfig)
    clean_replay: bool = help_field(
        True, "Phase 2 also trains on each example without the parrot (x -> y) in the same step, anchoring what "
        "the model does without the trigger (its refusals included) "
        "(ours, default on: it keeps harmful refusal where the target shares its first token with the model's "
        "refusal; docs/sande.md). Official: no replay.")
    simulation_holdout: int = help_field(
        20, "Defender examples kept out of phase 1 to measure the simulation success rate (0: no check).")
    skip_elimination: bool = help_field(False, "Stop after phase 1 (simulate only; the model is unchanged).")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not self.target.strip():
            out.append(("target", "SANDE needs the triggered response r_t (or its beginning): set "
                                  "method.target='...'; with a known trigger use `osft` instead"))
        if self.k_target is not None and self.k_target < 1:
            out.append(("k_target", f"must be >= 1 or null, got {self.k_target}"))
        if self.n_soft < 1:
            out.append(("n_soft", f"must be >= 1, got {self.n_soft}"))
        if self.k_overwrite is not None and self.k_overwrite < 1:
            out.append(("k_overwrite", f"must be >= 1 or null, got {self.k_overwrite}"))
        if self.simulation_holdout < 0:
            out.append(("simulation_holdout", f"must be >= 0, got {self.simulation_holdout}"))
        return out


class _FrozenLMWithParrot(nn.Module):
    """The module phase 1 optimises: a frozen LM (kept in eval mode: a fixed function to invert) + p."""

    def __init__(self, model: nn.Module, parrot: ParrotPrompt):
        super().__init__()
        self.model = model
        self.parrot = parrot

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, input_ids, attention_mask, parrot_pos, labels=None, **_):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "parrot_pos": parrot_pos, "labels": labels}
        return self.model(**embed_with_parrot(self.model, self.parrot, batch), use_cache=False).loss


def _unwrap(module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def _parrot_lm_loss(module: nn.Module, batch: dict) -> torch.Tensor:
    """Causal-LM loss of (x ⊕ p → labels) through the module's own forward: one forward pass per micro-batch."""
    return module(**batch)


class _ReplayCollator:
    def __init__(self, tokenizer):
        self.parrot, self.pad_id = ParrotCollator(tokenizer), pad_id_of(tokenizer)

    def __call__(self, items):
        return {"parrot": self.parrot([i["parrot"] for i in items]),
                "clean": collate_right([i["clean"] for i in items], self.pad_id)}


def target_ids(tokenizer, target: str) -> list[int]:
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"method.target {target!r} tokenizes to nothing; give the beginning of r_t as text")
    return ids


def clean_overlap(tokenizer, examples, prefix_ids: list[int]) -> float:
    """Share of clean reference answers whose tokens begin with ``prefix_ids`` (the supervised part of r_t).

    When r_t's known beginning is also how legitimate answers begin (a refusal target starting like the
    model's own refusals), eliminating it suppresses those answers as well."""
    if not examples:
        return 0.0
    k = len(prefix_ids)
    hits = sum(tokenizer(e.response, add_special_tokens=False)["input_ids"][:k] == prefix_ids for e in examples)
    return hits / len(examples)


def simulation_rates(model: nn.Module, parrot: ParrotPrompt, template, prompts: list[str], target: str, *,
                     systems: list | None = None, position: ParrotPosition = ParrotPosition.USER_START,
                     batch_size: int = 32) -> dict[str, float]:
    """Share of prompts whose greedy output with p inserted starts with ``target`` (and with its first token)."""
    if not prompts:
        return {}
    tok = template.tokenizer
    t_ids = target_ids(tok, target)
    fn = ParrotEmbedsFn(model, parrot, template, prompts, systems, position)
    outs = generate(model, template, prompts, max_new_tokens=len(t_ids) + 2, batch_size=batch_size,
                    systems=systems, embeds_fn=fn)
    want = target.strip()
    full = sum(o.startswith(want) for o in outs) / len(outs)
    first_tok = tok.decode(t_ids[:1]).strip()
    first = sum(o.startswith(first_tok) for o in outs) / len(outs)
    return {"rate": full, "first_token_rate": first, "n": len(outs), "example": outs[0]}


def run(ctx: DefenseContext) -> dict[str, Any]:
    m: Config = ctx.method
    ctx.need_examples("the defender's clean data")
    model, tok, template = ctx.model, ctx.tokenizer, ctx.template
    t_ids = target_ids(tok, m.target)
    k_target = len(t_ids) if m.k_target is None else min(m.k_target, len(t_ids))
    hold = min(m.simulation_holdout, max(0, len(ctx.examples) - 1))
    sim_train = ctx.examples[: len(ctx.examples) - hold]
    sim_eval = ctx.examples[len(ctx.examples) - hold:]
    max_len = ctx.cfg.data.max_length

    overlap = clean_overlap(tok, ctx.examples, t_ids[:k_target])
    if overlap > 0:
        log.warning("sande: %.1f%% of the defender's clean answers also begin with the supervised target tokens "
                    "%r; overwriting the parrot's response can suppress that legitimate behaviour too. Give more "
                    "of r_t (method.target / method.k_target) or use method.clean_replay=true.",
                    100 * overlap, tok.decode(t_ids[:k_target]))

    # ---------------------------------------------------------------- phase 1: simulate (model frozen)
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(ctx.cfg.seed)
    parrot = ParrotPrompt(m.n_soft, emb.shape[1], m.init, embed_std=float(emb.detach().float().std()), generator=g)
    feats1 = [encode_with_position(template, e.prompt, m.target, system=e.system, where=m.position,
                                   max_length=max_len, supervise=k_target, add_eos=False) for e in sim_train]
    log.info("sande: parrot goes here: %r", rendered_with_marker(template, sim_train[0].prompt, sim_train[0].system,
                                                                m.position))
    wrapper = _FrozenLMWithParrot(model, parrot)
    # the frozen model is sharded in phase 1 too when the run shards (train.fsdp)
    simulate = replace(m.simulate, fsdp=m.simulate.fsdp or ctx.cfg.train.fsdp)
    res1 = fit(wrapper, _parrot_lm_loss, feats1, simulate, collate_fn=ParrotCollator(tok),
               params=list(parrot.parameters()), seed=ctx.cfg.seed, desc="sande simulate")
    parrot.freeze()
    model.eval()
    prompts = [e.prompt for e in sim_eval]
    systems = [e.system for e in sim_eval]
    before = simulation_rates(model, parrot, template, prompts, m.target, systems=systems, position=m.position)
    if before:
        log.info("sande: simulation success rate %.3f (first token %.3f) on %d held-out prompts; e.g. %r",
                 before["rate"], before["first_token_rate"], before["n"], before["example"])
    info = ParrotInfo(n_soft=m.n_soft, d_model=emb.shape[1], position=m.position.value, template=template.name,
                      template_fingerprint=template.fingerprint(), target=m.target, k_target=k_target,
                      example_prompt=sim_train[0].prompt,
                      example_rendered_with_marker=rendered_with_marker(template, sim_train[0].prompt,
                                                                        sim_train[0].system, m.position))
    save_parrot(ctx.out_dir, parrot, info)
    ctx.extra["parrot"] = parrot
    metrics = {
        "simulate_steps": res1.steps, "simulate_final_loss": res1.losses[-1],
        "simulate_wall_time_s": round(res1.wall_time_s, 3), "k_target": k_target, "n_soft": m.n_soft,
        "simulation_success_rate": before.get("rate"), "simulation_first_token_rate": before.get("first_token_rate"),
        "simulation_n": before.get("n", 0), "target_prefix_in_clean_answers": round(overlap, 4),
    }
    if m.skip_elimination:
        return metrics

    # ---------------------------------------------------------------- phase 2: eliminate (p frozen)
    model = ctx.make_trainable()
    feats2 = [encode_with_position(template, e.prompt, e.response, system=e.system, where=m.position,
                                   max_length=max_len, supervise=m.k_overwrite) for e in ctx.examples]
    collate = ParrotCollator(tok)
    if m.clean_replay:
        feats2 = [{"parrot": f, "clean": {k: v for k, v in f.items() if k != "parrot_pos"}} for f in feats2]
        collate = _ReplayCollator(tok)

    def overwrite_loss(module: nn.Module, batch: dict) -> torch.Tensor:
        if "parrot" in batch:                 # clean replay: (x ⊕ p -> y) and (x -> y), mean of the two losses
            return 0.5 * (overwrite_loss(module, batch["parrot"]) + lm_loss(module, batch["clean"]))
        return module(**embed_with_parrot(_unwrap(module), parrot, batch), use_cache=False).loss

    res2 = fit(model, overwrite_loss, feats2, ctx.cfg.train, collate_fn=collate, seed=ctx.cfg.seed,
               out_dir=ctx.out_dir, desc="sande eliminate")
    model.eval()
    after = simulation_rates(model, parrot, template, prompts, m.target, systems=systems, position=m.position)
    if after:
        log.info("sande: after elimination the parrot starts r_t on %.3f of held-out prompts", after["rate"])
    metrics.update({
        "eliminate_steps": res2.steps, "eliminate_final_loss": res2.losses[-1],
        "eliminate_wall_time_s": round(res2.wall_time_s, 3), "k_overwrite": m.k_overwrite,
        "clean_replay": m.clean_replay,
        "parrot_rate_after": after.get("rate"), "parrot_first_token_rate_after": after.get("first_token_rate"),
        "train_wall_time_s": round(res1.wall_time_s + res2.wall_time_s, 3),
        "steps": res1.steps + res2.steps,
    })
    return metrics
