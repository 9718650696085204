"""Surprise-targeting controller (Oumnix "neurochemistry"): observed surprise tracks the target on a debug model for
a target below and one above what plain sampling gives, differs from plain sampling, moves the knobs it claims to
set, and its state is saved with a persistent session.

Notation: V vocabulary, τ* target surprise (nats), s̄ mean observed surprise.
"""
from __future__ import annotations

import math
import statistics

import pytest
import torch

import memlm
from memlm.inference.controller import ControllerConfig, SurpriseController
from memlm.inference.sampling import SamplingConfig
from memlm.inference.session import Session
from memlm.inference.store import SessionStore

WARMUP = 50  # tokens the controller needs to move μ / T from their start values
TOL = 0.25  # nats


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """transformer-debug with matrices redrawn at gain 3: random-init debug models are nearly uniform (every token
    ≈ log V surprising), which leaves a sampler nothing to steer; this one has peaked, varying distributions."""
    torch.manual_seed(0)
    m = memlm.build_model("transformer-debug").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 3.0 / math.sqrt(p.shape[-1]))
    return m


@pytest.fixture(scope="module")
def tok():
    return memlm.load_tokenizer("byte")


def observed(session: Session, n: int = 300) -> list[float]:
    """Surprises of ≥ n generated tokens over as many turns as it takes (replies end at <|end|>)."""
    out: list[float] = []
    i = 0
    while len(out) < n:
        out += session.ask(f"Tell me story number {i}.").surprise
        i += 1
    return out


def test_surprise_tracks_two_targets_and_differs_from_plain_sampling(model, tok):
    plain = observed(Session(model, tok, sampling=SamplingConfig(seed=0), max_new_tokens=100))
    plain_mean = statistics.mean(plain[WARMUP:])
    results = {}
    for target in (1.5, 3.5):  # below and above the plain-sampling surprise (≈ 2.7 nats on this model)
        s = Session(model, tok, sampling=SamplingConfig(seed=0), controller=ControllerConfig(target=target),
                    max_new_tokens=100)
        got = statistics.mean(observed(s)[WARMUP:])
        results[target] = (got, s.controller.snapshot())
        assert abs(got - target) < TOL, (target, got, s.controller.snapshot())
        assert abs(plain_mean - target) > 2 * TOL, (plain_mean, target)
    # the knobs that did it: truncation (top-k) for the low target, heat for the high one
    low, high = results[1.5][1], results[3.5][1]
    assert low["temperature"] == 1.0 and low["mu"] < 5 and low["top_k"] < 100
    assert high["temperature"] > 1.1
    assert low["exit_threshold"] != high["exit_threshold"] or low["surprise_ema"] != high["surprise_ema"]


def test_tracking_on_a_synthetic_stream():
    """Unit level: random distributions of varying sharpness, no model; the mean surprise converges to targets
    inside the feasible range, and an infeasible target saturates cleanly (μ at 0, greedy)."""
    g = torch.Generator().manual_seed(0)
    stream = [torch.randn(1, 300, generator=g) * (1 + 3 * torch.rand(1, generator=g)) for _ in range(600)]
    for target in (2.0, 3.0):
        c = SurpriseController(ControllerConfig(target=target))
        s = [c.choose(x, g)[1].surprise for x in stream]
        assert abs(statistics.mean(s[100:]) - target) < 0.15
    c = SurpriseController(ControllerConfig(target=0.01))
    steps = [c.choose(x, g)[1] for x in stream[:200]]
    assert c.mu == 0.0 and steps[-1].top_k == 1 and math.isfinite(steps[-1].surprise)


def test_penalties_still_apply_under_the_controller(model, tok):
    s = Session(model, tok, sampling=SamplingConfig(seed=0, no_repeat_ngram=1), controller=ControllerConfig(target=1.0),
                max_new_tokens=30)
    ids = s.ask("go").token_ids
    body = ids[:-1] if ids and ids[-1] == tok.special_tokens["<|end|>"] else ids
    assert len(set(body)) == len(body)  # no token repeated


def test_controller_state_is_saved_with_the_session(model, tok, tmp_path):
    store = SessionStore(tmp_path)
    s = Session(model, tok, mode="persistent", store=store, session_id="c", sampling=SamplingConfig(seed=0),
                controller=ControllerConfig(target=2.0, lr=0.2), max_new_tokens=40)
    assert s.ask("hello").completion_tokens > 0
    saved = s.controller.state_dict()
    assert saved["steps"] > 0
    again = Session(model, tok, mode="persistent", store=store, session_id="c")  # no controller given: restored
    assert again.controller is not None and again.controller.state_dict() == saved
    assert again.controller.config.lr == 0.2
    assert again.stats()["controller"]["steps"] == saved["steps"]


@pytest.mark.parametrize("bad", [{"target": 0}, {"target": float("nan")}, {"lr": 0}, {"ema": 1.0},
                                 {"temperature": 3.0}, {"max_top_k": -1}, {"exit_threshold": 0.1}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        ControllerConfig(**bad)


def test_controller_refuses_a_batch():
    with pytest.raises(ValueError, match=r"\[1, V\]"):
        SurpriseController().choose(torch.zeros(2, 10))
