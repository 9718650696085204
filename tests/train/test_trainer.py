"""Tests for memlm.train.trainer and memlm.train.tbptt: label shift, overfitting, gradient accumulation with
valid-token normalisation, resume = uninterrupted (bit-exact on CPU), TBPTT = full backprop, the non-finite guard.

Notation: B rows, T tokens per row, V_used distinct token ids in random data, S segments, k = detach_every,
N valid target tokens of one optimizer step.
"""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

import memlm
from memlm.data.packing import Batch, Packer
from memlm.data.tokenizer import ByteTokenizer
from memlm.errors import UserError
from memlm.ops.testing import assert_close, rel_err
from memlm.train.metrics import read_jsonl
from memlm.train.tbptt import IGNORE, tbptt_loss, token_ce_sum
from memlm.train.trainer import NonFiniteError, Trainer, train

TEXT = ("Memory is the treasury and guardian of all things. The river keeps its course by the stones it has "
        "carried; the child keeps the tune her grandmother sang. A ship in harbour is safe, but that is not what "
        "ships are for. Every morning the baker counts the loaves, and every evening he counts the coins. ")


pytestmark = pytest.mark.usefixtures("one_thread")


def texts(n: int = 60) -> list[str]:
    words = TEXT.split()
    return [" ".join(words[(7 * i) % len(words):] + words[:(7 * i) % len(words)]) + f" ({i})" for i in range(n)]


def debug_cfg(preset: str = "transformer-debug", **train_kw):
    cfg = memlm.preset(preset)
    base = {"seq_len": 32, "batch_size": 4, "steps": 20, "warmup": 2, "lr": 3e-3, "eval_every": 0, "sample_every": 0,
            "save_every": 0, "log_every": 1, "tensorboard": False, "device": "cpu"}
    cfg.train = cfg.train.replace(**(base | train_kw))
    return cfg


def make_trainer(tmp_path, cfg, *, name="run", data=None, val=None, **kw) -> Trainer:
    tok = ByteTokenizer()
    t = cfg.train
    if data is None:
        mode = "streams" if t.tbptt else "packed"
        data = Packer(texts(), tok, batch_size=t.batch_size, seq_len=t.seq_len, mode=mode, seed=t.seed)
    return Trainer(cfg, out_dir=tmp_path / name, data=data, val_data=val, tokenizer=tok, log=lambda s: None, **kw)


def random_batch(gen: torch.Generator, B: int, T: int, v_used: int, *, shift: bool = True) -> Batch:
    x = torch.randint(0, v_used, (B, T + 1), generator=gen)
    labels = x[:, 1:] if shift else x[:, :-1]  # shift=False is the defect: the label is the input itself
    return Batch(x[:, :-1].clone(), labels.clone(), torch.zeros(B, T, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------------ label shift

def test_label_shift_random_tokens_cannot_be_copied(tmp_path):
    v_used, steps = 64, 40
    floor = math.log(v_used)
    losses = {}
    for shift in (True, False):
        tr = make_trainer(tmp_path, debug_cfg(batch_size=8, steps=steps, warmup=5, schedule="constant"), name=f"s{shift}", data=iter([]))
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            out = tr.train_step(random_batch(gen, 8, 32, v_used, shift=shift))
        losses[shift] = out["loss"]
    # Next-token targets of uniform random tokens carry log(V_used) nats; nothing can be learned below that.
    assert losses[True] > floor - 0.15, losses
    # The broken batch (label = input) is learnable by copying — the same loop gets near zero, so the check can fail.
    assert losses[False] < 0.5, losses


def test_label_shift_through_the_packer(tmp_path):
    """Random documents through the real Packer (which shifts) and the trainer: loss stays near log(V_used)."""
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 32, (500,), generator=gen).tolist() for _ in range(20)]
    cfg = debug_cfg(steps=30)
    tr = make_trainer(tmp_path, cfg, data=Packer(docs, ByteTokenizer(), batch_size=4, seq_len=32))
    res = tr.fit()
    assert res["loss"] > math.log(32) - 0.3, res


