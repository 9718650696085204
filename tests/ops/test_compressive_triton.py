"""Triton compressive-memory backend on CUDA at infini-pythia head shapes (K = V = 64): the op against the
token-loop reference and the chunked form, and the Compressive mixer end to end against its chunked self at awkward
lengths, fp32 and bf16, with document resets and pending tokens carried. Marked gpu (deselected by default).

Notation: B batch, T tokens, N segments, C segment length, H heads, K = V head width, R memories per head,
M [B, H, R, K, V], z [B, H, R, K] memories. Both backends compute the op in float32, so fp32 comparisons use
1e-5 (outputs and gradients); a bf16 module uses 5e-3 (outputs) and 1e-2 (gradients).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from test_compressive_triton_interp import op_inputs, run

from memlm.config.model import ModelConfig
from memlm.layers.compressive import Compressive, CompressiveConfig
from memlm.ops.compressive import chunked, reference, triton_segments
from memlm.ops.testing import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"
HEAD = 64          # infini-pythia-70m: d_model 512, 8 heads
SEG = 64           # segment length for the length sweep (the preset's 512 is covered at op level)
LENGTHS = (1, 63, 64, 65, 100, 1000)


REDUCED = {"dlog_tau"}  # per-head scalars: their gradients sum over every token (assert_close kind "sum")


def compare_all(got: dict, want: dict, dtype=torch.float32) -> None:
    for n, w in want.items():
        kind = "sum" if n in REDUCED else "grad" if n.startswith("d") else "out"
        assert_close(got[n], w, dtype=dtype, kind=kind, name=n)


@pytest.mark.parametrize("R,delta", [(1, True), (2, False), (3, True)])
def test_op_matches_reference_and_chunked(R, delta):
    x, kw = op_inputs(B=2, N=3, C=SEG, H=2, K=HEAD, V=HEAD, R=R, seed=R, device=DEVICE)
    kw["delta"] = delta
    got = run(triton_segments.segment_memory, x, kw)
    compare_all(got, run(reference.segment_memory, x, kw))
    compare_all(got, run(chunked.segment_memory, x, kw))


def test_op_at_preset_segment_length():
    """infini-pythia-70m per layer: segments of 512 tokens (eight token tiles), 8 heads."""
    x, kw = op_inputs(B=2, N=3, C=512, H=8, K=HEAD, V=HEAD, R=1, seed=9, device=DEVICE)
    kw["delta"] = True
    compare_all(run(triton_segments.segment_memory, x, kw), run(chunked.segment_memory, x, kw))


def layer_run(backend: str, dtype: torch.dtype, T: int, **cfg_kw) -> dict[str, torch.Tensor]:
    """y, final M and z, and every parameter gradient of one Compressive mixer over T tokens; resets in row 0 and,
    for T = LENGTHS[4], two calls with the pending tokens carried."""
    torch.manual_seed(0)
    cfg = CompressiveConfig(segment_size=SEG, backend=backend, **cfg_kw)
    m = Compressive(cfg, ModelConfig(d_model=2 * HEAD, n_heads=2, layers=[cfg]), 0)
    with torch.no_grad():
        m.gate.normal_()
    m = m.to(DEVICE, dtype)
    x = torch.randn(2, T, 2 * HEAD, generator=torch.Generator().manual_seed(T)).to(DEVICE, dtype)
    reset = torch.zeros(2, T, dtype=torch.bool, device=DEVICE)
    for t in (SEG // 6, 2 * SEG + SEG // 3, 5 * SEG - 20, 10 * SEG):
        if t < T:
            reset[0, t] = True
    cuts = [0, SEG // 2 + 5, T] if T == LENGTHS[4] else [0, T]
    ys, state = [], None
    for a, b in itertools.pairwise(cuts):
        y, state = m(x[:, a:b], state, reset=reset[:, a:b])
        ys.append(y)
    y = torch.cat(ys, 1)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(y.shape, generator=g).to(DEVICE)
    ((y.double() * w).sum() + state.M.double().sum() + state.z.double().sum()).backward()
    return {"y": y, "M": state.M, "z": state.z, **{f"d{n}": p.grad for n, p in m.named_parameters()}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", LENGTHS)
def test_layer_matches_chunked(T, dtype):
    compare_all(layer_run("triton", dtype, T), layer_run("chunked", dtype, T), dtype)


@pytest.mark.parametrize("T", [LENGTHS[3], LENGTHS[-1]])
def test_layer_hierarchical_matches_chunked(T):
    """infini-pythia-70m-hier4: four fine memories written round-robin and their sum."""
    compare_all(layer_run("triton", torch.float32, T, hierarchical=4), layer_run("chunked", torch.float32, T,
                                                                                   hierarchical=4))
