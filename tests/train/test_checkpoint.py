"""Tests for memlm.train.checkpoint and the trainer's use of it: atomic writes (a crash mid-write leaves the
previous checkpoint loadable), pruning, SIGTERM saves, mismatched configs, RNG round trips, metrics truncation.
"""
from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest
import torch

import memlm
from memlm.data.packing import Packer
from memlm.data.tokenizer import ByteTokenizer
from memlm.errors import UserError
from memlm.train import checkpoint as ckpt
from memlm.train.metrics import MetricsLogger, progress_line, read_jsonl
from memlm.train.trainer import Trainer

TEXTS = [f"Line {i}: a small boat crossed the grey water while the gulls argued overhead." for i in range(40)]


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(steps: int = 4, **kw):
    cfg = memlm.preset("transformer-debug")
    base = {"seq_len": 16, "batch_size": 2, "steps": steps, "warmup": 1, "eval_every": 0, "sample_every": 0,
            "save_every": 0, "log_every": 1, "tensorboard": False, "keep_last": 2, "device": "cpu"}
    cfg.train = cfg.train.replace(**(base | kw))
    return cfg


def trainer(path, cfg, **kw) -> Trainer:
    data = Packer(TEXTS, ByteTokenizer(), batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len)
    return Trainer(cfg, out_dir=path, data=data, tokenizer=ByteTokenizer(), log=lambda s: None, **kw)


def test_crash_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    tr = trainer(tmp_path / "run", cfg_for())
    tr.fit()  # saves step_000004 at the end
    good = ckpt.find_checkpoint(tmp_path / "run")
    weights = (good / ckpt.WEIGHTS).read_bytes()
    real = ckpt._write_files

    def crash(tmp, **kw):
        real(tmp, **kw)  # everything written ...
        (tmp / ckpt.WEIGHTS).write_bytes(b"garbage")
        raise OSError("disk full")  # ... then the process dies before the rename

    monkeypatch.setattr(ckpt, "_write_files", crash)
    tr.step = 5
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint()
    monkeypatch.undo()
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.find_checkpoint(tmp_path / "run") == good
    assert (root / ckpt.LATEST).read_text().strip() == "step_000004"
    assert not (root / "step_000005").exists() and not list(root.glob(".step_*"))
    assert (good / ckpt.WEIGHTS).read_bytes() == weights
    resumed = trainer(tmp_path / "run", cfg_for(steps=6), resume=True)
    assert resumed.step == 4 and memlm.load_model(good) is not None


def test_stale_temp_folder_is_cleaned_and_unfinished_folder_ignored(tmp_path):
    tr = trainer(tmp_path / "run", cfg_for(steps=1))
    tr.fit()
    root = tmp_path / "run" / "checkpoints"
    (root / ".step_000009.tmp123").mkdir()
    (root / "step_000007").mkdir()  # no trainer_state.json: not a complete checkpoint
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000001"]
    tr.step = 2
    tr.save_checkpoint()
    assert not (root / ".step_000009.tmp123").exists()
    assert ckpt.find_checkpoint(root).name == "step_000002"


def test_keep_last_prunes(tmp_path):
    tr = trainer(tmp_path / "run", cfg_for(steps=5, save_every=1, keep_last=2))
    tr.fit()
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000004", "step_000005"]
    assert (root / ckpt.LATEST).read_text().strip() == "step_000005"


def test_sigterm_during_fit_saves_and_returns(tmp_path):
    tr = trainer(tmp_path / "run", cfg_for(steps=50))
    orig = tr.train_step

    def step(batch):
        out = orig(batch)
        if tr.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    tr.train_step = step
    res = tr.fit()
    assert res["stopped"] == "SIGTERM" and res["step"] == 3
    assert res["checkpoint"].endswith("step_000003")
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_000003" / ckpt.TRAINER_STATE).read_text())
    assert state["step"] == 3 and state["data"]["batches"] == 3 and state["tokens"] == 3 * 2 * 16


