"""MemoryLM: embeddings → generic Blocks → final norm → LM head, carrying a ModelState.

Notation: B batch, T tokens, V vocabulary, D model width.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from memlm.config.model import ModelConfig
from memlm.errors import UserError
from memlm.io import atomic_replace_dir
from memlm.layers.base import stream_positions
from memlm.layers.norm import make_norm
from memlm.models.block import Block
from memlm.models.init import init_weights
from memlm.models.oumnix import attach_oumnix
from memlm.models.state import ModelState
from memlm.ops.cross_entropy import linear_ce_sum, token_ce_sum

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class MemoryLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.max_seq_len, c.d_model) if c.position == "learned" else None
        self.blocks = nn.ModuleList(Block(c, lc, i) for i, lc in enumerate(c.layers))
        self.norm_f = make_norm(c.norm, c.d_model, c.norm_eps, bias=c.norm_bias)
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_weights(self, std=c.init_std, n_layers=len(c.layers))
        # Oumnix switches (WEAVE, PFP, cell, exits); None for every model that uses none of them.
        self.oumnix = attach_oumnix(self)
        # Computed once: hashing the config on every forward would cost time and break torch.compile graphs.
        self._config_hash = c.config_hash()
        self._kinds = tuple(lc.kind for lc in c.layers)

    # ----------------------------------------------------------------------------------------- state
    def init_state(self, batch_size: int, *, device: torch.device | str | None = None) -> ModelState:
        device = device or self.embed.weight.device
        z = torch.zeros(batch_size, dtype=torch.long, device=device)
        return ModelState(tuple(b.mixer.init_state(batch_size, device=device) for b in self.blocks), z, z.clone(),
                          self._config_hash, self._kinds)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, state: ModelState | None = None, reset: Tensor | None = None,
                update: bool = True, *, return_hidden: bool = False, labels: Tensor | None = None,
                ce_chunk: int = 0) -> tuple[Tensor, ModelState]:
        """input_ids [B, T] → logits [B, T, V] (or final hidden [B, T, D] with return_hidden) and the new state.

        reset [B, T] marks document starts inside packed rows; update=False reads memories without writing.
        labels [B, T] (already shifted, −100 skips): return the summed token cross-entropy (fp32 scalar) instead of
        the logits — inside forward, so DDP/FSDP and torch.compile see the LM head and the loss as part of the model.
        ce_chunk > 0 computes it ce_chunk tokens at a time without materialising the logits (ops/cross_entropy.py).
        """
        B, T = input_ids.shape
        if state is None:
            # Mixers get state=None (the contract's fresh state): they know it is empty without reading it, which
            # lets chunked memories size their work from shapes alone (no host sync, no torch.compile graph break).
            z = torch.zeros(B, dtype=torch.long, device=input_ids.device)
            state = ModelState((None,) * len(self.blocks), z, z.clone(), self._config_hash, self._kinds)
        elif state.batch_size != B:
            raise ValueError(f"state has batch {state.batch_size}, input has {B}")
        x = self.embed(input_ids)
        abs_pos, doc_tok = stream_positions(state.pos, state.doc_start, reset, T)
        if self.pos_embed is not None:
            x = x + self.pos_embed((abs_pos - doc_tok).clamp(max=self.config.max_seq_len - 1))
        if self.oumnix is None:
            new_layers = []
            for block, s in zip(self.blocks, state.layers):
                x, s = block(x, s, reset, update)
                new_layers.append(s)
            x = self.norm_f(x)
        else:
            x, new_layers = self.oumnix(self, x, state.layers, reset, update)
        if update:
            new_state = ModelState(tuple(new_layers), state.pos + T, doc_tok[:, -1], state.config_hash, state.kinds)
        else:
            new_state = ModelState(tuple(new_layers), state.pos, state.doc_start, state.config_hash, state.kinds)
        if labels is not None:
            if ce_chunk > 0:
                return linear_ce_sum(x, self.head_weight, labels, chunk=ce_chunk), new_state
            return token_ce_sum(self.logits(x), labels), new_state
        return (x if return_hidden else self.logits(x)), new_state

    def logits(self, hidden: Tensor) -> Tensor:
        w = self.embed.weight if self.head is None else self.head.weight
        return F.linear(hidden, w)

    @property
    def head_weight(self) -> Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    # ----------------------------------------------------------------------------------------- sizes
    def num_params(self, *, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
            if self.head is not None:
                n -= self.head.weight.numel()
        return n

    # ------------------------------------------------------------------------------------------- I/O
    def save_pretrained(self, path: str | Path) -> None:
        """Write ``path/model.safetensors`` and ``path/config.json`` (atomically, as one folder)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt", "memlm_config_hash": self.config.config_hash()})
        (tmp / CONFIG).write_text(json.dumps({"memlm_version": 1, "model": self.config.to_dict()}, indent=2))
        atomic_replace_dir(tmp, path)


def read_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig saved in a model/checkpoint folder (config.json with a "model" section)."""
    path = Path(path)
    cfg_file = path / CONFIG if path.is_dir() else path.with_name(CONFIG)
    if not cfg_file.exists():
        raise UserError(f"{path}: no {CONFIG} found (is this a memlm model or checkpoint folder?)")
    try:
        data = json.loads(cfg_file.read_text())
        return ModelConfig.from_dict(data["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_file}: invalid model config ({e})") from None


def load_model(path: str | Path, *, device: torch.device | str = "cpu") -> MemoryLM:
    """Rebuild a model from ``path`` (a folder written by save_pretrained or a trainer checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model or checkpoint")
    cfg = read_model_config(path)
    weights = path / WEIGHTS if path.is_dir() else path
    try:
        sd = load_file(str(weights), device=str(device))
    except Exception as e:  # noqa: BLE001 — safetensors raises several types on bad files
        raise UserError(f"{weights}: cannot read weights ({e})") from None
    model = MemoryLM(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{weights}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval()
