"""SPEC.md Atlas-MAG defects, one test each: every check must FAIL on a deliberately broken variant built here and
PASS on memlm's atlas-mag. Defects: memory shared across the batch, gates without gradient, updates leaking future
tokens (the original's 256-token look-back update), test-time learning off at inference, random untrained
persistent memory.

Notation: B batch, T tokens, C chunk (16 in the debug preset), W SWA window (32).
"""
from __future__ import annotations

import types

import pytest
import torch

import memlm
from memlm.layers.neural_memory import MAG, NeuralMemory
from memlm.ops.neural_memory import memory_read, poly_features

torch.set_num_threads(1)

T = 48  # three chunks of 16: later chunks read what earlier ones wrote


def atlas():
    torch.manual_seed(0)
    return memlm.build_model("atlas-mag-debug")


def memories(model) -> list[NeuralMemory]:
    return [m for m in model.modules() if isinstance(m, NeuralMemory)]


def ids(B=2, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ checks

def check_batch_independent(model) -> None:
    """Row 0's outputs do not change when the other rows change, in one call and with the state carried."""
    x = ids(3)
    y = x.clone()
    y[1:] = ids(2, seed=5)
    with torch.no_grad():
        for cut in (T, 20):
            a, sa = model(x[:, :cut])
            b, sb = model(y[:, :cut])
            if cut < T:
                a, _ = model(x[:, cut:], sa)
                b, _ = model(y[:, cut:], sb)
            assert torch.allclose(a[0], b[0], atol=1e-5), f"row 0 changed when other rows changed (split at {cut})"


def check_gates_get_gradient(model) -> None:
    model.zero_grad()
    logits, _ = model(ids())
    logits[:, 16:].float().logsumexp(-1).mean().backward()
    for i, m in enumerate(memories(model)):
        g = m.gates.weight.grad
        assert g is not None, f"layer {i}: gate projection has no gradient"
        g = g.view(4, m.h, -1)
        for j, name in enumerate(("gamma", "eta", "theta", "alpha")):
            assert g[j].abs().sum() > 0, f"layer {i}: no gradient to the {name} gate"


def check_causal(model) -> None:
    x = ids()
    with torch.no_grad():
        base, _ = model(x)
        for t in (5, 20, 40):
            y = x.clone()
            y[:, t:] = (y[:, t:] + 7) % 256
            out, _ = model(y)
            assert torch.allclose(out[:, :t], base[:, :t], atol=1e-5), f"outputs before {t} depend on tokens ≥ {t}"


def check_learns_in_eval_mode(model) -> None:
    model.eval()
    x = ids()
    with torch.no_grad():
        _, state = model(x)
        fresh = model.init_state(2)
        for s, f in zip(state.layers, fresh.layers):
            assert not torch.allclose(s.mem.W1, f.mem.W1), "eval mode did not write the neural memory"
        model.train()
        _, st_train = model(x)
    model.eval()
    for s, t in zip(state.layers, st_train.layers):
        assert torch.allclose(s.mem.W1, t.mem.W1, atol=1e-6), "training and inference write differently"


def check_persistent_memory_trained(model) -> None:
    cores = [m.core for m in model.modules() if isinstance(m, MAG)]
    params = {id(p) for p in model.parameters()}
    for c in cores:
        for t in (c.persist_k, c.persist_v):
            assert isinstance(t, torch.nn.Parameter) and id(t) in params, "persistent memory is not a parameter"
    before = [c.persist_v.detach().clone() for c in cores]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logits, _ = model(ids())
    logits.float().logsumexp(-1).mean().backward()
    for c in cores:
        assert c.persist_k.grad is not None and c.persist_k.grad.abs().sum() > 0, "persistent keys get no gradient"
        assert c.persist_v.grad is not None and c.persist_v.grad.abs().sum() > 0, "persistent values get no gradient"
    opt.step()
    for c, b in zip(cores, before):
        assert not torch.equal(c.persist_v.detach(), b), "persistent memory did not change with training"


# ------------------------------------------------------------------------------------------- broken variants

def shared_memory(model):
    """The memory averaged over the batch after every write (one memory for all rows)."""
    for m in memories(model):
        orig = m._write

        def write(self, *a, _orig=orig, **kw):
            o, st = _orig(*a, **kw)
            mean = (lambda t: t.mean(0, keepdim=True).expand_as(t))
            return o, type(st)(**{**st.__dict__, "W1": mean(st.W1), "W2": mean(st.W2)})

        m._write = types.MethodType(write, m)
    return model


def detached_gates(model):
    for m in memories(model):
        orig = m.inputs

        def inputs(self, *a, _orig=orig):
            q, k, v, g, conv = _orig(*a)
            return q, k, v, g.detach(), conv

        m.inputs = types.MethodType(inputs, m)
    return model


def lookahead_update(model):
    """The original's look-back update: each token reads a memory built from a window that includes later tokens
    (here: the weights after the call's last write)."""
    for m in memories(model):
        orig = m._write

        def write(self, q, *a, _orig=orig):
            _, st = _orig(q, *a)
            qb = q.float().transpose(1, 2)
            xf = poly_features(qb) if self.cfg.poly else qb
            return memory_read(st.W1, st.W2, xf, qb).transpose(1, 2), st

        m._write = types.MethodType(write, m)
    return model


def ttl_only_in_training(model):
    for m in memories(model):
        orig = m.forward

        def forward(self, x, state=None, *, reset=None, update=True, _orig=orig):
            return _orig(x, state, reset=reset, update=update and self.training)

        m.forward = types.MethodType(forward, m)
    return model


def random_persistent_memory(model):
    """Precomputed random M_persistent that is never trained (buffers, not parameters)."""
    for mod in model.modules():
        if isinstance(mod, MAG):
            k, v = mod.core.persist_k.detach().clone(), mod.core.persist_v.detach().clone()
            del mod.core.persist_k, mod.core.persist_v
            mod.core.register_buffer("persist_k", k)
            mod.core.register_buffer("persist_v", v)
    return model


CASES = [
    ("memory shared across the batch", check_batch_independent, shared_memory),
    ("gates without gradient", check_gates_get_gradient, detached_gates),
    ("updates leaking future tokens", check_causal, lookahead_update),
    ("test-time learning off at inference", check_learns_in_eval_mode, ttl_only_in_training),
    ("random untrained persistent memory", check_persistent_memory_trained, random_persistent_memory),
]


@pytest.mark.parametrize("name,check,breaker", CASES, ids=[c[0] for c in CASES])
def test_defect(name, check, breaker):
    check(atlas())                       # memlm's implementation passes
    with pytest.raises(AssertionError):  # the broken variant is caught
        check(breaker(atlas()))
