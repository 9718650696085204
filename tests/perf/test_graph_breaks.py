"""torch.compile sees the whole training forward of every preset: no graph breaks, no recompiles between batches.

Each debug preset runs the trainer's own ``train_step`` (aux collection, the reset bound, LM head and chunked CE
inside the model's forward, backward, optimizer step) with the model compiled through Dynamo onto a counting
``eager`` backend (no code generation, so this stays fast on the CPU). Three batches: without a document start
inside the rows (the trainer drops reset then), with document starts (packed rows), and the same kind again, which
must reuse the compiled graphs.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import memlm
from memlm.data.packing import Batch
from memlm.train.graphs import trace_training_steps
from memlm.train.trainer import Trainer

DEBUG = [n for n in memlm.list_presets() if n.endswith("-debug")]
# the slowest to trace on 2 CPU cores (10–35 s each); the default run keeps one preset of each family
SLOW = {"atlas-mal-debug", "titans-lmm-debug", "titans-mag-debug", "oumnix-debug", "oumnix-retrieval-debug", "hope-debug",
        "deltanet-debug", "infini-pythia-70m-hier4-debug", "infini-pythia-70m-multi4-debug"}
B, T = 2, 32


def _params():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in DEBUG]


def _batch(seed: int, docs: bool) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 250, (B, T + 1), generator=g)
    labels = x[:, 1:].clone()
    labels[0, :3] = -100  # masked targets (e.g. a prompt) go through the loss path too
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True
    if docs:
        reset[0, 17 + seed % 5] = True       # packed rows: documents of different lengths per row
        reset[1, 28 - seed % 3] = True
        reset[1, 9] = True
    return Batch(x[:, :-1].clone(), labels, reset)


def _trainer(name: str, tmp_path, device: str = "cpu") -> Trainer:
    cfg = memlm.preset(name)
    cfg.train = cfg.train.replace(seq_len=T, batch_size=B, steps=10, warmup=1, eval_every=0, sample_every=0,
                                  save_every=0, log_every=1, tensorboard=False, device=device, compile=False,
                                  cross_entropy="chunked", ce_chunk=37)
    return Trainer(cfg, out_dir=tmp_path / name, data=iter([]), tokenizer=memlm.load_tokenizer(cfg.train.tokenizer),
                   log=lambda s: None)


# On CUDA the Triton kernels (delta rule, neural memory, compressive memory) and FlexAttention are in the graph
CUDA_PRESETS = ["transformer-debug", "transformer-swa-debug", "gated-deltanet-debug", "deltanet-debug",
                "atlas-mag-debug", "titans-mag-debug", "infini-pythia-70m-debug", "hope-debug", "onyx-debug"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CUDA_PRESETS)
def test_training_step_compiles_without_graph_breaks_cuda(name, tmp_path):
    test_training_step_compiles_without_graph_breaks(name, tmp_path, "cuda")


@pytest.mark.parametrize("name", _params())
def test_training_step_compiles_without_graph_breaks(name, tmp_path, device="cpu"):
    torch.manual_seed(0)
    tr = _trainer(name, tmp_path, device)
    rep = trace_training_steps(tr, [_batch(0, docs=False), _batch(1, docs=True), _batch(2, docs=False),
                                    _batch(3, docs=True)], seen=2)
    assert not rep.breaks, f"{name}: graph breaks {rep.breaks}"
    assert not rep.recompiled_on_repeat, f"{name}: recompiled for a batch of a kind already seen ({rep.recompiles})"
    assert all(torch.isfinite(torch.tensor(o["loss"])) and not o["skipped"] for o in rep.outputs)
    assert rep.seconds < 120


@pytest.mark.filterwarnings("ignore::UserWarning")  # eager flex_attention on the CPU warns that it is slow
@pytest.mark.parametrize("name", ["transformer-swa-debug", "atlas-mag-debug"])
def test_flex_attention_forward_compiles_without_graph_breaks(name):
    """The FlexAttention path (CUDA's default; forced here, eager on the CPU, forward only: no CPU backward)."""
    from memlm.ops.compressive.segments import reset_bound
    from memlm.ops.dispatch import force_backend

    torch.manual_seed(0)
    model = memlm.build_model(name).eval()
    batch = _batch(1, docs=True)
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    with force_backend("masked_attention", "flex"), reset_bound(2), torch.no_grad():
        got, _ = compiled(batch.input_ids, None, batch.reset)
        want, _ = model(batch.input_ids, None, batch.reset)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(got, want)