def test_loss_goes_down_on_text_and_validation_runs(tmp_path):
    tok = ByteTokenizer()
    val = Packer(texts(8), tok, batch_size=4, seq_len=32, shuffle=False, loop=False)
    cfg = debug_cfg(steps=40, eval_every=20, eval_batches=3, sample_every=40, sample_tokens=8)
    tr = make_trainer(tmp_path, cfg, val=val)
    res = tr.fit()
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    train_losses = [r["loss"] for r in recs if "loss" in r]
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(train_losses) == 40 and len(vals) == 2
    assert train_losses[-1] < train_losses[0] - 1.5
    assert vals[1] < vals[0] and res["val_loss"] == pytest.approx(vals[1])
    assert res["val_ppl"] == pytest.approx(math.exp(vals[1]))
    assert any(isinstance(r.get("sample"), str) for r in recs)
    # the same fixed validation batches every time: evaluating twice gives the same number
    assert tr.evaluate()["val_loss"] == tr.evaluate()["val_loss"]


def test_overfit_single_batch(tmp_path):
    tr = make_trainer(tmp_path, debug_cfg(steps=100, warmup=5), data=iter([]))
    gen = torch.Generator().manual_seed(2)
    batch = random_batch(gen, 4, 32, 200)
    first = tr.train_step(batch)["loss"]
    for _ in range(99):
        out = tr.train_step(batch)
    assert first > 4.0 and out["loss"] < 0.5, (first, out["loss"])


# ------------------------------------------------------------------------------------------- gradient accumulation

def _uneven_batch() -> Batch:
    gen = torch.Generator().manual_seed(3)
    b = random_batch(gen, 8, 16, 200)
    labels = b.labels.clone()
    labels[:4, 3:] = IGNORE  # first half: 4·3 = 12 targets; second half: 64 targets
    labels[6, :5] = IGNORE
    return Batch(b.input_ids, labels, b.reset)


