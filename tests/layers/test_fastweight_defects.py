"""SPEC.md defects of the Onyx (HOPE) and Infini-Pythia (compressive) originals, one check each. Every check must
PASS on memlm's layer and FAIL on a deliberately broken variant built here:

  1 non-causal operators (unmasked segment attention, centred conv padding)
  3 memory shared / averaged across the batch; memory carried across a document reset
  4 learned initial memory overwritten by a later re-init, or trained only on the first step; memory detached
  5 different update schedules in training and decode (per-token writes in decode)
  6 memory updates that leak future tokens into earlier outputs
  7 memory that only learns in training mode
  and the Infini-Pythia multi-memory read by the largest normaliser instead of by content.
Plus: no information from before a reset reaches any output after it, for every fast-weight debug preset.

Notation: B batch, T tokens, C chunk / segment length (8 in the mixers built here), D width.
"""
from __future__ import annotations

import re
import types

import pytest
import torch
import torch.nn.functional as F

import memlm
import memlm.layers.compressive as comp_mod
import memlm.layers.hope as hope_mod
import memlm.ops.hope_scan.reference as hope_ref
from memlm.config.model import ModelConfig
from memlm.layers.compressive import Compressive, CompressiveConfig, content_weights
from memlm.layers.hope import Hope, HopeConfig
from memlm.layers.shortconv import ShortConv
from memlm.ops.compressive import chunked

torch.set_num_threads(1)
T = 40
D = 32


def hope(read: str = "memory") -> Hope:
    torch.manual_seed(0)
    cfg = HopeConfig(read=read, n_kv_heads=4 if read == "memory" else 2, head_dim=8, chunk_size=8)
    return Hope(cfg, ModelConfig(d_model=D, n_heads=4, layers=[cfg]), 0).eval()


def infini(**kw) -> Compressive:
    torch.manual_seed(0)
    cfg = CompressiveConfig(segment_size=8, **kw)
    return Compressive(cfg, ModelConfig(d_model=D, n_heads=4, layers=[cfg]), 0).eval()


def xs(B: int = 2, T: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def op(*args, backend=None, **kw):
    """The real segment op, for the broken wrappers below (they take what the layer passes)."""
    return chunked.segment_memory(*args, **kw)


def fails(check, *args) -> bool:
    try:
        check(*args)
    except AssertionError:
        return True
    return False


# ------------------------------------------------------------------------------------------------------ checks


@torch.no_grad()
def check_causal(f) -> None:
    """f: x [B, T, D] -> y [B, T, ·]. Perturbing token t never changes outputs before t."""
    x = xs()
    y = f(x)
    for t in (3, 12, 25):
        x2 = x.clone()
        x2[:, t:] += torch.randn_like(x2[:, t:])
        assert torch.allclose(f(x2)[:, :t], y[:, :t], atol=1e-5), f"output before {t} saw tokens ≥ {t}"


@torch.no_grad()
def check_batch_independent(m) -> None:
    x = xs(3)
    y = x.clone()
    y[1:] = xs(2, seed=5)
    for cut in (T, 13):
        a, sa = m(x[:, :cut])
        b, sb = m(y[:, :cut])
        if cut < T:
            a, _ = m(x[:, cut:], sa)
            b, _ = m(y[:, cut:], sb)
        assert torch.allclose(a[0], b[0], atol=1e-5), f"row 0 changed when other rows changed (split at {cut})"


@torch.no_grad()
def check_reset_cuts_the_past(m) -> None:
    """Changing everything before a reset changes nothing at or after it (reset on and off chunk boundaries, and
    with a state carried in from an earlier call)."""
    for r in (5, 16, 21):
        x = xs(1)
        x2 = x.clone()
        x2[:, :r] = xs(1, seed=9)[:, :r]
        reset = torch.zeros(1, T, dtype=torch.bool)
        reset[0, r] = True
        _, s1 = m(xs(1, 11, seed=3))
        _, s2 = m(xs(1, 11, seed=4))
        a, _ = m(x, s1, reset=reset)
        b, _ = m(x2, s2, reset=reset)
        assert torch.allclose(a[:, r:], b[:, r:], atol=1e-5), f"information crossed the reset at {r}"


@torch.no_grad()
def check_decode_equals_training(m) -> None:
    x = xs(2)
    full, _ = m(x)
    o, s = m(x[:, :13])
    outs = [o]
    for t in range(13, T):
        o, s = m(x[:, t: t + 1], s)
        outs.append(o)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5), "token-by-token decode differs from training"


