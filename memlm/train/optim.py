"""Optimizers: AdamW, Lion, Muon and M3, with parameter groups.

Notation (per parameter tensor p, one optimizer step t = 1, 2, ...):
  g   gradient                       η   learning rate (group "lr" = base lr × "lr_scale")
  λ   decoupled weight decay          ε   denominator epsilon
  m   momentum (Lion, Muon's B)       μ   Muon momentum factor
  M1  M3 fast momentum                β1  its decay (also Lion's interpolation factor)
  V   second moment                   β2  its decay (also Lion's momentum decay)
  M2  M3 slow momentum                β3  its decay
  S   running gradient sum (M3)       f   M3 slow-momentum period (steps)
  α   M3 slow-momentum weight         O   Newton–Schulz (NS5) output, ≈ the orthogonal polar factor
  r,c rows, columns of a matrix (r = out_features of an nn.Linear weight)

Parameter groups (``param_groups``): no weight decay for vectors (ndim < 2), biases, norm weights and
embeddings; learning-rate scales by fnmatch pattern on the parameter name. Every group carries
"lr_scale" and "param_names" so that ``schedule.apply_lr`` can set lr = base × lr_scale on all groups.

Which matrices count as "hidden" (Muon / the M3 matrix rule): 2-D parameters that are not owned by an
nn.Embedding, whose name has no "embed", and which are not the output head. The head is recognised by
fnmatch on the parameter name, ``DEFAULT_HEAD_PATTERNS`` (top-level ``lm_head``/``head``/``output``, or any
name containing ``lm_head``/``unembed``); a tied head shares the embedding's tensor and is an embedding.

Multi-tensor paths: AdamW is fused (one kernel for all parameters) when every parameter is on CUDA, else torch's
default (foreach on CUDA); Lion and our Muon take ``foreach`` (default: on when the parameters are on CUDA), which runs
the element-wise updates as ``torch._foreach_*`` ops over a group and Muon's Newton–Schulz as one batched matmul chain
per matrix shape; the results equal the per-tensor loop. ``describe_optimizer`` names what was picked (the trainer
logs it).

All optimizer states are plain tensors and Python numbers, so ``torch.save(opt.state_dict())`` loads back
with ``torch.load(weights_only=True)``. States are kept in the parameter's dtype (torch's
``Optimizer.load_state_dict`` casts floating state to the parameter dtype, so anything else would not
resume bit-for-bit); train with float32 master weights (bf16 autocast) as the trainer does.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from fnmatch import fnmatch
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_HEAD_PATTERNS", "NS_COEFFICIENTS", "newton_schulz", "muon_lr_ratio", "param_groups",
    "build_optimizer", "describe_optimizer", "Lion", "Muon", "M3", "MultiOptimizer", "OPTIMIZERS",
]

OPTIMIZERS = ("adamw", "lion", "muon", "m3")
# Quintic Newton–Schulz coefficients (Jordan et al., the Muon write-up): steep slope at zero, so 5 steps
# push every singular value of X/‖X‖ into roughly [0.7, 1.2] instead of converging exactly to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
DEFAULT_HEAD_PATTERNS = ("lm_head.*", "head.*", "output.*", "*lm_head*", "*unembed*")


# ----------------------------------------------------------------------------------------------------------
# Newton–Schulz orthogonalisation
# ----------------------------------------------------------------------------------------------------------
def newton_schulz(x: Tensor, *, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7) -> Tensor:
    """Approximate orthogonal polar factor of x [..., r, c] by `steps` quintic Newton–Schulz iterations.

    X ← x / max(‖x‖_F, eps); repeat: A = X Xᵀ, X ← a X + (b A + c A²) X. Works on the smaller side (the
    transpose when r > c: the polynomial commutes with transposition, so only the cost changes). The maths
    runs in float32 (float64 inputs stay float64) because bf16 matmuls lose the small singular values on
    CPU; the result is cast back to x's dtype. Differentiable (no in-place ops), batched over leading dims.
    A zero matrix maps to zero.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix [..., r, c], got shape {tuple(x.shape)}")
    a, b, c = coefficients
    work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    tall = work.shape[-2] > work.shape[-1]
    if tall:
        work = work.transpose(-2, -1)
    work = work / work.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    for _ in range(steps):
        gram = work @ work.transpose(-2, -1)
        work = a * work + (b * gram + c * (gram @ gram)) @ work
    if tall:
        work = work.transpose(-2, -1)
    return work.to(x.dtype)


