"""Progressive growth: logits unchanged (fp32, 1e-5) for wider d_ff / heads / d_model and deeper stacks, clear refusals,
optimizer state carried, and a grown checkpoint that the Trainer resumes."""
from __future__ import annotations

import json

import pytest
import torch

import memlm
from memlm.cli.main import main as cli
from memlm.config.base import apply_overrides
from memlm.data.packing import Packer
from memlm.data.tokenizer import ByteTokenizer
from memlm.errors import UserError
from memlm.models.grow import grow_checkpoint, grow_model, head_maps
from memlm.ops.testing import assert_close
from memlm.train import checkpoint as ckpt
from memlm.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    m = memlm.build_model(name).eval()
    with torch.no_grad():  # move away from the init so that no zero/identity structure hides a wrong remap
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _ids(T=40):
    return torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(7))


def _check(old, target, **kw):
    new = grow_model(old, target, verify=False, **kw)
    x = _ids()
    assert_close(new(x)[0], old(x)[0], tol=1e-5, name=f"logits after growth to {target.to_dict()}")
    # and with a carried state (decode after a prefill): the memories grew consistently too
    _, s_old = old(x[:, :25])
    _, s_new = new(x[:, :25])
    assert_close(new(x[:, 25:], s_new)[0], old(x[:, 25:], s_old)[0], tol=1e-5, name="continuation with state")
    return new


def _deeper(cfg, extra: int = 1, **changes):
    return cfg.replace(layers=list(cfg.layers) + [cfg.layers[-1]] * extra, **changes)


GROW_PRESETS = [p for p in ("transformer-debug", "nyx-debug", "cms-debug", "onyx-debug") if p in memlm.list_presets()]


@pytest.mark.parametrize("preset", GROW_PRESETS)
def test_wider_and_deeper_preserve_logits(preset):
    old = _model(preset)
    c = old.config
    _check(old, c.replace(d_ff=c.d_ff + 64))
    wide = _check(old, apply_overrides(c, ["d_model=128", "n_heads=8"]))
    assert wide.config.d_model == 128 and wide.config.norm_eps == pytest.approx(c.norm_eps / 2)
    # deeper, with the new layer put in the middle
    _check(old, _deeper(c), layer_map=[0, 2])
    _check(old, _deeper(apply_overrides(c, ["d_model=96", "n_heads=6"]), extra=2, d_ff=c.d_ff * 2))


def test_kv_heads_and_gqa_regrouping():
    old = _model("transformer-debug")  # 4 query / 2 kv heads of 16
    _check(old, apply_overrides(old.config, ["layers.0.n_kv_heads=4", "layers.1.n_kv_heads=4"]))  # kv copies
    _check(old, apply_overrides(old.config, ["d_model=96", "n_heads=6"]))  # groups of 2 → 3 over 2 kv heads
    with pytest.raises(UserError, match="head width"):
        grow_model(old, apply_overrides(old.config, ["d_model=128"]))  # 4 heads of 32: Dh would change


