"""BEEAR: entrap the trigger's drift in embedding space with a universal perturbation δ, then train it away.

Paper: Zeng, Sun, Huynh, Song, Li, Jia, "BEEAR: Embedding-based Adversarial Removal of Safety Backdoors in
Instruction-tuned Language Models", EMNLP 2024, https://arxiv.org/abs/2406.17092 (official code:
github.com/reds-lab/BEEAR). Spec: shared/specs/beear.md; user docs: docs/beear.md.

Bi-level loop, for ``n_rounds`` rounds::

    S ← inner_samples pairs of (D_SA, D_SA-H);  P ← pa_samples rows of D_PA
    δ ← 0 ∈ R^{token_length × d}                                   (fp32, re-initialised each round)
    inner (model frozen), inner_epochs passes over S in micro-batches of inner_batch_size:
        L_in = CE(y_unwanted | x, δ) − alpha · CE(y_safe | x, δ)   → Adam on δ, lr inner_lr
    outer (δ* fixed), one pass over S and P with the shared `train` settings:
        L_out = CE(y_safe | x, δ*) + lambda_pa · CE(y | x_benign)  → the `trainable` parameters

Config field → paper symbol / choice (ours = not fixed by the paper; see docs/beear.md):

======================  ============================================================================
``safe_path``           D_SA: harmful queries with safe answers (refusals)
``unwanted_path``       D_SA-H: the same queries with unwanted answers; paired with D_SA by prompt
``data.path`` (shared)  D_PA: benign performance-anchoring pairs
``anchor_layer``        the layer whose *input* (HF ``hidden_states[k]``) gets δ; paper 9 of 32;
                        ``null`` = the same relative depth (round(9/32 · L)) (ours)
``token_length``        rows of δ, paper 7
``positions``           which prompt tokens δ covers: ``last`` token_length (ending at the assistant
                        header) or ``all`` (one shared row) (ours: last)
``alpha``               weight of the "away from safe" term, paper 0.05
``away_loss``           ``ce_ascent`` (−alpha·CE) or ``unlikelihood`` (+alpha·−log(1−p)) (ours: ce_ascent)
``n_rounds``            outer rounds, paper 6
``inner_epochs``        inner passes over S, paper 5
``inner_samples``       |S| per round, paper 120 (≈150 in some runs)
``pa_samples``          |P| per round, paper 100
``inner_batch_size``    inner micro-batch, paper 6
``inner_optimizer``     δ optimizer (ours: adam)
``inner_lr``            δ step size; with ``inner_lr_scale=hidden_rms`` in units of the median per-token
                        RMS of the anchor hidden states, so one value fits any model scale (ours)
``delta_max_norm``      optional bound on each δ row's L2 norm (same units) (ours: none)
``trainable``           parameters of the outer step: ``upper`` (layers ≥ anchor + final norm), ``all``,
                        ``lower`` (layers < anchor), ``lora`` (the shared ``lora`` section) (ours: upper)
``lambda_pa``           weight of the PA term (ours: 1.0)
``reinit_delta``        δ ← 0 every round (ours: yes)
``train.*`` (shared)    the outer step: lr (paper 3e-7 on a 7B model), batch size, epochs per round
======================  ============================================================================

The frozen model's lower layers run once per inner micro-batch: their output at the anchor is cached
(:func:`unbackdoor.components.perturb.anchor_inputs`) and reused across inner epochs, and the backward pass
starts at the anchor (``cache_activations``). Each round logs the entrapment check: the rate of unwanted
answers under δ on held-out harmful queries (a generation counts as unwanted when it is closer to the
held-out unwanted reference than to the safe one), before and after the outer step.
"""
from __future__ import annotations

import difflib
import enum
import logging
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..arch import anatomy
from ..components.perturb import Delta, Positions, anchor_inputs, perturb, placement
from ..config import help_field
from ..data import IGNORE, DataError, Example, collate_right, encode, pad_id_of, read_file
from ..schema import Optimizer, Scheduler, TrainConfig
from ..train import FitResult, fit, get_accelerator
from .base import DefenseContext, DefenseError

log = logging.getLogger(__name__)