def muon_lr_ratio(shape: torch.Size | tuple[int, ...], adjust_lr_fn: str | None = None) -> float:
    """Muon's per-matrix LR multiplier, torch.optim.Muon's ``adjust_lr_fn`` conventions.

    "original" (default, None): √max(1, r/c) — Jordan's Muon; keeps the update's RMS per input unit
    consistent across rectangular shapes. "match_rms_adamw": 0.2·√max(r, c) — Moonshot's rule, makes the
    update RMS ≈ AdamW's so the AdamW learning rate and weight decay can be reused unchanged.
    """
    r, c = shape[0], shape[1]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, r / c))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(r, c))
    raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r} is not one of None, 'original', 'match_rms_adamw'")


# ----------------------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------------------
def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None:
        norm_types = norm_types + (rms,)
    # Our own norms (memlm.layers.norm.RMSNorm, ...) are recognised by class name, to avoid an import cycle.
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def _classify(model: nn.Module, head_patterns: Iterable[str]) -> list[tuple[str, Tensor, bool, bool]]:
    """(name, param, decay, hidden_matrix) for each trainable parameter, in named_parameters order."""
    owners: dict[int, list[nn.Module]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    head_patterns = tuple(head_patterns)
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mods = owners.get(id(p), [])
        embed = "embed" in name.lower() or any(isinstance(m, nn.Embedding) for m in mods)
        norm = any(_is_norm(m) for m in mods)
        bias = name.rsplit(".", 1)[-1].endswith("bias")
        decay = not (p.ndim < 2 or norm or bias or embed)
        head = any(fnmatch(name, pat) for pat in head_patterns)
        hidden = p.ndim == 2 and not (embed or norm or bias or head)
        out.append((name, p, decay, hidden))
    return out


def _lr_scale(name: str, lr_scales: dict[str, float] | None) -> float:
    for pattern, scale in (lr_scales or {}).items():
        if fnmatch(name, pattern):  # first matching pattern wins (dict order)
            return float(scale)
    return 1.0


def param_groups(model: nn.Module, *, weight_decay: float, lr_scales: dict[str, float] | None = None,
                 split_matrices: bool = False, head_patterns: Iterable[str] = DEFAULT_HEAD_PATTERNS) -> list[dict]:
    """Split model's trainable parameters into optimizer groups.

    Keys of each group: "params", "param_names", "weight_decay" (weight_decay or 0.0), "lr_scale" (from the
    first fnmatch pattern in lr_scales matching the parameter name, else 1.0) and, with split_matrices,
    "matrix" (True for hidden 2-D weights that Muon / M3's matrix rule should handle). No decay for
    ndim < 2, biases, parameters owned by a norm module, and embeddings (owned by nn.Embedding or with
    "embed" in the name). Parameters with requires_grad=False are left out. Group order is deterministic
    (first appearance in named_parameters), so a saved optimizer state loads into a rebuilt optimizer.
    """
    groups: dict[tuple, dict] = {}
    for name, p, decay, hidden in _classify(model, head_patterns):
        scale = _lr_scale(name, lr_scales)
        key = (decay, scale, hidden) if split_matrices else (decay, scale)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": scale}
            if split_matrices:
                groups[key]["matrix"] = hidden
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------------------
# Lion

def _default_foreach(params: Iterable) -> bool:
    """Multi-tensor updates pay off on CUDA (fewer kernel launches); the per-tensor loop is as fast on the CPU."""
    params = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return bool(params) and all(p.is_cuda for p in params)


def _run_closure(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """The optimizer-step closure protocol: re-evaluate the loss with gradients enabled, if a closure is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


# ----------------------------------------------------------------------------------------------------------
class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    u = sign(β1 m + (1 − β1) g);  p ← p − η (u + λ p);  m ← β2 m + (1 − β2) g.
    The paper's defaults are betas=(0.9, 0.99) and an LR 3–10× smaller than AdamW's (sign updates have
    RMS 1), with λ 3–10× larger to keep η·λ similar.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, foreach: bool | None = None) -> None:
        if lr < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"Lion: invalid lr={lr}, betas={betas} or weight_decay={weight_decay}")
        params = list(params)
        foreach = _default_foreach(params) if foreach is None else foreach
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay, "foreach": foreach})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            if group["foreach"]:
                self._step_foreach(group)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = torch.sign(m * b1 + p.grad * (1 - b1))
                p.mul_(1 - lr * wd).add_(update, alpha=-lr)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss

    def _step_foreach(self, group: dict) -> None:
        """The loop above as multi-tensor ops over the group: the same operations in the same order."""
        lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if "exp_avg" not in self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p)
        grads = [p.grad for p in params]
        ms = [self.state[p]["exp_avg"] for p in params]
        update = torch._foreach_add(torch._foreach_mul(ms, b1), torch._foreach_mul(grads, 1 - b1))
        torch._foreach_sign_(update)
        torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, update, alpha=-lr)
        torch._foreach_mul_(ms, b2)
        torch._foreach_add_(ms, grads, alpha=1 - b2)


# ----------------------------------------------------------------------------------------------------------
# Muon
# ----------------------------------------------------------------------------------------------------------
class Muon(torch.optim.Optimizer):
    """Muon for 2-D hidden weight matrices (our implementation; same arguments as torch.optim.Muon).

    B ← μ B + g;  U = g + μ B (Nesterov) or B;  O = NS5(U);  p ← p (1 − η λ) − η · ratio(r, c) · O,
    ratio from ``muon_lr_ratio(shape, adjust_lr_fn)``: √max(1, r/c) by default (torch's "original").
    torch keeps B as an EMA (B ← μ B + (1 − μ) g); that differs from ours by a constant factor that NS
    normalisation removes, so both produce the same update. Unlike torch (bf16 NS), NS runs in float32.
    Embeddings, the output head, norms and biases belong to another optimizer (see ``build_optimizer``).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None,
                 foreach: bool | None = None) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"Muon: invalid lr={lr}, momentum={momentum} or weight_decay={weight_decay}")
        muon_lr_ratio((1, 1), adjust_lr_fn)  # validates the name
        params = list(params)
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": tuple(ns_coefficients), "eps": eps, "ns_steps": ns_steps,
                    "adjust_lr_fn": adjust_lr_fn, "foreach": _default_foreach(params) if foreach is None else foreach}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            if group["foreach"]:
                self._step_foreach(group)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                update = p.grad + mu * buf if group["nesterov"] else buf
                ortho = newton_schulz(update, steps=group["ns_steps"], coefficients=group["ns_coefficients"],
                                      eps=group["eps"])
                p.mul_(1 - lr * wd).add_(ortho, alpha=-lr * muon_lr_ratio(p.shape, group["adjust_lr_fn"]))
        return loss

    def _step_foreach(self, group: dict) -> None:
        """The loop above with multi-tensor momentum/decay ops and one batched Newton–Schulz per matrix shape."""
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        updates = torch._foreach_add(grads, torch._foreach_mul(bufs, mu)) if group["nesterov"] else bufs
        by_shape: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append(i)
        torch._foreach_mul_(params, 1 - lr * wd)
        for (shape, _, _), idx in by_shape.items():
            ortho = newton_schulz(torch.stack([updates[i] for i in idx]), steps=group["ns_steps"],
                                  coefficients=group["ns_coefficients"], eps=group["eps"])
            torch._foreach_add_([params[i] for i in idx], list(ortho.unbind(0)),
                                alpha=-lr * muon_lr_ratio(shape, group["adjust_lr_fn"]))


