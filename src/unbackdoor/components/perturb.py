"""A learnable perturbation δ added to the hidden states at the input of one decoder layer.

Used by BEEAR (:mod:`unbackdoor.methods.beear`) but method-agnostic:

- :class:`Delta` — δ as an ``nn.Module`` parameter (fp32, shape ``[rows, d_model]``) so that it goes through
  ``accelerator.prepare`` like any module and several processes optimise one tensor.
- :func:`placement` — a ``[batch, seq, rows]`` 0/1 matrix saying which δ row is added at which token, from
  the attention mask and each row's prompt length; correct under left and right padding.
- :func:`perturb` — a context manager registering a forward pre-hook on decoder layer ``layer`` (input of
  layer ``k`` = HF ``hidden_states[k]``) that adds ``placement @ δ``; optionally it also swaps in a cached
  input for that layer and turns the layers below into pass-throughs, so a frozen model's lower layers run
  once per batch (:func:`anchor_inputs`) and backpropagation starts at the anchor. The hook and the
  pass-throughs are removed on every exit path.

Works for every layout of :func:`unbackdoor.arch.anatomy` (Llama, GPT-NeoX, GPT-2 families, PEFT-wrapped)
because it touches only the decoder-layer modules: the model's own forward still builds the rotary
embeddings and attention masks for the upper layers.
"""
from __future__ import annotations

import contextlib
import enum
from typing import Callable, Iterator

import torch
from torch import nn

from ..arch import anatomy


class Positions(str, enum.Enum):
    """Which prompt tokens δ covers."""
    LAST = "last"   # the last `rows` prompt tokens, ending at the assistant header (δ has `rows` rows)
    ALL = "all"     # every prompt token, one shared row (a uniform drift)


class Delta(nn.Module):
    """The universal perturbation δ ∈ R^{rows × d_model}, kept in fp32 whatever the model's dtype."""

    def __init__(self, rows: int, d_model: int):
        super().__init__()
        if rows < 1 or d_model < 1:
            raise ValueError(f"Delta needs rows >= 1 and d_model >= 1, got rows={rows}, d_model={d_model}")
        self.delta = nn.Parameter(torch.zeros(rows, d_model, dtype=torch.float32))

    def forward(self) -> torch.Tensor:  # called through DDP wrappers, so gradients are all-reduced
        return self.delta

    @torch.no_grad()
    def reset(self) -> None:
        self.delta.zero_()

    @torch.no_grad()
    def clamp_rows_(self, max_norm: float) -> None:
        """Project every row of δ onto the L2 ball of radius ``max_norm``."""
        norms = self.delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.delta.mul_(torch.clamp(max_norm / norms, max=1.0))


def placement(attention_mask: torch.Tensor, prompt_len: torch.Tensor | list[int], rows: int,
              positions: Positions | str = Positions.LAST) -> torch.Tensor:
    """``P[b, t, j] = 1`` where δ row ``j`` is added at token ``t`` of sequence ``b``.

    Each row's tokens are the contiguous run of ones in ``attention_mask`` (left or right padding); its
    prompt is the first ``prompt_len[b]`` of them. ``Positions.LAST``: row ``j`` of δ goes to prompt token
    ``prompt_len - rows + j`` (so δ ends on the last prompt token, the assistant header); a prompt shorter
    than ``rows`` gets only the last rows of δ. ``Positions.ALL``: the single row goes on every prompt token.
    """
    positions = Positions(positions)
    mask = attention_mask.bool()
    bsz, seq = mask.shape
    plen = torch.as_tensor(prompt_len, device=mask.device).long().view(-1)
    if plen.numel() != bsz:
        raise ValueError(f"prompt_len has {plen.numel()} entries for a batch of {bsz}")
    if (mask.long().diff(dim=1).abs().sum(dim=1) > 2).any():
        raise ValueError("attention_mask must hold one contiguous run of ones per row (left or right padding)")
    start = torch.where(mask.any(dim=1), mask.float().argmax(dim=1), torch.zeros_like(plen))
    length = mask.sum(dim=1)
    if (plen > length).any():
        raise ValueError(f"prompt_len {plen.tolist()} exceeds the sequence lengths {length.tolist()}")
    end = start + plen                                     # one past the last prompt token
    t = torch.arange(seq, device=mask.device).view(1, seq)
    in_prompt = (t >= start.view(-1, 1)) & (t < end.view(-1, 1))
    out = torch.zeros(bsz, seq, rows, dtype=torch.float32, device=mask.device)
    if positions is Positions.ALL:
        if rows != 1:
            raise ValueError(f"positions='all' uses one shared δ row, got rows={rows}")
        out[..., 0] = in_prompt.float()
        return out
    row = t - (end.view(-1, 1) - rows)                      # which δ row lands on token t
    ok = in_prompt & (row >= 0) & (row < rows)
    b_idx, t_idx = ok.nonzero(as_tuple=True)
    out[b_idx, t_idx, row[b_idx, t_idx]] = 1.0
    return out


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
    if args:
        return args[0], True
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"], False
    raise RuntimeError("the decoder layer was called without hidden states as its first argument; "
                       "unbackdoor.components.perturb does not know this layer's calling convention")