def test_grad_accum_equals_big_batch_with_valid_token_normalisation(tmp_path):
    b = _uneven_batch()
    halves = [Batch(b.input_ids[i:i + 4], b.labels[i:i + 4], b.reset[i:i + 4]) for i in (0, 4)]
    big = make_trainer(tmp_path, debug_cfg(batch_size=8, grad_accum=1, clip=0.0, warmup=1), name="big", data=iter([]))
    acc = make_trainer(tmp_path, debug_cfg(batch_size=4, grad_accum=2, clip=0.0, warmup=1), name="acc", data=iter([]))
    assert all(torch.equal(p, q) for p, q in zip(big.model.parameters(), acc.model.parameters()))
    o1, o2 = big.train_step([b]), acc.train_step(halves)
    assert o1["valid_tokens"] == o2["valid_tokens"] == 12 + 64 - 5
    assert o1["loss"] == pytest.approx(o2["loss"], rel=1e-5)
    for (name, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        assert_close(q.grad, p.grad, kind="grad", name=name)
    big.train_step([b])
    acc.train_step(halves)
    for (name, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        assert_close(q, p, tol=1e-5, name=name)

    # Sanity: the per-micro-batch mean (the defect) gives a different gradient on the same uneven halves.
    model = memlm.build_model(debug_cfg().model)
    model.load_state_dict(big.model.state_dict())
    wrong = 0.0
    for h in halves:
        logits, _ = model(h.input_ids, None, h.reset)
        wrong = wrong + token_ce_sum(logits, h.labels) / (h.labels != IGNORE).sum() / 2
    wrong.backward()
    model2 = memlm.build_model(debug_cfg().model)
    model2.load_state_dict(big.model.state_dict())
    logits, _ = model2(b.input_ids, None, b.reset)
    (token_ce_sum(logits, b.labels) / (b.labels != IGNORE).sum()).backward()
    assert rel_err(model.embed.weight.grad, model2.embed.weight.grad) > 1e-2


def test_compile_says_when_a_new_kind_of_batch_compiles(tmp_path, monkeypatch):
    """A step that makes Dynamo compile a new graph (new shapes, document starts inside the rows, another reset_bound
    bucket) is announced and timed, once per kind, so a compile of minutes does not look like a stalled run."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)     # the log is the trainer's, not Dynamo's
    lines: list[str] = []
    tr = Trainer(debug_cfg(compile=True), out_dir=tmp_path / "c", data=iter([]), val_data=None, log=lines.append)
    g = torch.Generator().manual_seed(0)
    plain = random_batch(g, 4, 32, 50)
    plain.reset[:, 0] = True
    starts = random_batch(g, 4, 32, 50)
    starts.reset[:, 0] = starts.reset[:, 9] = starts.reset[:, 20] = starts.reset[:, 25] = True   # 3 a row: bucket 4
    for b in (plain, starts, plain, starts, random_batch(g, 2, 32, 50)):
        tr.train_step(b)
    said = [s for s in lines if s.startswith("torch.compile: compiling")]
    assert len(said) == 3, lines
    assert "1 × [4, 32] tokens, no document start inside the rows; kind 1" in said[0]
    assert "up to 4 document starts a row; kind 2" in said[1] and "1 × [2, 32] tokens" in said[2]
    assert sum(s.startswith("torch.compile: that kind of batch compiled and ran in ") for s in lines) == 3


# ------------------------------------------------------------------------------------------------------------ TBPTT

def test_tbptt_full_window_equals_full_backprop():
    torch.manual_seed(0)
    model = memlm.build_model(debug_cfg().model)
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (2, 49), generator=gen)
    ids, labels = x[:, :-1], x[:, 1:].clone()
    labels[0, 10] = IGNORE
    reset = torch.zeros(2, 48, dtype=torch.bool)
    reset[1, 20] = True  # a document starts inside segment 2 of row 1

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    logits, _ = model(ids, None, reset)
    full = grads(token_ce_sum(logits, labels) / (labels != IGNORE).sum())
    loss_all, state = tbptt_loss(model, ids, labels, 16, 3, reset=reset)
    assert int(state.pos[0]) == 48 and not state.layers[0].k.requires_grad
    for (name, _), a, b in zip(model.named_parameters(), grads(loss_all), full):
        assert_close(a, b, kind="grad", name=name)
    loss_cut, _ = tbptt_loss(model, ids, labels, 16, 1, reset=reset)
    assert float(loss_cut.detach()) == pytest.approx(float(loss_all.detach()), rel=1e-5)  # same forward value ...
    cut = grads(loss_cut)
    assert max(rel_err(a, b) for a, b in zip(cut, full)) > 1e-3  # ... but gradients stop at segment boundaries


def test_trainer_tbptt_carries_state_across_steps(tmp_path):
    cfg = debug_cfg("transformer-swa-debug", tbptt=True, detach_every=2, steps=3, batch_size=2, seq_len=16)
    tr = make_trainer(tmp_path, cfg)
    assert tr.micro_per_step == 2
    res = tr.fit()
    assert res["step"] == 3 and tr.tbptt_state is not None
    assert tr.tbptt_state.pos.tolist() == [3 * 2 * 16] * 2  # every stream advanced 3 steps × 2 segments × T
    assert not tr.tbptt_state.layers[0].k.requires_grad
    assert (tmp_path / "run" / "checkpoints" / "step_000003" / "tbptt_state.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ resume, signals

class NoisyTrainer(Trainer):
    """Scales the loss by RNG-drawn noise (like dropout, it changes the gradients), so a resume that lost the RNG
    state would diverge."""

    def _forward(self, ids, state, reset, labels):
        ce, state = super()._forward(ids, state, reset, labels)
        return ce * (1 + 0.5 * torch.rand(())), state


def _kill_at(tr: Trainer, step: int, sig=signal.SIGTERM) -> None:
    orig = tr.train_step

    def step_then_signal(batch):
        out = orig(batch)
        if tr.step == step:
            os.kill(os.getpid(), sig)  # a real signal to this process; the handler only sets a flag
        return out

    tr.train_step = step_then_signal


@pytest.mark.parametrize("preset,tbptt", [("transformer-debug", False), ("transformer-swa-debug", True)])
def test_resume_equals_uninterrupted(tmp_path, preset, tbptt):
    cfg = debug_cfg(preset, steps=10, eval_every=4, eval_batches=2, sample_every=3, sample_tokens=4, tbptt=tbptt,
                    detach_every=2 if tbptt else 1, grad_accum=1 if tbptt else 2, seq_len=16)

    def val():  # a Packer is an iterator: each trainer needs its own
        return Packer(texts(6), ByteTokenizer(), batch_size=4, seq_len=16, mode="streams" if tbptt else "packed",
                      shuffle=False, loop=False)

    full = NoisyTrainer(cfg, out_dir=tmp_path / "full", tokenizer=ByteTokenizer(), log=lambda s: None, val_data=val(),
                        data=Packer(texts(), ByteTokenizer(), batch_size=4, seq_len=16,
                                    mode="streams" if tbptt else "packed"))
    full.fit()

    def fresh_data():
        return Packer(texts(), ByteTokenizer(), batch_size=4, seq_len=16, mode="streams" if tbptt else "packed")

    first = NoisyTrainer(cfg, out_dir=tmp_path / "cut", data=fresh_data(), val_data=val(), tokenizer=ByteTokenizer(),
                         log=lambda s: None)
    _kill_at(first, 5)
    assert first.fit()["stopped"] == "SIGTERM" and first.step == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after fit
    second = NoisyTrainer(cfg, out_dir=tmp_path / "cut", data=fresh_data(), val_data=val(), tokenizer=ByteTokenizer(),
                          log=lambda s: None, resume=True)
    assert second.step == 5
    second.fit()
    a = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    drop = ("tok_s",)
    strip = [[{k: v for k, v in r.items() if k not in drop} for r in recs] for recs in (a, b)]
    assert [r["loss"] for r in strip[0] if "loss" in r] == [r["loss"] for r in strip[1] if "loss" in r]
    assert strip[0] == strip[1]  # losses, lr, grad norms, val losses and samples, bit for bit
    for (name, p), q in zip(full.model.named_parameters(), second.model.parameters()):
        assert torch.equal(p, q), name
    if tbptt:
        for k, v in full.tbptt_state.state_dict().items():
            assert torch.equal(v, second.tbptt_state.state_dict()[k]), k


def test_second_signal_aborts(tmp_path):
    tr = make_trainer(tmp_path, debug_cfg(steps=5))
    tr._on_signal(signal.SIGINT, None)
    assert tr._stop == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        tr._on_signal(signal.SIGINT, None)


# --------------------------------------------------------------------------------------------------- non-finite guard

def test_nonfinite_step_is_skipped_then_training_stops(tmp_path):
    cfg = debug_cfg(steps=20, max_nonfinite=3)
    tr = make_trainer(tmp_path, cfg, data=iter([]))
    gen = torch.Generator().manual_seed(5)
    tr.train_step(random_batch(gen, 4, 32, 200))
    before = [p.detach().clone() for p in tr.model.parameters()]
    real = Trainer._forward
    poison = {"on": True}

    def forward(ids, state, reset, labels):
        ce, state = real(tr, ids, state, reset, labels)
        return (ce * float("nan"), state) if poison["on"] else (ce, state)

    tr._forward = forward
    out = tr.train_step(random_batch(gen, 4, 32, 200))
    assert out["skipped"] and tr.nonfinite_total == 1 and tr.nonfinite_in_row == 1 and tr.step == 2
    assert all(torch.equal(a, p) for a, p in zip(before, tr.model.parameters()))  # weights untouched
    poison["on"] = False
    out = tr.train_step(random_batch(gen, 4, 32, 200))
    assert not out["skipped"] and tr.nonfinite_in_row == 0 and math.isfinite(out["loss"])
    poison["on"] = True
    tr.data = Packer(texts(), ByteTokenizer(), batch_size=4, seq_len=32)
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        tr.fit()
    assert tr.nonfinite_total == 4 and tr.step == 6
    assert isinstance(NonFiniteError("x"), UserError)


# ------------------------------------------------------------------------------------------------------- functional

def test_train_function_and_load_model(tmp_path):
    cfg = debug_cfg(steps=3)
    res = train(cfg, out_dir=tmp_path / "fn", data=Packer(texts(), ByteTokenizer(), batch_size=4, seq_len=32),
                tokenizer=ByteTokenizer(), log=lambda s: None)
    assert res["step"] == 3 and res["checkpoint"].endswith("step_000003") and res["val_loss"] is None
    model = memlm.load_model(res["checkpoint"])
    assert model.config.to_dict() == cfg.model.to_dict()
    assert isinstance(memlm.load_tokenizer(res["checkpoint"]), ByteTokenizer)
    saved = json.loads((tmp_path / "fn" / "checkpoints" / "step_000003" / "config.json").read_text())
    assert saved["memlm_version"] == 1 and saved["train"]["steps"] == 3


@pytest.mark.parametrize("kind", ["jsonl", "shards"])
def test_trainer_builds_its_data_from_the_config(tmp_path, kind):
    """No injected data: train.data names files (validation = every val_every_doc-th document) or a prepared folder."""
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(30)))
    spec = str(src)
    if kind == "shards":
        from memlm.data.shards import prepare
        prepare([str(src)], ByteTokenizer(), tmp_path / "prepared", val_every=5)
        spec = str(tmp_path / "prepared")
    cfg = debug_cfg(steps=4, eval_every=2, eval_batches=2, val_every_doc=5, data=[spec], save_every=2)
    res = Trainer(cfg, out_dir=tmp_path / "run", log=lambda s: None).fit()
    assert res["step"] == 4 and res["val_loss"] is not None and math.isfinite(res["val_loss"])
    # and it resumes its own data cursor
    cfg2 = debug_cfg(steps=6, eval_every=0, val_every_doc=5, data=[spec])
    tr = Trainer(cfg2, out_dir=tmp_path / "run", log=lambda s: None, resume=True)
    assert tr.data.batches == 4 and tr.fit()["step"] == 6


# --------------------------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_bf16_training_resume_and_cpu_load(tmp_path, compile_):
    """bf16 autocast on CUDA (dtype auto): loss falls, CUDA RNG is saved, resume continues, weights load on CPU."""
    cfg = debug_cfg(device="cuda", steps=30, warmup=3, save_every=15, compile=compile_, seq_len=64)
    tr = make_trainer(tmp_path, cfg)
    assert tr.amp == torch.bfloat16
    res = tr.fit()
    recs = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(recs) == 30 and all(math.isfinite(x) for x in recs) and recs[-1] < recs[0] - 1.0
    ck = tmp_path / "run" / "checkpoints" / "step_000015"
    assert "torch_cuda" in torch.load(ck / "rng.pt", weights_only=True)
    again = make_trainer(tmp_path, cfg, name="run2", resume=str(ck))
    again.fit()
    recs2 = [r["loss"] for r in read_jsonl(tmp_path / "run2" / "metrics.jsonl") if "loss" in r]
    assert len(recs2) == 15
    assert max(abs(a - b) for a, b in zip(recs2, recs[15:])) < 0.05  # same run up to GPU non-determinism
    cpu = memlm.load_model(res["checkpoint"])
    assert all(p.device.type == "cpu" for p in cpu.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tbptt_and_accumulation(tmp_path):
    cfg = debug_cfg("transformer-swa-debug", device="cuda", steps=6, tbptt=True, detach_every=2, grad_accum=2,
                    seq_len=32)
    tr = make_trainer(tmp_path, cfg)
    res = tr.fit()
    assert res["step"] == 6 and tr.tbptt_state.pos.tolist() == [6 * 4 * 32] * 4
    assert tr.tbptt_state.pos.device.type == "cuda"


def test_mixers_see_the_training_step_and_histograms_stay_bins(monkeypatch, tmp_path):
    """Scheduled auxiliary losses (gate polarization) need the optimizer step inside the forward; histogram metrics
    (gate values) must be logged as bin counts, not averaged into one number."""
    import torch

    import memlm
    from memlm.data.packing import Batch
    from memlm.layers import attention
    from memlm.layers.base import add_metric, current_step
    from memlm.train.trainer import Trainer

    seen = []
    orig = attention.Attention.forward

    def spy(self, x, state=None, *, reset=None, update=True):
        if self.layer_idx == 0:
            seen.append(current_step())
            add_metric("hist", torch.tensor([1.0, 2.0, 3.0]))
        return orig(self, x, state, reset=reset, update=update)

    monkeypatch.setattr(attention.Attention, "forward", spy)
    cfg = memlm.preset("transformer-debug")
    cfg.train = cfg.train.replace(steps=3, eval_every=0, sample_every=0, save_every=0, tensorboard=False)
    ids = torch.randint(0, 64, (2, 17))
    batch = Batch(input_ids=ids[:, :-1], labels=ids[:, 1:], reset=torch.zeros(2, 16, dtype=torch.bool))
    tr = Trainer(cfg, out_dir=tmp_path, data=iter([batch] * 5), val_data=[], log=lambda s: None)
    outs = [tr.train_step(batch) for _ in range(3)]
    assert seen == [0, 1, 2]
    assert outs[-1]["mixer/hist"] == [1.0, 2.0, 3.0]
