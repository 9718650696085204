"""MQAR, multi-query associative recall (after Zoology): a trained task. Small models of the evaluated architecture
(its layer kinds, the first ``n_layers`` of them, at several widths) are trained from scratch on synthetic MQAR
batches (``memlm.data.synthetic.mqar_batch``) and tested on fresh batches: accuracy vs number of key→value pairs and
vs model width / recurrent state bytes. What it measures is how much an architecture's memory can hold and bind,
independent of language.

Notation: P pairs in the context, Q queries, T sequence length, V vocabulary, D model width, H heads.

State bytes are those of ``ModelState`` for one sequence after T tokens (a KV cache grows with T; recurrent
memories do not). Training: AdamW, linear warm-up then constant LR, cross-entropy on the answer positions only,
each step's P drawn from ``train_pairs``; batches are seeded by step (identical for every architecture).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from memlm.config.model import ModelConfig
from memlm.data.synthetic import mqar_batch
from memlm.errors import UserError
from memlm.eval.tasks.base import register_task
from memlm.models.lm import MemoryLM

if TYPE_CHECKING:
    from memlm.eval.runner import EvalContext


@dataclass(kw_only=True)
class MQARSettings:
    widths: list[int] = field(default_factory=lambda: [64, 128])
    pairs: list[int] = field(default_factory=lambda: [4, 8, 16])  # tested
    train_pairs: list[int] | None = None  # None: every tested P (one drawn per step)
    seq_len: int = 128
    vocab_size: int = 256
    n_layers: int | None = 2  # the first n layers of the architecture (Zoology uses 2); None: all
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 30
    eval_batches: int = 2
    seed: int = 0

    @classmethod
    def from_overrides(cls, d: dict) -> MQARSettings:
        names = {f.name for f in fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise UserError(f"unknown MQAR setting(s) {bad}; settings: {', '.join(sorted(names))}")
        lists = {"widths", "pairs", "train_pairs"}
        d = {k: ([v] if k in lists and v is not None and not isinstance(v, list) else v) for k, v in d.items()}
        return cls(**d)


def _scaled_heads(h: int | None, ratio: float, width: int) -> int | None:
    if h is None:
        return None
    n = max(1, round(h * ratio))
    while n > 1 and width % n:
        n -= 1
    return n


def width_variant(cfg: ModelConfig, d_model: int, *, vocab_size: int, max_seq_len: int,
                  n_layers: int | None) -> ModelConfig:
    """The same architecture at width ``d_model``: head counts scale with the width (head width kept where it is
    explicit), feed-forward widths re-derived, the first ``n_layers`` layers kept."""
    d = cfg.to_dict()
    ratio = d_model / cfg.d_model
    d.update(d_model=d_model, d_ff=0, vocab_size=vocab_size, max_seq_len=max(cfg.max_seq_len, max_seq_len), name="")
    if "cms_d_ff" in d:
        d["cms_d_ff"] = 0
    d["n_heads"] = _scaled_heads(cfg.n_heads, ratio, d_model)
    layers = d["layers"][:n_layers] if n_layers else d["layers"]
    for lc in layers:
        if lc.get("n_heads") is not None:
            lc["n_heads"] = _scaled_heads(lc["n_heads"], ratio, d_model)
        if lc.get("n_kv_heads") is not None:
            h = lc.get("n_heads") or d["n_heads"]
            kv = max(1, round(lc["n_kv_heads"] * ratio))
            while h % kv:
                kv -= 1
            lc["n_kv_heads"] = kv
        if lc.get("d_ff"):
            lc["d_ff"] = None
    d["layers"] = layers
    return ModelConfig.from_dict(d)


def state_bytes(model: MemoryLM, T: int, device) -> int:
    """Bytes of one sequence's ModelState after T tokens."""
    with torch.no_grad():
        _, st = model(torch.zeros(1, T, dtype=torch.long, device=device))
    return st.nbytes()