def _put_hidden(args: tuple, kwargs: dict, value: torch.Tensor, positional: bool) -> tuple[tuple, dict]:
    if positional:
        return (value, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = value
    return args, kwargs


class _Stop(Exception):
    pass


@torch.no_grad()
def anchor_inputs(model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, bool]:
    """The input of decoder layer ``layer`` (= HF ``hidden_states[layer]``) for a batch, computed in eval
    mode (no dropout: the model is frozen) by running only the embedding and the layers below it. Also
    returns whether the decoder layers return tuples (older transformers) so pass-throughs can mimic them."""
    layers = anatomy(model).layers
    captured: dict[str, object] = {}

    def grab(_mod, args, kwargs):
        captured["h"] = _split_hidden(args, kwargs)[0].detach()
        raise _Stop

    def shape(_mod, _args, output):
        captured["tuple"] = isinstance(output, tuple)

    handles = [layers[layer].register_forward_pre_hook(grab, with_kwargs=True)]
    if layer > 0:
        handles.append(layers[0].register_forward_hook(shape))
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if "h" not in captured:
        raise RuntimeError(f"decoder layer {layer} was never called during the forward pass")
    return captured["h"], bool(captured.get("tuple", False))


@contextlib.contextmanager
def perturb(model: nn.Module, layer: int, delta: torch.Tensor | Callable[[], torch.Tensor] | None,
            where: torch.Tensor | None = None, *, cached: torch.Tensor | None = None, layers_return_tuple: bool = False,
            prefill_only: bool = False) -> Iterator[None]:
    """Within the context, add ``where @ δ`` to the input of decoder layer ``layer`` of ``model``.

    - ``delta``: a ``[rows, d]`` tensor or a zero-argument callable returning one (e.g. a :class:`Delta`
      module, possibly DDP-wrapped); ``None`` adds nothing (useful with ``cached`` alone).
    - ``where``: ``[batch, seq, rows]`` from :func:`placement`; the hook acts only on calls whose sequence
      length equals ``seq`` (the prompt pass, not the one-token decoding steps of generation).
    - ``cached``: the layer's input from :func:`anchor_inputs` for the same batch; the hook uses it instead
      of what the layers below computed, and those layers are replaced by pass-throughs for the duration,
      so they cost nothing and no gradient flows below the anchor.
    - ``prefill_only``: act on the first matching call only (generation with a KV cache).
    """
    layers = anatomy(model).layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"anchor layer {layer} is out of range for a model with {len(layers)} decoder layers "
                         f"(valid: 0..{len(layers) - 1})")
    if delta is not None and where is None:
        raise ValueError("perturb: `where` (from placement()) is required when a delta is given")
    state = {"calls": 0}

    def hook(_mod, args, kwargs):
        hidden, positional = _split_hidden(args, kwargs)
        if cached is not None:
            if cached.shape != hidden.shape:
                raise RuntimeError(f"cached anchor input has shape {tuple(cached.shape)} but the batch gives "
                                   f"{tuple(hidden.shape)}: the cache belongs to another batch")
            hidden = cached
        if delta is not None and hidden.shape[1] == where.shape[1] and not (prefill_only and state["calls"]):
            state["calls"] += 1
            d = delta() if callable(delta) else delta
            add = torch.matmul(where.to(d.device, d.dtype), d)        # [batch, seq, d_model], fp32
            hidden = (hidden.to(add.dtype) + add).to(hidden.dtype)
        elif delta is not None and not prefill_only:
            raise RuntimeError(f"the δ placement covers {where.shape[1]} tokens but decoder layer {layer} got "
                               f"{hidden.shape[1]}: build `where` with placement() from this batch's mask")
        elif cached is None:
            return None
        return _put_hidden(args, kwargs, hidden, positional)

    def passthrough(hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = kwargs.get("hidden_states")
        return (hidden_states,) if layers_return_tuple else hidden_states

    handle = layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    skipped = list(layers[:layer]) if cached is not None else []
    try:
        for mod in skipped:
            mod.forward = passthrough
        yield
    finally:
        handle.remove()
        for mod in skipped:
            if "forward" in mod.__dict__:
                del mod.forward


__all__ = ["Positions", "Delta", "placement", "anchor_inputs", "perturb"]