@pytest.mark.parametrize("hq,hk,hq2,hk2", [(6, 2, 8, 2), (4, 2, 8, 4), (4, 2, 4, 4), (4, 4, 6, 6), (2, 1, 8, 4)])
def test_head_maps_keep_every_query_with_its_kv_head(hq, hk, hq2, hk2):
    qmap, kvmap = head_maps(hq, hk, hq2, hk2)
    assert sorted(h for h in qmap if h >= 0) == list(range(hq))
    for new_q, old_q in enumerate(qmap):
        if old_q >= 0:
            assert kvmap[new_q // (hq2 // hk2)] == old_q // (hq // hk)


def test_cms_levels_and_accumulators_grow():
    old = _model("cms-debug")
    with torch.no_grad():
        for n, b in old.named_buffers():
            if ".acc_" in n:
                b.normal_()
    new = _check(old, old.config.replace(cms_levels=[1, 4, 16, 64], d_model=128, n_heads=8))
    assert len(new.blocks[0].mlp.levels) == 4
    acc_old = old.blocks[1].mlp.levels[2].acc_w_in_weight
    acc_new = new.blocks[1].mlp.levels[2].acc_w_in_weight
    F = acc_old.shape[0] // 2
    assert torch.equal(acc_new[:F, :64], acc_old[:F, :64]) and not acc_new[:F, 64:].any()
    with pytest.raises(UserError, match="cms_levels"):
        grow_model(old, old.config.replace(cms_levels=[1, 8, 16]))


def test_refusals_are_user_errors():
    pyth = _model("pythia-debug")
    _check(pyth, _deeper(pyth.config, d_ff=pyth.config.d_ff + 64))  # LayerNorm: depth and d_ff are fine
    with pytest.raises(UserError, match="LayerNorm"):
        grow_model(pyth, apply_overrides(pyth.config, ["d_model=128", "n_heads=8"]))
    t = _model("transformer-debug")
    with pytest.raises(UserError, match="vocab_size"):
        grow_model(t, t.config.replace(vocab_size=300))
    with pytest.raises(UserError, match="only widens"):
        grow_model(t, t.config.replace(d_ff=64))
    with pytest.raises(UserError, match="layer map"):
        grow_model(t, _deeper(t.config), layer_map=[1, 0])


def _trainer(path, cfg, resume=None):
    texts = [f"Line {i}: a small boat crossed the grey water while the gulls argued overhead." for i in range(30)]
    data = Packer(texts, ByteTokenizer(), batch_size=2, seq_len=16)
    return Trainer(cfg, out_dir=path, data=data, tokenizer=ByteTokenizer(), log=lambda s: None, resume=resume)


def test_grown_checkpoint_resumes_with_carried_optimizer_state(tmp_path):
    cfg = memlm.preset("transformer-debug")
    cfg.train = cfg.train.replace(seq_len=16, batch_size=2, steps=3, warmup=1, eval_every=0, sample_every=0,
                                  save_every=0, log_every=1, tensorboard=False, device="cpu")
    tr = _trainer(tmp_path / "a", cfg)
    tr.fit()
    src = ckpt.find_checkpoint(tmp_path / "a")
    summary = grow_checkpoint(str(tmp_path / "a"), ["d_ff=256", "train.steps=5"], str(tmp_path / "b"),
                              log=lambda s: None)
    assert summary["resumable"] and summary["step"] == 3 and summary["logit_rel_err"] < 1e-6
    # w_in and w_out of both layers grew: their moments are remapped; everything else is kept as it was
    assert (summary["optimizer_state_kept"], summary["optimizer_state_remapped"], summary["optimizer_state_fresh"]) \
        == (len(list(tr.model.parameters())) - 4, 4, 0)
    grown_cfg = memlm.RunConfig.from_dict({k: v for k, v in ckpt.read_config(summary["out"]).items()
                                           if k in ("model", "train")})
    assert grown_cfg.model.d_ff == 256 and grown_cfg.train.steps == 5
    tr2 = _trainer(tmp_path / "b", grown_cfg, resume=True)
    assert tr2.step == 3
    old_state = torch.load(src / ckpt.OPTIMIZER, weights_only=True)["state"]
    # torch numbers optimizer states by position in param_groups (same grouping before and after growth)
    names = [n for g in tr2.optimizer.param_groups for n in g["param_names"]]
    params = [p for g in tr2.optimizer.param_groups for p in g["params"]]
    e = names.index("embed.weight")
    assert torch.equal(tr2.optimizer.state[params[e]]["exp_avg"], old_state[e]["exp_avg"])
    w = names.index("blocks.0.mlp.w_out.weight")  # [D, F] → [D, F']: old columns keep their moments, new ones 0
    v_new, v_old = tr2.optimizer.state[params[w]]["exp_avg_sq"], old_state[w]["exp_avg_sq"]
    F = v_old.shape[1]
    assert torch.equal(v_new[:, :F], v_old) and not v_new[:, F:].any()
    assert float(tr2.optimizer.state[params[w]]["step"]) == 3
    out = tr2.fit()
    assert out["step"] == 5 and out["loss"] is not None and out["loss"] == out["loss"]
    reset = grow_checkpoint(str(tmp_path / "a"), ["d_ff=256"], str(tmp_path / "c"), optimizer_state="reset",
                            log=lambda s: None)
    assert (reset["optimizer_state_remapped"], reset["optimizer_state_fresh"]) == (0, 4)


def test_cli_grow_model_folder(tmp_path, capsys):
    m = _model("transformer-debug")
    m.save_pretrained(tmp_path / "m")
    assert cli(["grow", str(tmp_path / "m"), "--to", "d_ff=256", "n_heads=8", "d_model=128", "n_layers=3",
                "--out", str(tmp_path / "g")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumable"] is False and summary["params_after"] > summary["params_before"]
    g = memlm.load_model(tmp_path / "g")
    assert g.config.n_layers == 3 and g.config.name == "transformer-debug-grown"
    assert_close(g(_ids())[0], m(_ids())[0], tol=1e-5, name="CLI-grown model")
    assert cli(["grow", str(tmp_path / "m"), "--to", "vocab_size=300", "--out", str(tmp_path / "h")]) == 2
