"""The trainer: an explicit ``train_step`` and a ``fit`` loop with validation, samples, checkpoints and metrics.

Notation: B rows per micro-batch, T tokens per row (train.seq_len), M micro-batches per optimizer step
(train.grad_accum), k = train.detach_every, N valid target tokens (labels ≠ −100) in one optimizer step.

One optimizer step consumes M micro-batches (M·k consecutive segments of the same B streams with train.tbptt;
each window of k segments keeps its graph and is backpropagated once). The loss of a step is
Σ token CE / N over ALL its micro-batches — not a mean of per-micro-batch means, which would weight a token by
how full its micro-batch happened to be — plus the auxiliary losses mixers report (mean over forwards).
Resuming from a checkpoint continues bit for bit on CPU: weights, optimizer, step (the LR schedule is a pure
function of it), data cursor, RNG states and the carried TBPTT state are all restored.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from memlm.config.train import RunConfig, TrainConfig
from memlm.data.packing import shard_rows
from memlm.errors import UserError
from memlm.layers.cms import cms_gate_gradients
from memlm.models.lm import MemoryLM
from memlm.models.state import ModelState
from memlm.ops.compressive.segments import reset_bound
from memlm.ops.dispatch import force_backend
from memlm.train import checkpoint as ckpt
from memlm.train import parallel
from memlm.train.cuda_graph import CaptureError, StepGraphs
from memlm.train.metrics import MetricsLogger, progress_line
from memlm.train.optim import build_optimizer, describe_optimizer
from memlm.train.schedule import apply_lr, lr_at
from memlm.train.tbptt import count_valid, run_segments, to_floats


class NonFiniteError(UserError):
    """Training stopped after train.max_nonfinite non-finite steps in a row."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device={name!r} is not a device (use auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name!r} but CUDA is not available")
    return dev


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.dtype (None: plain fp32). Master weights and optimizer state stay fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resets_bucket(batches: Sequence[Any]) -> int | None:
    """A promise for ``reset_bound``: the most document starts after the first token in any row of ``batches``,
    rounded up to a power of two (few distinct values: one compiled graph each), from the host copies of reset.
    None when no batch has a reset."""
    most = None
    for b in batches:
        r = getattr(b, "reset", None)
        if r is not None:
            n = int(r[:, 1:].sum(1).max()) if r.shape[1] > 1 else 0
            most = n if most is None else max(most, n)
    return None if most is None else (0 if most == 0 else 1 << (most - 1).bit_length())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_data(t: TrainConfig, tok: Any, world: int = 1) -> tuple[Any, Any]:
    """(training batch stream, validation source or None) from train.data / train.val_data (default: demo corpus).

    A prepared shard folder (``memlm data prepare``) is read by random access with its own validation split;
    anything else is read as documents, and without train.val_data every val_every_doc-th one is held out.
    With ``world`` processes the streams yield global batches of batch_size × world rows (each rank keeps its own).
    """
    from memlm.data import demo_corpus_path
    from memlm.data.packing import Packer
    from memlm.data.shards import INDEX, ShardDataset
    from memlm.data.sources import open_sources, split_documents

    specs = list(t.data) or [demo_corpus_path()]
    val = open_sources(t.val_data, seed=t.seed) if t.val_data else None
    if len(specs) == 1 and (Path(specs[0]) / INDEX).is_file():
        train_docs = ShardDataset(specs[0], tokenizer=tok, shuffle=True, seed=t.seed)
        if val is None:
            val = train_docs.val() if train_docs.index.get("val") else split_documents(train_docs, t.val_every_doc)[1]
    else:
        train_docs = open_sources(specs, seed=t.seed)
        if val is None:
            train_docs, val = split_documents(train_docs, t.val_every_doc)
    mode = "streams" if t.tbptt else "packed"
    stream = Packer(train_docs, tok, batch_size=t.batch_size * world, seq_len=t.seq_len, mode=mode, seed=t.seed)
    val_stream = Packer(val, tok, batch_size=t.batch_size * world, seq_len=t.seq_len, mode=mode, seed=t.seed,
                        shuffle=False, loop=False)
    return stream, val_stream


