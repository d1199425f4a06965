"""Config sections shared by every command (model, LoRA, data, training, generation, output).

Method-specific sections live beside each method (``unbackdoor.methods.<name>.Config``) and are attached
to a :class:`DefendConfig` under ``method:`` by name.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from .config import help_field


class Dtype(str, enum.Enum):
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class MixedPrecision(str, enum.Enum):
    NO = "no"
    BF16 = "bf16"
    FP16 = "fp16"


class Scheduler(str, enum.Enum):
    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class Optimizer(str, enum.Enum):
    ADAMW = "adamw"
    ADAM = "adam"
    SGD = "sgd"


class DataFormat(str, enum.Enum):
    AUTO = "auto"
    JSONL = "jsonl"
    JSON = "json"
    CSV = "csv"
    DATASET_INFO = "dataset_info"


class OnInvalid(str, enum.Enum):
    ERROR = "error"          # refuse the data, naming the rows
    SKIP = "skip"            # leave the rows out (the count and lines are recorded)


class AdapterMode(str, enum.Enum):
    MERGE = "merge"          # merge the given adapter into the base, then (optionally) add a fresh one
    CONTINUE = "continue"    # keep training the given adapter


@dataclass
class ModelConfig:
    path: str = help_field("", "Local folder or hub id of a Hugging Face causal LM.")
    dtype: Dtype = help_field(Dtype.AUTO, "Weights dtype; 'auto' = float32 on CPU, bfloat16 on GPUs that support it.")
    tokenizer: Optional[str] = help_field(None, "Tokenizer folder if different from the model folder.")
    template: str = help_field(
        "auto", "Prompt template: 'auto' (the tokenizer's chat template, else 'alpaca'), 'chat', or a plain "
        "template name (see `unbackdoor ls templates`).")
    system_prompt: Optional[str] = help_field(None, "System message put in every rendered conversation.")
    adapter: Optional[str] = help_field(None, "A PEFT adapter folder to load on the model (e.g. a BackdoorLLM LoRA).")
    adapter_mode: AdapterMode = help_field(
        AdapterMode.MERGE, "'merge': merge the adapter into the weights; 'continue': keep training it.")
    gguf_file: Optional[str] = help_field(None, "File name of a GGUF checkpoint inside `path` (dequantized on load).")
    allow_pickle: bool = help_field(
        False, "Allow pickle (.bin/.pt) weights. Pickle can run code: only for trusted files.")
    trust_remote_code: bool = help_field(
        False, "Run modelling code shipped with the checkpoint. Only for trusted models.")
    revision: Optional[str] = help_field(None, "Hub revision (branch, tag or commit) for hub ids.")
    device: str = help_field(
        "auto", "Where the model runs outside training (evaluation, perplexity, references, prune, quantize, "
        "BEEAR's and SANDE's checks): 'auto' = this process's GPU (cuda:LOCAL_RANK) when there is one, else the "
        "CPU; or a torch device such as cpu, cuda:1, mps. Training places it through Accelerate.")
    device_map: Optional[str] = help_field(
        None, "Hugging Face device_map for inference of a model too large for one device ('auto', 'balanced', "
        "'sequential'); overrides model.device. Not for training (use FSDP/DeepSpeed there).")
    attn_implementation: Optional[str] = help_field(
        None, "Attention kernel: null (the library's default, sdpa where supported), 'eager', 'sdpa', "
        "'flash_attention_2' (needs the flash-attn package and a GPU), 'flex_attention'.")
    quantization: Optional[str] = help_field(
        None, "Load the weights quantized through bitsandbytes (pip install 'unbackdoor[qlora]'): 'nf4' or 'fp4' "
        "(4-bit, double-quantized, computing in model.dtype: QLoRA), 'int8'. Training then updates a LoRA adapter "
        "only (lora.enabled=true) and the saved model is the full-precision model with the adapter merged.")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.quantization not in QUANTIZATIONS:
            out.append(("quantization", f"got {self.quantization!r}, expected one of "
                                        f"{[q for q in QUANTIZATIONS if q]} or null"))
        elif self.quantization and self.gguf_file:
            out.append(("quantization", f"got {self.quantization!r} with model.gguf_file: a GGUF checkpoint is "
                                        "dequantized on load; drop one of the two"))
        if not self.path:
            out.append(("path", "no model given; set model.path=/path/to/model (a HF folder or hub id)"))
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            out.append(("attn_implementation", f"got {self.attn_implementation!r}, expected one of "
                                               f"{[a for a in ATTN_IMPLEMENTATIONS if a]} or null"))
        if self.device_map not in (None, "auto", "balanced", "balanced_low_0", "sequential"):
            out.append(("device_map", f"got {self.device_map!r}, expected auto, balanced, balanced_low_0, "
                                      "sequential or null"))
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                out.append(("device", f"got {self.device!r}, expected 'auto' or a torch device (cpu, cuda:0)"))
        return out


QUANTIZATIONS = (None, "nf4", "fp4", "int8")
#: Why quantized weights need LoRA, and the fix (the config check and the loader's runtime check say the same).
QLORA_NEEDS_LORA = ("quantized weights stay frozen, training updates a LoRA adapter on them (QLoRA). Set "
                    "lora.enabled=true, or drop model.quantization to train the full weights")
ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class LoraConfig:
    enabled: bool = help_field(False, "Train a LoRA adapter instead of the full weights.")
    r: int = help_field(8, "LoRA rank.")
    alpha: int = help_field(16, "LoRA alpha (scaling = alpha / r).")
    dropout: float = help_field(0.0, "LoRA dropout.")
    target_modules: list[str] = help_field(
        ["auto"], "Modules to adapt: ['auto'] (the model-type table, else all linear), ['all-linear'], or names.")
    merge: bool = help_field(True, "Merge the trained adapter into the weights when saving the output model.")
    fused_rank: bool = help_field(
        False, "Give a fused linear layer (GPT-NeoX query_key_value, GPT-2 c_attn, Phi-3 qkv_proj/gate_up_proj) "
        "rank and alpha x the number of projections it fuses, so the adapter has the capacity it has on a "
        "model with separate q/k/v (or gate/up) layers. Off: every layer gets rank r (PEFT's behaviour).")
    rank_pattern: dict[str, int] = help_field(
        {}, "Per-module rank, PEFT's rank_pattern (module-name regex -> rank); alpha scales with it. "
        "Overrides fused_rank for the modules it names.")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank < 1:
                out.append((f"rank_pattern.{key}", f"must be an integer rank >= 1, got {rank!r}"))
        if self.r < 1:
            out.append(("r", f"must be >= 1, got {self.r}"))
        if self.alpha < 1:
            out.append(("alpha", f"must be >= 1, got {self.alpha}"))
        if not 0.0 <= self.dropout < 1.0:
            out.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if not self.target_modules:
            out.append(("target_modules", "empty; use ['auto'] or ['all-linear'] or module names"))
        return out


@dataclass
class DataConfig:
    path: str = help_field("", "Data file (.jsonl/.json/.csv) or a folder/file of a LLaMA-Factory dataset_info.json.")
    format: DataFormat = help_field(DataFormat.AUTO, "File format; 'auto' from the extension.")
    dataset: Optional[str] = help_field(None, "Dataset name inside dataset_info.json.")
    limit: Optional[int] = help_field(None, "Use the first N examples (after a seeded shuffle when shuffle=true).")
    shuffle: bool = help_field(True, "Shuffle before taking `limit` examples (seeded).")
    max_length: int = help_field(
        512, "Rendered prompt+response longer than this many tokens are cut (the end of the user message, then of "
        "the response; the chat header stays); the count is reported.")
    on_invalid: OnInvalid = help_field(
        OnInvalid.ERROR, "Rows with an empty prompt or response: 'error' refuses the data naming them, 'skip' "
        "leaves them out (recorded).")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.limit is not None and self.limit < 1:
            out.append(("limit", f"must be >= 1 or null, got {self.limit}"))
        if self.max_length < 8:
            out.append(("max_length", f"must be >= 8, got {self.max_length}"))
        return out


@dataclass
class TrainConfig:
    lr: float = help_field(2e-4, "Peak learning rate.")
    epochs: float = help_field(1.0, "Passes over the data (ignored when max_steps is set).")
    max_steps: Optional[int] = help_field(None, "Optimizer steps; overrides epochs.")
    batch_size: int = help_field(4, "Micro-batch size per process.")
    grad_accum: int = help_field(1, "Gradient accumulation steps.")
    max_grad_norm: Optional[float] = help_field(1.0, "Clip the gradient norm to this value (null: no clipping).")
    optimizer: Optimizer = help_field(Optimizer.ADAMW, "Optimizer.")
    betas: list[float] = help_field([0.9, 0.999], "Adam betas.")
    weight_decay: float = help_field(0.0, "Weight decay.")
    scheduler: Scheduler = help_field(Scheduler.COSINE, "Learning-rate schedule after warmup.")
    warmup_ratio: float = help_field(0.0, "Share of the steps spent warming up linearly from 0.")
    warmup_steps: Optional[int] = help_field(None, "Warmup steps; overrides warmup_ratio.")
    mixed_precision: MixedPrecision = help_field(MixedPrecision.NO, "Mixed precision where the hardware has it.")
    bf16_on_cpu: bool = help_field(
        False, "With mixed_precision=bf16, autocast to bf16 on a CPU too, if it has native bf16 (AVX512-BF16/AMX): "
               "1.5x faster LoRA training on such a CPU (benchmarks/bench_cpu_bf16.py). Off: bf16 applies to GPUs "
               "only and a CPU run stays fp32.")
    gradient_checkpointing: bool = help_field(False, "Recompute activations in backward to save memory.")
    fsdp: bool = help_field(
        False, "Shard the model's weights, gradients and optimizer state over the processes with FSDP2 (each "
               "decoder layer one unit) under any multi-process launcher, gloo or NCCL; one process: ignored. "
               "docs/gpu.md.")
    log_every: int = help_field(10, "Log the loss every N optimizer steps.")
    checkpoint_every: Optional[int] = help_field(None, "Save a resumable checkpoint every N optimizer steps.")
    log_with: list[str] = help_field([], "Accelerate trackers: tensorboard, wandb, mlflow.")
    progress: bool = help_field(True, "Show a progress bar.")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not self.lr > 0:
            out.append(("lr", f"must be > 0, got {self.lr}"))
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            out.append(("max_grad_norm", f"must be > 0 or null (no clipping), got {self.max_grad_norm}"))
        if not self.weight_decay >= 0:
            out.append(("weight_decay", f"must be >= 0, got {self.weight_decay}"))
        if self.warmup_steps is not None and self.warmup_steps < 0:
            out.append(("warmup_steps", f"must be >= 0 or null, got {self.warmup_steps}"))
        if self.log_every < 1:
            out.append(("log_every", f"must be >= 1, got {self.log_every}"))
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            out.append(("checkpoint_every", f"must be >= 1 or null (no checkpoints), got {self.checkpoint_every}"))
        if self.batch_size < 1:
            out.append(("batch_size", f"must be >= 1, got {self.batch_size}"))
        if self.grad_accum < 1:
            out.append(("grad_accum", f"must be >= 1, got {self.grad_accum}"))
        if self.max_steps is not None and self.max_steps < 1:
            out.append(("max_steps", f"must be >= 1 or null, got {self.max_steps}"))
        if not self.epochs > 0:
            out.append(("epochs", f"must be > 0, got {self.epochs}"))
        if not 0.0 <= self.warmup_ratio < 1.0:
            out.append(("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            out.append(("betas", f"must be two numbers in [0, 1), got {self.betas}"))
        bad = [t for t in self.log_with if t not in ("tensorboard", "wandb", "mlflow")]
        if bad:
            out.append(("log_with", f"unknown tracker(s) {bad}; choose from tensorboard, wandb, mlflow"))
        return out


@dataclass
class GenerationConfig:
    max_new_tokens: int = help_field(64, "Tokens generated per prompt (greedy).")
    batch_size: int = help_field(32, "Prompts per generation batch.")

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.max_new_tokens < 1:
            out.append(("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}"))
        if self.batch_size < 1:
            out.append(("batch_size", f"must be >= 1, got {self.batch_size}"))
        return out


@dataclass
class OutputConfig:
    dir: str = help_field("", "Output folder (created; written atomically).")
    overwrite: bool = help_field(False, "Replace an existing finished output folder.")
    save_model: bool = help_field(True, "Save the defended model.")

    def validate(self) -> list[tuple[str, str]]:
        return [] if self.dir else [("dir", "no output folder; set output.dir=/path/to/out")]


@dataclass
class DefendConfig:
    """A defense run: the suspect model, the defender's data, the shared training settings and the method."""
    method: Any = help_field({}, "The method section: `name` (see `unbackdoor ls methods`) plus its fields.")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = help_field(0, "Seed for data order, initialisation and sampling.")

    def validate(self) -> list[tuple[str, str]]:
        out = seed_problems(self.seed)
        q = self.model.quantization
        if q and q in QUANTIZATIONS and not self.lora.enabled:
            out.append(("lora.enabled", f"false with model.quantization={q}: {QLORA_NEEDS_LORA}"))
        if q and q in QUANTIZATIONS and self.train.fsdp:
            out.append(("train.fsdp", f"true with model.quantization={q}: sharding quantized weights is not "
                                      "supported; train QLoRA under DDP (the adapter is small) or drop one of the two"))
        return out


def seed_problems(seed: int, key: str = "seed") -> list[tuple[str, str]]:
    """A seed must fit the generators it seeds (Python, NumPy, torch): 0 <= seed < 2**32."""
    if isinstance(seed, int) and not 0 <= seed < 2**32:
        return [(key, f"must be in [0, 2**32), got {seed}")]
    return []