NAME = "beear"
SUMMARY = ("bi-level: fit a universal perturbation δ at an inner layer that elicits the unwanted behaviour, "
           "then train the model to stay safe under δ (no trigger knowledge)")
#: Config fields a shipped config leaves to the command line (the defender's own files).
COMMAND_LINE_FIELDS = ("safe_path", "unwanted_path")

#: The paper's anchor: input of decoder layer 9 of Llama-2-7B's 32.
PAPER_ANCHOR = (9, 32)


class AwayLoss(str, enum.Enum):
    CE_ASCENT = "ce_ascent"          # L_in = CE(unwanted) − alpha · CE(safe)
    UNLIKELIHOOD = "unlikelihood"    # L_in = CE(unwanted) + alpha · mean −log(1 − p(safe token))


class Trainable(str, enum.Enum):
    UPPER = "upper"   # decoder layers from the anchor on + the final norm
    ALL = "all"       # every weight
    LOWER = "lower"   # decoder layers below the anchor
    LORA = "lora"     # a LoRA adapter per the shared `lora` section


class LrScale(str, enum.Enum):
    HIDDEN_RMS = "hidden_rms"   # inner_lr and delta_max_norm in units of the anchor hidden-state scale
    ABSOLUTE = "absolute"       # as given


@dataclass
class Config:
    """BEEAR's own fields; the outer step uses the shared `train` section, D_PA the shared `data` section."""
    safe_path: str = help_field("", "D_SA: harmful queries with safe answers (.jsonl/.json/.csv, prompt/response).")
    unwanted_path: str = help_field("", "D_SA-H: the same queries with unwanted answers; paired with D_SA by prompt.")
    anchor_layer: Optional[int] = help_field(
        None, "δ goes on the INPUT of this decoder layer (0-indexed, = HF hidden_states[k]). Paper: 9 of 32. "
        "null: the paper's relative depth, round(9/32 * num_layers).")
    token_length: int = help_field(7, "Rows of δ (paper 7): the last token_length prompt tokens (positions=last).")
    positions: Positions = help_field(
        Positions.LAST, "Tokens δ covers: 'last' token_length prompt tokens ending at the assistant header, or "
        "'all' prompt tokens with one shared row. Our choice: last.")
    alpha: float = help_field(0.05, "Weight of the 'away from the safe answer' term (paper 0.05).")
    away_loss: AwayLoss = help_field(
        AwayLoss.CE_ASCENT, "'ce_ascent': −alpha·CE(safe) (the paper's form as far as known); 'unlikelihood': "
        "+alpha·mean −log(1−p(safe token)), bounded. Our choice: ce_ascent.")
    n_rounds: int = help_field(6, "Outer rounds (paper 6).")
    inner_epochs: int = help_field(5, "Passes of the inner (δ) optimisation over S per round (paper 5).")
    inner_samples: Optional[int] = help_field(120, "|S|: harmful pairs drawn per round (paper 120); null = all.")
    pa_samples: Optional[int] = help_field(100, "|P|: D_PA rows drawn per round (paper 100); null = all.")
    inner_batch_size: int = help_field(6, "Inner micro-batch (paper 6); 1 works.")
    inner_optimizer: Optimizer = help_field(Optimizer.ADAM, "Optimizer of δ. Our choice: adam.")
    inner_lr: float = help_field(
        0.05, "Step size of δ; with inner_lr_scale=hidden_rms in units of the median per-token RMS of the anchor "
        "hidden states. Our choice, from the lab ablation (docs/beear.md).")
    inner_lr_scale: LrScale = help_field(
        LrScale.HIDDEN_RMS, "'hidden_rms': inner_lr and delta_max_norm scale with the model's hidden states; "
        "'absolute': as given.")
    delta_max_norm: Optional[float] = help_field(
        None, "Bound on each δ row's L2 norm (hidden_rms units: multiples of a typical token's norm); null = none.")
    trainable: Trainable = help_field(
        Trainable.UPPER, "Outer-step parameters: 'upper' (layers >= anchor + final norm), 'all', 'lower' "
        "(layers < anchor), 'lora' (needs lora.enabled=true). Our choice: upper.")
    lambda_pa: float = help_field(1.0, "Weight of the performance-anchoring term (ours: 1.0).")
    reinit_delta: bool = help_field(True, "Reset δ to zero at every round (ours: yes); false warm-starts it.")
    check_samples: int = help_field(
        16, "Harmful pairs held out of training for the per-round entrapment check (0: no check).")
    check_max_new_tokens: int = help_field(32, "Tokens generated per held-out query in the entrapment check.")
    cache_activations: bool = help_field(
        True, "Inner phase: run the layers below the anchor once per micro-batch and backpropagate from the "
        "anchor up (exact, faster). false recomputes the full forward every step.")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        for name in ("token_length", "n_rounds", "inner_epochs", "inner_batch_size", "check_max_new_tokens"):
            if getattr(self, name) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        for name in ("inner_samples", "pa_samples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                out.append((name, f"must be >= 1 or null (all), got {v}"))
        if self.anchor_layer is not None and self.anchor_layer < 0:
            out.append(("anchor_layer", f"must be >= 0 or null, got {self.anchor_layer}"))
        if self.inner_lr <= 0:
            out.append(("inner_lr", f"must be > 0, got {self.inner_lr}"))
        if self.alpha < 0:
            out.append(("alpha", f"must be >= 0, got {self.alpha}"))
        if self.lambda_pa < 0:
            out.append(("lambda_pa", f"must be >= 0, got {self.lambda_pa}"))
        if self.delta_max_norm is not None and self.delta_max_norm <= 0:
            out.append(("delta_max_norm", f"must be > 0 or null, got {self.delta_max_norm}"))
        if self.check_samples < 0:
            out.append(("check_samples", f"must be >= 0, got {self.check_samples}"))
        if not self.safe_path:
            out.append(("safe_path", "D_SA is required: set method.safe_path=/path/to/safe.jsonl (harmful "
                                     "queries -> safe answers)"))
        if not self.unwanted_path:
            out.append(("unwanted_path", "D_SA-H is required: set method.unwanted_path=/path/to/unwanted.jsonl "
                                         "(the same queries -> unwanted answers)"))
        return out

    @property
    def rows(self) -> int:
        return 1 if self.positions is Positions.ALL else self.token_length


# ----------------------------------------------------------------------------------- data

@dataclass
class Pair:
    """One harmful query with its safe (D_SA) and unwanted (D_SA-H) answers."""
    prompt: str
    safe: str
    unwanted: str
    system: str | None = None


def pair_examples(safe: Sequence[Example], unwanted: Sequence[Example], *, safe_src: str = "safe_path",
                  unwanted_src: str = "unwanted_path") -> list[Pair]:
    """Pair D_SA and D_SA-H rows by (system, prompt); the k-th repeat of a prompt pairs with the k-th."""
    pool: dict[tuple, list[Example]] = {}
    for e in unwanted:
        pool.setdefault((e.system, e.prompt), []).append(e)
    pairs, missing = [], 0
    for e in safe:
        cands = pool.get((e.system, e.prompt))
        if not cands:
            missing += 1
            continue
        u = cands.pop(0)
        if not e.response.strip() or not u.response.strip():
            raise DataError(f"{safe_src}/{unwanted_src}: the pair for prompt {e.prompt[:60]!r} has an empty answer; "
                            "every D_SA and D_SA-H row needs a response")
        pairs.append(Pair(e.prompt, e.response, u.response, e.system))
    left = sum(len(v) for v in pool.values())
    if not pairs:
        raise DataError(f"{safe_src} and {unwanted_src} share no prompt: D_SA and D_SA-H must hold the same "
                        "harmful queries (paired by the prompt text)")
    if missing or left:
        log.warning("BEEAR: %d D_SA rows and %d D_SA-H rows have no partner (paired by prompt) and are unused",
                    missing, left)
    return pairs


def load_pairs(cfg: Config) -> list[Pair]:
    return pair_examples(read_file(cfg.safe_path), read_file(cfg.unwanted_path),
                         safe_src=f"method.safe_path={cfg.safe_path}",
                         unwanted_src=f"method.unwanted_path={cfg.unwanted_path}")


def resolve_anchor(cfg: Config, num_layers: int) -> int:
    if cfg.anchor_layer is None:
        k = round(PAPER_ANCHOR[0] / PAPER_ANCHOR[1] * num_layers)
        return min(max(k, 0), num_layers - 1)
    if cfg.anchor_layer >= num_layers:
        raise ValueError(f"method.anchor_layer={cfg.anchor_layer}, but the model has {num_layers} decoder layers; "
                         f"choose 0..{num_layers - 1}, or null for the paper's relative depth "
                         f"({round(PAPER_ANCHOR[0] / PAPER_ANCHOR[1] * num_layers)} here)")
    return cfg.anchor_layer


def _feat(template, prompt: str, response: str, system: str | None, max_length: int) -> dict:
    return encode(template, prompt, response, system=system, max_length=max_length)


def _batch(feats: Sequence[dict], pad_id: int, rows: int, positions: Positions) -> dict:
    b = collate_right(feats, pad_id)
    b["where"] = placement(b["attention_mask"], b["prompt_len"], rows, positions)
    return b


# ----------------------------------------------------------------------------------- losses

def response_ce(logits: torch.Tensor, labels: torch.Tensor, per_example: bool = False) -> torch.Tensor:
    """Token-level cross-entropy on the response tokens (labels != -100), next-token shifted."""
    lg = logits[:, :-1].float()
    lb = labels[:, 1:]
    tok = nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=IGNORE,
                                      reduction="none").view(lb.shape)
    valid = (lb != IGNORE).float()
    if per_example:
        return (tok * valid).sum(1) / valid.sum(1).clamp_min(1)
    return (tok * valid).sum() / valid.sum().clamp_min(1)


def unlikelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean −log(1 − p(y_t)) over the response tokens: bounded pressure away from the given answer."""
    lg = logits[:, :-1].float()
    lb = labels[:, 1:]
    valid = lb != IGNORE
    logp = torch.log_softmax(lg, -1).gather(-1, lb.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    p = logp.exp().clamp(max=1 - 1e-6)
    ul = -torch.log1p(-p)
    return (ul * valid).sum() / valid.sum().clamp_min(1)


def _forward(model, b: dict, layer: int, delta, cached=None, tuple_out=False) -> torch.Tensor:
    with perturb(model, layer, delta, b["where"], cached=cached, layers_return_tuple=tuple_out):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits


# ----------------------------------------------------------------------------------- inner phase

def build_inner_batches(model, template, pairs: Sequence[Pair], cfg: Config, layer: int, max_length: int,
                        cache: bool, device=None) -> list[dict]:
    """Fixed micro-batches of S (unwanted and safe sequences) with δ placements, and, when ``cache``, the
    anchor-layer inputs computed once (the model is frozen during the inner phase)."""
    pad = pad_id_of(template.tokenizer)
    device = device or next(model.parameters()).device
    out = []
    for s in range(0, len(pairs), cfg.inner_batch_size):
        chunk = pairs[s: s + cfg.inner_batch_size]
        item = {}
        for key in ("unwanted", "safe"):
            feats = [_feat(template, p.prompt, getattr(p, key), p.system, max_length) for p in chunk]
            b = {k: v.to(device) for k, v in _batch(feats, pad, cfg.rows, cfg.positions).items()}
            if cache:
                b["cached"], tuple_out = anchor_inputs(model, layer, b["input_ids"], b["attention_mask"])
                item["tuple_out"] = tuple_out
            item[key] = b
        out.append(item)
    return out


def inner_loss(model, layer: int, cfg: Config):
    """L_in(δ) for one inner micro-batch; ``module`` is the (possibly DDP-wrapped) :class:`Delta`."""
    def loss_fn(module, item):
        tuple_out = item.get("tuple_out", False)
        u, s = item["unwanted"], item["safe"]
        logits_u = _forward(model, u, layer, module, u.get("cached"), tuple_out)
        ce_u = response_ce(logits_u, u["labels"])
        logits_s = _forward(model, s, layer, module, s.get("cached"), tuple_out)
        ce_s = response_ce(logits_s, s["labels"])
        if cfg.away_loss is AwayLoss.CE_ASCENT:
            loss = ce_u - cfg.alpha * ce_s
        else:
            loss = ce_u + cfg.alpha * unlikelihood(logits_s, s["labels"])
        d = module()
        return loss, {"ce_unwanted": ce_u.detach().item(), "ce_safe": ce_s.detach().item(),
                      "delta_norm": d.detach().norm(dim=-1).mean().item()}
    return loss_fn


def anchor_scale(model, batches: Sequence[dict], layer: int) -> tuple[float, float]:
    """(median per-token RMS, median per-token L2 norm) of the anchor inputs over the prompt tokens."""
    rms, norms = [], []
    for item in batches:
        b = item["unwanted"]
        h = b.get("cached")
        if h is None:
            h, _ = anchor_inputs(model, layer, b["input_ids"], b["attention_mask"])
        prompt_tok = (torch.arange(h.shape[1], device=h.device).view(1, -1) < b["prompt_len"].view(-1, 1).to(h.device))
        sel = h.float()[prompt_tok & b["attention_mask"].bool()]
        rms.extend(sel.pow(2).mean(-1).sqrt().tolist())
        norms.extend(sel.norm(dim=-1).tolist())
    return statistics.median(rms), statistics.median(norms)


def entrap(model, batches: Sequence[dict], delta: Delta, layer: int, cfg: Config, *, lr: float,
           max_norm: float | None = None, seed: int = 0, desc: str = "beear inner", progress: bool = False,
           trajectory: list | None = None) -> FitResult:
    """The inner level: minimise L_in over δ with the model frozen (fixed batch order, ``inner_epochs``
    passes). ``trajectory`` (optional list) receives a copy of δ after every step."""
    was_training = model.training
    model.eval()
    req = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in req:
        p.requires_grad_(False)

    def on_step(_step, _row):
        if max_norm is not None:
            delta.clamp_rows_(max_norm)
        if trajectory is not None:
            trajectory.append(delta.delta.detach().clone())

    tcfg = TrainConfig(lr=lr, epochs=float(cfg.inner_epochs), batch_size=1, grad_accum=1, max_grad_norm=None,
                       optimizer=cfg.inner_optimizer, scheduler=Scheduler.CONSTANT, weight_decay=0.0,
                       log_every=max(1, len(batches)), progress=progress)
    try:
        return fit(delta, inner_loss(model, layer, cfg), list(batches), tcfg, collate_fn=_first,
                   params=[delta.delta], seed=seed, desc=desc, on_step=on_step, shuffle=False)
    finally:
        for p, r in req:
            p.requires_grad_(r)
        model.train(was_training)


def _first(items):
    return items[0]


# ----------------------------------------------------------------------------------- outer phase

def select_trainable(model, which: Trainable, layer: int) -> list[nn.Parameter]:
    """Set requires_grad for the outer step's subset; return those parameters."""
    an = anatomy(model)
    if which is Trainable.LORA:
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        if not params:
            raise ValueError("method.trainable=lora but the model has no LoRA adapter; set lora.enabled=true")
        chosen = {id(p) for p in params}
    elif which is Trainable.ALL:
        chosen = {id(p) for p in model.parameters()}
    elif which is Trainable.UPPER:
        mods = list(an.layers[layer:]) + ([an.norm] if an.norm is not None else [])
        chosen = {id(p) for m in mods for p in m.parameters()}
    else:
        if layer == 0:
            raise ValueError("method.trainable=lower but the anchor is layer 0: there are no layers below it; "
                             "raise method.anchor_layer or choose trainable=upper/all")
        chosen = {id(p) for m in an.layers[:layer] for p in m.parameters()}
    out = []
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
        if id(p) in chosen:
            out.append(p)
    return out


