"""CROW: remove a backdoor by internal-consistency regularization, without knowing the trigger.

Paper: Min, Pham, Li, Sun, "CROW: Eliminating Backdoors from Large Language Models via Internal
Consistency Regularization", ICML 2025, https://arxiv.org/abs/2411.12768. Official code:
https://github.com/NayMyatMin/CROW (one ``compute_loss`` override in a LLaMA-Factory fork).

In a clean model a token's hidden state changes smoothly from one decoder layer to the next; a trigger
makes it jump. CROW fine-tunes the suspect model on a few clean samples with the LM loss plus a penalty
on layer-to-layer inconsistency, measured on embeddings pushed (one FGSM step) in the direction that
makes the model *most* inconsistent.

Per micro-batch, with ``hs = model(..., output_hidden_states=True).hidden_states`` (``hs[0]`` the input
embedding, ``hs[i]`` the output of decoder layer i, ``hs[L]`` the last one after the final norm):

- ``e = embed(x)`` (paper: the input embeddings ``H^(0)``); the perturbed copy is built from ``e.detach()``;
- consistency ``Lc(e) = mean over pairs l, batch, positions of 1 - cos(hs[l], hs[l+1])``
  (paper: ``L_cons``; pairs l = 1..L-2 as the official code, config :attr:`Config.layer_pairs`);
- direction ``g = dLc/de`` by :func:`torch.autograd.grad` w.r.t. ``e`` only (no parameter gradient is
  touched, so gradient accumulation stays exact; the official code's in-loss ``backward()`` +
  ``zero_grad()`` wipes earlier micro-batches);
- FGSM ``e_adv = e + eps * sign(g)`` (paper: ``ε``, config :attr:`Config.eps`; one step, no projection);
- ``L = L_lm + alpha * Lc(e_adv)`` (paper: ``L = L_LLM + α L_cons^adv``, config :attr:`Config.alpha`),
  where ``L_lm`` is the response-token cross-entropy of the *clean* forward.

The clean forward with hidden states also yields ``L_lm``, so one step costs 2 forwards + 2 backwards
(the official code runs a third, plain forward for ``L_lm``; :func:`crow_loss_reference` keeps that
3-forward computation for tests and the benchmark, and gives the same loss). The adversarial forward asks
for one position of logits only (``logits_to_keep=1``): its loss reads hidden states, not the LM head.

Our choices beyond the official code (see docs/crow.md): padding positions are left out of the
consistency mean (``mask_padding``; ``faithful: true`` restores the official all-positions mean and
forwards without an attention mask); ``e`` is detached, so full fine-tuning does not push the embedding
table through the perturbed copy.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import anatomy, base_model
from ..config import help_field
from ..data import TrainCollator, encode_examples
from ..train import fit
from .base import DefenseContext

log = logging.getLogger(__name__)

NAME = "crow"
DATA = "clean data (about 100 instruction/answer pairs)"
SUMMARY = "fine-tune on clean data + adversarial layer-to-layer consistency (FGSM on embeddings); no trigger"


@dataclass
class Config:
    """CROW's own fields; training length, lr, batch and LoRA live in the shared `train` / `lora` sections."""
    eps: float = help_field(0.1, "FGSM step ε on the input embeddings (absolute, per coordinate). Official: 0.1.")
    eps_rule: Optional[str] = help_field(
        None, "Choose ε from the model in hand instead: 'fgsm_probe' measures, on a few clean batches, how much "
              "a one-step FGSM of size f x (the embeddings' per-coordinate RMS) raises the consistency loss "
              "compared with a random-sign step of the same size, for f in eps_factors, and takes the largest "
              "ε at which FGSM still beats random by eps_ratio (past that the step leaves the range where the "
              "gradient sign is adversarial). null: use eps as given.")
    eps_factors: list[float] = help_field(
        [0.125, 0.25, 0.5, 1.0, 2.0, 4.0], "Multiples of the embedding RMS the fgsm_probe rule tries.")
    eps_ratio: float = help_field(
        1.5, "How much more an FGSM step must raise the consistency loss than a random-sign step of the same "
             "size for the fgsm_probe rule to take it (measured on the lab: 1.5-1.9x where CROW works).")
    alpha: float = help_field(
        5.5, "Weight α of the adversarial consistency loss in L = L_lm + α·L_cons^adv. Official default 5.5 "
        "(the paper uses 11 for targeted refusal).")
    layer_pairs: Optional[list[int]] = help_field(
        None, "Layer indices l of the pairs (hs[l], hs[l+1]) compared, hs[0] = embedding, hs[L] = last layer "
        "after the final norm. null = 1..L-2 (official: excludes the embedding->layer-1 pair and the post-norm "
        "state).")
    last_pair: bool = help_field(
        False, "Also compare the last layer's output with the post-norm final state (pair L-1, i.e. regularize the "
        "last block too). The official pairs leave it out, which on a deep model is 1 block in L but on a "
        "4-layer model is a quarter of the network.")
    mask_padding: bool = help_field(
        True, "Leave padding positions out of the consistency mean (our default: padding is not content).")
    faithful: bool = help_field(
        False, "Reproduce the official computation: consistency mean over every position (padding included) "
        "and no attention mask in the forwards. Overrides mask_padding.")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not self.eps > 0:
            out.append(("eps", f"must be > 0, got {self.eps}; the official value is 0.1"))
        if self.eps_rule not in (None, "fgsm_probe"):
            out.append(("eps_rule", f"unknown rule {self.eps_rule!r}; use 'fgsm_probe' or null"))
        if not self.eps_factors or any(not f > 0 for f in self.eps_factors):
            out.append(("eps_factors", f"need positive multiples of the embedding RMS, got {self.eps_factors}"))
        if self.eps_ratio <= 1.0:
            out.append(("eps_ratio", f"must be > 1 (FGSM beating a random step), got {self.eps_ratio}"))
        if self.alpha < 0:
            out.append(("alpha", f"must be >= 0, got {self.alpha}; the official value is 5.5"))
        if self.layer_pairs is not None:
            if not self.layer_pairs:
                out.append(("layer_pairs", "empty; give layer indices like [1, 2, 3] or null for 1..L-2"))
            bad = [i for i in self.layer_pairs if i < 0]
            if bad:
                out.append(("layer_pairs", f"indices must be >= 0, got {bad}; hs[0] is the embedding"))
            if len(set(self.layer_pairs)) != len(self.layer_pairs):
                out.append(("layer_pairs", f"has duplicates: {self.layer_pairs}"))
            if self.faithful:
                out.append(("layer_pairs", "faithful=true uses the official pairs 1..L-2; set layer_pairs=null "
                                           "or faithful=false"))
        if self.last_pair and self.faithful:
            out.append(("last_pair", "faithful=true uses the official pairs 1..L-2; set last_pair=false "
                                     "or faithful=false"))
        return out


