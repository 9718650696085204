"""Islet bank: low-rank deltas with keys, picked by prompt similarity; base weights never touched.

Notation: B batch, T tokens, D width, A [r, I], B [O, r] an islet's delta on one linear module, σ its scale.
"""
from __future__ import annotations

import copy

import pytest
import torch

import memlm
from memlm.cli.main import main
from memlm.errors import UserError
from memlm.layers.islets import ISLETS_CONFIG, ISLETS_WEIGHTS, IsletBank
from memlm.layers.lora import apply_lora, save_lora
from memlm.layers.weave import disable_micro_lora, enable_micro_lora
from memlm.ops.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

MODS = ("blocks.0.mixer.core.qkv", "blocks.1.mlp.w_out")


def model(name="transformer-debug", seed=0):
    torch.manual_seed(seed)
    return memlm.build_model(name).eval()


def deltas(m, r=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in MODS:
        lin = m.get_submodule(n)
        out[n] = (torch.randn(r, lin.in_features, generator=g) * 0.3, torch.randn(lin.out_features, r, generator=g) * 0.3)
    return out


def ids(text: str) -> torch.Tensor:
    return torch.tensor([list(text.encode())])


@torch.no_grad()
def test_active_islet_equals_merged_weights_and_base_is_untouched():
    m = model()
    ref_model = copy.deepcopy(m)  # before any hook exists
    base_sd = {k: v.clone() for k, v in m.state_dict().items()}
    x = ids("The quick brown fox jumps")
    y0, _ = m(x)
    bank = IsletBank(m).attach()
    d = deltas(m)
    bank.add("one", d, key=torch.randn(64), scale=0.5)
    y_off, _ = m(x)
    assert torch.equal(y_off, y0)  # attached but none active: the base model
    bank.use("one")
    y1, _ = m(x)
    for n, (a, b) in d.items():
        ref_model.get_submodule(n).weight.add_(0.5 * b @ a)
    y_ref, _ = ref_model(x)
    assert_close(y1, y_ref, tol=1e-5, name="islet = W + σ B A")
    assert not torch.allclose(y1, y0)
    bank.remove("one")
    bank.detach()
    for k, v in m.state_dict().items():
        assert torch.equal(v, base_sd[k]), f"base weight {k} changed"
    assert torch.equal(m(x)[0], y0)


@torch.no_grad()
def test_selection_by_prompt_summary():
    m = model()
    bank = IsletBank(m, min_similarity=0.0)
    code, prose = ids("def f(x):\n    return [i ** 2 for i in x]\n"), ids("Once upon a time there lived a king.")
    bank.add("code", deltas(m, seed=2), key_ids=code)
    bank.add("prose", deltas(m, seed=3), key_ids=prose)
    assert bank.select(code) == "code" and bank.select(prose) == "prose"
    assert bank.select(ids("class A:\n    def g(self):\n        return {k: v for k, v in d}\n")) == "code"
    sc = bank.scores(code)
    assert abs(float(sc["code"]) - 1) < 1e-5 and float(sc["prose"]) < float(sc["code"])
    bank.min_similarity = 1.5
    assert bank.select(code) is None
    bank.min_similarity = 0.0
    with bank.routed(prose) as chosen:
        assert chosen == "prose" and bank.active == "prose"
        y_in, _ = m(prose)
    assert bank.active is None and not bank._attached
    assert not torch.allclose(y_in, m(prose)[0])
    assert [e["name"] for e in bank.list()] == ["code", "prose"] and bank.list()[0]["rank"] == 3


@torch.no_grad()
def test_islets_are_off_in_training_unless_enabled():
    m = model()
    x = ids("abcdef")
    bank = IsletBank(m).attach()
    bank.add("i", deltas(m), key=torch.ones(64))
    bank.use("i")
    m.train()
    y_train, _ = m(x)
    bank.use(None)
    y_base, _ = m(x)
    assert torch.equal(y_train, y_base)
    bank.train_enabled = True
    bank.use("i")
    assert not torch.allclose(m(x)[0], y_base)


def test_validation_errors():
    m = model()
    bank = IsletBank(m)
    with pytest.raises(UserError, match="name"):
        bank.add("bad name!", deltas(m), key=torch.ones(64))
    with pytest.raises(UserError, match="not a linear module"):
        bank.add("x", {"blocks.0.nope": (torch.ones(1, 64), torch.ones(64, 1))}, key=torch.ones(64))
    with pytest.raises(UserError, match="expected A"):
        bank.add("x", {MODS[0]: (torch.ones(2, 63), torch.ones(192, 2))}, key=torch.ones(64))
    with pytest.raises(UserError, match="key"):
        bank.add("x", deltas(m), key=torch.ones(5))
    bank.add("x", deltas(m), key=torch.ones(64))
    with pytest.raises(UserError, match="already exists"):
        bank.add("x", deltas(m), key=torch.ones(64))
    with pytest.raises(UserError, match="no islet"):
        bank.remove("y")


@torch.no_grad()
def test_save_load_roundtrip_and_other_model_refused(tmp_path):
    m = model()
    bank = IsletBank(m, min_similarity=0.25)
    bank.add("a", deltas(m), key_ids=ids("hello there"), scale=2.0)
    bank.save(tmp_path)
    assert (tmp_path / ISLETS_WEIGHTS).exists() and (tmp_path / ISLETS_CONFIG).exists()
    loaded = IsletBank.load(m, tmp_path)
    assert loaded.min_similarity == 0.25 and loaded.list() == bank.list()
    x = ids("hello")
    with bank.routed(x) as name:
        assert name == "a"
        y_orig, _ = m(x)
    with loaded.routed(x) as name:
        assert name == "a"
        y_loaded, _ = m(x)
    assert torch.equal(y_loaded, y_orig) and not torch.equal(y_orig, m(x)[0])
    with pytest.raises(UserError, match="another model"):
        IsletBank.load(model("gated-deltanet-debug"), tmp_path)
    assert IsletBank.load(m, tmp_path / "nothing-here").list() == []


@torch.no_grad()
def test_islet_from_micro_lora_reproduces_the_adapted_model():
    m = model("oumnix-debug")
    x = ids("adapt me please")
    enable_micro_lora(m, rank=2)
    for mod in m.modules():
        if getattr(mod, "lora_B", None) is not None:
            mod.lora_B.normal_(0, 0.1)
    y_adapted, _ = m(x)
    bank = IsletBank(m)
    bank.add_from_micro_lora("adapt", key_ids=x)
    disable_micro_lora(m)
    y_base, _ = m(x)
    with bank.routed(x) as name:
        assert name == "adapt"
        y_islet, _ = m(x)
    assert_close(y_islet, y_adapted, tol=1e-5, name="islet from micro-LoRA")
    assert not torch.allclose(y_base, y_adapted)


def test_cli_add_list_remove(tmp_path, capsys):
    m = model()
    mdir = tmp_path / "model"
    m.save_pretrained(mdir)
    weights_before = (mdir / "model.safetensors").read_bytes()
    a = copy.deepcopy(m)
    apply_lora(a, rank=2, alpha=4, targets=["qkv"])
    with torch.no_grad():
        for n, p in a.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()
    save_lora(a, tmp_path / "adapter")
    assert main(["islets", "add", str(mdir), "--name", "legal", "--adapter", str(tmp_path / "adapter"),
                 "--key-text", "the party of the first part", "--scale", "0.5"]) == 0
    assert main(["islets", "list", str(mdir)]) == 0
    out = capsys.readouterr().out
    assert '"name": "legal"' in out and "blocks.0.mixer.core.qkv" in out
    bank = IsletBank.load(memlm.load_model(mdir), mdir)
    assert bank.list()[0]["scale"] == 0.5 and bank.list()[0]["rank"] == 2
    assert main(["islets", "add", str(mdir), "--name", "legal", "--adapter", str(tmp_path / "adapter"),
                 "--key-text", "x"]) == 2  # exists: a one-line error, exit code 2
    assert main(["islets", "remove", str(mdir), "--name", "legal"]) == 0
    assert IsletBank.load(memlm.load_model(mdir), mdir).list() == []
    assert (mdir / "model.safetensors").read_bytes() == weights_before  # base weights untouched on disk


def test_chat_and_serve_load_the_bank_and_route_each_turn(tmp_path):
    """load_for_inference (used by chat, serve, generate) picks up islets saved beside the model; a Session routes
    every turn through them: the turn whose text matches an islet's key runs with that islet's deltas (its reply
    logits equal those of the model with the islet active), the other turn with the base model."""
    from memlm.cli.commands import load_for_inference
    from memlm.inference.sampling import SamplingConfig
    from memlm.inference.session import Session

    m = model()
    mdir = tmp_path / "model"
    m.save_pretrained(mdir)
    bank = IsletBank(m, min_similarity=0.9)
    code = "def f(x):\n    return [i ** 2 for i in x]\n"
    bank.add("code", deltas(m, seed=2), key_ids=ids(code), scale=1.0)
    bank.save(mdir)
    loaded, tok, _ = load_for_inference(str(mdir), "cpu", "byte")
    assert loaded.islet_bank.list()[0]["name"] == "code"
    greedy = SamplingConfig(temperature=0.0)
    s = Session(loaded, tok, mode="stateless", sampling=greedy, max_new_tokens=4)
    r_code = s.complete(code).result
    r_prose = s.complete("Once upon a time there lived a king.").result
    assert r_code.islet == "code" and r_prose.islet is None
    assert loaded.islet_bank.active is None and not loaded.islet_bank._attached   # nothing left on after a turn
    plain, _, _ = load_for_inference(str(mdir), "cpu", "byte")
    del plain.islet_bank
    base = Session(plain, tok, mode="stateless", sampling=greedy, max_new_tokens=4)
    assert base.complete("Once upon a time there lived a king.").result.token_ids == r_prose.token_ids
    with plain_bank(plain, mdir) as b, b.routed(ids(code)):
        want = Session(plain, tok, mode="stateless", sampling=greedy, max_new_tokens=4).complete(code).result
    assert want.token_ids == r_code.token_ids and want.surprise == pytest.approx(r_code.surprise, abs=1e-5)
    no_islet = base.complete(code).result                  # the islet did change this turn's distribution
    assert no_islet.surprise != pytest.approx(r_code.surprise, abs=1e-3)


def plain_bank(m, mdir):
    import contextlib

    @contextlib.contextmanager
    def cm():
        b = IsletBank.load(m, mdir, min_similarity=0.9)
        try:
            yield b
        finally:
            b.detach()
    return cm()
