"""Chunked LM-head cross-entropy (memlm/ops/cross_entropy.py) equals the plain path: loss and gradients (hidden
states, head weight), with ignored labels, awkward chunk sizes, bf16 autocast, through the model and the trainer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.data.packing import Batch
from memlm.ops.cross_entropy import linear_ce_sum, token_ce_sum
from memlm.ops.testing import rel_err


def _inputs(N=100, D=24, V=257, seed=0, ignore_every=7):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = (torch.randn(V, D, generator=g) / D ** 0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return h, w, labels


def _loss_and_grads(fn, h, w, labels):
    h.grad = w.grad = None
    loss = fn(h, w, labels)
    (loss * 0.37).backward()  # a non-unit upstream gradient
    return loss.detach(), h.grad.clone(), w.grad.clone()


def plain(h, w, labels):
    return token_ce_sum(F.linear(h, w), labels)


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 1000])
@pytest.mark.parametrize("ignore_every", [0, 3])
def test_chunked_equals_plain_fp32(chunk, ignore_every):
    h, w, labels = _inputs(ignore_every=ignore_every)
    want = _loss_and_grads(plain, h, w, labels)
    got = _loss_and_grads(lambda *a: linear_ce_sum(*a, chunk=chunk), h, w, labels)
    for name, a, b in zip(("loss", "grad h", "grad W"), got, want):
        assert rel_err(a, b) <= 1e-5, (name, rel_err(a, b))


def test_all_ignored_gives_zero_loss_and_gradients():
    h, w, labels = _inputs()
    labels[:] = -100
    loss, gh, gw = _loss_and_grads(lambda *a: linear_ce_sum(*a, chunk=9), h, w, labels)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_chunked_equals_plain_under_bf16_autocast():
    h, w, labels = _inputs(N=130, V=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _loss_and_grads(plain, h, w, labels)
        got = _loss_and_grads(lambda *a: linear_ce_sum(*a, chunk=33), h, w, labels)
    assert rel_err(got[0], want[0]) <= 5e-3
    for a, b in zip(got[1:], want[1:]):
        assert rel_err(a, b) <= 1e-2
    assert got[1].dtype == h.dtype and got[2].dtype == w.dtype


def test_no_gradient_needed_is_just_the_loss():
    h, w, labels = _inputs()
    with torch.no_grad():
        assert rel_err(linear_ce_sum(h, w, labels, chunk=16), plain(h, w, labels)) <= 1e-5


@pytest.mark.parametrize("name", ["transformer-debug", "pythia-debug"])  # tied and untied heads
def test_model_loss_path_chunked_equals_plain(name):
    torch.manual_seed(0)
    model = memlm.build_model(name)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 250, (2, 33), generator=g)
    labels = torch.randint(0, 250, (2, 33), generator=g)
    labels[1, :5] = -100
    reset = torch.zeros(2, 33, dtype=torch.bool)
    reset[:, 0] = reset[0, 20] = True
    out = []
    for chunk in (0, 10):
        model.zero_grad(set_to_none=True)
        ce, _ = model(ids, None, reset, labels=labels, ce_chunk=chunk)
        ce.backward()
        out.append((ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = out
    logits, _ = model(ids, None, reset)
    assert rel_err(a, token_ce_sum(logits, labels)) <= 1e-6  # labels= gives what the logits give
    assert rel_err(a, b) <= 1e-5
    assert ga.keys() == gb.keys()
    for n in ga:
        assert rel_err(gb[n], ga[n]) <= 1e-5, n


def test_trainer_chunked_and_plain_cross_entropy_train_the_same(tmp_path):
    from memlm.data.tokenizer import ByteTokenizer
    from memlm.train.trainer import Trainer

    runs = []
    for mode in ("plain", "chunked"):
        cfg = memlm.preset("transformer-debug")
        cfg.train = cfg.train.replace(seq_len=24, batch_size=2, steps=3, warmup=1, eval_every=0, sample_every=0,
                                      save_every=0, tensorboard=False, device="cpu", cross_entropy=mode, ce_chunk=13)
        lines = []
        tr = Trainer(cfg, out_dir=tmp_path / mode, data=iter([]), tokenizer=ByteTokenizer(), log=lines.append)
        assert tr.ce_chunk == (13 if mode == "chunked" else 0)
        assert any(f"cross-entropy {'chunked' if mode == 'chunked' else 'plain'}" in s for s in lines)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(3):
            x = torch.randint(0, 250, (2, 25), generator=g)
            reset = torch.zeros(2, 24, dtype=torch.bool)
            reset[:, 0] = reset[1, 11] = True
            losses.append(tr.train_step(Batch(x[:, :-1], x[:, 1:].clone(), reset))["loss"])
        runs.append((losses, [p.detach().clone() for p in tr.model.parameters()]))
    (la, pa), (lb, pb) = runs
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(la, lb)), (la, lb)
    assert all(rel_err(b, a) <= 1e-4 for a, b in zip(pa, pb))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N", [1, 63, 64, 65, 100, 1000])
def test_chunked_equals_plain_cuda(N):
    h, w, labels = _inputs(N=N, D=64, V=16384, ignore_every=5)
    h, w = (t.detach().cuda().requires_grad_() for t in (h, w))
    labels = labels.cuda()
    want = _loss_and_grads(plain, h, w, labels)
    got = _loss_and_grads(lambda *a: linear_ce_sum(*a, chunk=256), h, w, labels)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = _loss_and_grads(plain, h, w, labels)
        got = _loss_and_grads(lambda *a: linear_ce_sum(*a, chunk=256), h, w, labels)
    assert rel_err(got[0], want[0]) <= 5e-3
    for a, b in zip(got[1:], want[1:]):
        assert rel_err(a, b) <= 1e-2
