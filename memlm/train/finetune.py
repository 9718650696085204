"""Fine-tuning a trained model: LoRA adapters (only they train) or all weights, on text or on conversations (chat SFT).

Notation: r LoRA rank, α LoRA scale numerator, B rows, T tokens per row.

``FinetuneTrainer`` is the Trainer with three changes: the model starts from the BASE weights, LoRA adapters are
applied before the optimizer is built (so only they are optimised and saved in the optimizer state), and every
checkpoint also refreshes ``out_dir/adapter/`` (``adapter.safetensors`` with only the adapters, ``adapter.json``).
Everything else — accumulation, clipping, schedules, checkpoints, bit-exact ``resume`` — is the Trainer's.

Chat SFT (``chat=True``): records with ``messages`` ([{role, content}], memlm/data/sources.py) go through the
chat template (memlm/data/chat.py); the Packer turns its loss mask into labels = −100 on every token that is not
an assistant token (system and user turns, role markers), so prompts carry no loss. Records without messages are
skipped and counted; data without any conversation is an error.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memlm.config.train import RunConfig, TrainConfig
from memlm.errors import UserError
from memlm.layers.lora import apply_lora, parse_targets, save_lora
from memlm.train.optim import build_optimizer
from memlm.train.trainer import Trainer

ADAPTER_DIR = "adapter"

__all__ = ["ADAPTER_DIR", "ChatOnly", "FinetuneTrainer", "LoraSpec", "base_run_config", "build_finetune_data",
           "load_base_tokenizer"]


@dataclass
class LoraSpec:
    rank: int
    alpha: float | None = None  # None: 2·rank
    targets: list[str] = field(default_factory=lambda: ["qkv", "o_proj"])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"--lora-rank {self.rank}: must be ≥ 1")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--lora-dropout {self.dropout}: must be in [0, 1)")
        self.targets = parse_targets(self.targets)
        if self.alpha is None:
            self.alpha = 2.0 * self.rank


class ChatOnly:
    """Re-iterable view of a document source keeping only conversations (Documents with messages)."""

    def __init__(self, docs: Iterable[Any]) -> None:
        self.docs = docs
        self.skipped = 0

    @property
    def stats(self):
        return getattr(self.docs, "stats", None)

    def __repr__(self) -> str:
        return f"conversations of {self.docs!r}"

    def __iter__(self) -> Iterator[Any]:
        found = False
        for d in self.docs:
            if getattr(d, "messages", None) is not None:
                found = True
                yield d
            else:
                self.skipped += 1
        if not found:
            raise UserError(f"{self.docs!r}: no conversations (records with a 'messages' list of {{role, content}}); "
                            f"drop --chat to train on plain text")


def build_finetune_data(t: TrainConfig, tok: Any, *, chat: bool) -> tuple[Any, Any]:
    """(training Packer, validation Packer or None) like the Trainer's, keeping only conversations with ``chat``."""
    from memlm.data.packing import Packer
    from memlm.data.sources import open_sources, split_documents

    if not t.data:
        raise UserError("fine-tuning needs --data")
    docs = open_sources(list(t.data), seed=t.seed)
    val = open_sources(list(t.val_data), seed=t.seed) if t.val_data else None
    if chat:
        docs = ChatOnly(docs)
        val = ChatOnly(val) if val is not None else None
    if val is None:
        docs, val = split_documents(docs, t.val_every_doc)
    mode = "streams" if t.tbptt else "packed"
    stream = Packer(docs, tok, batch_size=t.batch_size, seq_len=t.seq_len, mode=mode, seed=t.seed)
    val_stream = Packer(val, tok, batch_size=t.batch_size, seq_len=t.seq_len, mode=mode, seed=t.seed, shuffle=False,
                        loop=False)
    return stream, val_stream


def load_base_tokenizer(base: Path, t: TrainConfig):
    """The tokenizer saved beside the base weights, else the one its training config names."""
    from memlm.data.tokenizer import load_tokenizer

    if (base / "memlm_tokenizer.json").is_file() or (base / "tokenizer.json").is_file():
        return load_tokenizer(str(base))
    return load_tokenizer(t.tokenizer)


def base_run_config(base: str | os.PathLike) -> tuple[Path, RunConfig]:
    """(weights folder, RunConfig) of a base run / checkpoint / model folder: its model config and, when saved,
    its training config (tokenizer, sequence length …) as the starting point of the fine-tuning config."""
    import json

    from memlm.models.lm import read_model_config
    from memlm.train import checkpoint as ckpt

    p = Path(base)
    try:
        path = ckpt.find_checkpoint(p)
    except UserError:
        if not (p / "config.json").is_file():
            raise UserError(f"{p}: not a memlm run, checkpoint or model folder") from None
        path = p
    model_cfg = read_model_config(path)
    data = json.loads((path / "config.json").read_text())
    train = TrainConfig.from_dict(data["train"]) if isinstance(data.get("train"), dict) else TrainConfig()
    return path, RunConfig(model=model_cfg, train=train)


class FinetuneTrainer(Trainer):
    """The Trainer starting from ``base`` weights, with optional LoRA (see the module docstring).

    resume follows the Trainer's meaning; the base weights are loaded first, then a checkpoint (which holds the
    adapters and their optimizer state) overrides them."""

    def __init__(self, cfg: RunConfig, base: str | os.PathLike, *, lora: LoraSpec | None = None, chat: bool = False,
                 resume: str | os.PathLike | bool | None = None, tokenizer: Any = None, data: Any = None,
                 val_data: Iterable | None = None, **kw: Any) -> None:
        from safetensors.torch import load_file

        self._ft_ready = False
        self._ft_resume = resume
        self.base_path, _ = base_run_config(base)
        self.lora = lora
        if tokenizer is None:
            tokenizer = load_base_tokenizer(self.base_path, cfg.train)
        if data is None:
            data, built_val = build_finetune_data(cfg.train, tokenizer, chat=chat)
            val_data = built_val if val_data is None else val_data
        super().__init__(cfg, resume=None, tokenizer=tokenizer, data=data, val_data=val_data, **kw)
        try:
            sd = load_file(str(self.base_path / "model.safetensors"), device=str(self.device))
        except Exception as e:  # noqa: BLE001 — safetensors raises several types on bad files
            raise UserError(f"{self.base_path}: cannot read base weights ({e})") from None
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UserError(f"{self.base_path}: base weights do not fit the model config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        t = cfg.train
        if lora is not None:
            apply_lora(self.model, lora.rank, lora.alpha, lora.targets, lora.dropout)
        self.optimizer = build_optimizer(self.model, name=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                                         betas=tuple(t.betas), eps=t.eps, lr_scales=t.lr_scales, **t.optimizer_options)
        self._module = torch.compile(self.model) if t.compile else self.model
        self._ft_ready = True
        Trainer._maybe_resume(self, resume)

    def _maybe_resume(self, resume: Any) -> None:
        if self._ft_ready:  # Trainer.__init__ calls this before the base weights and adapters are in place
            Trainer._maybe_resume(self, resume)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def save_checkpoint(self) -> Path:
        path = super().save_checkpoint()
        if self.lora is not None:
            save_lora(self.model, self.out_dir / ADAPTER_DIR,
                      extra={"base_path": str(self.base_path), "step": self.step, "checkpoint": str(path)})
        return path
