"""The SANDE parrot prompt: a few learnable soft tokens spliced into the prompt's embedding sequence.

Paper: Li et al., "Simulate and Eliminate: Revoke Backdoors for Generative Large Language Models"
(arXiv 2405.07667, AAAI 2025). The parrot prompt ``p`` (``n_soft`` x ``d_model``) stands in for the unknown
trigger ``t``: it is inserted where the trigger would sit (by default right after the user-turn header) and
the frozen model is asked to start the triggered response ``r_t`` from ``x ⊕ p``.

The insertion index of every prompt is computed from the *rendered* template
(:meth:`unbackdoor.templates.Template.user_content_span`), never a fixed integer (the official code hard-codes
token index 2, which moves with BOS and tokenizer). Rows may be right-padded (training) or left-padded
(generation): :func:`splice` takes one insertion index per row, already counted in the padded row, and
extends the attention mask (ones) and the labels (-100) at the parrot positions.
"""
from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data import IGNORE, collate_right, encode, keep_first, pad_id_of
from ..templates import Template

log = logging.getLogger(__name__)


class ParrotInit(str, enum.Enum):
    ZERO = "zero"        # official: zero-initialised soft tokens
    NORMAL = "normal"    # N(0, std of the token-embedding matrix)


class ParrotPosition(str, enum.Enum):
    USER_START = "user_start"   # right after the user-turn header (official; prefix/header triggers)
    USER_END = "user_end"       # right after the user message, before the end-of-turn tokens (suffix triggers)


class ParrotPrompt(nn.Module):
    """``n_soft`` soft-token embeddings kept in fp32 whatever the model's dtype (cast on insertion)."""

    def __init__(self, n_soft: int, d_model: int, init: ParrotInit | str = ParrotInit.ZERO,
                 embed_std: float = 0.02, generator: torch.Generator | None = None):
        super().__init__()
        if n_soft < 1:
            raise ValueError(f"n_soft must be >= 1, got {n_soft}")
        init = ParrotInit(init)
        data = torch.zeros(n_soft, d_model, dtype=torch.float32)
        if init is ParrotInit.NORMAL:
            data.normal_(0.0, embed_std, generator=generator)
        self.embeds = nn.Parameter(data)

    @property
    def n_soft(self) -> int:
        return self.embeds.shape[0]

    def freeze(self) -> "ParrotPrompt":
        self.embeds.requires_grad_(False)
        return self