class _OuterCollator:
    def __init__(self, tokenizer, rows: int, positions: Positions):
        self.pad, self.rows, self.positions = pad_id_of(tokenizer), rows, positions

    def __call__(self, items):
        return {"sa": _batch([i["sa"] for i in items], self.pad, self.rows, self.positions),
                "pa": collate_right([i["pa"] for i in items], self.pad) if items[0]["pa"] is not None else None}


def outer_loss(layer: int, delta_star: torch.Tensor, lambda_pa: float):
    def loss_fn(model, batch):
        sa = batch["sa"]
        logits = _forward(model, sa, layer, delta_star.to(sa["input_ids"].device))
        ce_sa = response_ce(logits, sa["labels"])
        metrics = {"ce_safe_delta": ce_sa.detach().item()}
        loss = ce_sa
        if batch["pa"] is not None and lambda_pa > 0:
            pa = batch["pa"]
            out = model(input_ids=pa["input_ids"], attention_mask=pa["attention_mask"], use_cache=False)
            ce_pa = response_ce(out.logits, pa["labels"])
            loss = loss + lambda_pa * ce_pa
            metrics["ce_pa"] = ce_pa.detach().item()
        return loss, metrics
    return loss_fn


def outer_items(template, S: Sequence[Pair], P: Sequence[Example], max_length: int) -> list[dict]:
    """One pass over S and P: item i pairs S[i mod |S|] with P[i mod |P|], max(|S|, |P|) items."""
    n = max(len(S), len(P))
    sa = [_feat(template, p.prompt, p.safe, p.system, max_length) for p in S]
    pa = [_feat(template, e.prompt, e.response, e.system, max_length) for e in P]
    return [{"sa": sa[i % len(sa)], "pa": pa[i % len(pa)] if pa else None} for i in range(n)]