def train_mqar(cfg: ModelConfig, s: MQARSettings, device, log=print) -> tuple[MemoryLM, list[float]]:
    """A fresh model of ``cfg`` trained on MQAR; returns it (eval mode) and the loss every 10 steps."""
    torch.manual_seed(s.seed)
    model = MemoryLM(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0, betas=(0.9, 0.98))
    pairs = s.train_pairs or s.pairs
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else None
    losses = []
    for step in range(s.steps):
        P = pairs[step % len(pairs)]
        b = mqar_batch(s.batch_size, s.seq_len, P, s.vocab_size, seed=s.seed * 1_000_003 + step)
        for g in opt.param_groups:
            g["lr"] = s.lr * min(1.0, (step + 1) / max(1, s.warmup))
        ids, labels = b.input_ids.to(device), b.labels.to(device)
        with amp if amp is not None else torch.autocast("cpu", enabled=False):
            logits, _ = model(ids)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == s.steps - 1:
            losses.append(float(loss.detach()))
    return model.eval(), losses


@torch.no_grad()
def eval_mqar(model: MemoryLM, s: MQARSettings, n_pairs: int, device) -> float:
    """Accuracy of argmax at the answer positions on ``eval_batches`` held-out batches (seeds unseen in training)."""
    hit = tot = 0
    for k in range(s.eval_batches):
        b = mqar_batch(s.batch_size, s.seq_len, n_pairs, s.vocab_size, seed=10_000_019 + 7919 * k + n_pairs)
        logits, _ = model(b.input_ids.to(device))
        pred = logits.argmax(-1).cpu()
        hit += int((pred[b.mask] == b.labels[b.mask]).sum())
        tot += int(b.mask.sum())
    return hit / max(tot, 1)


def run_mqar(base: ModelConfig, s: MQARSettings, device, log=print) -> list[dict]:
    """Train and test one model per width; a record per (width, P)."""
    out = []
    for w in s.widths:
        t0 = time.perf_counter()
        try:
            try:
                cfg = width_variant(base, w, vocab_size=s.vocab_size, max_seq_len=s.seq_len, n_layers=s.n_layers)
            except (ValueError, UserError):
                # Model-level settings may name layer indices (e.g. which layers hold a cell): keep every layer.
                cfg = width_variant(base, w, vocab_size=s.vocab_size, max_seq_len=s.seq_len, n_layers=None)
            model, losses = train_mqar(cfg, s, device, log)
        except (ValueError, UserError) as e:  # a width the architecture cannot take (head counts, windows)
            out.append({"task": "mqar", "width": w, "error": f"{type(e).__name__}: {e}"})
            continue
        sb = state_bytes(model, s.seq_len, device)
        n_params = model.num_params(non_embedding=True)
        for P in s.pairs:
            acc = eval_mqar(model, s, P, device)
            out.append({"task": "mqar", "width": w, "pairs": P, "acc": acc, "state_bytes": sb, "params": n_params,
                        "layers": len(cfg.layers),
                        "seq_len": s.seq_len, "steps": s.steps, "final_loss": losses[-1],
                        "chance": 1.0 / (s.vocab_size - 1 - (s.vocab_size - 1) // 2),
                        "seconds": round(time.perf_counter() - t0, 2)})
        log(f"mqar width {w}: " + ", ".join(f"P={r['pairs']} acc {r['acc']:.2f}" for r in out[-len(s.pairs):])
            + f" (loss {losses[-1]:.3f}, state {sb:,} B)")
        del model
    return out


@register_task("mqar", "mqar", "multi-query associative recall (trained): accuracy vs pairs and width / state bytes",
               uses_lengths=False)
def run_mqar_task(ctx: EvalContext) -> Iterator[dict]:
    s = MQARSettings.from_overrides(dict(ctx.cfg.mqar))
    if not math.isfinite(s.lr) or s.steps < 1:
        raise UserError("MQAR needs steps ≥ 1 and a finite lr")
    yield from run_mqar(ctx.model.config, s, ctx.device, ctx.log)


__all__ = ["MQARSettings", "eval_mqar", "run_mqar", "state_bytes", "train_mqar", "width_variant"]