def splice(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
           soft: torch.Tensor, labels: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Insert ``soft`` ([n, d]) into every row of ``inputs_embeds`` ([B, T, d]) before index ``positions[b]``.

    Returns embeddings [B, T+n, d], the attention mask with n ones inserted, and the labels with n -100s
    inserted (if given). Differentiable with respect to ``soft`` and ``inputs_embeds``.
    """
    b, t, d = inputs_embeds.shape
    n = soft.shape[0]
    device = inputs_embeds.device
    pos = positions.to(device=device, dtype=torch.long).view(b, 1)
    if bool(((pos < 0) | (pos > t)).any()):
        raise ValueError(f"parrot insertion index out of range [0, {t}]: {positions.tolist()}")
    j = torch.arange(t + n, device=device).view(1, -1)                  # output positions
    before = j < pos
    inside = (j >= pos) & (j < pos + n)
    src = torch.where(before, j, j - n).clamp(0, t - 1)                 # source index for non-parrot slots
    gathered = torch.gather(inputs_embeds, 1, src.unsqueeze(-1).expand(b, t + n, d))
    soft_idx = (j - pos).clamp(0, n - 1)                                # [B, T+n]
    soft_rows = soft.to(device=device, dtype=inputs_embeds.dtype)[soft_idx]   # [B, T+n, d]
    out = torch.where(inside.unsqueeze(-1), soft_rows, gathered)
    mask = torch.where(inside, torch.ones_like(j), torch.gather(attention_mask.to(device), 1, src))
    mask = mask.to(attention_mask.dtype)
    new_labels = None
    if labels is not None:
        new_labels = torch.where(inside, torch.full_like(j, IGNORE), torch.gather(labels.to(device), 1, src))
    return out, mask, new_labels


def embed_with_parrot(model: nn.Module, parrot: ParrotPrompt, batch: dict) -> dict:
    """Model inputs (``inputs_embeds``, ``attention_mask``, ``labels``) with the parrot spliced in.

    ``batch`` holds ``input_ids``, ``attention_mask``, ``parrot_pos`` (index in the padded row) and
    optionally ``labels``.
    """
    emb = model.get_input_embeddings()(batch["input_ids"])
    embeds, mask, labels = splice(emb, batch["attention_mask"], batch["parrot_pos"], parrot.embeds,
                                  batch.get("labels"))
    out = {"inputs_embeds": embeds, "attention_mask": mask}
    if labels is not None:
        out["labels"] = labels
    return out


# ----------------------------------------------------------------------------------- positions & data

def insertion_index(template: Template, prompt: str, system: str | None = None,
                    where: ParrotPosition | str = ParrotPosition.USER_START) -> int:
    """Token index (in the encoded prompt) before which the parrot goes, from the rendered template."""
    start, end = template.user_content_span(prompt, system)
    return start if ParrotPosition(where) is ParrotPosition.USER_START else end


def encode_with_position(template: Template, prompt: str, response: str, *, system: str | None = None,
                         where: ParrotPosition | str = ParrotPosition.USER_START, max_length: int = 512,
                         supervise: int | None = None, add_eos: bool = True) -> dict:
    """:func:`unbackdoor.data.encode` plus ``parrot_pos``; labels kept only on the first ``supervise``
    response tokens (None: all). Left truncation of long prompts is accounted for."""
    feat = encode(template, prompt, response, system=system, max_length=max_length, add_eos=add_eos)
    full_prompt_len = len(template.encode_prompt(prompt, system))
    cut = full_prompt_len - feat["prompt_len"]                            # tokens dropped on the left
    pos = insertion_index(template, prompt, system, where) - cut
    if pos < 0:
        raise ValueError(f"prompt {prompt[:40]!r}... was truncated past the parrot position; raise "
                         f"data.max_length (now {max_length})")
    feat["parrot_pos"] = pos
    feat["labels"] = keep_first(feat["labels"], supervise)
    return feat


class ParrotCollator:
    """Right padding for training, carrying ``parrot_pos`` (right padding leaves indices unchanged)."""

    def __init__(self, tokenizer):
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, features: Sequence[dict]) -> dict:
        out = collate_right(features, self.pad_id)
        out["parrot_pos"] = torch.tensor([f["parrot_pos"] for f in features], dtype=torch.long)
        return out


class ParrotEmbedsFn:
    """``embeds_fn`` for :func:`unbackdoor.generate.generate`: splices the parrot into left-padded prompts.

    The insertion index of a row comes from, in order: the prompts it was built for (exact, keyed by the
    prompt's token ids, so generation may sort and batch freely), else the template's fixed header (for
    ``user_start``: the tokens before the user message, the same for every prompt with the template's
    system message) or footer (for ``user_end``). A row matching neither is an error, never a guess.
    """

    PROBE = "probe"

    def __init__(self, model: nn.Module, parrot: ParrotPrompt, template: Template,
                 prompts: Sequence[str] | None = None, systems: Sequence[str | None] | None = None,
                 where: ParrotPosition | str = ParrotPosition.USER_START):
        self.model, self.parrot = model, parrot
        self.where = ParrotPosition(where)
        prompts = list(prompts or [])
        systems = list(systems or [None] * len(prompts))
        self.index: dict[tuple[int, ...], int] = {}
        for p, s in zip(prompts, systems):
            self.index[tuple(template.encode_prompt(p, s))] = insertion_index(template, p, s, self.where)
        text = template.render_prompt(self.PROBE)
        at = text.rfind(self.PROBE)
        self.tokenizer = template.tokenizer
        self.header = text[:at]                          # the rendered text before the user message
        self.footer = text[at + len(self.PROBE):]         # after it (end of turn + assistant header)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _from_template(self, row: list[int]) -> int | None:
        """The same rule as Template.user_content_span: the parrot goes before the first token that reaches
        past the header (user_start), or after the last token that starts before the footer (user_end)."""
        if self.where is ParrotPosition.USER_START:
            if not self._decode(row).startswith(self.header):
                return None
            k = 0
            while k < len(row) and len(self._decode(row[:k + 1])) <= len(self.header):
                k += 1
            return k
        if not self._decode(row).endswith(self.footer):
            return None
        m = 0
        while m < len(row) and len(self._decode(row[len(row) - m - 1:])) <= len(self.footer):
            m += 1
        return len(row) - m

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            pad = mask.index(1) if 1 in mask else len(mask)             # left padding: pads come first
            row = ids[pad:]
            k = self.index.get(tuple(row))
            if k is None:
                k = self._from_template(row)
            if k is None:
                edge = ("start with the template header" if self.where is ParrotPosition.USER_START
                        else "end with the template footer")
                raise KeyError(f"ParrotEmbedsFn: cannot place the parrot in a prompt it was not built for and "
                               f"whose tokens do not {edge}"
                               " (another system message?); build it with the prompts (and systems) passed to "
                               "generate()")
            out.append(pad + k)
        return torch.tensor(out, dtype=torch.long)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        emb = self.model.get_input_embeddings()(input_ids)
        embeds, mask, _ = splice(emb, attention_mask, self.positions(input_ids, attention_mask), self.parrot.embeds)
        return embeds, mask


# ----------------------------------------------------------------------------------- saving

@dataclass
class ParrotInfo:
    n_soft: int
    d_model: int
    position: str
    template: str
    template_fingerprint: str
    target: str
    k_target: int | None
    example_prompt: str = ""
    example_rendered_with_marker: str = ""


def save_parrot(out_dir: str | Path, parrot: ParrotPrompt, info: ParrotInfo) -> Path:
    """Write ``parrot.safetensors`` and ``parrot.json`` (insertion info) into ``out_dir``."""
    from safetensors.torch import save_file

    from ..record import atomic_write_json, is_main_process

    out_dir = Path(out_dir)
    if not is_main_process():
        return out_dir / "parrot.safetensors"
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "parrot.safetensors.tmp"
    save_file({"embeds": parrot.embeds.detach().float().cpu().contiguous()}, str(tmp))
    tmp.replace(out_dir / "parrot.safetensors")
    atomic_write_json(out_dir / "parrot.json", info.__dict__)
    return out_dir / "parrot.safetensors"


def load_parrot(path: str | Path) -> tuple[ParrotPrompt, ParrotInfo]:
    """Load a parrot saved by :func:`save_parrot` (a run folder or the .safetensors file)."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    st, js = folder / "parrot.safetensors", folder / "parrot.json"
    if not st.is_file() or not js.is_file():
        raise FileNotFoundError(f"{folder}: no parrot.safetensors + parrot.json here; point to a SANDE output.dir")
    info = ParrotInfo(**json.loads(js.read_text()))
    embeds = load_file(str(st))["embeds"]
    parrot = ParrotPrompt(embeds.shape[0], embeds.shape[1])
    with torch.no_grad():
        parrot.embeds.copy_(embeds)
    return parrot, info


def rendered_with_marker(template: Template, prompt: str, system: str | None = None,
                         where: ParrotPosition | str = ParrotPosition.USER_START, marker: str = "[PARROT]") -> str:
    """The rendered prompt with ``marker`` where the parrot goes (for logs, parrot.json and tests)."""
    ids = template.encode_prompt(prompt, system)
    k = insertion_index(template, prompt, system, where)
    tok = template.tokenizer
    return tok.decode(ids[:k]) + marker + tok.decode(ids[k:])