def check_memory_carries_gradient(m) -> None:
    """Outputs of the last segment/chunk depend, through the memory, on the inputs of the first (no detach)."""
    x = xs(1).requires_grad_()
    y, _ = m(x)
    (gx,) = torch.autograd.grad(y[:, 32:].square().sum(), x)
    assert gx[:, :8].abs().sum() > 0, "no gradient from later segments reaches the first one through the memory"


@torch.no_grad()
def check_learns_in_eval_mode(m) -> None:
    m.eval()
    s0 = m.init_state(1)
    _, s = m(xs(1), s0)
    changed = [k for k, v in s.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, s0.state_dict()[k])]
    assert any(re.search(r"(mem|^M)$", k) for k in changed), f"memory not written in eval mode (changed: {changed})"


def check_initial_memory_trained_every_step(model, train_step) -> None:
    for step in range(3):
        model.zero_grad()
        train_step(model, step)
        for i, b in enumerate(model.blocks):
            g = b.mixer.mem_init.grad
            assert g is not None and g.abs().sum() > 0, f"step {step}: layer {i} initial memory got no gradient"


def check_initial_memory_survives_init(model) -> None:
    for b in model.blocks:
        dh = b.mixer.dh
        diag = torch.diagonal(b.mixer.mem_init[:, :dh], dim1=-2, dim2=-1)
        assert diag.mean() > 0.9, "the learned initial memory was overwritten after its own initialisation"


def check_content_match(weights_fn) -> None:
    """A query aligned with a small memory's keys reads that memory, not the one with the largest normaliser."""
    q = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 1, 1, 3)
    z = torch.stack([torch.tensor([0.0, 60.0, 60.0]), torch.tensor([0.3, 0.02, 0.0])]).view(1, 1, 1, 2, 3)
    w = weights_fn(q, z, torch.tensor([2.3]))
    assert w[..., 1].item() > 0.9, f"read weights {w.flatten().tolist()} ignore the content match"


def fresh_step(model, step):
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(step))
    logits, _ = model(x)
    logits.float().logsumexp(-1).mean().backward()


# ------------------------------------------------------------------------------------------- defect 1: causal


def test_segment_attention_is_causal():
    m = infini()
    check_causal(lambda x: m(x)[0])
    broken = infini()

    def unmasked(self, qg, kg, vg, valid, lay):  # the whole segment visible, as an unmasked local attention
        B, S, N, H, K = qg.shape
        q, k, v = (t.reshape(B * S, N, H, K).transpose(1, 2) for t in (qg, kg, vg))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid.reshape(B * S, 1, 1, N))
        return o.transpose(1, 2).reshape(B, S, N, H, K)

    broken._local_attention = types.MethodType(unmasked, broken)
    assert fails(check_causal, lambda x: broken(x)[0])


def test_short_conv_is_causal():
    conv = ShortConv(D, 4)
    check_causal(lambda x: conv(x)[0])
    centred = lambda x: F.conv1d(F.pad(x.transpose(1, 2), (2, 1)), conv.weight[:, None], groups=D).transpose(1, 2)
    assert fails(check_causal, centred)


# ---------------------------------------------------------------------------------- defect 3: batch and resets


def test_compressive_memory_not_shared_across_batch(monkeypatch):
    check_batch_independent(infini())

    def averaged(*a, **kw):
        num, den, zp, M, z = op(*a, **kw)
        return num, den, zp, M.mean(0, keepdim=True).expand_as(M), z.mean(0, keepdim=True).expand_as(z)

    monkeypatch.setattr(comp_mod, "segment_memory", averaged)
    assert fails(check_batch_independent, infini())


