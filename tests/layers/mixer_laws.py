"""Mixer-level contract laws (DESIGN.md §2) for one mixer built in isolation — used by the Oumnix operator tests.

The model-level battery (tests/test_contract.py) runs them through whole presets; here each operator is checked
alone, at a size where a leak of even one future token shows. Notation: B batch, T tokens, D width.
"""
from __future__ import annotations

import itertools

import torch

from memlm.config.model import ModelConfig
from memlm.layers.base import Mixer, MixerConfig, build_mixer


def close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=lambda m: f"{msg}: {m}")


def build(cfg: MixerConfig, d: int = 32, heads: int = 4, seed: int = 0, **model_kw) -> Mixer:
    """A mixer of config ``cfg`` inside a model config of width d, initialised like in a model, in eval mode."""
    torch.manual_seed(seed)
    mc = ModelConfig(d_model=d, n_heads=heads, layers=[cfg], **model_kw)
    m = build_mixer(cfg, mc, 0)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.normal_(mod.weight, 0.0, 0.2)
    for mod in m.modules():
        if getattr(mod, "custom_init", False) and hasattr(mod, "reset_parameters") and mod is not m:
            mod.reset_parameters()
    if getattr(m, "custom_init", False):
        m.reset_parameters()
    return m.eval()


def x_of(m: Mixer, B: int = 2, T: int = 50, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, m.d_model, generator=g)


@torch.no_grad()
def check_causal(m: Mixer, T: int = 50) -> None:
    x = x_of(m, T=T)
    base, _ = m(x)
    for t in (0, 1, T // 3, T - 1):
        y = x.clone()
        y[:, t:] += torch.randn_like(y[:, t:])
        out, _ = m(y)
        close(out[:, :t], base[:, :t], f"outputs before {t} changed when inputs ≥ {t} changed (future leak)")
        assert not torch.allclose(out[:, t], base[:, t]), f"input {t} had no effect on output {t}"


@torch.no_grad()
def check_chunks(m: Mixer, T: int = 50, cuts=(1, 7, 8, 9, 30)) -> None:
    """One call = any split with the state carried (outputs and final state); also token by token."""
    x = x_of(m, T=T)
    full, s_full = m(x)
    edges = [0, *cuts, T]
    outs, s = [], None
    for a, b in itertools.pairwise(edges):
        o, s = m(x[:, a:b], s)
        outs.append(o)
    close(torch.cat(outs, 1), full, "split run")
    for k, v in s_full.tensors().items():
        close(s.tensors()[k].float(), v.float(), f"final state {k}")
    outs, s = [], None
    for t in range(T):
        o, s = m(x[:, t:t + 1], s)
        outs.append(o)
    close(torch.cat(outs, 1), full, "token-by-token decode")


@torch.no_grad()
def check_reset(m: Mixer, T: int = 40, at: int = 17) -> None:
    """A packed row with a reset equals its two documents run alone, also with a state carried in."""
    x = x_of(m, B=2, T=T)
    reset = torch.zeros(2, T, dtype=torch.bool)
    reset[0, at] = True
    reset[1, at + 5] = True  # rows start their second document at different places
    packed, s_packed = m(x, reset=reset)
    for b, r in ((0, at), (1, at + 5)):
        a_out, _ = m(x[b:b + 1, :r])
        b_out, _ = m(x[b:b + 1, r:])
        close(packed[b:b + 1, :r], a_out, "first document")
        close(packed[b:b + 1, r:], b_out, "second document differs from running it alone")
    _, s_prev = m(x_of(m, B=2, T=9, seed=4))
    r0 = torch.zeros(2, T, dtype=torch.bool)
    r0[:, 0] = True
    fresh, _ = m(x, s_prev, reset=r0)
    alone, _ = m(x)
    close(fresh, alone, "reset at t=0 with a carried state")
    # splitting the packed rows anywhere gives the same outputs and the same final state
    outs, s = [], None
    for a, b in ((0, at - 1), (at - 1, at + 2), (at + 2, T)):
        o, s = m(x[:, a:b], s, reset=reset[:, a:b])
        outs.append(o)
    close(torch.cat(outs, 1), packed, "split packed rows")
    for k, v in s_packed.tensors().items():
        close(s.tensors()[k].float(), v.float(), f"final state {k} after resets")


@torch.no_grad()
def check_update_false(m: Mixer) -> None:
    x = x_of(m, T=20)
    _, s = m(x[:, :10])
    before = {k: v.clone() for k, v in s.tensors().items()}
    y1, _ = m(x[:, 10:], s)
    for k, v in s.tensors().items():
        assert torch.equal(v, before[k]), f"input state {k} modified in place"
    y2, s2 = m(x[:, 10:], s, update=False)
    close(y2, y1, "update=False must read the same memory")
    for k, v in s2.tensors().items():
        assert torch.equal(v, before[k]), f"update=False wrote {k}"


def check_grads(m: Mixer) -> None:
    m.train()
    x = x_of(m, T=24).requires_grad_(True)
    y, s = m(x[:, :12])
    y2, _ = m(x[:, 12:], s)
    (y.pow(2).mean() + y2.pow(2).mean()).backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, f"parameters without gradient: {dead}"
    assert x.grad[:, :12].abs().sum() > 0
    m.eval()


def check_all(m: Mixer) -> None:
    check_causal(m)
    check_chunks(m)
    check_reset(m)
    check_update_false(m)
    check_grads(m)