def sample_text(model: MemoryLM, tok: Any, prompt: str, n: int, *, temperature: float = 0.8, top_k: int = 40,
                seed: int = 0) -> str:
    """``prompt`` continued by up to ``n`` sampled tokens (temperature + top-k) through the inference engine.

    A seeded private generator: sampling never moves the training RNG (resume stays bit-exact). Eval mode for the
    duration (dropout off); memories still update as they do in generation."""
    from memlm.inference.engine import generate

    was_training = model.training
    model.eval()
    try:
        gen = generate(model, tok, prompt, max_new_tokens=n, temperature=temperature, top_k=top_k, seed=seed)
        return prompt + gen.text
    finally:
        model.train(was_training)


class Trainer:
    """Train ``cfg.model`` as ``cfg.train`` says. ``data`` / ``val_data`` / ``tokenizer`` override what the config
    names (tests, custom pipelines): data is an iterator of batches with input_ids, labels (already shifted) and
    reset [B, T], ideally with state_dict()/load_state_dict() for resume; val_data an iterable of such batches.

    resume: None/False — a fresh run (refused if out_dir already holds checkpoints); True — the latest checkpoint
    in out_dir (must exist); "auto" — the latest if any, else fresh; a path — that run or checkpoint folder.

    Launched by torchrun with WORLD_SIZE > 1, ``self.dist`` holds the process group (train/parallel.py): data and
    val_data then yield global batches (batch_size × world rows) of which each rank trains on rows rank::world.
    """

    def __init__(self, cfg: RunConfig, *, out_dir: str | os.PathLike | None = None,
                 resume: str | os.PathLike | bool | None = None, log: Callable[[str], None] = print,
                 data: Any = None, val_data: Iterable | None = None, tokenizer: Any = None) -> None:
        self.cfg, self.log = cfg, log
        t = self.t = cfg.train
        self.out_dir = Path(out_dir if out_dir is not None else t.out_dir)
        self.ckpt_root = self.out_dir / ckpt.CKPT_DIR
        self.device = resolve_device(t.device)
        self.dist = parallel.setup(t, self.device)  # None in a single process: nothing below changes
        if self.dist is not None:
            self.device = self.dist.device
            self.log = log = log if self.dist.is_main else (lambda s: None)
        self.amp = autocast_dtype(t.dtype, self.device)
        seed_everything(t.seed)
        self.model = MemoryLM(cfg.model).to(self.device)
        wrapped = parallel.prepare_model(self.model, t, self.dist)  # activation checkpointing, DDP / FSDP2
        if tokenizer is None:
            from memlm.data.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(t.tokenizer)
        self.tok = tokenizer
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise UserError(f"tokenizer {t.tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size is "
                            f"{cfg.model.vocab_size}; raise model.vocab_size or pick another tokenizer")
        try:
            self.optimizer = build_optimizer(self.model, name=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                                             betas=tuple(t.betas), eps=t.eps, lr_scales=t.lr_scales, **t.optimizer_options)
        except (TypeError, ValueError) as e:
            raise UserError(f"train.optimizer={t.optimizer!r} / train.optimizer_options: {e}") from None
        self._module = torch.compile(wrapped) if t.compile else wrapped
        self._compiled_kinds: set = set()  # kinds of batch torch.compile has met (_note_compile)
        self.graphs = self._step_graphs()
        # the summed CE is computed inside the model's forward (MemoryLM(labels=...)): chunked, or plain logits
        chunked = t.cross_entropy == "chunked" or (t.cross_entropy == "auto" and self.device.type == "cuda")
        self.ce_chunk = t.ce_chunk if chunked else 0
        attn = t.attention if t.attention != "auto" else ("flex" if self.device.type == "cuda" else "sdpa")
        log(f"training path: torch.compile {'on' if t.compile else 'off'}; "
            f"CUDA graph {'on' if self.graphs is not None else 'off'}; cross-entropy "
            f"{f'chunked ({t.ce_chunk} tokens)' if chunked else 'plain'}; masked attention {attn} "
            f"({t.attention}); optimizer {describe_optimizer(self.optimizer)}")
        if data is None:
            data, built_val = build_data(t, tokenizer, self.dist.world if self.dist else 1)
            val_data = built_val if val_data is None else val_data
        self.data, self._val_source = data, val_data
        self._val_batches: list | None = None
        self.step = self.tokens = self.nonfinite_total = self.nonfinite_in_row = 0
        self.best_val_loss = self.last_val_loss = math.inf
        self.loss_scale = 2.0**16 if self.amp == torch.float16 else 1.0
        self._good_since_scale = 0
        self.tbptt_state: ModelState | None = None
        self.elapsed, self.started_at = 0.0, time.time()
        self._stop: str | None = None
        self._agreed_stop: str | None = None  # with several processes: a stop any rank asked for, agreed per step
        self._last_saved = -1
        self.resumed_from: Path | None = None
        if t.tbptt and any(getattr(lc, "kind", "") == "attention" and getattr(lc, "window", 0) is None
                           for lc in cfg.model.layers):
            log("warning: train.tbptt with full-attention layers carries a KV cache that grows every step; "
                "use sliding-window attention (window=...) or tbptt=false")
        self._maybe_resume(resume)

    # ------------------------------------------------------------------------------------------------ resume
    def _maybe_resume(self, resume: Any) -> None:
        if resume is None or resume is False:
            if ckpt.list_checkpoints(self.ckpt_root):
                raise UserError(f"{self.out_dir} already holds checkpoints; pass resume (--resume) to continue that "
                                f"run, or choose another out_dir")
            return
        if resume is True or resume == "auto":
            if not ckpt.list_checkpoints(self.ckpt_root):
                if resume == "auto":
                    return
                raise UserError(f"{self.out_dir}: no checkpoint to resume from (leave out resume to start fresh)")
            path = ckpt.find_checkpoint(self.out_dir)
        else:
            path = ckpt.find_checkpoint(resume)
        load = self.dist.load_checkpoint if self.dist else ckpt.load_checkpoint
        loaded = load(path, model=self.model, optimizer=self.optimizer, device=self.device)
        st = loaded["trainer_state"]
        self.step, self.tokens = int(st["step"]), int(st["tokens"])
        self.best_val_loss = _num(st.get("best_val_loss"))
        self.last_val_loss = _num(st.get("last_val_loss"))
        self.nonfinite_total = int(st.get("nonfinite_total", 0))
        self.nonfinite_in_row = int(st.get("nonfinite_in_row", 0))
        self.loss_scale = float(st.get("loss_scale", self.loss_scale))
        self.elapsed = float(st.get("elapsed_s", 0.0))
        self.started_at = float(st.get("started_at", self.started_at))
        if st.get("data") is not None:
            if not hasattr(self.data, "load_state_dict"):
                raise UserError(f"{path}: the checkpoint has a data cursor but this data stream cannot be resumed")
            self.data.load_state_dict(st["data"])
        if loaded["tbptt_state_path"] is not None and self.t.tbptt:
            self.tbptt_state = ModelState.load(loaded["tbptt_state_path"], model=self.model, device=self.device)
            if self.dist is not None:
                self.tbptt_state = self.dist.local_rows(self.tbptt_state)
        if loaded["rng"] is not None:
            ckpt.set_rng_state(loaded["rng"])
        self._last_saved = self.step
        self.resumed_from = path
        self.log(f"resumed from {path} (step {self.step}, {self.tokens:,} tokens)")

    # ------------------------------------------------------------------------------------------------- step
    def _step_graphs(self) -> StepGraphs | None:
        """train.cuda_graph: the graphs of the training step (cuda_graph.py), after refusing what they cannot do."""
        t = self.t
        if not t.cuda_graph:
            return None
        why = ("it needs a CUDA device (train.device)" if self.device.type != "cuda" else
               "several processes are not supported yet" if self.dist is not None else None)
        if why:
            raise UserError(f"train.cuda_graph=true: {why}; set train.cuda_graph=false")
        return self._with_graphs(StepGraphs(self.model.parameters()))

    def _with_graphs(self, graphs: Any) -> Any:
        """``graphs`` (a StepGraphs, or in CPU tests anything with its ``run`` and ``captured``) with the static tensors
        that every graph reads: per kind of step the batch and carried state, and N, the step and the loss scale."""
        self._static: dict[Any, tuple[list[tuple], ModelState | None]] = {}  # key -> (batch, state) buffers
        self._n_dev = torch.ones((), dtype=torch.float32, device=self.device)     # N of the step
        self._step_dev = torch.zeros((), dtype=torch.float64, device=self.device)  # the step, for λ(step)
        self._scale_dev = torch.ones((), dtype=torch.float32, device=self.device)  # float16's loss scale
        self._last_shapes: Any = ()  # tbptt: the carried state's shapes at the last step (_steady_state)
        return graphs

    def _forward(self, ids: torch.Tensor, state: ModelState | None, reset: torch.Tensor | None,
                 labels: torch.Tensor):
        """(summed token CE, new state): the LM head and the loss run inside the (compiled / wrapped) model."""
        return self._module(ids, state, reset, labels=labels, ce_chunk=self.ce_chunk)

    def _attention(self):
        """train.attention: force a masked-attention backend for the training and validation forwards."""
        a = self.t.attention
        return contextlib.nullcontext() if a == "auto" else force_backend("masked_attention", a)

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        # a CUDA graph must not keep autocast's cast weights across steps: they would be captured stale
        return torch.autocast(self.device.type, dtype=self.amp, cache_enabled=self.graphs is None)

    def _segments(self, batches: Sequence[Any]) -> list[tuple]:
        out = []
        for b in batches:
            if self.dist is not None:
                b = shard_rows(b, self.dist.rank, self.dist.world)
            reset = getattr(b, "reset", None)
            if reset is not None and not self.t.tbptt and not reset[:, 1:].any():
                # A fresh state restarts at t=0 anyway: without a document start inside the rows, attention can use
                # the plain causal (flash) kernel instead of a document mask. Checked on the host copy: no GPU sync.
                reset = None
            out.append((b.input_ids.to(self.device, non_blocking=True), b.labels.to(self.device, non_blocking=True),
                        None if reset is None else reset.to(self.device, non_blocking=True)))
        return out

    def _grad_sync(self, enabled: bool):
        return contextlib.nullcontext() if self.dist is None else self.dist.grad_sync(enabled)

    @property
    def micro_per_step(self) -> int:
        return self.t.grad_accum * (self.t.detach_every if self.t.tbptt else 1)

    def train_step(self, batch: Any) -> dict[str, Any]:
        """One optimizer step on ``batch`` — a batch, or the list of micro-batches of this step (micro_per_step)."""
        t = self.t
        segs = self._segments(batch if isinstance(batch, (list, tuple)) else [batch])
        self.model.train()
        n_valid = count_valid([s[1] for s in segs])
        world = 1 if self.dist is None else self.dist.world
        if self.dist is not None:
            n_valid = self.dist.sum_int(n_valid)  # every rank normalises by N over all ranks (module docstring)
        lr = lr_at(self.step, base_lr=t.lr, warmup=t.warmup, total=t.steps, schedule=t.schedule,
                   min_lr_ratio=t.min_lr_ratio)
        apply_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        # chunked memories size their chunk grids from shapes and this promise: no host sync, no graph break
        bound = resets_bucket(batch if isinstance(batch, (list, tuple)) else [batch])
        # what changes the kernels a step launches: shapes, document starts inside the rows, the reset_bound bucket
        kind = (bound, tuple((tuple(s[0].shape), s[2] is None) for s in segs))
        compiling = self._note_compile(kind)
        state = self.tbptt_state if t.tbptt else None
        if self.graphs is None or not self._steady_state(state):
            results, loss, ce, grad_norm = self._backward(segs, n_valid, bound, self.step, self.loss_scale, state)
        else:
            # the graph of this kind of step reads its batch, carried state, N, step and loss scale from static device
            # tensors
            key = (kind, self._last_shapes)
            if key not in self._static:
                self._static[key] = pytree.tree_map_only(torch.Tensor, torch.empty_like, (segs, state))
            static, static_state = self._static[key]
            for d, x in zip(pytree.tree_leaves((static, static_state)), pytree.tree_leaves((segs, state))):
                if d is not None:
                    d.copy_(x, non_blocking=True)
            self._n_dev.fill_(max(n_valid, 1))
            self._step_dev.fill_(self.step)
            scale = self.loss_scale
            if self.amp == torch.float16:  # only float16's scale changes (else 1: no scaling kernels in the graph)
                scale = self._scale_dev.fill_(scale)
            fresh = not self.graphs.captured(key)
            try:
                results, loss, ce, grad_norm = self.graphs.run(
                    key, lambda: self._backward(static, self._n_dev, bound, self._step_dev, scale, static_state))
            except CaptureError as e:
                raise UserError(f"train.cuda_graph=true: {e}; set train.cuda_graph=false and start a new process "
                                f"(the checkpoints in {self.ckpt_root} are intact)") from e
            if fresh and self.graphs.captured(key):
                n = len(self.graphs.graphs)
                self.log(f"captured a CUDA graph of the training step ({n} kind{'s' * (n > 1)} of batch so far)")
        loss_f, gn_f = float(loss), float(grad_norm)  # the one host sync of a step
        if compiling is not None:
            self.log(f"torch.compile: that kind of batch compiled and ran in {time.perf_counter() - compiling:.0f} s")
        finite = math.isfinite(loss_f) and math.isfinite(gn_f)
        if finite:
            # CMS (issue 6): levels with period f keep their (clipped) gradient in an accumulator and skip the step
            # unless (step + 1) % f == 0; a no-op for models without mlp="cms"
            cms_gate_gradients(self.model, self.step + 1)
            self.optimizer.step()
            self.nonfinite_in_row = 0
            if t.tbptt:
                self.tbptt_state = results[0].state
            self._grow_scale()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.tbptt_state = None  # a state that saw NaNs would poison every later step; restart the memories
            if self.amp == torch.float16 and math.isfinite(loss_f) and self.loss_scale > 1.0:
                self.loss_scale, self._good_since_scale = self.loss_scale / 2, 0  # fp16 overflow, not divergence
            else:
                self.nonfinite_in_row += 1
                self.nonfinite_total += 1
                self.log(f"warning: non-finite loss/gradient at step {self.step + 1} (loss {loss_f}, grad norm "
                         f"{gn_f}); step skipped ({self.nonfinite_in_row}/{t.max_nonfinite} in a row)")
        n_tokens = sum(s[0].numel() for s in segs) * world
        self.step += 1
        self.tokens += n_tokens
        out = {"loss": float(ce) / max(n_valid, 1), "loss_total": loss_f, "lr": lr, "grad_norm": gn_f,
               "tokens": self.tokens, "step_tokens": n_tokens, "valid_tokens": n_valid, "skipped": not finite}
        for r in results:
            for k, v in to_floats(r.aux).items():
                out[f"aux/{k}"] = out.get(f"aux/{k}", 0.0) + v
            for k, v in to_floats(r.metrics).items():
                prev = out.get(f"mixer/{k}")
                if isinstance(v, list):  # histogram bins: summed elementwise over micro-batches
                    out[f"mixer/{k}"] = v if prev is None else [a + b for a, b in zip(prev, v)]
                else:
                    out[f"mixer/{k}"] = (prev or 0.0) + v / len(results)
        if self.nonfinite_in_row >= t.max_nonfinite:
            raise NonFiniteError(f"training stopped at step {self.step}: {self.nonfinite_in_row} non-finite steps in "
                                 f"a row (train.max_nonfinite); lower train.lr, raise train.warmup or check the data "
                                 f"— the last checkpoint is in {self.ckpt_root}")
        return out

    def _note_compile(self, kind: tuple) -> float | None:
        """With train.compile, say when a step meets a kind of batch (train_step's ``kind``: the reset_bound bucket and
        each micro-batch's shape and whether it has document starts inside its rows) the compiled model has not seen:
        Dynamo then compiles a new graph, which takes minutes for the memory presets, and the step would otherwise look
        stalled. Returns the start time of such a step (None otherwise)."""
        if not self.t.compile or kind in self._compiled_kinds:
            return None
        self._compiled_kinds.add(kind)
        bound, shapes = kind
        starts = f"up to {bound} document starts a row" if bound else "no document start inside the rows"
        self.log(f"torch.compile: compiling for a new kind of batch ({len(shapes)} × {list(shapes[0][0])} tokens, "
                 f"{starts}; kind {len(self._compiled_kinds)}); memory presets can take minutes "
                 f"(atlas-mag-small: 152 s with cold caches on an H100)")
        return time.perf_counter()

    def _steady_state(self, state: ModelState | None) -> bool:
        """Whether this step may run from a CUDA graph: always without tbptt; with it, only when the carried state has
        the shapes it had at the last step. A full-attention cache grows every step, and a graph per shape would be
        captured and never replayed, so those steps run eagerly; memories and windows keep fixed shapes from the
        second step on."""
        if not self.t.tbptt:
            return True
        shapes = tuple(None if x is None else (tuple(x.shape), x.dtype) for x in pytree.tree_leaves(state))
        steady, self._last_shapes = shapes == self._last_shapes, shapes
        return steady

    def _backward(self, segs: list[tuple], n_valid: int | torch.Tensor, bound: int | None,
                  step: int | torch.Tensor, scale: float | torch.Tensor, state: ModelState | None
                  ) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward of every micro-batch from the carried ``state`` (tbptt; else None), then the gradients'
        unscale and clip: (results, loss, summed CE, gradient norm). Eager, or the body of a CUDA graph (n_valid, step
        and the loss scale then device tensors: a float16 scale that halves after an overflow must not be baked into
        the graph; the state then static tensors the caller copies the carried one into)."""
        t = self.t
        world = 1 if self.dist is None else self.dist.world
        # DDP / FSDP average gradients over ranks: × world turns Σ_r W·CE_r/N back into Σ CE/N, and the auxiliary
        # losses (a mean over forwards) get weight 1/(forwards · world) so that they average over ranks too
        kw = {"normalizer": n_valid, "backward": True, "scale": scale * world, "autocast": self._autocast,
              "aux_weight": 1 / (len(segs) * world), "step": step, "loss_in_forward": True}
        with reset_bound(bound), self._attention():
            if t.tbptt:
                results = [run_segments(self._forward, segs, state, detach_every=t.detach_every, **kw)]
            else:
                results = []
                for i, s in enumerate(segs):
                    with self._grad_sync(i == len(segs) - 1):  # communicate gradients once, after the last micro-batch
                        results.append(run_segments(self._forward, [s], None, **kw))
        loss = sum(r.loss for r in results)
        ce = sum(r.ce_sum for r in results)
        if self.dist is not None:
            loss, ce, stop = self.dist.global_loss(loss, ce, n_valid, self._stop is not None)
            self._agreed_stop = (self._stop or "stop requested by another rank") if stop else None
        params = [p for p in self.model.parameters() if p.grad is not None]
        if isinstance(scale, torch.Tensor) or scale != 1.0:
            torch._foreach_div_([p.grad for p in params], scale)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.clip if t.clip > 0 else math.inf)
        if self.dist is not None:
            grad_norm = self.dist.replicated(grad_norm)
        return results, loss, ce, grad_norm

    def _grow_scale(self) -> None:
        if self.amp == torch.float16:
            self._good_since_scale += 1
            if self._good_since_scale >= 2000:
                self.loss_scale, self._good_since_scale = min(self.loss_scale * 2, 2.0**24), 0

    # ------------------------------------------------------------------------------------------- validation
    def _get_val_batches(self) -> list:
        if self._val_batches is None:
            self._val_batches = []
            if self._val_source is not None and self.t.eval_batches > 0:
                try:
                    self._val_batches = list(islice(iter(self._val_source), self.t.eval_batches))
                except UserError as e:
                    self.log(f"warning: no validation data ({e}); skipping validation — hold out more often with "
                             f"--set train.val_every_doc=N (now {self.t.val_every_doc}) or give train.val_data")
        return self._val_batches

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity over the same eval_batches batches every time ({} without val data).

        With tbptt the batches are consecutive segments of the validation streams and the state is carried."""
        batches = self._get_val_batches()
        if not batches:
            return {}
        self.model.eval()
        state, ce, n = None, 0.0, 0

        def forward(ids, st, reset, labels):
            return self.model(ids, st, reset, labels=labels, ce_chunk=self.ce_chunk)

        for b, seg in zip(batches, self._segments(batches)):
            with reset_bound(resets_bucket([b])), self._attention():
                r = run_segments(forward, [seg], state if self.t.tbptt else None, normalizer=1,
                                 autocast=self._autocast, loss_in_forward=True)
            ce += float(r.ce_sum)
            n += count_valid(seg[1])
            state = r.state
        self.model.train()
        if self.dist is not None:  # each rank evaluated its rows of the same batches
            ce, n = (float(v) for v in self.dist.all_sum([ce, n]))
        loss = ce / max(n, 1)
        self.last_val_loss = loss
        self.best_val_loss = min(self.best_val_loss, loss)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    def sample(self) -> str:
        model = self.model if self.dist is None else self.dist.sampling_model(self.model)  # rank 0 samples
        if model is None:
            return ""
        return sample_text(model, self.tok, self.t.sample_prompt, self.t.sample_tokens, seed=self.t.seed + self.step)

    # ------------------------------------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict[str, Any]:
        cursor = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        return {"step": self.step, "tokens": self.tokens, "data": cursor, "best_val_loss": _json_num(self.best_val_loss),
                "last_val_loss": _json_num(self.last_val_loss), "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_row": self.nonfinite_in_row, "loss_scale": self.loss_scale, "elapsed_s": self.elapsed,
                "started_at": self.started_at}

    def save_checkpoint(self) -> Path:
        config = {"memlm_version": 1, "model": self.cfg.model.to_dict(), "train": self.t.to_dict()}
        if self.dist is None:
            save, rng = ckpt.save_checkpoint, {"rng": ckpt.rng_state()}
        else:  # every rank writes its shards and its RNG state; rank 0 the rest
            save, rng = self.dist.save_checkpoint, {}
        path = save(self.ckpt_root, self.step, model=self.model, optimizer=self.optimizer, config=config,
                    trainer_state=self.trainer_state(), tbptt_state=self.tbptt_state if self.t.tbptt else None,
                    keep_last=self.t.keep_last, tokenizer=self.tok, **rng)
        self._last_saved = self.step
        return path

    # -------------------------------------------------------------------------------------------------- signals
    def _stopping(self) -> str | None:
        # several processes stop together, after the step at which any of them had been signalled
        return self._stop if self.dist is None else self._agreed_stop

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop is not None:  # second signal: abort now (checkpoints on disk stay intact)
            raise KeyboardInterrupt
        self._stop = signal.Signals(signum).name
        # os.write, not print: a handler may run while print holds the stream's lock
        os.write(2, f"\n{self._stop}: saving a checkpoint after this step (press Ctrl-C again to abort)\n".encode())

    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------------------------------------------ fit
    def _next_batches(self) -> list | None:
        try:
            return [next(self.data) for _ in range(self.micro_per_step)]
        except StopIteration:
            return None

    def fit(self) -> dict[str, Any]:
        """Train until train.steps (or a signal); returns the final metrics."""
        t, log = self.t, self.log
        total, non_emb = self.model.num_params(), self.model.num_params(non_embedding=True)
        log(f"model {self.cfg.model.name or '(unnamed)'}: {total:,} parameters ({non_emb:,} non-embedding); "
            f"device {self.device}, {'fp32' if self.amp is None else str(self.amp).split('.')[-1] + ' autocast'}; "
            f"{t.batch_size * t.seq_len * self.micro_per_step * (self.dist.world if self.dist else 1):,} tokens/step; "
            f"out_dir {self.out_dir}" + (f"; {self.dist.describe()}" if self.dist else ""))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = parallel.NullMetrics() if self.dist and not self.dist.is_main else MetricsLogger(
            self.out_dir, tensorboard=t.tensorboard, wandb=t.wandb, wandb_project=t.wandb_project,
            run_config={"model": self.cfg.model.to_dict(), "train": t.to_dict()}, log=log,
            resume_step=self.step if self.resumed_from else None)
        last: dict[str, Any] = {}
        val: dict[str, float] = {}
        stopped = None
        window_t, window_tok, t0 = time.perf_counter(), 0, time.perf_counter()
        with metrics, self._signals():
            while self.step < t.steps and self._stopping() is None:
                batches = self._next_batches()
                if batches is None:
                    stopped = "data exhausted"
                    log(f"training data exhausted at step {self.step}")
                    break
                last = self.train_step(batches)
                window_tok += last["step_tokens"]
                s = self.step
                if s % t.log_every == 0 or s == t.steps:
                    now = time.perf_counter()
                    tok_s = window_tok / max(now - window_t, 1e-9)
                    eta = (t.steps - s) * (now - window_t) / max(1, s % t.log_every or t.log_every)
                    window_t, window_tok = now, 0
                    log(progress_line(s, t.steps, last["loss"], last["lr"], tok_s, eta))
                    metrics.write(s, {k: v for k, v in last.items() if k not in ("step_tokens", "skipped")}
                                  | {"tok_s": tok_s})
                if t.eval_every > 0 and (s % t.eval_every == 0 or s == t.steps):
                    val = self.evaluate()
                    if val:
                        log(f"step {s}: val_loss {val['val_loss']:.4f} | val_ppl {val['val_ppl']:.2f}")
                        metrics.write(s, val)
                if t.sample_every > 0 and s % t.sample_every == 0:
                    text = self.sample()
                    log(f"step {s} sample: {text!r}")
                    metrics.write(s, {"sample": text})
                self.elapsed += time.perf_counter() - t0
                t0 = time.perf_counter()
                if t.save_every > 0 and s % t.save_every == 0:
                    self.save_checkpoint()
            if self._stopping() is not None:
                stopped = self._stopping()
            if self.step != self._last_saved:
                path = self.save_checkpoint()
                log(f"saved {path}")
        return {"step": self.step, "tokens": self.tokens, "loss": last.get("loss"), "lr": last.get("lr"),
                "val_loss": val.get("val_loss"), "val_ppl": val.get("val_ppl"),
                "best_val_loss": _json_num(self.best_val_loss), "nonfinite_steps": self.nonfinite_total,
                "stopped": stopped, "elapsed_s": self.elapsed, "checkpoint": str(ckpt.find_checkpoint(self.out_dir))
                if ckpt.list_checkpoints(self.ckpt_root) else None}


def _num(v: Any) -> float:
    return math.inf if v is None else float(v)


def _json_num(v: float) -> float | None:
    return v if math.isfinite(v) else None


def train(cfg: RunConfig, **kw: Any) -> dict[str, Any]:
    """Build a Trainer(cfg, **kw) and fit it; returns the final metrics (what the CLI prints)."""
    return Trainer(cfg, **kw).fit()
