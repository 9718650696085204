"""Memory transfer (SPEC.md Infini-Pythia): a state moved CPU → file → another process → model continues the text
bit-exactly, for every memory family's debug preset."""
import subprocess
import sys

import pytest
import torch

import memlm
from memlm.models.state import ModelState

PRESETS = [p for p in ("gated-deltanet-debug", "hope-debug", "infini-pythia-70m-debug", "atlas-mag-debug",
                       "mamba2-debug", "oumnix-debug", "transformer-swa-debug") if p in memlm.list_presets()]

CHILD = r"""
import sys, torch, memlm
from pathlib import Path
from memlm.models.state import ModelState
for d in sys.argv[1:]:
    d = Path(d)
    model = memlm.load_model(d / "model")
    state = ModelState.load(d / "state.safetensors", model=model)
    ids = torch.load(d / "ids.pt", weights_only=True)
    with torch.no_grad():
        logits, new_state = model(ids, state)
    torch.save(logits, d / "out.pt")
    new_state.save(d / "out_state.safetensors")
"""


def test_state_continues_bit_exactly_in_another_process(tmp_path):
    expected = {}
    for name in PRESETS:
        d = tmp_path / name
        torch.manual_seed(0)
        model = memlm.build_model(name).eval()
        ids = torch.randint(0, 256, (2, 50))
        with torch.no_grad():
            _, state = model(ids[:, :37])
            want, want_state = model(ids[:, 37:], state)
        model.save_pretrained(d / "model")
        state.save(d / "state.safetensors")
        torch.save(ids[:, 37:].clone(), d / "ids.pt")
        expected[name] = (model, want, want_state)
    r = subprocess.run([sys.executable, "-c", CHILD, *[str(tmp_path / n) for n in PRESETS]], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for name, (model, want, want_state) in expected.items():
        got = torch.load(tmp_path / name / "out.pt", weights_only=True)
        assert torch.equal(got, want), f"{name}: continuation differs by {float((got - want).abs().max())}"
        got_state = ModelState.load(tmp_path / name / "out_state.safetensors", model=model)
        for k, v in want_state.state_dict().items():
            assert torch.equal(got_state.state_dict()[k], v), f"{name}: {k}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_state_round_trips_through_the_gpu_bit_exactly():
    for name in PRESETS:
        model = memlm.build_model(name).eval()
        _, s = model(torch.randint(0, 256, (1, 20)))
        back = s.to("cuda").to("cpu")
        for k, v in s.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), f"{name}: {k}"
