"""The compile-friendly paths equal the eager ones: chunk grids sized from shapes (fresh state, ``reset_bound``),
and every branch taken only inside torch.compile (always-write chunk loops, masked metrics, static compaction
widths), exercised here in eager mode by pretending to compile."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import memlm
from memlm.layers.base import collect_aux
from memlm.layers.neural_memory import polarization_weight
from memlm.ops.compressive.segments import (chunk_layout, gather_chunks, gather_tokens, pending_tail, reset_bound,
                                             static_chunks)
from memlm.ops.testing import rel_err

SLOW = pytest.mark.slow
CHUNKED = [pytest.param("hope-debug", marks=SLOW), "onyx-debug", "infini-pythia-70m-debug", pytest.param("infini-pythia-70m-hier4-debug", marks=SLOW),
           "transformer-retrieval-debug", "atlas-mag-debug", pytest.param("atlas-mal-debug", marks=SLOW),
           pytest.param("titans-lmm-debug", marks=SLOW), "oumnix-debug", pytest.param("oumnix-retrieval-debug", marks=SLOW)]
B, T = 3, 40


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (B, T), generator=g)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True
    reset[0, 7] = reset[0, 26] = reset[1, 35] = True  # row 2: one document
    return ids, reset


def _run(model, ids, reset, state=None, *, compiling=False, bound=None, monkeypatch=None):
    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model.zero_grad(set_to_none=True)
    try:
        with collect_aux(3) as box, reset_bound(bound):
            logits, st = model(ids, state, reset)
        (logits.square().mean() + sum(box["losses"].values(), 0.0)).backward()
    finally:
        monkeypatch.undo() if compiling else None
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), st.detach(), grads, box["metrics"]


@pytest.mark.parametrize("name", CHUNKED)
def test_static_layouts_and_compiled_branches_equal_eager(name, monkeypatch):
    torch.manual_seed(0)
    model = memlm.build_model(name)
    ids, reset = _data()
    # reference: an explicit initial state (not known to be fresh) and no bound: exact grids read from the device
    ref = _run(model, ids, reset, model.init_state(B))
    runs = {"fresh + bound": _run(model, ids, reset, bound=2),
            "loose bound": _run(model, ids, reset, model.init_state(B), bound=7),
            "compiled branches": _run(model, ids, reset, bound=4, compiling=True, monkeypatch=monkeypatch)}
    for what, (logits, st, grads, metrics) in runs.items():
        assert rel_err(logits, ref[0]) <= 1e-5, what
        assert grads.keys() == ref[2].keys(), what
        for n in grads:
            assert rel_err(grads[n], ref[2][n]) <= 1e-5, (what, n)
        for k, v in ref[1].state_dict().items():
            w = st.state_dict()[k]
            if w.shape == v.shape:  # a compiled global_attention cache carries extra empty slots (module docstring)
                assert torch.equal(w, v) if not w.is_floating_point() else rel_err(w, v) <= 1e-5, (what, k)
        for k, v in ref[3].items():
            assert rel_err(torch.as_tensor(metrics[k]), torch.as_tensor(v)) <= 1e-5, (what, k)


@pytest.mark.parametrize("name", ["hope-debug", "atlas-mag-debug", "infini-pythia-70m-debug"])
def test_carried_state_with_bound_equals_exact(name):
    torch.manual_seed(0)
    model = memlm.build_model(name).eval()
    ids, reset = _data(1)
    with torch.no_grad():
        _, s1 = model(ids[:, :13], None, reset[:, :13])  # pending tokens in the carried state
        want, ws = model(ids[:, 13:], s1, reset[:, 13:])
        with reset_bound(1):
            got, gs = model(ids[:, 13:], s1, reset[:, 13:])
    assert rel_err(got, want) <= 1e-5
    for k, v in ws.state_dict().items():
        assert rel_err(gs.state_dict()[k].double(), v.double()) <= 1e-5, k


def test_static_chunk_bound_holds():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        C = int(torch.randint(1, 9, (1,), generator=g))
        Tn = int(torch.randint(1, 40, (1,), generator=g))
        pos = torch.randint(0, 30, (4,), generator=g)
        doc = torch.minimum(pos, torch.randint(0, 30, (4,), generator=g))
        reset = torch.rand(4, Tn, generator=g) < 0.2
        exact = chunk_layout(pos, doc, reset, Tn, C).N
        r = int(reset[:, 1:].sum(1).max()) if Tn > 1 else 0
        with reset_bound(r):
            lay = chunk_layout(pos, doc, reset, Tn, C)
        assert lay.static and lay.N >= exact
        assert static_chunks(Tn, C, None, fresh=False) >= chunk_layout(pos, doc, None, Tn, C).N
        z = torch.zeros(4, dtype=torch.long)
        no_reset = torch.zeros(4, Tn, dtype=torch.bool)  # a reset tensor and no bound: the exact count
        assert static_chunks(Tn, C, None, fresh=True) == max(-(-Tn // C), 1) == chunk_layout(z, z, no_reset, Tn, C).N


def test_polarization_weight_tensor_step_matches_int():
    for w, warm, hold, half in [(0.1, 10, 20, 5), (0.3, 0, 0, 7), (0.2, 4, 0, 0)]:
        for step in (0, 1, 3, 9, 10, 29, 30, 31, 44, 1000):
            a = polarization_weight(step, w, warm, hold, half)
            b = polarization_weight(torch.tensor(step, dtype=torch.float64), w, warm, hold, half)
            assert abs(float(b) - a) <= 1e-12 * max(abs(a), 1e-30), (step, a, float(b))


@pytest.mark.parametrize("reset", ["none", "first", "later"])
def test_identity_layout_gathers_as_the_general_one(reset):
    """A fresh state, T a multiple of C and one document a row (no reset, or reset_bound(0)): the layout is the
    identity, its gathers are views and nothing is pending — equal to the general gathers. A reset after the first
    token (bound 1) is not the identity."""
    B, T, C = 3, 24, 8
    z = torch.zeros(B, dtype=torch.long)
    r = None if reset == "none" else torch.zeros(B, T, dtype=torch.bool)
    if r is not None:
        r[:, 0] = True
        if reset == "later":
            r[1, 13] = True
    with reset_bound(None if r is None else int(r[:, 1:].sum(1).max())):
        lay = chunk_layout(z, z, r, T, C, fresh=True)
    assert lay.identity == (reset != "later")
    general = dataclasses.replace(lay, identity=False)
    xe = torch.randn(B, C - 1 + T, 5)
    grid = torch.randn(B, lay.N, C, 5)
    for f, x in ((gather_chunks, xe), (gather_tokens, grid), (pending_tail, xe)):
        assert torch.equal(f(x, lay), f(x, general)), f.__name__
    assert not chunk_layout(z, z, None, T + 3, C, fresh=True).identity           # a partial last chunk
    assert not chunk_layout(z + 5, z, None, T, C).identity                        # tokens pending from before


def test_identity_layout_changes_no_memory_layer(monkeypatch):
    """A MAG (neural memory) and a HOPE model on a fresh state with whole chunks: outputs, states and gradients as
    with the general layout."""
    from memlm.layers import hope, neural_memory
    for preset in ("atlas-mag-debug", "onyx-debug"):
        cfg = memlm.preset(preset).model
        ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        out = []
        for ident in (True, False):
            if not ident:
                for mod in (hope, neural_memory):
                    monkeypatch.setattr(mod, "chunk_layout", lambda *a, **k: dataclasses.replace(chunk_layout(*a, **k),
                                                                                                 identity=False))
            torch.manual_seed(0)
            model = memlm.build_model(cfg)
            logits, _ = model(ids)
            logits.square().mean().backward()
            out.append((logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
            monkeypatch.undo()
        (a, ga), (b, gb) = out
        assert torch.allclose(a, b, rtol=0, atol=1e-6), preset
        assert ga.keys() == gb.keys()
        for n in ga:
            assert torch.allclose(ga[n], gb[n], rtol=1e-5, atol=1e-7), (preset, n)