# ----------------------------------------------------------------------------------------------------------
# M3 (Onyx / Nested Learning's multi-scale momentum)
# ----------------------------------------------------------------------------------------------------------
class M3(torch.optim.Optimizer):
    """M3: fast and slow momentum, each orthogonalised, with an Adam second moment (SPEC.md, Onyx).

    Matrix rule (group "matrix" True, or None and p.ndim == 2), at step t, with D = √V̂ + ε:
        M1 ← β1 M1 + g;   V ← β2 V + (1 − β2) g²;   S ← S + g
        if t % f == 0:   M2 ← β3 M2 + S;  S ← 0;  O2 = NS5(M2 / D)          (O2 = 0 until the first refresh)
        p ← p (1 − η λ) − η · 0.2 √max(r, c) · (NS5(M1 / D) + α O2)          (matrix_rule="preconditioned")
    with V̂ = V / (1 − β2^t) when v_bias_correction (default). The second moment preconditions the momenta
    BEFORE the orthogonalisation (M / D is Adam's dimensionless, bounded direction), and 0.2 √max(r, c) is
    Moonshot's "match_rms_adamw" factor (``muon_lr_ratio``), which makes the update's RMS ≈ 0.2 like AdamW's:
    the matrices and the Adam-rule vectors share one learning rate, and the step does not depend on the
    gradient's scale (multiplying the loss by c leaves it unchanged, up to ε).

    matrix_rule="spec" is the SPEC formula p ← p (1 − η λ) − η (NS5(M1) + α NS5(M2)) / D (literally so with
    v_bias_correction=False: SPEC uses V itself). It is kept for reference but is ill-posed: NS5 outputs have entries ≈ 1/√max(r, c) whatever ‖g‖ is, and they are
    divided entry by entry by √V̂ ≈ |g| of an UNRELATED entry, so an entry moves by ≈ η / (|g_ij| √max(r, c)),
    unbounded where |g_ij| is small (η · O_ij / ε where it is 0). On onyx-11m (lr 1e-3, clipped gradients
    of ~1e-5 per entry) the first step moved hidden matrices by up to 1e4 and left the network dead (uniform
    logits, then NaN). With "spec" the matrices need an LR orders of magnitude below the vectors', and the
    right one depends on the model size and the gradient scale.
    O2 is cached between refreshes because M2 only changes then (it uses D of the refresh step).
    Vector rule (everything else): AdamW with bias correction on m = EMA_β1(g) and V.
    Defaults: betas=(0.9, 0.95), beta3=0.9, alpha=1.0, slow_every f=8, eps=1e-8, 5 NS steps — our choices,
    not values from the paper.
    """

    MATRIX_RULES = ("preconditioned", "spec")

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 beta3: float = 0.9, alpha: float = 1.0, slow_every: int = 8, eps: float = 1e-8,
                 weight_decay: float = 0.0, ns_steps: int = 5,
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, ns_eps: float = 1e-7,
                 v_bias_correction: bool = True, matrix: bool | None = None,
                 matrix_rule: str = "preconditioned", foreach: bool | None = None) -> None:
        if lr < 0 or weight_decay < 0 or slow_every < 1 or not all(0 <= b < 1 for b in (*betas, beta3)):
            raise ValueError(f"M3: invalid lr={lr}, betas={betas}, beta3={beta3}, slow_every={slow_every} "
                             f"or weight_decay={weight_decay}")
        if matrix_rule not in self.MATRIX_RULES:
            raise ValueError(f"M3: matrix_rule={matrix_rule!r} is not one of {', '.join(self.MATRIX_RULES)}")
        defaults = {"lr": lr, "betas": tuple(betas), "beta3": beta3, "alpha": alpha, "slow_every": slow_every,
                    "eps": eps, "weight_decay": weight_decay, "ns_steps": ns_steps,
                    "ns_coefficients": tuple(ns_coefficients), "ns_eps": ns_eps,
                    "v_bias_correction": v_bias_correction, "matrix": matrix, "matrix_rule": matrix_rule}
        params = list(params)
        defaults["foreach"] = _default_foreach(params) if foreach is None else foreach
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, matrix: bool) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)  # M1 (matrices) or m (vectors)
            state["exp_avg_sq"] = torch.zeros_like(p)  # V
            if matrix:
                state["grad_sum"] = torch.zeros_like(p)  # S
                state["slow"] = torch.zeros_like(p)  # M2
                state["slow_ortho"] = torch.zeros_like(p)  # O2 = NS5(M2)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, (b1, b2), wd, eps = group["lr"], group["betas"], group["weight_decay"], group["eps"]
            if group.get("foreach"):
                self._step_foreach(group)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                matrix = group["matrix"] if group["matrix"] is not None else p.ndim == 2
                state = self._init_state(p, matrix)
                state["step"] += 1
                t = state["step"]
                v = state["exp_avg_sq"]
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.mul_(1 - lr * wd)
                if matrix:
                    ns = {"steps": group["ns_steps"], "coefficients": group["ns_coefficients"], "eps": group["ns_eps"]}
                    m1 = state["exp_avg"].mul_(b1).add_(g)
                    state["grad_sum"].add_(g)
                    v_hat = v / (1 - b2 ** t) if group["v_bias_correction"] else v
                    denom = v_hat.sqrt().add_(eps)
                    spec = group.get("matrix_rule", "preconditioned") == "spec"
                    if t % group["slow_every"] == 0:
                        state["slow"].mul_(group["beta3"]).add_(state["grad_sum"])
                        state["grad_sum"].zero_()
                        slow = state["slow"] if spec else state["slow"] / denom
                        state["slow_ortho"].copy_(newton_schulz(slow, **ns))
                    if spec:
                        direction = newton_schulz(m1, **ns) + group["alpha"] * state["slow_ortho"]
                        p.addcdiv_(direction, denom, value=-lr)
                    else:
                        direction = newton_schulz(m1 / denom, **ns) + group["alpha"] * state["slow_ortho"]
                        p.add_(direction, alpha=-lr * muon_lr_ratio(p.shape, "match_rms_adamw"))
                else:
                    m = state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                    denom = (v / (1 - b2 ** t)).sqrt().add_(eps)
                    p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        return loss

    def _step_foreach(self, group: dict) -> None:
        """The loop above as multi-tensor ops over the group, and the Newton–Schulz iterations batched per matrix
        shape (one matmul chain for all matrices of a shape instead of one per matrix): the same update."""
        lr, (b1, b2), wd, eps = group["lr"], group["betas"], group["weight_decay"], group["eps"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        is_matrix = [group["matrix"] if group["matrix"] is not None else p.ndim == 2 for p in params]
        states = [self._init_state(p, m) for p, m in zip(params, is_matrix)]
        for st in states:
            st["step"] += 1
        grads = [p.grad for p in params]
        vs = [st["exp_avg_sq"] for st in states]
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
        torch._foreach_mul_(params, 1 - lr * wd)
        vec = [i for i, m in enumerate(is_matrix) if not m]
        if vec:
            ps, gs = [params[i] for i in vec], [grads[i] for i in vec]
            ms = [states[i]["exp_avg"] for i in vec]
            ts = [states[i]["step"] for i in vec]
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, gs, alpha=1 - b1)
            denom = torch._foreach_sqrt(torch._foreach_div([vs[i] for i in vec], [1 - b2 ** t for t in ts]))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, ms, denom, [-lr / (1 - b1 ** t) for t in ts])
        mat = [i for i, m in enumerate(is_matrix) if m]
        if not mat:
            return
        ns = {"steps": group["ns_steps"], "coefficients": group["ns_coefficients"], "eps": group["ns_eps"]}
        spec = group.get("matrix_rule", "preconditioned") == "spec"
        m1s = [states[i]["exp_avg"] for i in mat]
        gs = [grads[i] for i in mat]
        torch._foreach_mul_(m1s, b1)
        torch._foreach_add_(m1s, gs)
        torch._foreach_add_([states[i]["grad_sum"] for i in mat], gs)
        v_hat = ([vs[i] for i in mat] if not group["v_bias_correction"]
                 else torch._foreach_div([vs[i] for i in mat], [1 - b2 ** states[i]["step"] for i in mat]))
        denoms = torch._foreach_sqrt(v_hat)
        torch._foreach_add_(denoms, eps)
        den = dict(zip(mat, denoms))
        by_shape: dict[tuple, list[int]] = {}
        for i in mat:
            by_shape.setdefault((tuple(params[i].shape), params[i].dtype, params[i].device), []).append(i)
        for (shape, _, _), idx in by_shape.items():
            refresh = [i for i in idx if states[i]["step"] % group["slow_every"] == 0]
            if refresh:
                slows = [states[i]["slow"] for i in refresh]
                sums = [states[i]["grad_sum"] for i in refresh]
                torch._foreach_mul_(slows, group["beta3"])
                torch._foreach_add_(slows, sums)
                torch._foreach_zero_(sums)
                x = slows if spec else torch._foreach_div(slows, [den[i] for i in refresh])
                ortho = newton_schulz(torch.stack(x), **ns)
                torch._foreach_copy_([states[i]["slow_ortho"] for i in refresh], list(ortho.unbind(0)))
            x = [states[i]["exp_avg"] for i in idx]
            if not spec:
                x = torch._foreach_div(x, [den[i] for i in idx])
            direction = list(newton_schulz(torch.stack(x), **ns).unbind(0))
            torch._foreach_add_(direction, [states[i]["slow_ortho"] for i in idx], alpha=group["alpha"])
            ps = [params[i] for i in idx]
            if spec:
                torch._foreach_addcdiv_(ps, direction, [den[i] for i in idx], value=-lr)
            else:
                torch._foreach_add_(ps, direction, alpha=-lr * muon_lr_ratio(shape, "match_rms_adamw"))