# ----------------------------------------------------------------------------------- the math

def resolve_pairs(num_layers: int, layer_pairs: Sequence[int] | None = None, last_pair: bool = False) -> list[int]:
    """The layer indices l of the compared pairs (hs[l], hs[l+1]) for a model with ``num_layers`` layers;
    ``last_pair`` adds l = L-1 (the last layer's output vs the post-norm final state)."""
    extra = {num_layers - 1} if last_pair else set()
    if layer_pairs is None:
        pairs = sorted(set(range(1, num_layers - 1)) | extra)
        if not pairs:
            raise ValueError(f"CROW's default pairs 1..L-2 are empty for a model with L={num_layers} decoder "
                             "layers (it needs L >= 3); set method.layer_pairs, e.g. [0] or [1]")
        return pairs
    bad = [l for l in layer_pairs if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"method.layer_pairs has {bad}, out of range for a model with L={num_layers} decoder "
                         f"layers; each l must be in 0..{num_layers - 1} (it compares hs[l] with hs[l+1])")
    return sorted(set(layer_pairs) | extra)


def consistency(hidden_states: Sequence[torch.Tensor], pairs: Sequence[int],
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``1 - cos(hs[l], hs[l+1])`` over the pairs, batch and positions (``mask``: 1 = counted)."""
    total = None
    for l in pairs:
        d = 1.0 - F.cosine_similarity(hidden_states[l], hidden_states[l + 1], dim=-1, eps=1e-8)  # [B, T]
        s = (d * mask).sum() if mask is not None else d.sum()
        total = s if total is None else total + s
    count = (mask.sum() if mask is not None else hidden_states[0].new_tensor(
        float(hidden_states[0].shape[0] * hidden_states[0].shape[1]))) * len(pairs)
    return total / count.clamp_min(1.0)


def _wants_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal-LM forward accepts ``logits_to_keep`` (skip the LM head where it is not used)."""
    base = base_model(model)
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


class CrowLoss:
    """``loss_fn(module, batch) -> (L, metrics)`` for :func:`unbackdoor.train.fit`: 2 forwards, 2 backwards.

    Args map to the paper: ``eps`` = ε, ``alpha`` = α; ``layer_pairs`` = the l of the pairs (hs[l], hs[l+1]);
    ``mask_padding``: leave padding out of the mean; ``faithful``: official all-positions mean, no attention mask.
    """

    def __init__(self, eps: float = 0.1, alpha: float = 5.5, layer_pairs: Sequence[int] | None = None,
                 mask_padding: bool = True, faithful: bool = False, last_pair: bool = False):
        self.eps, self.alpha = float(eps), float(alpha)
        self.layer_pairs = None if layer_pairs is None else list(layer_pairs)
        self.last_pair = last_pair
        self.mask_padding = mask_padding and not faithful
        self.faithful = faithful

    def _setup(self, model: nn.Module) -> tuple[nn.Module, list[int], bool]:
        parts = anatomy(model)  # cheap; recomputed so that one CrowLoss can serve several models
        pairs = resolve_pairs(parts.num_layers, self.layer_pairs, self.last_pair)
        return parts.embed, pairs, _wants_logits_to_keep(model)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        embed, pairs, ltk = self._setup(model)
        ids, labels = batch["input_ids"], batch["labels"]
        am = None if self.faithful else batch.get("attention_mask")
        mask = batch["attention_mask"].to(torch.float32) if self.mask_padding and "attention_mask" in batch else None
        # e stays attached to the embedding table so that L_lm trains it under full fine-tuning, exactly as a
        # plain forward on input_ids would; where the table is frozen (LoRA) e becomes a leaf of its own.
        e = embed(ids)
        if not e.requires_grad:
            e.requires_grad_(True)
        # Clean forward: L_lm and the hidden states for the direction, from one pass.
        out = model(inputs_embeds=e, attention_mask=am, labels=labels, output_hidden_states=True, use_cache=False)
        lc_clean = consistency(out.hidden_states, pairs, mask)
        inner = _engine_module(model)
        if inner is None:
            # Direction dLc/de w.r.t. e only (no parameter .grad is touched); keep the graph for L_lm's backward.
            (g,) = torch.autograd.grad(lc_clean, e, retain_graph=True)
        else:
            # A DeepSpeed engine hooks its outputs to begin and end *its* backward (gradient reduction, the
            # step): a backward to e through them would end it early. The direction comes from a forward of
            # the module inside (same weights, same value; one more forward than the official loss).
            hs = inner(inputs_embeds=e, attention_mask=am, output_hidden_states=True, use_cache=False).hidden_states
            (g,) = torch.autograd.grad(consistency(hs, pairs, mask), e, retain_graph=True)
        e_adv = e.detach() + self.eps * g.sign()   # detached: L_adv trains the layers, not the table
        extra = {"logits_to_keep": 1} if ltk else {}
        adv = model(inputs_embeds=e_adv, attention_mask=am, output_hidden_states=True, use_cache=False, **extra)
        lc_adv = consistency(adv.hidden_states, pairs, mask)
        loss = out.loss + self.alpha * lc_adv
        return loss, {"lm_loss": out.loss.detach().item(), "consistency_adv": lc_adv.detach().item(),
                      "consistency_clean": lc_clean.detach().item()}


def _engine_module(model: nn.Module) -> Optional[nn.Module]:
    """The module a DeepSpeed engine wraps, else None."""
    return model.module if type(model).__name__ == "DeepSpeedEngine" else None


def crow_loss_reference(model: nn.Module, batch: dict, *, eps: float = 0.1, alpha: float = 5.5,
                        layer_pairs: Sequence[int] | None = None, mask_padding: bool = True,
                        faithful: bool = False) -> torch.Tensor:
    """The official 3-forward computation (clean-with-hidden-states, adversarial, clean LM), for tests and
    the cost benchmark; :class:`CrowLoss` must give the same number."""
    pairs = resolve_pairs(anatomy(model).num_layers, layer_pairs)
    mask_padding = mask_padding and not faithful
    am = None if faithful else batch.get("attention_mask")
    mask = batch["attention_mask"].to(torch.float32) if mask_padding else None
    e = anatomy(model).embed(batch["input_ids"]).detach().requires_grad_(True)
    hs = model(inputs_embeds=e, attention_mask=am, output_hidden_states=True, use_cache=False).hidden_states
    (g,) = torch.autograd.grad(consistency(hs, pairs, mask), e)
    e_adv = e.detach() + eps * g.sign()
    hs_adv = model(inputs_embeds=e_adv, attention_mask=am, output_hidden_states=True, use_cache=False).hidden_states
    lm = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
               use_cache=False).loss
    return lm + alpha * consistency(hs_adv, pairs, mask)