def test_hope_memory_not_shared_across_batch(monkeypatch):
    check_batch_independent(hope())
    real = hope_ref.write

    def shared(M0, *a, **kw):
        M1, *rest = real(M0, *a, **kw)
        return M1.mean(0, keepdim=True).expand_as(M1), *rest

    monkeypatch.setattr(hope_ref, "write", shared)
    assert fails(check_batch_independent, hope())


@pytest.mark.parametrize("kind", ["hope", "hope-attention", "compressive"])
def test_reset_restarts_memory(kind, monkeypatch):
    make = {"hope": hope, "hope-attention": lambda: hope("attention"), "compressive": infini}[kind]
    check_reset_cuts_the_past(make())
    mod = comp_mod if kind == "compressive" else hope_mod
    real = mod.chunk_layout

    def carried(*a, **kw):  # the memory is carried into the next document (no restart at its first chunk)
        lay = real(*a, **kw)
        lay.starts_doc = torch.zeros_like(lay.starts_doc)
        return lay

    monkeypatch.setattr(mod, "chunk_layout", carried)
    assert fails(check_reset_cuts_the_past, make())


FASTWEIGHT_DEBUG = [n for n in memlm.list_presets() if n.endswith("-debug")
                    and re.match(r"(deltanet|gated-deltanet|hope|onyx|infini-pythia)", n)]


@pytest.mark.parametrize("name", FASTWEIGHT_DEBUG)
def test_no_information_crosses_a_reset_in_any_preset(name):
    torch.manual_seed(0)
    model = memlm.build_model(name).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (1, 48), generator=g)
    with torch.no_grad():
        for r in (5, 16, 21, 32):
            x2 = x.clone()
            x2[:, :r] = torch.randint(0, 256, (1, r), generator=g)
            reset = torch.zeros_like(x, dtype=torch.bool)
            reset[:, r] = True
            a, _ = model(x, reset=reset)
            b, _ = model(x2, reset=reset)
            c, _ = model(x[:, r:])
            torch.testing.assert_close(a[:, r:], b[:, r:], msg=f"{name}: tokens before the reset at {r} leaked")
            torch.testing.assert_close(a[:, r:], c, rtol=2e-4, atol=2e-5, msg=f"{name}: packed ≠ separate at {r}")


# ---------------------------------------------------------------------------------------- defect 4: training


def test_initial_memory_trained_on_every_step():
    model = memlm.build_model("hope-debug").train()
    check_initial_memory_trained_every_step(model, fresh_step)
    carried = {}

    def carry_state(model, step):  # the original: the memory state kept across optimizer steps
        x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(step))
        logits, s = model(x, carried.get("s"))
        carried["s"] = s.detach()
        logits.float().logsumexp(-1).mean().backward()

    assert fails(check_initial_memory_trained_every_step, memlm.build_model("hope-debug").train(), carry_state)


def test_initial_memory_survives_the_generic_init():
    check_initial_memory_survives_init(memlm.build_model("onyx-debug"))
    model = memlm.build_model("onyx-debug")
    with torch.no_grad():  # the original's order: memory init first, then a blanket re-init of every matrix
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    assert fails(check_initial_memory_survives_init, model)


def test_compressive_memory_carries_gradient(monkeypatch):
    check_memory_carries_gradient(infini())

    def detached(sq, sk, v, **kw):
        return op(sq, sk.detach(), v.detach(), **kw)

    monkeypatch.setattr(comp_mod, "segment_memory", detached)
    assert fails(check_memory_carries_gradient, infini())


def test_hope_memory_carries_gradient(monkeypatch):
    check_memory_carries_gradient(hope())
    real = hope_ref.write

    def detached(M0, *a, **kw):
        M1, *rest = real(M0, *a, **kw)
        return M1.detach(), *rest

    monkeypatch.setattr(hope_ref, "write", detached)
    assert fails(check_memory_carries_gradient, hope())


# ----------------------------------------------------------------------------- defect 5: one update schedule