# ----------------------------------------------------------------------------------------------------------
# Several optimizers behind one interface
# ----------------------------------------------------------------------------------------------------------
class MultiOptimizer:
    """Several optimizers over disjoint parameters, used as one (Muon for matrices + AdamW for the rest).

    ``param_groups`` is the concatenation of the inner optimizers' group dicts (the same objects), so
    ``schedule.apply_lr`` and anything that edits group["lr"] reaches every group.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("MultiOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @property
    def defaults(self) -> dict:
        return self.optimizers[0].defaults

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _run_closure(closure)
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict.get("optimizers")
        if not isinstance(inner, list) or len(inner) != len(self.optimizers):
            raise ValueError(f"optimizer state holds {len(inner) if isinstance(inner, list) else 'no'} inner "
                             f"optimizers, this MultiOptimizer has {len(self.optimizers)}")
        for opt, sd in zip(self.optimizers, inner):
            opt.load_state_dict(sd)

    def __repr__(self) -> str:
        return "MultiOptimizer(" + ", ".join(type(o).__name__ for o in self.optimizers) + ")"


# ----------------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------------
_EXTRA = {
    "adamw": set(),
    "lion": set(),
    "muon": {"momentum", "nesterov", "ns_steps", "adjust_lr_fn", "muon_lr", "muon_impl", "head_patterns"},
    "m3": {"beta3", "alpha", "slow_every", "ns_steps", "v_bias_correction", "matrix_rule", "head_patterns"},
}


def _adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
           fused: bool | None, foreach: bool | None = None) -> torch.optim.AdamW:
    """Fused (one kernel) when every parameter is on CUDA unless fused=False; otherwise ``foreach`` (None: torch's
    default, multi-tensor on CUDA, a per-tensor loop on the CPU)."""
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None,
                             foreach=None if fused else foreach)


def describe_optimizer(opt: Any) -> str:
    """What runs the update, e.g. "AdamW(fused)", "MultiOptimizer(Muon(foreach) + AdamW(fused))", "M3(for-loop)"."""
    if isinstance(opt, MultiOptimizer):
        return "MultiOptimizer(" + " + ".join(describe_optimizer(o) for o in opt.optimizers) + ")"
    g = opt.param_groups[0] if opt.param_groups else {}
    if g.get("fused"):
        mode = "fused"
    elif g.get("foreach") or (g.get("foreach") is None and isinstance(opt, torch.optim.AdamW)
                               and _default_foreach(opt.param_groups)):
        mode = "foreach"
    else:
        mode = "for-loop"
    return f"{type(opt).__name__}({mode})"


def build_optimizer(model: nn.Module, *, name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    lr_scales: dict[str, float] | None = None, fused: bool | None = None,
                    foreach: bool | None = None, **extra: Any) -> torch.optim.Optimizer | MultiOptimizer:
    """Build the optimizer `name` (adamw, lion, muon, m3) over model's trainable parameters.

    Groups come from ``param_groups``; each group's initial lr is lr × lr_scale (``schedule.apply_lr``
    keeps that relation). `fused` applies to AdamW (default: fused when every parameter is on CUDA); `foreach` to
    AdamW when not fused, Lion, our Muon and M3 (default: on when every parameter is on CUDA; torch's default for
    AdamW).
    betas go to AdamW, Lion (its paper uses (0.9, 0.99)) and M3 (β1, β2).

    muon: a MultiOptimizer of Muon (hidden matrices) + AdamW (embeddings, head, norms, biases).
      extra: momentum=0.95, nesterov=True, ns_steps=5, adjust_lr_fn=None ("original": √max(1, r/c);
      "match_rms_adamw": 0.2·√max(r, c), which lets Muon share AdamW's lr), muon_lr=None (the matrices'
      base LR; stored as a larger lr_scale so one schedule drives both, e.g. lr=3e-4, muon_lr=0.02 for
      "original"), muon_impl="auto" (torch.optim.Muon when installed, else ours; or "torch" / "memlm"),
      head_patterns=DEFAULT_HEAD_PATTERNS.
    m3: one M3 optimizer; hidden matrices get the matrix rule, the rest the AdamW rule (one lr for both with the
      default matrix_rule="preconditioned"). extra: beta3=0.9, alpha=1.0, slow_every=8, ns_steps=5,
      v_bias_correction=True, matrix_rule="preconditioned" (or "spec", the literal SPEC formula, see M3),
      head_patterns.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name {name!r} is not one of {', '.join(OPTIMIZERS)}")
    unknown = set(extra) - _EXTRA[name]
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for optimizer {name!r}; "
                         f"allowed: {sorted(_EXTRA[name]) or 'none'}")
    head_patterns = extra.pop("head_patterns", DEFAULT_HEAD_PATTERNS)
    groups = param_groups(model, weight_decay=weight_decay, lr_scales=lr_scales,
                          split_matrices=name in ("muon", "m3"), head_patterns=head_patterns)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    for g in groups:
        g["lr"] = lr * g["lr_scale"]

    if name == "adamw":
        return _adamw(groups, lr, betas, eps, fused, foreach)
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas, weight_decay=weight_decay, foreach=foreach)
    if name == "m3":
        return M3(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, **extra)

    flags = [g.pop("matrix") for g in groups]
    matrices = [g for g, is_matrix in zip(groups, flags) if is_matrix]
    rest = [g for g, is_matrix in zip(groups, flags) if not is_matrix]
    muon_lr = extra.pop("muon_lr", None)
    if muon_lr is not None:
        if lr <= 0:
            raise ValueError(f"muon_lr needs a positive base lr to express it as an lr_scale, got lr={lr}")
        for g in matrices:
            g["lr_scale"] *= muon_lr / lr
            g["lr"] = lr * g["lr_scale"]
    impl = extra.pop("muon_impl", "auto")
    if impl not in ("auto", "torch", "memlm"):
        raise ValueError(f"muon_impl={impl!r} is not one of 'auto', 'torch', 'memlm'")
    torch_muon = getattr(torch.optim, "Muon", None)
    if impl == "torch" and torch_muon is None:
        raise ValueError(f"muon_impl='torch' but torch {torch.__version__} has no torch.optim.Muon")
    cls = torch_muon if impl == "torch" or (impl == "auto" and torch_muon is not None) else Muon
    optimizers: list[torch.optim.Optimizer] = []
    if matrices:
        if cls is Muon:
            extra["foreach"] = foreach
        optimizers.append(cls(matrices, lr=lr, weight_decay=weight_decay, **extra))
    if rest:
        optimizers.append(_adamw(rest, lr, betas, eps, fused, foreach))
    return MultiOptimizer(optimizers)