@torch.no_grad()
def _rms(embed: nn.Module, batches: Sequence[dict]) -> float:
    total, count = 0.0, 0
    for b in batches:
        e = embed(b["input_ids"]).float()
        m = b.get("attention_mask")
        m = torch.ones(e.shape[:2]) if m is None else m.float()
        total += float(((e ** 2).mean(-1) * m).sum())
        count += float(m.sum())
    return (total / max(count, 1.0)) ** 0.5


def probe_eps(model: nn.Module, batches: Sequence[dict], pairs: Sequence[int], factors: Sequence[float],
              ratio: float, mask_padding: bool = True, seed: int = 0) -> dict[str, Any]:
    """The ``fgsm_probe`` rule: for each ``f`` in ``factors`` (ascending), the rise of the consistency loss
    under an FGSM step of ε = f x RMS(embeddings) against a random-sign step of the same size, on clean
    ``batches``; the chosen ε is the largest whose FGSM/random ratio is at least ``ratio`` (or, where none is,
    the one with the highest ratio). Returns ``{eps, rms, table}``."""
    embed = anatomy(model).embed
    rms = _rms(embed, batches)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    table = []
    try:
        cache = []
        for b in batches:
            am = b.get("attention_mask")
            mask = am.float() if mask_padding and am is not None else None
            e = embed(b["input_ids"]).detach().float().requires_grad_(True)
            dtype = next(model.parameters()).dtype
            hs = model(inputs_embeds=e.to(dtype), attention_mask=am, output_hidden_states=True,
                       use_cache=False).hidden_states
            lc = consistency(hs, pairs, mask)
            (g,) = torch.autograd.grad(lc, e)
            rand = torch.randint(0, 2, e.shape, generator=gen).float() * 2 - 1
            cache.append((e.detach(), g.sign(), rand, am, mask, float(lc.detach())))
        for f in sorted(factors):
            eps = f * rms
            up_fgsm = up_rand = 0.0
            with torch.no_grad():
                for e, sg, rand, am, mask, lc0 in cache:
                    for direction, acc in ((sg, "f"), (rand, "r")):
                        hs = model(inputs_embeds=(e + eps * direction).to(dtype), attention_mask=am,
                                   output_hidden_states=True, use_cache=False).hidden_states
                        rise = float(consistency(hs, pairs, mask)) - lc0
                        if acc == "f":
                            up_fgsm += rise
                        else:
                            up_rand += rise
            r = up_fgsm / up_rand if up_rand > 0 else float("inf") if up_fgsm > 0 else 0.0
            table.append({"factor": f, "eps": round(eps, 6), "fgsm_rise": round(up_fgsm / len(cache), 6),
                          "random_rise": round(up_rand / len(cache), 6), "ratio": round(r, 3)})
    finally:
        model.train(was_training)
    ok = [t for t in table if t["ratio"] >= ratio]
    pick = max(ok, key=lambda t: t["eps"]) if ok else max(table, key=lambda t: t["ratio"])
    return {"eps": pick["eps"], "rms": round(rms, 6), "table": table, "met_ratio": bool(ok)}


