"""Config dataclasses: JSON round trip, --set overrides with type checks, validation messages, preset registry."""
import json

import pytest

import memlm
from memlm.config.base import apply_overrides
from memlm.config.train import RunConfig
from memlm.errors import UserError
from memlm.layers.attention import AttentionConfig


def test_json_round_trip_every_preset():
    for name in memlm.list_presets():
        cfg = memlm.preset(name)
        again = RunConfig.from_json(cfg.to_json())
        assert again.to_dict() == cfg.to_dict(), name
        assert again.model.config_hash() == cfg.model.config_hash()
        assert type(again.model.layers[0]) is type(cfg.model.layers[0])


def test_overrides_typed_and_nested():
    cfg = memlm.preset("transformer-debug")
    new = apply_overrides(cfg, ["train.lr=1e-3", "model.layers.0.window=16", "train.data=[\"a.txt\",\"b.txt\"]",
                                "train.compile=true"])
    assert new.train.lr == 1e-3 and new.model.layers[0].window == 16 and new.train.data == ["a.txt", "b.txt"]
    assert new.train.compile is True
    assert isinstance(new.model.layers[0], AttentionConfig)
    assert cfg.train.lr != 1e-3, "the original config must not change"


@pytest.mark.parametrize("item, words", [
    ("train.lr=fast", "train.lr"),
    ("train.nope=1", "nope"),
    ("model.layers.9.window=4", "out of range"),
    ("train.steps=2.5", "train.steps"),
    ("train.optimizer=sgd", "optimizer"),
    ("model.layers.0.kind=banana", "banana"),
    ("trainlr", "KEY=VALUE"),
    ("train.compile=1", "true/false"),
])
def test_bad_overrides_name_the_key(item, words):
    with pytest.raises(UserError) as e:
        apply_overrides(memlm.preset("transformer-debug"), [item])
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_changing_mixer_kind_by_override_rebuilds_config():
    cfg = apply_overrides(memlm.preset("transformer-debug"), ["model.norm=layernorm"])
    assert cfg.model.norm == "layernorm"
    m = memlm.build_model(cfg)
    assert type(m.norm_f).__name__ == "LayerNorm"


def test_unknown_preset_suggests():
    with pytest.raises(UserError, match="did you mean"):
        memlm.preset("transformer-debg")


def test_from_dict_unknown_key():
    d = memlm.preset("transformer-debug").to_dict()
    d["model"]["colour"] = "red"
    with pytest.raises(UserError, match="colour"):
        RunConfig.from_dict(json.loads(json.dumps(d)))


def test_exact_parameter_counts():
    # SPEC.md: NYX is exactly 30,020,096 parameters; Pythia-70m's shape gives 70,426,624 (with vocab 50304).
    assert memlm.build_model("nyx-30m").num_params() == 30_020_096
    assert memlm.build_model("pythia-70m").num_params() == 70_426_624
    assert memlm.build_model("transformer-34m").num_params() == 34_087_424


def test_build_model_accepts_name_runconfig_modelconfig():
    a = memlm.build_model("transformer-debug")
    b = memlm.build_model(memlm.preset("transformer-debug"))
    c = memlm.build_model(memlm.preset("transformer-debug").model)
    assert a.num_params() == b.num_params() == c.num_params()
