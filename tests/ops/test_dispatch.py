"""Backend registry: automatic choice by priority and `supports`, and the three ways to name a backend."""
from __future__ import annotations

import threading

import pytest

from memlm.ops import dispatch

OP = "test_dummy_op"


@pytest.fixture(autouse=True)
def dummy_op():
    def fast(x):
        return ("fast", x)

    def slow(x):
        return ("slow", x)

    def ref(x):
        return ("ref", x)

    dispatch.register(OP, "slow", slow, priority=0)
    dispatch.register(OP, "ref", ref, priority=-100)
    # registered last but tried first; only takes even numbers (think: "Triton, CUDA, supported head size")
    dispatch.register(OP, "fast", fast, supports=lambda x: x % 2 == 0, priority=10)
    yield
    for name in ("slow", "ref", "fast", "extra"):
        dispatch.unregister(OP, name)


def test_automatic_order_and_supports():
    assert dispatch.backends(OP) == ["fast", "slow", "ref"]
    assert dispatch.call(OP, 2) == ("fast", 2)
    assert dispatch.call(OP, 3) == ("slow", 3)  # fast does not support odd inputs, so the next one is used
    assert dispatch.get(OP, args=(4,))(5) == ("fast", 5)


def test_equal_priority_keeps_registration_order():
    dispatch.register(OP, "extra", lambda x: ("extra", x), priority=0)
    assert dispatch.backends(OP) == ["fast", "slow", "extra", "ref"]


def test_force_backend_nests_and_restores():
    with dispatch.force_backend(OP, "ref"):
        assert dispatch.call(OP, 2) == ("ref", 2)
        with dispatch.force_backend(OP, "slow"):
            assert dispatch.call(OP, 2) == ("slow", 2)
        assert dispatch.call(OP, 2) == ("ref", 2)
    assert dispatch.call(OP, 2) == ("fast", 2)


def test_force_backend_is_per_thread():
    seen = []
    with dispatch.force_backend(OP, "ref"):
        t = threading.Thread(target=lambda: seen.append(dispatch.call(OP, 2)[0]))
        t.start()
        t.join()
    assert seen == ["fast"]


def test_env_var(monkeypatch):
    assert dispatch.env_var("delta_rule") == "MEMLM_BACKEND_DELTA_RULE"
    assert dispatch.env_var("ssm-scan.v2") == "MEMLM_BACKEND_SSM_SCAN_V2"
    monkeypatch.setenv(dispatch.env_var(OP), "slow")
    assert dispatch.call(OP, 2) == ("slow", 2)
    with dispatch.force_backend(OP, "ref"):  # the context is more local than the environment
        assert dispatch.call(OP, 2) == ("ref", 2)
    monkeypatch.setenv(dispatch.env_var(OP), "nonexistent")
    with pytest.raises(KeyError, match="nonexistent.*MEMLM_BACKEND_TEST_DUMMY_OP"):
        dispatch.call(OP, 2)


def test_explicit_backend_wins_and_is_checked():
    with dispatch.force_backend(OP, "ref"):
        assert dispatch.call(OP, 2, backend="slow") == ("slow", 2)
    with pytest.raises(ValueError, match="does not support"):
        dispatch.call(OP, 3, backend="fast")  # named backends never fall back silently
    with pytest.raises(KeyError, match="registered: fast, slow, ref"):
        dispatch.get(OP, "nope")


def test_errors():
    with pytest.raises(KeyError, match="no backends"):
        dispatch.get("never_registered_op")
    with pytest.raises(KeyError), dispatch.force_backend(OP, "nope"):
        pass
    with pytest.raises(ValueError, match="already registered"):
        dispatch.register(OP, "slow", lambda x: x)
    dispatch.register(OP, "slow", lambda x: ("new", x), replace=True)
    assert dispatch.call(OP, 3) == ("new", 3)
    dispatch.unregister(OP, "slow")
    assert dispatch.call(OP, 3) == ("ref", 3)
    dispatch.unregister(OP, "ref")
    with pytest.raises(ValueError, match="no backend"):
        dispatch.call(OP, 3)  # only "fast" is left and it takes even inputs only


def test_reregistering_same_function_is_idempotent():
    fn = dispatch.get(OP, "slow")
    dispatch.register(OP, "slow", fn)
    assert dispatch.backends(OP) == ["fast", "slow", "ref"]


def test_auto_condition_limits_only_the_automatic_choice():
    """A backend registered with auto= (e.g. Triton: CPU tensors only under the interpreter, by name) is skipped by
    the automatic choice when auto says no, but a name still reaches it; a call without arguments never asks its
    supports (which may need them)."""
    import torch

    def interp(x):
        return ("interp", x)

    dispatch.register(OP, "extra", interp, supports=lambda x: True, priority=20, auto=dispatch.on_cuda)
    cpu = torch.tensor(3)
    assert dispatch.get(OP, args=(cpu,)) is not interp          # the CPU tensor falls through to the next backend
    assert dispatch.get(OP, "extra", args=(cpu,)) is interp      # named: auto does not apply
    with dispatch.force_backend(OP, "extra"):
        assert dispatch.get(OP, args=(cpu,)) is interp
    b = dispatch._lookup(OP, "extra", "test")
    assert not b.auto_accepts((), {})                            # no arguments: auto says no, supports not called
    assert not dispatch.on_cuda() and not dispatch.on_cuda(cpu, 1, k=2)


def test_auto_conditions_trace_without_graph_breaks():
    """The dispatcher runs inside compiled forwards: its `on_cuda` condition must trace in one graph (a bool() of the
    argument tuple broke every compiled CUDA graph at each Triton op under torch 2.11; 2.13 traces it)."""
    import torch
    import torch._dynamo as dynamo

    def f(x):
        return x + 1 if dispatch.on_cuda(x) else x - 1

    dynamo.reset()
    out = torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(3))
    assert torch.equal(out, -torch.ones(3))
    assert dispatch.on_cuda() is False