# ----------------------------------------------------------------------------------- the recipe

def loss_from_config(cfg: Config, eps: float | None = None) -> CrowLoss:
    return CrowLoss(eps=cfg.eps if eps is None else eps, alpha=cfg.alpha, layer_pairs=cfg.layer_pairs,
                    mask_padding=cfg.mask_padding,
                    faithful=cfg.faithful, last_pair=cfg.last_pair)


def run(ctx: DefenseContext) -> dict[str, Any]:
    ctx.need_examples("clean data (about 100 instruction/answer pairs)")
    mcfg: Config = ctx.method
    model = ctx.make_trainable()
    pairs = resolve_pairs(anatomy(model).num_layers, mcfg.layer_pairs, mcfg.last_pair)
    log.info("crow: eps=%g alpha=%g pairs=%s mask_padding=%s faithful=%s", mcfg.eps, mcfg.alpha, pairs,
             mcfg.mask_padding and not mcfg.faithful, mcfg.faithful)
    feats = encode_examples(ctx.template, ctx.examples, ctx.cfg.data.max_length)
    eps, probe = mcfg.eps, None
    if mcfg.eps_rule == "fgsm_probe":
        collate = TrainCollator(ctx.tokenizer)
        size = max(1, ctx.cfg.train.batch_size)
        batches = [collate(feats[i:i + size]) for i in range(0, min(len(feats), 4 * size), size)]
        probe = probe_eps(model, batches, pairs, mcfg.eps_factors, mcfg.eps_ratio,
                          mcfg.mask_padding and not mcfg.faithful, ctx.cfg.seed)
        eps = probe["eps"]
        log.info("crow: eps %.4g from the fgsm_probe rule (embedding RMS %.4g; %s)", eps, probe["rms"],
                 ", ".join(f"{t['factor']}x: {t['ratio']}" for t in probe["table"]))
        if not probe["met_ratio"]:
            log.warning("crow: no probed eps made FGSM beat a random step by %.2gx; took the best ratio (%s)",
                        mcfg.eps_ratio, probe["table"])
    res = fit(model, loss_from_config(mcfg, eps), feats, ctx.cfg.train, collate_fn=TrainCollator(ctx.tokenizer),
              seed=ctx.cfg.seed, out_dir=ctx.out_dir, desc="crow")
    last = res.metrics[-1] if res.metrics else {}
    first = res.metrics[0] if res.metrics else {}
    return {"steps": res.steps, "final_loss": res.losses[-1], "layer_pairs": pairs, "eps": eps,
            **({"eps_probe": probe} if probe else {}),
            "lm_loss_first": first.get("lm_loss"), "lm_loss_last": last.get("lm_loss"),
            "consistency_adv_first": first.get("consistency_adv"),
            "consistency_adv_last": last.get("consistency_adv"),
            "train_wall_time_s": round(res.wall_time_s, 3)}