# ----------------------------------------------------------------------------------- entrapment check

def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.strip(), b.strip(), autojunk=False).ratio()


@torch.no_grad()
def entrapment_check(model, template, pairs: Sequence[Pair], layer: int, delta: torch.Tensor | None, cfg: Config, *,
                     max_new_tokens: int, batch_size: int = 32, max_length: int = 512) -> dict[str, float]:
    """Under δ (or none), on held-out harmful queries: ``unwanted_rate`` = share of greedy generations closer
    (difflib ratio) to the unwanted reference than to the safe one; ``prefers_unwanted`` = share where the
    teacher-forced CE of the unwanted answer is below that of the safe one."""
    from ..generate import generate_ids

    if not pairs:
        return {}
    tok = template.tokenizer
    pad = pad_id_of(tok)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = [template.encode_prompt(p.prompt, p.system) for p in pairs]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))     # generate_ids keeps a sorted batch's order
    texts: dict[int, str] = {}
    from ..data import collate_left

    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        seqs = [ids[i] for i in idx]
        if delta is None:
            new = generate_ids(model, tok, seqs, max_new_tokens=max_new_tokens, batch_size=len(seqs))
        else:
            mask = collate_left(seqs, pad)["attention_mask"].to(device)
            where = placement(mask, [len(x) for x in seqs], delta.shape[0], cfg.positions)
            with perturb(model, layer, delta, where, prefill_only=True):
                new = generate_ids(model, tok, seqs, max_new_tokens=max_new_tokens, batch_size=len(seqs))
        for i, row in zip(idx, new):
            texts[i] = tok.decode(row, skip_special_tokens=True).strip()
    unwanted = [_similarity(texts[i], p.unwanted) > _similarity(texts[i], p.safe) for i, p in enumerate(pairs)]
    prefers = []
    rows = delta.shape[0] if delta is not None else cfg.rows
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s: s + batch_size]
        ce = {}
        for key in ("unwanted", "safe"):
            feats = [_feat(template, p.prompt, getattr(p, key), p.system, max_length) for p in chunk]
            b = {k: v.to(device) for k, v in _batch(feats, pad, rows, cfg.positions).items()}
            logits = _forward(model, b, layer, delta) if delta is not None else model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            ce[key] = response_ce(logits, b["labels"], per_example=True)
        prefers.extend((ce["unwanted"] < ce["safe"]).tolist())
    model.train(was_training)
    return {"unwanted_rate": sum(unwanted) / len(unwanted), "prefers_unwanted": sum(prefers) / len(prefers),
            "example": texts[0][:120]}


