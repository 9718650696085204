"""LoRA: only adapters train, exact merge/unmerge, adapters saved alone, loading refuses another base model."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import memlm
from memlm.errors import UserError
from memlm.layers.lora import (
    ADAPTER_WEIGHTS,
    LoRALinear,
    apply_lora,
    load_lora,
    lora_modules,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_lora,
    unmerge_lora,
)
from memlm.ops.testing import assert_close


def _model(name="transformer-debug", seed=0):
    torch.manual_seed(seed)
    return memlm.build_model(name).eval()


def _randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def _ids(T=24):
    return torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(3))


def test_apply_targets_and_only_adapters_train():
    model = _model()
    keys_before = set(model.state_dict())
    x = _ids()
    ref = model(x)[0]
    names = apply_lora(model, rank=4, alpha=8, targets="qkv,o_proj")
    assert names == ["blocks.0.mixer.core.qkv", "blocks.0.mixer.core.o_proj", "blocks.1.mixer.core.qkv",
                     "blocks.1.mixer.core.o_proj"]
    assert isinstance(model.blocks[0].mixer.core.qkv, LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    assert set(model.state_dict()) - keys_before == trainable  # base keys unchanged, adapters added
    assert torch.equal(model(x)[0], ref), "a fresh adapter (B = 0) must not change the output"
    # a few optimizer steps move the adapters only
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        logits, _ = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"frozen {n} changed"
    assert all(m.lora_B.abs().sum() > 0 for m in lora_modules(model).values())


def test_glob_targets_and_no_match_error():
    model = _model()
    names = apply_lora(model, rank=2, alpha=2, targets=["blocks.1.*"])
    assert names and all(n.startswith("blocks.1.") for n in names)
    with pytest.raises(UserError, match="already"):
        apply_lora(model, rank=2, alpha=2, targets="qkv")
    with pytest.raises(UserError, match="match no nn.Linear module.*available names:.*o_proj"):
        apply_lora(_model(), rank=2, alpha=2, targets="nonexistent")


@pytest.mark.parametrize("preset", ["transformer-debug", "nyx-debug"])
def test_merge_equals_adapter_and_unmerge_is_exact(preset):
    model = _model(preset)
    apply_lora(model, rank=4, alpha=16, targets="qkv,o_proj,w_in,w_out")
    _randomise_adapters(model)
    base_w = {n: m.weight.detach().clone() for n, m in lora_modules(model).items()}
    x = _ids()
    adapter_out = model(x)[0]
    assert not torch.equal(adapter_out, _model(preset)(x)[0]), "the random adapters should matter"
    merge_lora(model)
    for n, m in lora_modules(model).items():
        assert m.merged and not torch.equal(m.weight, base_w[n])
    assert_close(model(x)[0], adapter_out, tol=1e-6, name="merged forward vs adapter forward")
    unmerge_lora(model)
    for n, m in lora_modules(model).items():
        assert torch.equal(m.weight, base_w[n]), f"unmerge did not restore {n} bit-exactly"
    assert torch.equal(model(x)[0], adapter_out)


def test_save_alone_load_and_refuse_other_base(tmp_path):
    model = _model()
    apply_lora(model, rank=4, alpha=8, targets="qkv,o_proj")
    _randomise_adapters(model)
    x = _ids()
    want = model(x)[0]
    save_lora(model, tmp_path / "ad")
    saved = load_file(str(tmp_path / "ad" / ADAPTER_WEIGHTS))
    assert set(saved) == set(lora_state_dict(model)) and all(".lora_" in k for k in saved), "adapter file not alone"
    fresh = _model()  # the same base weights (same seed)
    meta = load_lora(fresh, tmp_path / "ad")
    assert meta["rank"] == 4 and meta["targets"] == ["qkv", "o_proj"]
    assert torch.equal(fresh(x)[0], want)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(saved)
    with pytest.raises(UserError) as e:
        load_lora(_model("nyx-debug"), tmp_path / "ad")
    assert "made for base model" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a LoRA adapter"):
        load_lora(_model(), tmp_path)


def test_remove_lora_gives_a_plain_model(tmp_path):
    model = _model()
    apply_lora(model, rank=4, alpha=8, targets="o_proj")
    _randomise_adapters(model)
    x = _ids()
    want = model(x)[0]
    remove_lora(model, merge=True)
    assert not lora_modules(model) and type(model.blocks[0].mixer.core.o_proj) is torch.nn.Linear
    model.save_pretrained(tmp_path / "merged")
    again = memlm.load_model(tmp_path / "merged")
    assert_close(again(x)[0], want, tol=1e-6, name="merged model saved and reloaded")
