"""Small models of several architectures, built from scratch for the lab and the tests."""
from __future__ import annotations

import enum

import torch


class LabArch(str, enum.Enum):
    LLAMA = "llama"
    GPT_NEOX = "gpt_neox"
    GPT2 = "gpt2"
    #: Qwen2-style: grouped-query attention (half as many key/value heads), biased q/k/v projections.
    QWEN2 = "qwen2"
    #: Gemma-3-style: embeddings scaled by sqrt(hidden), (1 + w) RMSNorms around every sub-block, q/k norms,
    #: GeGLU MLP, and sliding-window attention on all but the last layer.
    GEMMA3 = "gemma3"


def make_model(arch: LabArch | str, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
               intermediate: int | None = None, max_positions: int = 256, seed: int = 0):
    """A randomly initialised causal LM of the given architecture sized for ``tokenizer``."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    arch = LabArch(arch)
    vocab = len(tokenizer)
    inter = intermediate or 4 * hidden
    common = dict(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if arch is LabArch.LLAMA:
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                          tie_word_embeddings=True, **common)
    elif arch is LabArch.GPT_NEOX:
        cfg = GPTNeoXConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=max_positions, rotary_pct=0.25,
                            use_parallel_residual=True, tie_word_embeddings=False, **common)
    elif arch is LabArch.QWEN2:
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          max_position_embeddings=max_positions, tie_word_embeddings=True, **common)
    elif arch is LabArch.GEMMA3:
        head_dim = hidden // heads
        # A window shorter than a lab prompt, so the sliding layers really see only part of it.
        window = max(8, max_positions // 8)
        cfg = Gemma3TextConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=head_dim,
                               query_pre_attn_scalar=head_dim, sliding_window=window,
                               layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
                               max_position_embeddings=max_positions, tie_word_embeddings=True, **common)
    else:
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, n_inner=inter,
                         **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
