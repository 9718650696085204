"""Training configuration and the run config (model + train) that presets return."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memlm.config.base import Config, check_choice, check_positive
from memlm.config.model import ModelConfig


@dataclass(kw_only=True)
class TrainConfig(Config):
    # data
    data: list[str] = field(default_factory=list)  # files / folders / globs / "hf:name"; empty: the built-in demo corpus
    val_data: list[str] = field(default_factory=list)  # empty: hold out every val_every_doc-th training document
    val_every_doc: int = 50
    tokenizer: str = "byte"
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    # optimisation
    steps: int = 1000
    optimizer: str = "adamw"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    lr_scales: dict[str, float] = field(default_factory=dict)  # fnmatch pattern on parameter names -> LR scale
    # optimizer-specific settings passed to build_optimizer, e.g. {"muon_lr": 0.02} or {"slow_every": 8, "alpha": 1.0}
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    clip: float = 1.0
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model's training forward (LM head and loss included)
    # CUDA: replay each kind of step's forward, backward and clip from a CUDA graph (memlm/train/cuda_graph.py): the
    # host then launches one graph instead of every kernel; one process (tbptt: steps whose carried state keeps its
    # shapes; a full-attention cache grows, so those steps run eagerly)
    cuda_graph: bool = False
    # summed token cross-entropy: "chunked" computes LM head + CE ce_chunk tokens at a time (no [tokens, vocab] fp32
    # logits kept; memlm/ops/cross_entropy.py), "plain" materialises the logits; "auto": chunked on CUDA
    cross_entropy: str = "auto"
    ce_chunk: int = 4096
    # masked attention (windows, packed documents, persistent tokens; memlm/ops/attention.py): "auto" = FlexAttention
    # on CUDA for training/prefill, dense-mask SDPA elsewhere; "sdpa" or "flex" force one
    attention: str = "auto"
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    # memory across steps
    tbptt: bool = False  # rows continue the same documents step after step; the ModelState is carried
    detach_every: int = 1  # with tbptt: cut the graph every k steps (k>1 keeps the graph across k segments)
    # evaluation, sampling, checkpoints, logging
    eval_every: int = 200
    eval_batches: int = 20
    sample_every: int = 500
    sample_tokens: int = 120
    sample_prompt: str = "The "
    save_every: int = 500
    keep_last: int = 3
    out_dir: str = "runs/default"
    log_every: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "memlm"
    seed: int = 1337
    device: str = "auto"
    # several processes (launched by torchrun / memlm train --nproc N); train.batch_size is then rows per process
    parallel: str = "auto"  # auto: ddp when WORLD_SIZE > 1; ddp; fsdp (FSDP2 fully_shard per block + root); none
    mixed_precision: str = "auto"  # FSDP params + gradient reduce (DDP: reduce only); auto: bfloat16 on CUDA, else fp32
    activation_checkpointing: bool = False  # recompute every Block's forward in backward (also in one process)

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, ("adamw", "lion", "muon", "m3"))
        check_choice("schedule", self.schedule, ("cosine", "constant", "wsd"))
        check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        check_choice("cross_entropy", self.cross_entropy, ("auto", "plain", "chunked"))
        check_choice("attention", self.attention, ("auto", "sdpa", "flex"))
        check_choice("parallel", self.parallel, ("auto", "none", "ddp", "fsdp"))
        check_choice("mixed_precision", self.mixed_precision, ("auto", "float32", "bfloat16", "bfloat16-reduce-float32"))
        for n in ("seq_len", "batch_size", "grad_accum", "steps", "detach_every", "keep_last", "log_every", "ce_chunk"):
            check_positive(n, getattr(self, n))
        check_positive("lr", self.lr)


@dataclass(kw_only=True)
class RunConfig(Config):
    """What a preset returns: the model and how to train it."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    family: str = ""
    description: str = ""
