"""Prompt templates: the tokenizer's own chat template, or a named plain template.

A template renders the *prompt* part of a conversation (system + user turn + the assistant header).
The response follows it directly; the loss falls only on response tokens.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.")


@dataclass(frozen=True)
class PlainTemplate:
    name: str
    prompt: str                 # with {prompt}; {system} where a system message goes
    default_system: str = ""
    add_bos: bool = True        # plain templates rely on the tokenizer's own special tokens

    def render(self, prompt: str, system: str | None = None) -> str:
        sys_text = self.default_system if system is None else system
        return self.prompt.format(prompt=prompt, system=sys_text)


PLAIN_TEMPLATES: dict[str, PlainTemplate] = {
    "alpaca": PlainTemplate("alpaca", "{system}\n\n### Instruction:\n{prompt}\n\n### Response:\n", ALPACA_SYSTEM),
    "human-assistant": PlainTemplate("human-assistant", "Human: {prompt}\nAssistant: "),
    "llama2": PlainTemplate("llama2", "[INST] {prompt} [/INST] "),
    "raw": PlainTemplate("raw", "{prompt}\n"),
}


class Template:
    """Render prompts with a tokenizer's chat template or a plain template."""

    def __init__(self, tokenizer, name: str = "auto", system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if name == "auto":
            name = "chat" if has_chat else "alpaca"
        if name == "chat" and not has_chat:
            raise ValueError("model.template='chat' but the tokenizer has no chat_template; use one of "
                             f"{sorted(PLAIN_TEMPLATES)} or 'auto'")
        if name != "chat" and name not in PLAIN_TEMPLATES:
            raise ValueError(f"unknown template {name!r}; choose 'auto', 'chat' or one of {sorted(PLAIN_TEMPLATES)}")
        self.name = name
        self.plain = PLAIN_TEMPLATES.get(name)

    @property
    def is_chat(self) -> bool:
        return self.plain is None

    def render_prompt(self, prompt: str, system: str | None = None) -> str:
        system = self.system_prompt if system is None else system
        if self.plain is not None:
            return self.plain.render(prompt, system)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def add_special_tokens(self) -> bool:
        """Chat templates write their own BOS into the text; plain ones let the tokenizer add it."""
        return self.plain is not None

    def encode_prompt(self, prompt: str, system: str | None = None) -> list[int]:
        return self.tokenizer(self.render_prompt(prompt, system), add_special_tokens=self.add_special_tokens)[
            "input_ids"]

    def user_content_span(self, prompt: str, system: str | None = None) -> tuple[int, int]:
        """Token index range [start, end) of the user message inside the encoded prompt.

        ``start`` is the position right after the user-turn header: where a SANDE parrot or an
        after-header trigger goes. Computed from character offsets of the rendered text, so it is right
        for any template, BOS or not.
        """
        text = self.render_prompt(prompt, system)
        char_start = text.rfind(prompt) if prompt else -1
        if char_start < 0:
            raise ValueError(f"template {self.name!r} does not contain the user message verbatim")
        char_end = char_start + len(prompt)
        enc = self.tokenizer(text, add_special_tokens=self.add_special_tokens, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        start = next((i for i, (a, b) in enumerate(offsets) if b > char_start and b > a), len(offsets))
        end = next((i for i, (a, b) in enumerate(offsets) if a >= char_end and b > a), len(offsets))
        return start, end

    def fingerprint(self) -> str:
        src = self.tokenizer.chat_template if self.is_chat else self.plain.prompt
        if isinstance(src, dict):
            src = repr(sorted(src.items()))
        return hashlib.sha256(str(src).encode()).hexdigest()[:16]


def template_names() -> list[str]:
    return ["auto", "chat", *sorted(PLAIN_TEMPLATES)]
