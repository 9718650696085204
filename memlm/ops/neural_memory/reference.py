"""Token-by-token reference of the neural-memory op (the specification; slow, float32 or float64).

Notation:
  B batch, T tokens, H heads, Dk key width, Dv value width, F memory input width, E hidden width, C chunk size,
  c window, p pending tokens, φ feature map, M_W(x) = [x if Dk = Dv] + W2 gelu(W1 φ(x)), W = (W1 [E, F], W2 [Dv, E]),
  S = (S1, S2) momenta, γ write gates, η momentum decay, θ step size, α forgetting, j chunk index.

For every row b, chunk j (absolute positions jC .. jC+C−1 of the stream, counted from the first token ever given,
pending tokens included) and token t in it:
  read   o_t = M_{W_j}(q_t), or M_{W_init}(q_t) when a reset lies in chunk j at or before t;
  write  after the chunk's last token (only with update=True):
         r = last reset position in the chunk (none: r = chunk start; tokens before r are masked out);
         (W, S) = (W_init, 0) if the chunk holds a reset else (W_j, S_j);
         G = Σ_{i in last c tokens, i >= r} ∇_W γ_i ‖M_W(k_i) − v_i‖²   (one autograd call per token);
         η, θ, α = means over the chunk's tokens i >= r;  S <- η S − θ G;  W_{j+1} = (1 − α) W + U(S),
         U = identity ("momentum", Titans) or newton_schulz5 ("muon", Atlas).
Tokens of an incomplete chunk are read and returned in the pending buffer; they are written once a later call
completes their chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import Tensor

from .common import NeuralMemoryState, Pending, check_args, compute_dtype, features, newton_schulz5

__all__ = ["neural_memory_reference"]


def _memory(W1: Tensor, W2: Tensor, x: Tensor, poly: bool, residual: bool) -> Tensor:
    """M_W(x) for one token of one row: W1 [H, E, F], W2 [H, Dv, E], x [H, Dk] -> [H, Dv]."""
    h = Fn.gelu(torch.einsum("hef,hf->he", W1, features(x, poly)))
    y = torch.einsum("hve,he->hv", W2, h)
    return y + x if residual else y


def _with_grad(w: Tensor) -> Tensor:
    # autograd.grad needs a graph through W; a W that is a constant becomes a fresh leaf for the inner gradient only.
    return w if w.requires_grad else w.detach().requires_grad_(True)


def _write(buf: list[dict[str, Tensor]], W1: Tensor, W2: Tensor, S1: Tensor, S2: Tensor, W1_init: Tensor | None,
           W2_init: Tensor | None, c: int, optimizer: str, poly: bool, residual: bool
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One inner optimizer step on the Omega objective of a full chunk `buf` (C token records of one row)."""
    C = len(buf)
    resets = [i for i, tok in enumerate(buf) if bool(tok["reset"])]
    r = resets[-1] if resets else 0
    if resets:
        W1, W2, S1, S2 = W1_init, W2_init, torch.zeros_like(S1), torch.zeros_like(S2)
    W1, W2 = _with_grad(W1), _with_grad(W2)
    valid = buf[r:]
    eta = torch.stack([tok["eta"] for tok in valid]).mean(0)[:, None, None]  # [H, 1, 1]
    theta = torch.stack([tok["theta"] for tok in valid]).mean(0)[:, None, None]
    alpha = torch.stack([tok["alpha"] for tok in valid]).mean(0)[:, None, None]
    G1, G2 = torch.zeros_like(W1), torch.zeros_like(W2)
    for i in range(max(C - c, r), C):
        tok = buf[i]
        err = _memory(W1, W2, tok["k"], poly, residual) - tok["v"]  # [H, Dv]
        # Heads have separate weights, so the gradient of the head-sum is every head's own gradient.
        loss = (tok["gamma"] * err.square().sum(-1)).sum()
        g1, g2 = torch.autograd.grad(loss, (W1, W2), create_graph=True)
        G1, G2 = G1 + g1, G2 + g2
    S1 = eta * S1 - theta * G1
    S2 = eta * S2 - theta * G2
    U1, U2 = (newton_schulz5(S1), newton_schulz5(S2)) if optimizer == "muon" else (S1, S2)
    return (1 - alpha) * W1 + U1, (1 - alpha) * W2 + U2, S1, S2


