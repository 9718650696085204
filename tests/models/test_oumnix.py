"""Oumnix model-level features: training path (label shift), ablation switches, the cell, dynamic depth.

Notation: B batch, T tokens, V vocabulary, e an exit layer, τ the exit threshold, h_e the exit hidden.
The contract battery (tests/test_contract.py) already runs oumnix-debug through causality, chunk/step invariance,
packing and gradients; here are the feature-specific checks.
"""
from __future__ import annotations

import math

import pytest
import torch

import memlm
from memlm.config.base import apply_overrides
from memlm.errors import UserError
from memlm.layers.base import collect_aux
from memlm.layers.weave import WeaveLinear
from memlm.models.oumnix import EarlyExitDecoder, OumnixCell, early_exit, measure_early_exit
from memlm.ops.testing import assert_close
from memlm.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def build(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return memlm.build_model(apply_overrides(memlm.preset("oumnix-debug"), list(overrides))).eval()


def rand_ids(B=1, T=48, seed=0, vocab=256):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- training path


class RandomTokens:
    """Fresh random rows every step (vocab 32: loss cannot beat ln 32 ≈ 3.47 without copying the input)."""

    def __init__(self, shift: bool, B=4, T=32):
        self.g, self.shift, self.B, self.T = torch.Generator().manual_seed(0), shift, B, T

    def __iter__(self):
        return self

    def __next__(self):
        ids = torch.randint(0, 32, (self.B, self.T + 1), generator=self.g)
        b = type("Batch", (), {})()
        b.input_ids = ids[:, :-1]
        b.labels = ids[:, 1:] if self.shift else ids[:, :-1]  # unshifted = the original Oumnix trainer's defect
        b.reset = None
        return b


def train_losses(tmp_path, shift: bool, steps: int = 25) -> list[float]:
    cfg = apply_overrides(memlm.preset("oumnix-debug"), ["train.lr=3e-3", "train.warmup=0", "train.device=cpu",
                                                         "train.eval_every=0", "train.tensorboard=false"])
    tr = Trainer(cfg, out_dir=tmp_path / str(shift), data=RandomTokens(shift), val_data=[],
                 tokenizer=memlm.load_tokenizer())
    out = [tr.train_step(next(tr.data)) for _ in range(steps)]
    assert all(not o["skipped"] for o in out)
    assert {"aux/moop_balance", "aux/moop_z", "aux/exit_kl"} <= set(out[-1])  # every aux loss is in the objective
    return [o["loss"] for o in out]


def test_label_shift_on_the_oumnix_training_path(tmp_path):
    """With shifted labels the loss on random tokens stays near ln 32; the same trainer on unshifted labels (copying
    the input) drives it far lower — so a trainer that forgot the shift would be caught."""
    shifted = train_losses(tmp_path, shift=True)
    copied = train_losses(tmp_path, shift=False)
    assert min(shifted[-5:]) > math.log(32) - 0.3, shifted[-5:]
    assert max(copied[-5:]) < min(shifted[-5:]) - 1.0, (copied[-5:], shifted[-5:])


# ---------------------------------------------------------------------------------------------- switches


def test_each_feature_switches_off_with_set():
    full = build()
    x = rand_ids(B=2, T=20)

    def aux_of(m):
        m.train()
        with collect_aux() as box:
            m(x)
        m.eval()
        return box

    box = aux_of(full)
    assert {"moop_balance", "moop_z", "exit_kl"} <= set(box["losses"]) and "pfp/variance" in box["metrics"]
    n_full = full.num_params()

    m = build("model.moop_off=true")
    assert all(b.mixer.router is None for b in m.blocks) and "moop_balance" not in aux_of(m)["losses"]
    m = build("model.residual=sequential")
    assert m.oumnix.pfp is None and "pfp/variance" not in aux_of(m)["metrics"]
    m = build("model.weave_rank=0")
    assert not any(isinstance(mod, WeaveLinear) for mod in m.modules()) and m.num_params() > n_full
    m = build("model.cell_layers=[]")
    assert len(m.oumnix.cells) == 0 and m.num_params() < n_full
    assert not any(k.startswith("cell") for k in aux_of(m)["metrics"])
    m = build("model.exit_layers=[]")
    assert not m.oumnix.exit_layers and "exit_kl" not in aux_of(m)["losses"]
    m = build("model.moop_off=true", "model.residual=sequential", "model.weave_rank=0", "model.cell_layers=[]",
              "model.exit_layers=[]")
    assert m.oumnix is None  # a plain stack of (unrouted) operator mixtures
    assert m(x)[0].shape == (2, 20, 263)


def test_preset_param_counts_match_descriptions():
    for name in ("oumnix-tiny", "oumnix-small"):
        with torch.device("meta"):
            n = memlm.build_model(name).num_params()
        assert f"{n:,}" in memlm.preset(name).description, (name, n)


@torch.no_grad()
def test_save_load_roundtrip(tmp_path):
    m = build()
    m.save_pretrained(tmp_path / "m")
    m2 = memlm.load_model(tmp_path / "m")
    x = rand_ids(B=2, T=20)
    assert torch.equal(m(x)[0], m2(x)[0])
    assert any(k.endswith(".U") for k in m2.state_dict()) and "oumnix.cells.1.verify_bias" in m2.state_dict()


def test_config_validation():
    with pytest.raises(UserError, match="exit_layers"):
        build("model.exit_layers=[3]")
    with pytest.raises(UserError, match="cell_layers"):
        build("model.cell_layers=[4]")
    with pytest.raises(UserError, match="exit_threshold"):
        build("model.exit_threshold=1.5")


# ------------------------------------------------------------------------------------------------- cell


def test_cell_is_soft_in_training_and_a_hard_per_token_choice_at_inference():
    torch.manual_seed(0)
    cell = OumnixCell(16, 24)
    with torch.no_grad():
        cell.verify.weight.normal_(0, 1.0)
        for c in cell.cand:
            c.w_out.weight.normal_(0, 0.5)
    x = torch.randn(2, 9, 16)
    n = cell.norm(x)
    c = torch.stack([m(n) for m in cell.cand], 2)
    cell.train()
    soft, p = cell(x)
    assert_close(soft, (p[..., None] * c).sum(2), tol=1e-6, name="soft superposition")
    cell.eval()
    hard, p2 = cell(x)
    pick = p2.argmax(-1)
    assert_close(hard, c.gather(2, pick[..., None, None].expand(-1, -1, 1, 16))[:, :, 0], tol=1e-6, name="collapse")
    assert 0 < pick.float().mean() < 1  # both candidates are chosen somewhere: the choice is per token
    hard_prefix, _ = cell(x[:, :4])  # per token: a prefix gives the same choices (causal)
    assert torch.equal(hard_prefix, hard[:, :4])


# ---------------------------------------------------------------------------------------------- early exit


def exit_confidence(m, x) -> torch.Tensor:
    """max p(h_e) at the model's first exit for every token of x [B, T] (no exits taken)."""
    ex = m.oumnix
    e = ex.exit_layers[0]
    st = m.init_state(x.shape[0])
    h, _, var, _, _ = ex.run(m, m.embed(x), st.layers[: e + 1], None, False, stop=e + 1)
    return torch.softmax(m.logits(ex.finish(m, h, var)).float(), -1).amax(-1)


@torch.no_grad()
def test_exited_tokens_output_the_exit_head_and_later_layers_stay_consistent():
    m = build()
    x = rand_ids(B=2, T=40)
    conf = exit_confidence(m, x)
    tau = float(conf.median())
    with early_exit(m, tau):
        logits, state = m(x)
        # chunk invariance and causality hold with exits (states included)
        outs, s = [], None
        for a, b in ((0, 1), (1, 17), (17, 18), (18, 40)):
            o, s = m(x[:, a:b], s)
            outs.append(o)
        assert_close(torch.cat(outs, 1), logits, tol=1e-5, name="split forward with exits")
        for k, v in state.state_dict().items():
            assert_close(s.state_dict()[k].float(), v.float(), tol=1e-5, name=k)
        y = x.clone()
        y[:, 25:] = (y[:, 25:] + 3) % 256
        assert torch.equal(m(y)[0][:, :25], logits[:, :25])
    exited = conf >= tau
    assert 0 < exited.float().mean() < 1
    e = m.oumnix.exit_layers[0]
    st = m.init_state(2)
    h, _, var, _, _ = m.oumnix.run(m, m.embed(x), st.layers[: e + 1], None, False, stop=e + 1)
    exit_logits = m.logits(m.oumnix.finish(m, h, var))
    assert_close(logits[exited], exit_logits[exited], tol=1e-5, name="exited tokens = exit head")
    full, _ = m(x)
    assert not torch.allclose(full[~exited], exit_logits[~exited])


@torch.no_grad()
def test_early_exit_decoder_equals_the_one_pass_forward_and_keeps_states_consistent():
    m = build()
    x = rand_ids(B=1, T=36, seed=3)
    tau = float(exit_confidence(m, x)[0, 8:].median())
    with early_exit(m, tau):
        ref, ref_state = m(x)
    dec = EarlyExitDecoder(m, tau)
    out = [dec.prefill(x[:, :8])]
    for t in range(8, 35):
        out.append(dec.step(x[:, t]))
    assert 0 < dec.exits < dec.steps
    assert any(p is not None for p in dec.pending)  # deferred work is waiting …
    last = dec.step(x[:, 35])
    assert_close(torch.stack(out, 1), ref[:, 7:35], tol=1e-5, name="decoder logits")
    assert_close(last, ref[:, 35], tol=1e-5, name="decoder logits, last token")
    st = dec.state  # … and reading the state runs it: the same state as the one-pass forward
    assert all(p is None for p in dec.pending)
    for k, v in ref_state.state_dict().items():
        assert_close(st.state_dict()[k].float(), v.float(), tol=1e-5, name=f"state {k}")


def test_exit_loss_trains_the_early_layers_and_measure_reports():
    m = build().train()
    x = rand_ids(B=2, T=24)
    with collect_aux() as box:
        m(x)
    box["losses"]["exit_kl"].backward()
    early = m.blocks[0].mixer.router.weight.grad
    late = m.blocks[3].mixer.router.weight.grad
    assert early is not None and early.abs().sum() > 0
    assert late is None or late.abs().sum() == 0  # the target is detached; layers after the exit get nothing
    rows = measure_early_exit(m, rand_ids(B=1, T=24), [None, 0.004], prompt_len=4)
    assert [r["threshold"] for r in rows] == [None, 0.004] and all(r["tok_s"] > 0 for r in rows)
    assert rows[0]["exit_rate"] == 0 and math.isfinite(rows[1]["loss"])
    with pytest.raises(ValueError, match="exit layers"):
        EarlyExitDecoder(build("model.exit_layers=[]"), 0.5)
