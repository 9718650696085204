"""Triton neural-memory backend on CUDA at the per-head shapes of atlas-mag-small (Dk = Dv = 32, E = 64, polynomial
features F = 560, C = 64): outputs, final states and gradients w.r.t. every input vs the chunked form in float64
(and the token-loop reference once), at awkward lengths, fp32 and bf16, with document resets and a carried
pending buffer; and a two-layer atlas-mag-small model end to end. Marked gpu (deselected by default).

Notation: B batch, T tokens, H heads, C chunk size, W1, W2 fast weights, S1, S2 momenta, γ η θ α gates.
Tolerances: float32 within max(1e-5, NOISE × the chunked form's own float32 error) of float64 (the Muon gradients are
ill-conditioned enough that float32 PyTorch itself misses 1e-5); bf16 inputs: outputs/states 5e-3, gradients 1e-2,
or no worse than the chunked form under bf16 autocast (what bf16 training with the PyTorch backend computes), or
NOISE × the chunked form's float32 error with Newton–Schulz in the Gram form (which bf16 inputs take).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_neural_memory_triton_interp import LEAVES, NOISE, check, compare, inputs, resets, run, run_base

import memlm
from memlm.models.lm import MemoryLM
from memlm.ops import dispatch
from memlm.ops.neural_memory import neural_memory, neural_memory_reference, triton_memory
from memlm.ops.testing import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"
ATLAS = {"H": 2, "Dk": 32, "Dv": 32, "E": 64, "poly": True}   # atlas-mag-small: head_dim 32, expansion 2, poly
C = 64
LENGTHS = (1, 63, 64, 65, 100, 1000)


def case(T: int):
    """Inputs, resets (row 0 only: both write paths run in one launch; none at T = C + 1, the reset-free kernels),
    and a split into two calls for T = LENGTHS[4] (C/2 + 5 tokens pending across the calls)."""
    x = inputs(B=2, T=T, seed=T, device=DEVICE, **ATLAS)
    positions = (C // 6, 2 * C + C // 3, 5 * C - 20, 10 * C)
    reset = None if T == C + 1 else resets(2, T, [positions, ()], device=DEVICE)
    split = C // 2 + 5 if T == LENGTHS[4] else None
    nonzero = ("q", "W1", "W2") if T < C else LEAVES if reset is not None else LEAVES[:-2]   # no W_init w/o reset
    return x, {"reset": reset, "split": split, "chunk_size": C, "poly": True}, nonzero


@pytest.mark.parametrize("opt", ["momentum", "muon"])
@pytest.mark.parametrize("T", LENGTHS)
def test_fp32_matches_chunked_float64(T, opt):
    x, kw, nonzero = case(T)
    check(x, optimizer=opt, nonzero=nonzero, **kw)


LOW = ("q", "k", "v")   # the inputs given in bf16 by the bf16 tests


def bf16_case(T: int, opt: str):
    """case(T) with q, k, v rounded to bf16 (the values triton sees), its kwargs, and the chunked form in float64."""
    x, kw, _ = case(T)
    xr = {n: (t.bfloat16().double() if n in LOW else t) for n, t in x.items()}
    kw = {**kw, "optimizer": opt}
    return xr, kw, run(neural_memory, xr, torch.float64, **kw)


@pytest.mark.parametrize("opt", ["momentum", "muon"])
@pytest.mark.parametrize("T", LENGTHS)
def test_bf16_inputs(T, opt):
    xr, kw, want = bf16_case(T, opt)
    base = run_base(xr, low=LOW, **kw)
    with torch.autocast("cuda", torch.bfloat16):   # what bf16 training computes with the PyTorch (chunked) backend
        mixed = run(neural_memory, xr, torch.float32, low=LOW, **kw)
    got = run(triton_memory.neural_memory, xr, torch.float32, low=LOW, **kw)
    assert got["o"].dtype == torch.bfloat16 and got["W1"].dtype == torch.float32
    if T == 1000:
        print(f"\n{opt} {triton_memory.precision(half=True)} T {T}: " + ", ".join(
            f"{n} {rel_err(got[n], w):.1e}/{rel_err(mixed[n], w):.1e}" for n, w in want.items()
            if w.dtype != torch.bool and w.numel()))
    # within 5e-3 (outputs, states) / 1e-2 (gradients) of float64, or no worse than the chunked form under autocast
    compare(got, want, base, floor=5e-3, grad_floor=1e-2, also=mixed)


@pytest.mark.parametrize("T", [C, 1000])
def test_walk_precision_costs_no_accuracy(T, monkeypatch):
    """Muon with bf16 inputs: the Newton–Schulz backward's walk in bf16x3 dots (NS5_GRAM_PRECISION's third entry)
    gives every output, state and gradient within 1.5× (or 1e-3) of the error, against float64, that the walk in
    TF32×3 gives (measured: ∂W2_init 5.9e-3 against 5.3e-3 at T 64). The same split in the forward chain would not
    pass (8.1e-2 there)."""
    xr, kw, want = bf16_case(T, "muon")
    got = run(triton_memory.neural_memory, xr, torch.float32, low=LOW, **kw)
    assert triton_memory.NS5_GRAM_PRECISION[2] == "bf16x3"
    monkeypatch.setattr(triton_memory, "NS5_GRAM_PRECISION", triton_memory.NS5_GRAM_PRECISION[:2] + ("tf32x3",))
    tf32x3 = run(triton_memory.neural_memory, xr, torch.float32, low=LOW, **kw)
    for n, w in want.items():
        if w.dtype != torch.bool and w.numel():
            err, ref = rel_err(got[n], w), rel_err(tf32x3[n], w)
            assert err <= max(1.5 * ref, 1e-3), f"{n}: {err:.2e} against {ref:.2e} with the TF32×3 walk"


@pytest.mark.parametrize("opt", ["momentum", "muon"])
def test_reads_in_autocast_dtype(opt, monkeypatch):
    """Under bf16 autocast the reads' weight stack is cast once and φ writes the query features in bf16, and the
    kernels take their gradients in bf16, instead of autocast casting them at every read (and the gradients back):
    outputs, states and every gradient within 5e-3 (gradients 1e-2) of float64, or 1.5× the error with the casts.
    (Not bit for bit on the GPU: a read of a sliced bf16 tensor may pick another GEMM than one of the contiguous
    cast autocast makes; the CPU test checks bit equality.)"""
    from memlm.ops.neural_memory import parallel
    xr, kw, want = bf16_case(LENGTHS[4], opt)                         # resets, a split with pending tokens
    with torch.autocast("cuda", torch.bfloat16):
        got = run(triton_memory.neural_memory, xr, torch.float32, low=LOW, **kw)
        monkeypatch.setattr(parallel, "read_dtype", lambda dt, device: dt)
        casts = run(triton_memory.neural_memory, xr, torch.float32, low=LOW, **kw)
    assert got["o"].dtype == torch.bfloat16
    for n, w in want.items():
        if w.dtype != torch.bool and w.numel():
            err, tol = rel_err(got[n], w), max(1e-2 if n.startswith("d") else 5e-3, 1.5 * rel_err(casts[n], w))
            assert err <= tol, f"{n}: {err:.2e} > {tol:.2e} (with the casts {rel_err(casts[n], w):.2e})"


@pytest.mark.parametrize("opt", ["momentum", "muon"])
def test_matches_token_reference(opt):
    T = 2 * C + 2                                                    # two writes and an open chunk
    x = inputs(B=2, T=T, seed=5, device=DEVICE, **ATLAS)
    check(x, truth=neural_memory_reference, optimizer=opt, chunk_size=C, poly=True, split=C + 6,
          reset=resets(2, T, [(C // 3, C), ()], device=DEVICE))


def test_atlas_mag_small_model_two_layers():
    """Logits and every parameter gradient of a two-layer atlas-mag-small (packed documents) with the triton
    backend vs chunked in float64."""
    cfg = memlm.preset("atlas-mag-small").model
    cfg = dataclasses.replace(cfg, layers=cfg.layers[:2])
    torch.manual_seed(0)
    base = MemoryLM(cfg).to(DEVICE).double()
    ids = torch.randint(0, cfg.vocab_size, (2, 200), device=DEVICE)
    reset = torch.zeros(2, 200, dtype=torch.bool, device=DEVICE)
    reset[0, 77] = True

    def run_model(backend: str, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = MemoryLM(cfg).to(DEVICE, dtype)
        m.load_state_dict(base.state_dict())
        with dispatch.force_backend("neural_memory", backend):
            logits, _ = m(ids, reset=reset)
        logits.double().square().mean().backward()
        return logits, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    want, gwant = run_model("chunked", torch.float64)
    b, gb = run_model("chunked", torch.float32)
    got, ggot = run_model("triton", torch.float32)
    assert rel_err(got, want) <= max(1e-5, NOISE * rel_err(b, want))
    assert ggot.keys() == gwant.keys()
    for n in gwant:
        assert rel_err(ggot[n], gwant[n]) <= max(1e-5, NOISE * rel_err(gb[n], gwant[n])), n


def test_poly_features_on_cuda_match_torch_form(monkeypatch):
    """φ on float32 CUDA tensors (Triton kernels) against its torch form, forward and backward, training shapes."""
    from memlm.ops.neural_memory import common
    x = torch.randn(4, 8, 333, 32, device=DEVICE)
    g = torch.randn(4, 8, 333, 32 + 528, device=DEVICE)

    def fb():
        xr = x.clone().requires_grad_()
        y = common.poly_features(xr)
        return y, torch.autograd.grad(y, xr, g)[0]

    y, dx = fb()
    monkeypatch.setattr(common, "POLY_TRITON", False)
    y0, dx0 = fb()
    assert torch.equal(y, y0)
    assert rel_err(dx, dx0) < 1e-6



def test_side_stream_changes_nothing(monkeypatch):
    """W2's Newton–Schulz map on a side stream (NS5_SIDE_STREAM) runs the same kernels on the same data, ordered by
    events: outputs, states and every gradient bit for bit as on one stream (bf16 inputs: the Gram-form kernels)."""
    x, kw, _ = case(LENGTHS[-1])
    kw = {**kw, "optimizer": "muon"}
    got = {}
    for side in (False, True):
        monkeypatch.setattr(triton_memory, "NS5_SIDE_STREAM", side)
        got[side] = run(triton_memory.neural_memory, x, torch.float32, low=LOW, **kw)
    for n, t in got[False].items():
        assert torch.equal(got[True][n], t), n


@pytest.mark.parametrize("opt", ["momentum", "muon"])
def test_features_inside_the_step_kernels_on_cuda(opt, monkeypatch):
    """φ of the keys made by the step kernels (POLY_IN_STEP) against the feature stream of poly_features at
    atlas-mag-small's head shapes, T 1000 with resets and bf16 q, k, v: outputs, state and every gradient bit for bit
    (the same products; ∂L/∂k by the same poly_backward kernel)."""
    x, kw, _ = case(1000)
    fused = run(triton_memory.neural_memory, x, torch.float32, optimizer=opt, low=LOW, **kw)
    monkeypatch.setattr(triton_memory, "POLY_IN_STEP", False)
    plain = run(triton_memory.neural_memory, x, torch.float32, optimizer=opt, low=LOW, **kw)
    for n, w in plain.items():
        assert torch.equal(fused[n], w), n


def test_stack_copy_casts_like_torch():
    """The reads' stack (`_read_stack`): W_init in the slots of chunks that open with a reset, the kernels' slot
    elsewhere, cast to bf16 bit for bit as PyTorch casts (the interpreter cannot show it: it rounds otherwise)."""
    B, H, K1, E, F = 3, 2, 6, 64, 560
    W, Wi = torch.randn(B, H, K1, E, F, device=DEVICE), torch.randn(H, E, F, device=DEVICE)
    head = (torch.rand(B, 9, device=DEVICE) < 0.4).to(torch.int8)
    j0, kr = 2, 5
    want = torch.where(head[:, j0:j0 + kr, None, None].bool()[:, None], Wi[None, :, None], W[:, :, :kr])
    for rd in (torch.bfloat16, torch.float32):
        assert torch.equal(triton_memory._read_stack(W, Wi, head, j0, kr, rd), want.to(rd)), rd


@pytest.mark.parametrize("opt", ["momentum", "muon"])
def test_chunk_aligned_resets_under_autocast(opt):
    """chunk_aligned_resets (W_init read from the stack, no second read) at atlas-mag-small head shapes, bf16 reads
    under autocast, resets on chunk starts (the first token, inside the scan, the open chunk at T 1000): every output,
    state and gradient within the bf16 bounds of float64, or 1.5× the error of the path with the second read."""
    T = LENGTHS[-1]
    x = {n: (t.bfloat16().double() if n in LOW else t) for n, t in inputs(B=2, T=T, seed=9, device=DEVICE,
                                                                          **ATLAS).items()}
    kw = {"chunk_size": C, "poly": True, "optimizer": opt, "split": 3 * C + 5,
          "reset": resets(2, T, [(0, 2 * C, 15 * C), (5 * C,)], device=DEVICE)}
    want = run(neural_memory, x, torch.float64, **kw)
    with torch.autocast("cuda", torch.bfloat16):
        got = run(triton_memory.neural_memory, x, torch.float32, low=LOW, chunk_aligned_resets=True, **kw)
        plain = run(triton_memory.neural_memory, x, torch.float32, low=LOW, **kw)
    for n, w in want.items():
        if w.dtype != torch.bool and w.numel():
            err, tol = rel_err(got[n], w), max(1e-2 if n.startswith("d") else 5e-3, 1.5 * rel_err(plain[n], w))
            assert err <= tol, f"{n}: {err:.2e} > {tol:.2e} (with the second read {rel_err(plain[n], w):.2e})"