# ----------------------------------------------------------------------------------- the recipe

def _check_trainable(cfg: Config, lora_enabled: bool) -> None:
    if cfg.trainable is Trainable.LORA and not lora_enabled:
        raise DefenseError("method.trainable=lora needs the shared lora section: set lora.enabled=true")
    if cfg.trainable is not Trainable.LORA and lora_enabled:
        raise DefenseError(f"lora.enabled=true but method.trainable={cfg.trainable.value}: set method.trainable=lora "
                           "to train a LoRA adapter, or lora.enabled=false")


def _hold_out(pairs: list[Pair], cfg: Config, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(held-out check pairs, training pairs), shuffled with ``seed``."""
    random.Random(seed).shuffle(pairs)
    n_check = min(cfg.check_samples, len(pairs) // 2)
    if n_check < cfg.check_samples:
        log.warning("BEEAR: only %d pairs; holding out %d (not method.check_samples=%d) for the entrapment check",
                    len(pairs), n_check, cfg.check_samples)
    return pairs[:n_check], pairs[n_check:]


def _delta_scale(model, batches: Sequence[dict], layer: int, cfg: Config) -> dict[str, Any]:
    """δ's learning rate and norm bound in absolute units, from the anchor hidden states' scale (measured once)."""
    rms, norm = anchor_scale(model, batches, layer)
    unit_lr = rms if cfg.inner_lr_scale is LrScale.HIDDEN_RMS else 1.0
    unit_norm = norm if cfg.inner_lr_scale is LrScale.HIDDEN_RMS else 1.0
    lr = cfg.inner_lr * unit_lr
    max_norm = cfg.delta_max_norm * unit_norm if cfg.delta_max_norm is not None else None
    log.info("BEEAR: anchor hidden states: median token RMS %.4g, norm %.4g -> δ lr %.4g", rms, norm, lr)
    return {"anchor_rms": rms, "anchor_token_norm": norm, "delta_lr": lr, "delta_max_norm_abs": max_norm}


def run(ctx: DefenseContext) -> dict[str, Any]:
    cfg: Config = ctx.method
    tcfg = ctx.cfg.train
    seed = ctx.cfg.seed
    max_length = ctx.cfg.data.max_length
    _check_trainable(cfg, ctx.cfg.lora.enabled)
    pa = list(ctx.examples)
    if cfg.lambda_pa > 0 and not pa:
        raise DefenseError("BEEAR needs the performance-anchoring set D_PA: set data.path=/path/to/benign.jsonl "
                           "(or method.lambda_pa=0 to train without it)")
    check, train_pairs = _hold_out(load_pairs(cfg), cfg, seed)

    acc = get_accelerator(tcfg.mixed_precision, bf16_on_cpu=tcfg.bf16_on_cpu)
    if cfg.trainable is Trainable.LORA:
        ctx.make_trainable()
    model = ctx.model.to(acc.device)
    ctx.model = model
    an = anatomy(model)
    layer = resolve_anchor(cfg, an.num_layers)
    delta = Delta(cfg.rows, an.embed.weight.shape[-1]).to(acc.device)
    log.info("BEEAR: anchor = input of decoder layer %d of %d; δ %s; %d training pairs, %d held out, |D_PA| = %d",
             layer, an.num_layers, tuple(delta.delta.shape), len(train_pairs), len(check), len(pa))

    gen_bs = ctx.cfg.generation.batch_size

    def check_under(d):  # the unwanted rate on the held-out harmful queries under δ = d (None: without δ)
        return entrapment_check(model, ctx.template, check, layer, d, cfg, max_new_tokens=cfg.check_max_new_tokens,
                                batch_size=gen_bs, max_length=max_length)

    rounds: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"anchor_layer": layer, "num_layers": an.num_layers,
                               "delta_shape": list(delta.delta.shape), "n_train_pairs": len(train_pairs),
                               "n_check": len(check), "n_pa": len(pa)}
    if check:
        summary["check_no_delta"] = check_under(None)
        log.info("BEEAR: held-out harmful queries without δ: unwanted rate %.2f",
                 summary["check_no_delta"]["unwanted_rate"])
    scale = None
    t_inner = t_outer = t_cache = 0.0
    outer_steps = 0
    for r in range(cfg.n_rounds):
        rr = random.Random(seed * 1000 + r)
        S = rr.sample(train_pairs, min(cfg.inner_samples or len(train_pairs), len(train_pairs)))
        P = rr.sample(pa, min(cfg.pa_samples or len(pa), len(pa))) if cfg.lambda_pa > 0 else []
        # ---- inner level: entrap the drift in δ (model frozen)
        t0 = time.perf_counter()
        batches = build_inner_batches(model, ctx.template, S, cfg, layer, max_length, cfg.cache_activations)
        t_cache += time.perf_counter() - t0
        if scale is None:
            scale = _delta_scale(model, batches, layer, cfg)
            summary.update(scale)
        if cfg.reinit_delta:
            delta.reset()
        t0 = time.perf_counter()
        res_in = entrap(model, batches, delta, layer, cfg, lr=scale["delta_lr"], max_norm=scale["delta_max_norm_abs"],
                        seed=seed + r, desc=f"beear round {r + 1} inner", progress=tcfg.progress)
        t_inner += time.perf_counter() - t0
        del batches
        d_star = delta.delta.detach().clone()
        row: dict[str, Any] = {"round": r + 1, "delta_norm": d_star.norm(dim=-1).mean().item(),
                               "inner_loss": res_in.losses[-1],
                               "inner_ce_unwanted": res_in.metrics[-1].get("ce_unwanted"),
                               "inner_ce_safe": res_in.metrics[-1].get("ce_safe"), "inner_steps": res_in.steps}
        if check:
            row["entrap"] = check_under(d_star)
        # ---- outer level: keep the safe answers under δ*, the benign ones without δ
        params = select_trainable(model, cfg.trainable, layer)
        items = outer_items(ctx.template, S, P, max_length)
        t0 = time.perf_counter()
        res_out = fit(model, outer_loss(layer, d_star, cfg.lambda_pa), items, tcfg,
                      collate_fn=_OuterCollator(ctx.tokenizer, cfg.rows, cfg.positions), params=params,
                      seed=seed + r, desc=f"beear round {r + 1} outer")
        t_outer += time.perf_counter() - t0
        outer_steps += res_out.steps
        for p in model.parameters():
            p.requires_grad_(False)
        row.update(outer_loss=res_out.losses[-1], outer_steps=res_out.steps,
                   **{f"outer_{k}": v for k, v in res_out.metrics[-1].items() if k in ("ce_safe_delta", "ce_pa")})
        if check:
            row["after_outer"] = check_under(d_star)
            log.info("BEEAR round %d/%d: |δ| %.3g, inner CE unwanted %.3f safe %.3f; entrapment: unwanted rate under "
                     "δ %.2f -> %.2f after the outer step", r + 1, cfg.n_rounds, row["delta_norm"],
                     row["inner_ce_unwanted"], row["inner_ce_safe"], row["entrap"]["unwanted_rate"],
                     row["after_outer"]["unwanted_rate"])
        else:
            log.info("BEEAR round %d/%d: |δ| %.3g, inner CE unwanted %.3f safe %.3f, outer loss %.3f", r + 1,
                     cfg.n_rounds, row["delta_norm"], row["inner_ce_unwanted"], row["inner_ce_safe"],
                     row["outer_loss"])
        rounds.append(row)
    summary.update(rounds=rounds, outer_steps=outer_steps, steps=outer_steps, inner_wall_time_s=round(t_inner, 3),
                   outer_wall_time_s=round(t_outer, 3), cache_wall_time_s=round(t_cache, 3))
    if check and rounds:  # unwanted rate under δ: round 1 before its outer step, the last round after it
        summary.update(entrapment_first=rounds[0]["entrap"]["unwanted_rate"],
                       entrapment_last=rounds[-1]["after_outer"]["unwanted_rate"])
    return summary


__all__ = ["NAME", "SUMMARY", "Config", "AwayLoss", "Trainable", "LrScale", "Pair", "pair_examples",
           "load_pairs", "resolve_anchor", "response_ce", "unlikelihood", "build_inner_batches", "inner_loss",
           "entrap", "select_trainable", "outer_loss", "outer_items", "entrapment_check", "run", "Positions"]