@pytest.mark.parametrize("kind", ["hope", "compressive"])
def test_decode_performs_the_training_writes(kind, monkeypatch):
    make = hope if kind == "hope" else infini
    check_decode_equals_training(make())
    mod = hope_mod if kind == "hope" else comp_mod
    real = mod.chunk_layout

    def per_token(pos, doc_start, reset, T, C, **kw):  # decode commits every token instead of every chunk
        lay = real(pos, doc_start, reset, T, C, **kw)
        if T == 1:
            lay.complete = lay.slot_valid.any(-1)
        return lay

    monkeypatch.setattr(mod, "chunk_layout", per_token)
    assert fails(check_decode_equals_training, make())


# ------------------------------------------------------------------------------------- defect 6: future leak


def test_compressive_memory_read_precedes_the_segment_write(monkeypatch):
    m = infini()
    check_causal(lambda x: m(x)[0])

    def read_after_write(sq, sk, v, *, M0, z0, write_slot, starts_doc, complete, **kw):
        # each segment reads the memory after its own write (what the original's update-then-retrieve did)
        M, z, outs = M0, z0, []
        for n in range(sq.shape[1]):
            seg = dict(write_slot=write_slot[:, n:n + 1], complete=complete[:, n:n + 1], **kw)
            one = (sq[:, n:n + 1], sk[:, n:n + 1], v[:, n:n + 1])
            *_, M, z = op(*one, M0=M, z0=z, starts_doc=starts_doc[:, n:n + 1], **seg)
            outs.append(op(*one, M0=M, z0=z, starts_doc=torch.zeros_like(starts_doc[:, n:n + 1]), **seg)[:3])
        return *(torch.cat(t, 1) for t in zip(*outs)), M, z

    monkeypatch.setattr(comp_mod, "segment_memory", read_after_write)
    broken = infini()
    assert fails(check_causal, lambda x: broken(x)[0])


def test_hope_quantities_come_from_the_chunk_start(monkeypatch):
    m = hope()
    check_causal(lambda x: m(x)[0])
    real = hope_ref.write

    def from_chunk_end(M0, *a, **kw):  # k, v, η, α made by the memory after the whole chunk was written
        M1, *_ = real(M0, *a, **kw)
        return real(M1, *a, **kw)

    monkeypatch.setattr(hope_ref, "write", from_chunk_end)
    broken = hope()
    assert fails(check_causal, lambda x: broken(x)[0])


# -------------------------------------------------------------------------------- defect 7 and multi-memory


@pytest.mark.parametrize("kind", ["hope", "compressive"])
def test_memory_learns_in_eval_mode(kind):
    m = hope() if kind == "hope" else infini()
    check_learns_in_eval_mode(m)
    real = m.forward
    m.forward = lambda x, state=None, **kw: (real(x, state, **kw)[0], state) if not m.training else real(x, state, **kw)
    assert fails(check_learns_in_eval_mode, m)


def test_multi_memory_reads_by_content():
    check_content_match(content_weights)

    def largest_normaliser(sq, z_pre, log_tau):
        idx = z_pre.sum(-1).argmax(-1)                                   # the memory that absorbed the most keys
        return F.one_hot(idx, z_pre.shape[-2]).float()[:, :, None].expand(*sq.shape[:4], -1)

    assert fails(check_content_match, largest_normaliser)


# ------------------------------------------------------------------------------------------- printed counts


def test_preset_descriptions_print_the_real_parameter_counts():
    from memlm.config.presets import PRESETS
    from memlm.models.lm import MemoryLM

    for name in ("deltanet-34m", "gated-deltanet-34m", "onyx-11m", "onyx-16m", "onyx-24m", "infini-pythia-70m",
                 "infini-pythia-70m-multi4", "infini-pythia-70m-hier4"):
        with torch.device("meta"):
            model = MemoryLM(memlm.preset(name).model)
        desc = PRESETS[name].description
        numbers = [int(n.replace(",", "")) for n in re.findall(r"\d{1,3}(?:,\d{3})+", desc)]
        assert numbers, f"{name}: no parameter count in {desc!r}"
        assert numbers[0] in (model.num_params(), model.num_params(non_embedding=True)), (name, numbers, desc)
        if len(numbers) > 1:
            assert numbers[1] == model.num_params(), (name, numbers)
