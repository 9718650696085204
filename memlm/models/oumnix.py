"""Model-level Oumnix features: PFP variance channel, the Oumnix cell, dynamic depth (early exit), WEAVE swap.

Notation: B batch, T tokens, D model width, V vocabulary, L layers, ℓ a layer, x_ℓ the residual stream after layer ℓ,
h = norm_f(x) / √(1 + v) the output hidden (v the PFP variance, 0 without PFP), p(h) = softmax(W_head h), τ a threshold.

Oumnix cell (after each layer ℓ in ``cell_layers``): two candidate updates and a verifier that scores them.
    n = RMSNorm(x_ℓ);  c_j = W_out,j SiLU(W_in,j n) (j = 1, 2);  s_j = (W_q n) · c_j / √D + b_j
    x_ℓ ← x_ℓ + Σ_j w_j c_j,   w = softmax(s) in training ("superposition"), one_hot(argmax s) at inference
    ("collapse"). Everything is per token, so the hard choice is causal and chunk invariant.

Dynamic depth (exits after each layer e in ``exit_layers``): the exit head is the model's own head, p(h_e) with
h_e = norm_f(x_e)/√(1 + v_e) — no extra parameters. Training adds the auxiliary loss
    exit_kl = w_exit · mean_e mean_t KL( stopgrad p(h_L) ‖ p(h_e) )      (self-distillation towards the final layer)
At inference (eval mode, threshold τ set) a token whose exit confidence max p(h_e) ≥ τ *exits*: its residual stream
is frozen at x_e — deeper layers still read it, so their states (KV caches, SSM/conv states) receive an entry for
every token, exactly what the same token would have written had it been processed normally with input x_e — and its
output is p(h_e). That keeps every layer's state consistent for later tokens, keeps causality (the decision for t
reads only layers ≤ e at t) and chunk invariance (a one-pass forward, a split forward and ``EarlyExitDecoder`` agree).
The compute saving comes from ``EarlyExitDecoder``: the deeper layers' work for exited tokens is deferred and done in
one batched call together with the next token that does not exit (chunk invariance makes that exact).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.layers.base import add_aux_loss, add_metric, aux_active, stream_positions
from memlm.layers.norm import RMSNorm
from memlm.layers.residual import PFPHeads, pfp_temperature, report_uncertainty
from memlm.layers.weave import apply_weave
from memlm.models.init import init_weights
from memlm.models.state import ModelState

__all__ = ["EarlyExitDecoder", "OumnixCell", "OumnixExtras", "attach_oumnix", "early_exit", "measure_early_exit"]


class _Candidate(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d, hidden, bias=False)
        self.w_out = nn.Linear(hidden, d, bias=False)  # a residual writer: scaled init (models/init.py)

    def forward(self, n: Tensor) -> Tensor:
        return self.w_out(F.silu(self.w_in(n)))


class OumnixCell(nn.Module):
    """Two candidate updates + a verifier: x [B, T, D] -> (update [B, T, D], verifier probabilities [B, T, 2])."""

    def __init__(self, d: int, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = RMSNorm(d, eps)
        self.cand = nn.ModuleList(_Candidate(d, hidden) for _ in range(2))
        self.verify = nn.Linear(d, d, bias=False)
        self.verify_bias = nn.Parameter(torch.zeros(2))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n = self.norm(x)
        c = torch.stack([m(n) for m in self.cand], dim=2)  # [B, T, 2, D]
        s = torch.einsum("btd,btjd->btj", self.verify(n).float(), c.float()) / math.sqrt(x.shape[-1])
        s = s + self.verify_bias.float()
        probs = torch.softmax(s, dim=-1)
        w = probs if self.training else F.one_hot(s.argmax(-1), 2).float()  # soft superposition / hard collapse
        return torch.einsum("btj,btjd->btd", w.to(c.dtype), c), probs


class OumnixExtras(nn.Module):
    """PFP heads, cells and exit settings of one MemoryLM; ``forward`` runs its blocks (the lm.py hook)."""

    def __init__(self, c) -> None:
        super().__init__()
        n_layers = len(c.layers)
        self.n_layers = n_layers
        self.pfp = PFPHeads(c.d_model, n_layers) if c.residual == "pfp" else None
        self.cells = nn.ModuleDict({str(i): OumnixCell(c.d_model, c.cell_d_ff or c.d_model, c.norm_eps)
                                    for i in sorted(set(c.cell_layers))})
        self.exit_layers = tuple(sorted(set(c.exit_layers)))
        self.exit_weight = c.exit_weight
        self.threshold: float | None = c.exit_threshold  # inference-time knob (``early_exit`` changes it)

    def finish(self, model, x: Tensor, var: Tensor | None) -> Tensor:
        """The output hidden h = norm_f(x) / √(1 + v)  [B, T, D]."""
        h = model.norm_f(x)
        return h if var is None else pfp_temperature(h, var)

    def run(self, model, x: Tensor, states, reset: Tensor | None, update: bool, *, start: int = 0,
            stop: int | None = None, var: Tensor | None = None, exited: Tensor | None = None,
            threshold: float | None = None, collect_exits: bool = False):
        """Blocks start … stop−1 on x [B, T, D] with their states (a sequence of stop − start LayerStates).

        var [B, T] float32: PFP variance so far (None: zeros); exited bool [B, T]: tokens whose stream is frozen.
        Returns (x, new states, var, exited, {exit layer: h_e} when collect_exits)."""
        stop = self.n_layers if stop is None else stop
        if self.pfp is not None and var is None:
            var = x.new_zeros(x.shape[:2], dtype=torch.float32)
        new_states, exit_h = [], {}
        for i, s in zip(range(start, stop), states):
            block = model.blocks[i]
            lv = self.pfp.log_var(i, block.norm1(x)) if self.pfp is not None else None
            y, s = block(x, s, reset, update)
            cell = self.cells[str(i)] if str(i) in self.cells else None  # noqa: SIM401 (ModuleDict)
            if cell is not None:
                u, probs = cell(y)
                y = y + u
                if aux_active():
                    add_metric(f"cell{i}/p0", probs[..., 0].mean().detach())
            if exited is not None:
                y = torch.where(exited[..., None], x, y)  # exited tokens keep x_e; this layer still read it
            if lv is not None:
                inc = torch.exp(lv)
                var = var + (inc if exited is None else torch.where(exited, 0.0, inc))
            x = y
            new_states.append(s)
            if i in self.exit_layers and i < self.n_layers - 1:
                if collect_exits:
                    exit_h[i] = self.finish(model, x, var)
                if threshold is not None:
                    conf = torch.softmax(model.logits(self.finish(model, x, var)).float(), -1).amax(-1)
                    exited = conf >= threshold if exited is None else exited | (conf >= threshold)
        return x, new_states, var, exited, exit_h

    def forward(self, model, x: Tensor, states, reset: Tensor | None, update: bool) -> tuple[Tensor, list]:
        """x [B, T, D] (embedded) -> (output hidden h [B, T, D], new layer states)."""
        train_exits = self.training and self.exit_layers and self.exit_weight > 0 and aux_active()
        threshold = None if self.training else self.threshold
        x, new_states, var, exited, exit_h = self.run(model, x, states, reset, update, threshold=threshold,
                                                      collect_exits=bool(train_exits))
        h = self.finish(model, x, var)
        if var is not None:
            report_uncertainty(var)
            if aux_active():
                add_metric("pfp/variance", var.mean().detach())
        if exited is not None and aux_active():
            add_metric("exit/rate", exited.float().mean())
        if exit_h:
            lf = torch.log_softmax(model.logits(h).detach().float(), -1)
            pf = lf.exp()
            for i, he in exit_h.items():
                le = torch.log_softmax(model.logits(he).float(), -1)
                kl = (pf * (lf - le)).sum(-1).mean()
                add_aux_loss("exit_kl", self.exit_weight * kl / len(exit_h))
                add_metric(f"exit{i}/agree", (le.argmax(-1) == lf.argmax(-1)).float().mean())
        return h, new_states


def attach_oumnix(model) -> OumnixExtras | None:
    """Apply the model-level Oumnix switches of ``model.config`` to a freshly initialised MemoryLM: WEAVE swaps the
    targeted Linear layers (from their initial weights); PFP, cells or exits build an OumnixExtras (initialised
    here, after the base model, so the base initialisation is the same with or without them). None when unused."""
    c = model.config
    if c.weave_rank > 0:
        apply_weave(model, c.weave_rank, c.weave_targets)
    if c.residual != "pfp" and not c.cell_layers and not c.exit_layers:
        return None
    extras = OumnixExtras(c).to(model.embed.weight.device)
    init_weights(extras, std=c.init_std, n_layers=len(c.layers))
    return extras


# ------------------------------------------------------------------------------------------------ inference


@contextlib.contextmanager
def early_exit(model, threshold: float | None) -> Iterator[None]:
    """Inside the block, eval-mode forwards of ``model`` exit early at confidence ≥ threshold (None: never)."""
    ex = getattr(model, "oumnix", None)
    if ex is None or not ex.exit_layers:
        raise ValueError("the model has no exit layers (model.exit_layers is empty)")
    prev, ex.threshold = ex.threshold, threshold
    try:
        yield
    finally:
        ex.threshold = prev


class EarlyExitDecoder:
    """Token-by-token decoding with early exit; the deeper layers' work for exited tokens is deferred and batched
    with the next token that goes deeper. All rows of a batch exit together (when every row is confident), so the
    deferred buffers stay rectangular. ``state`` (reading it runs the deferred work) equals the state a one-pass
    eval forward under ``early_exit(model, threshold)`` would have produced for the same tokens (B = 1)."""

    def __init__(self, model, threshold: float) -> None:
        ex = getattr(model, "oumnix", None)
        if ex is None or not ex.exit_layers:
            raise ValueError("the model has no exit layers (model.exit_layers is empty)")
        self.model, self.ex, self.threshold = model, ex, threshold
        cuts = [e + 1 for e in ex.exit_layers if e < ex.n_layers - 1]
        self.segments = list(zip([0, *cuts], [*cuts, ex.n_layers]))
        self._state: ModelState | None = None
        self.pending: list[Tensor | None] = [None] * len(self.segments)
        self.exits = self.steps = 0

    @torch.no_grad()
    def prefill(self, ids: Tensor, state: ModelState | None = None) -> Tensor:
        """ids [B, T] -> logits of the last token [B, V] (one pass with early exit)."""
        self.flush()
        with early_exit(self.model, self.threshold):
            logits, self._state = self.model(ids, state if state is not None else self._state)
        return logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """tokens [B] -> logits [B, V] for the next token."""
        m, ex, st = self.model, self.ex, self._state
        ids = torch.as_tensor(tokens, device=m.embed.weight.device).reshape(-1, 1)
        if st is None:
            st = m.init_state(ids.shape[0])
        x = m.embed(ids)
        if m.pos_embed is not None:
            abs_pos, doc_tok = stream_positions(st.pos, st.doc_start, None, 1)
            x = x + m.pos_embed((abs_pos - doc_tok).clamp(max=m.config.max_seq_len - 1))
        layers = list(st.layers)
        var = x.new_zeros(x.shape[:2], dtype=torch.float32) if ex.pfp is not None else None
        self.steps += 1
        logits = None
        for j, (a, b) in enumerate(self.segments):
            x_in, frozen, v_in = x, None, var
            if self.pending[j] is not None:
                p = self.pending[j]
                x_in = torch.cat([p, x], 1)
                frozen = torch.zeros(x_in.shape[:2], dtype=torch.bool, device=x.device)
                frozen[:, :p.shape[1]] = True
                if var is not None:
                    v_in = torch.cat([var.new_zeros(p.shape[:2]), var], 1)
                self.pending[j] = None
            out, new, v_out, _, _ = ex.run(m, x_in, layers[a:b], None, True, start=a, stop=b, var=v_in,
                                           exited=frozen)
            layers[a:b] = new
            x = out[:, -1:]
            var = None if v_out is None else v_out[:, -1:]
            logits = m.logits(ex.finish(m, x, var))[:, -1]
            if j < len(self.segments) - 1:
                conf = torch.softmax(logits.float(), -1).amax(-1)
                if bool((conf >= self.threshold).all()):
                    self.exits += 1
                    for k in range(j + 1, len(self.segments)):
                        q = self.pending[k]
                        self.pending[k] = x if q is None else torch.cat([q, x], 1)
                    break
        self._state = ModelState(tuple(layers), st.pos + 1, st.doc_start, st.config_hash, st.kinds)
        return logits

    @torch.no_grad()
    def flush(self) -> None:
        """Run the deferred deeper-layer work now (the exited tokens' outputs are already known)."""
        if self._state is None or all(p is None for p in self.pending):
            return
        st, layers = self._state, list(self._state.layers)
        for j, (a, b) in enumerate(self.segments):
            p = self.pending[j]
            if p is None:
                continue
            frozen = torch.ones(p.shape[:2], dtype=torch.bool, device=p.device)
            _, new, _, _, _ = self.ex.run(self.model, p, layers[a:b], None, True, start=a, stop=b, exited=frozen)
            layers[a:b] = new
            self.pending[j] = None
        self._state = ModelState(tuple(layers), st.pos, st.doc_start, st.config_hash, st.kinds)

    @property
    def state(self) -> ModelState | None:
        self.flush()
        return self._state


@torch.no_grad()
def measure_early_exit(model, ids: Tensor, thresholds: list[float | None], *, prompt_len: int = 1,
                       repeats: int = 1, clock=time.perf_counter) -> list[dict]:
    """Loss and decode speed at each threshold (None: full depth). ids [B, T] (B = 1 keeps exits per token).

    loss: mean next-token CE of a one-pass eval forward under ``early_exit`` (teacher forcing);
    tok_s: tokens per second of ``EarlyExitDecoder`` feeding ids[:, prompt_len:] one at a time after a prefill of
    the first prompt_len tokens (the None row decodes with plain full-depth steps); exit_rate: share of decode steps
    that exited early. ``clock``: time.perf_counter (wall) or time.process_time (CPU time, steadier on a busy
    machine with one thread). The model is put in eval mode."""
    model.eval()
    tgt = ids[:, 1:]
    out = []
    for tau in thresholds:
        with early_exit(model, tau):
            logits, _ = model(ids)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tgt.flatten()).item()
        best, rate = math.inf, 0.0
        for _ in range(repeats):
            if tau is None:
                _, st = model(ids[:, :prompt_len])
                t0 = clock()
                for t in range(prompt_len, ids.shape[1]):
                    _, st = model(ids[:, t:t + 1], st)
                dt = clock() - t0
            else:
                dec = EarlyExitDecoder(model, tau)
                dec.prefill(ids[:, :prompt_len])
                t0 = clock()
                for t in range(prompt_len, ids.shape[1]):
                    dec.step(ids[:, t])
                dec.flush()
                dt = clock() - t0
                rate = dec.exits / max(dec.steps, 1)
            best = min(best, dt)
        n = ids.shape[1] - prompt_len
        out.append({"threshold": tau, "loss": loss, "tok_s": n * ids.shape[0] / best, "exit_rate": rate})
    return out