def test_mismatched_model_config_is_a_user_error(tmp_path):
    trainer(tmp_path / "run", cfg_for(steps=1)).fit()
    other = cfg_for()
    other.model = memlm.preset("transformer-debug").model.replace(d_model=32)
    with pytest.raises(UserError) as e:
        trainer(tmp_path / "run", other, resume=True)
    msg = str(e.value)
    assert "different model config" in msg and "d_model" in msg and "\n" not in msg
    # the same model under another preset name is fine (the name is a label, not an architecture)
    same = cfg_for(steps=2)
    same.model.name = "renamed"
    assert trainer(tmp_path / "run", same, resume=True).step == 1


def test_fresh_run_refuses_existing_checkpoints_and_resume_modes(tmp_path):
    trainer(tmp_path / "run", cfg_for(steps=1)).fit()
    with pytest.raises(UserError, match="already holds checkpoints"):
        trainer(tmp_path / "run", cfg_for())
    assert trainer(tmp_path / "new", cfg_for(), resume="auto").step == 0
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        trainer(tmp_path / "empty", cfg_for(), resume=True)
    ck = ckpt.find_checkpoint(tmp_path / "run")
    assert trainer(tmp_path / "elsewhere", cfg_for(steps=3), resume=str(ck)).step == 1


def test_find_checkpoint_resolution(tmp_path):
    trainer(tmp_path / "run", cfg_for(steps=2, save_every=1, keep_last=5)).fit()
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.find_checkpoint(tmp_path / "run") == root / "step_000002"
    assert ckpt.find_checkpoint(root) == root / "step_000002"
    assert ckpt.find_checkpoint(root / "step_000001") == root / "step_000001"
    (root / ckpt.LATEST).write_text("step_000001\n")
    assert ckpt.find_checkpoint(tmp_path / "run") == root / "step_000001"
    (root / ckpt.LATEST).write_text("step_999999\n")  # stale pointer: fall back to the highest step
    assert ckpt.find_checkpoint(tmp_path / "run") == root / "step_000002"
    with pytest.raises(UserError, match="no such"):
        ckpt.find_checkpoint(tmp_path / "missing")


def test_checkpoint_files_load_safely(tmp_path):
    trainer(tmp_path / "run", cfg_for(steps=1)).fit()
    ck = ckpt.find_checkpoint(tmp_path / "run")
    assert {p.name for p in ck.iterdir()} >= {ckpt.WEIGHTS, ckpt.CONFIG, ckpt.OPTIMIZER, ckpt.TRAINER_STATE, ckpt.RNG}
    torch.load(ck / ckpt.OPTIMIZER, weights_only=True)
    torch.load(ck / ckpt.RNG, weights_only=True)
    cfg = json.loads((ck / ckpt.CONFIG).read_text())
    assert cfg["memlm_version"] == 1 and set(cfg) >= {"model", "train"}


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    want = (torch.rand(3), random.random(), np.random.randn(2))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.randn(2))
    assert torch.equal(want[0], got[0]) and want[1] == got[1] and np.array_equal(want[2], got[2])


def test_metrics_jsonl_and_resume_truncation(tmp_path):
    with MetricsLogger(tmp_path, log=lambda s: None) as m:
        for s in (1, 2, 3):
            m.write(s, {"loss": float(s), "grad_norm": float("nan"), "x": torch.tensor(2.0)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by a crash
    MetricsLogger(tmp_path, log=lambda s: None, resume_step=2).close()
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert recs == [{"step": 1, "loss": 1.0, "grad_norm": None, "x": 2.0}, {"step": 2, "loss": 2.0, "grad_norm": None,
                                                                              "x": 2.0}]
    line = progress_line(7, 100, 2.5, 3e-4, 12345.0, 65.0)
    assert line == "step   7/100 | loss 2.5000 | lr 3.00e-04 | 12.3k tok/s | ETA 1m05s" and "\r" not in line