def neural_memory_reference(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, theta: Tensor,
                            alpha: Tensor, W1: Tensor, W2: Tensor, S1: Tensor | None = None,
                            S2: Tensor | None = None, *, pending: Pending | None = None, chunk_size: int = 64,
                            window: int | None = None, optimizer: str = "momentum", update: bool = True,
                            poly: bool = False, reset: Tensor | None = None, W1_init: Tensor | None = None,
                            W2_init: Tensor | None = None, commit: Tensor | None = None,
                            chunk_aligned_resets: bool = False) -> tuple[Tensor, NeuralMemoryState]:
    """Reference neural memory; same contract as `memlm.ops.neural_memory.neural_memory` (see its docstring).

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; gamma, eta, theta, alpha [B, T, H]; W1 [B, H, E, F]; W2 [B, H, Dv, E].
    Returns o [B, T, H, Dv] (dtype of q) and the new NeuralMemoryState.
    """
    c, S1, S2, pending = check_args(q, k, v, gamma, eta, theta, alpha, W1, W2, S1, S2, pending, chunk_size,
                                    window, optimizer, poly, reset, W1_init, W2_init, commit, chunk_aligned_resets)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    dt = compute_dtype(q, k, v, W1)
    residual = Dk == Dv
    out_dtype = q.dtype
    cast = (lambda t: None if t is None else t.to(dt))
    q, k, v, gamma, eta, theta, alpha = map(cast, (q, k, v, gamma, eta, theta, alpha))
    W1_in, W2_in, S1_in, S2_in = W1, W2, S1, S2
    W1, W2, S1, S2, W1_init, W2_init = map(cast, (W1, W2, S1, S2, W1_init, W2_init))
    pending = Pending(*(t if t.dtype == torch.bool else t.to(dt) for t in pending))
    reset = torch.zeros(B, T, dtype=torch.bool, device=q.device) if reset is None else reset
    fields = ("k", "v", "gamma", "eta", "theta", "alpha", "reset")
    outs, rows = [], []
    with torch.enable_grad():  # the inner gradient is needed even when the caller runs under no_grad
        for b in range(B):
            w1, w2, s1, s2 = W1[b], W2[b], S1[b], S2[b]
            states = [(w1, w2, s1, s2)]   # after 0, 1, … complete chunks (commit picks one)
            buf = [{f: getattr(pending, f)[b, i] for f in fields} for i in range(pending.length)]
            after_reset = bool(pending.reset[b].any())
            o_row = []
            for t in range(T):
                after_reset = after_reset or bool(reset[b, t])
                rw1, rw2 = (W1_init, W2_init) if after_reset else (w1, w2)
                o_row.append(_memory(rw1, rw2, q[b, t], poly, residual))
                if not update:
                    continue
                buf.append({"k": k[b, t], "v": v[b, t], "gamma": gamma[b, t], "eta": eta[b, t],
                            "theta": theta[b, t], "alpha": alpha[b, t], "reset": reset[b, t]})
                if len(buf) == chunk_size:
                    w1, w2, s1, s2 = _write(buf, w1, w2, s1, s2, W1_init, W2_init, c, optimizer, poly, residual)
                    buf, after_reset = [], False
                    states.append((w1, w2, s1, s2))
            if commit is not None:
                w1, w2, s1, s2 = states[min(max(int(commit[b]), 0), len(states) - 1)]
            outs.append(torch.stack(o_row))
            rows.append((w1, w2, s1, s2, buf))
    o = torch.stack(outs).to(out_dtype)
    if not update:
        return o, NeuralMemoryState(W1_in, W2_in, S1_in, S2_in, pending)
    W1n, W2n, S1n, S2n = (torch.stack([r[i] for r in rows]) for i in range(4))
    p = len(rows[0][4])
    new_pending = Pending(*(
        torch.stack([torch.stack([tok[f] for tok in r[4]]) for r in rows]) if p else empty
        for f, empty in zip(fields, (t[:, :0] for t in pending))))
    return o, NeuralMemoryState(W1n, W2n, S1n, S2n, new_pending)
