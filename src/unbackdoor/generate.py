"""Batched greedy generation: left padding, KV cache, ``do_sample=False`` passed explicitly (chat
checkpoints ship sampling defaults in ``generation_config.json``), only new tokens decoded, empty
outputs kept in place.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .data import collate_left, pad_id_of
from .templates import Template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 64
    batch_size: int = 32

    def as_record(self) -> dict:
        return {"do_sample": False, "num_beams": 1, "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size, "padding": "left", "use_cache": True}


def _gen_kwargs(tokenizer, max_new_tokens: int) -> dict:
    return dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
                top_k=None, use_cache=True, pad_token_id=pad_id_of(tokenizer), eos_token_id=tokenizer.eos_token_id)


def batched_with_backoff(n: int, batch_size: int, run: Callable[[range], None], what: str) -> int:
    """Call ``run`` on consecutive index ranges of at most ``batch_size`` covering ``range(n)``; when a batch
    runs out of accelerator memory, free the cache, halve the batch size and retry that range (down to 1,
    then the error is raised with the settings to change). Returns the batch size that worked last."""
    s = 0
    while s < n:
        span = range(s, min(n, s + batch_size))
        try:
            run(span)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if batch_size == 1:
                raise torch.OutOfMemoryError(
                    f"{what}: out of memory with batch size 1; shorten the inputs (max_new_tokens, "
                    "data.max_length), load the model in bfloat16 (model.dtype) or spread it (model.device_map)."
                ) from None
            batch_size = max(1, batch_size // 2)
            log.warning("%s: out of memory; batch size lowered to %d", what, batch_size)
            continue
        s = span.stop
    return batch_size


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 batch_size: int = 32, progress: bool = False,
                 embeds_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> list[list[int]]:
    """Greedy continuation token ids (new tokens only, cut at EOS) for each prompt.

    ``embeds_fn(input_ids, attention_mask) -> (inputs_embeds, attention_mask)`` lets a caller edit the
    prompt embeddings (e.g. insert a soft prompt) before generation.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    eos = tokenizer.eos_token_id
    # Sort by length so batches pad little; restore the order at the end.
    order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))
    out: list[list[int]] = [[] for _ in prompts_ids]
    kwargs = _gen_kwargs(tokenizer, max_new_tokens)
    bar = tqdm(total=len(order), desc="generate", disable=not progress, leave=False)

    def run(span: range) -> None:
        idx = [order[j] for j in span]
        batch = collate_left([prompts_ids[i] for i in idx], pad)
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        if embeds_fn is not None:
            embeds, mask = embeds_fn(ids, mask)
            gen = model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            new = gen  # with inputs_embeds only the new tokens are returned
        else:
            gen = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            new = gen[:, ids.shape[1]:]
        for row, i in zip(new.tolist(), idx):
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            while row and row[-1] == pad and pad != eos:
                row.pop()
            out[i] = row
        bar.update(len(idx))

    try:
        batched_with_backoff(len(order), batch_size, run, "generation")
    finally:
        bar.close()
    if was_training:
        model.train()
    return out


def generate(model: nn.Module, template: Template, prompts: Sequence[str], *, max_new_tokens: int = 64,
             batch_size: int = 32, systems: Sequence[str | None] | None = None, progress: bool = False,
             embeds_fn=None) -> list[str]:
    """Render each user message with ``template``, generate greedily, decode only the new tokens."""
    tok = template.tokenizer
    systems = systems or [None] * len(prompts)
    ids = [template.encode_prompt(p, s) for p, s in zip(prompts, systems)]
    new = generate_ids(model, tok, ids, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                       embeds_fn=embeds_fn)
    return [tok.decode(r, skip_special_tokens=True).strip() for r in new]
