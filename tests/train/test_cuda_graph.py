"""train.cuda_graph: the training step's forward, backward and clip replayed from CUDA graphs (train/cuda_graph.py).

CPU: what the graphs need from the step (the normaliser and the step as tensors) computes the same as numbers, and
the trainer refuses the option where it cannot work. GPU: graphed training follows eager training step by step, with
one graph per kind of batch, the step-scheduled polarization loss included.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import memlm
from memlm.data.packing import Batch
from memlm.errors import UserError
from memlm.ops.testing import rel_err
from memlm.train.cuda_graph import StepGraphs, _origin
from memlm.train.tbptt import run_segments
from memlm.train.trainer import Trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cfg_for(preset: str, **train_kw):
    cfg = memlm.preset(preset)
    base = {"seq_len": 64, "batch_size": 4, "steps": 50, "warmup": 3, "lr": 3e-3, "eval_every": 0, "sample_every": 0,
            "save_every": 0, "log_every": 1, "tensorboard": False, "device": "cpu"}
    cfg.train = cfg.train.replace(**(base | train_kw))
    return cfg


def trainer(tmp_path, cfg, name: str, log=None) -> Trainer:
    return Trainer(cfg, out_dir=tmp_path / name, data=iter([]), val_data=[], log=log or (lambda s: None))


def batches(n: int, B: int, T: int, vocab: int, *, resets_every: int = 0, seed: int = 0,
            streams: bool = False) -> list[Batch]:
    """n batches cycling over two random ones (so that the loss can fall); resets_every > 0: every such batch has
    document starts inside its rows (another kind). streams: only the first batch starts documents (tbptt carries
    the state from batch to batch)."""
    g = torch.Generator().manual_seed(seed)
    two = [torch.randint(0, vocab, (B, T + 1), generator=g) for _ in range(2)]
    out = []
    for i in range(n):
        x = two[i % 2]
        reset = torch.zeros(B, T, dtype=torch.bool)
        reset[:, 0] = i == 0 or not streams
        if resets_every and i % resets_every == resets_every - 1:
            reset[:, T // 3] = reset[1:, T // 2] = True
        labels = x[:, 1:].clone()
        labels[0, : i % 5] = -100   # N changes from step to step
        out.append(Batch(x[:, :-1].clone(), labels, reset))
    return out


# ------------------------------------------------------------------------------------------------------------- CPU

def test_refused_on_cpu_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^train.cuda_graph=true: it needs a CUDA device .*train.cuda_graph=false$"):
        trainer(tmp_path, cfg_for("transformer-debug", cuda_graph=True), "cpu")


def test_a_failed_capture_names_where_it_failed():
    """The first error of the chain, at its innermost frame in memlm (a failed capture raises again on its way out)."""
    try:
        try:
            memlm.preset("no-such-preset")
        except Exception:
            raise RuntimeError("operation failed due to a previous error during capture")
    except RuntimeError as e:
        where = _origin(e)
    assert where.startswith("UserError: ") and "(at memlm/config/presets.py:" in where, where


def test_step_graphs_needs_a_warm_up():
    with pytest.raises(ValueError, match="capture_after"):
        StepGraphs([], capture_after=0)


def test_normaliser_and_step_as_tensors_compute_the_same():
    """A graph reads N and the step from device tensors; as numbers or tensors, the loss, the step-scheduled
    polarization loss (which a graph that baked the step in would freeze) and the gradients are the same."""
    cfg = memlm.preset("atlas-mag-debug")
    torch.manual_seed(0)
    model = memlm.build_model(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (2, 33))
    seg = [(x[:, :-1], x[:, 1:], None)]

    def run(n, step, scale=1.0):
        model.zero_grad(set_to_none=True)
        r = run_segments(lambda i, s, rs, lab: model(i, s, rs, labels=lab), seg, normalizer=n, step=step,
                         backward=True, loss_in_forward=True, scale=scale)
        return r.loss, r.aux["gate_polarization"], [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for step in (0, 7, 3000):
        a = run(50, step)
        b = run(torch.tensor(50.0), torch.tensor(step, dtype=torch.float64))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert len(a[2]) == len(b[2]) and all(torch.equal(g, h) for g, h in zip(a[2], b[2]))
    for scale in (4.0, 2.0**16):   # float16's loss scale, a device tensor in a graph: the same scaled gradients
        a = run(50, 7, scale)
        b = run(50, 7, torch.tensor(scale))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert len(a[2]) == len(b[2]) and all(torch.equal(g, h) for g, h in zip(a[2], b[2]))
    assert not torch.equal(run(50, 0)[1], run(50, 7)[1])   # λ(step) does move over these steps


class EagerGraphs:
    """StepGraphs' interface on the CPU: warm-up, "capture" and "replays" all run the body, which reads the static
    tensors as a replay does. So the trainer's side of the graphs — the batch, carried state, N, step and loss scale
    copied into static tensors, the kinds of step — is checked against eager training without CUDA."""

    def __init__(self) -> None:
        self.graphs: dict = {}
        self.warm: set = set()
        self.replays = 0

    def captured(self, key) -> bool:
        return key in self.graphs

    def run(self, key, body):
        if key in self.graphs or key in self.warm:
            self.graphs[key] = True
            self.replays += 1
        self.warm.add(key)
        return body()


@pytest.mark.parametrize("preset, kw, graphs", [
    ("atlas-mag-debug", {}, 2),                                    # with and without document starts: two kinds
    ("atlas-mag-debug", {"tbptt": True}, 1),                       # a memory: fixed shapes from the third step
    ("transformer-swa-debug", {"tbptt": True}, 1),                 # a sliding window: the same
    ("transformer-debug", {"tbptt": True}, 0),                     # full attention's cache grows: eager, no buffers
    ("transformer-debug", {"dtype": "float16"}, 2),                # float16: overflows, skipped steps, halved scale
])
def test_the_trainers_graph_side_follows_eager_on_cpu(tmp_path, preset, kw, graphs):
    tbptt = kw.get("tbptt", False)
    data = batches(12, 2, 32, 256, resets_every=0 if tbptt else 3, streams=tbptt)
    if tbptt:
        data = [data[i: i + 2] for i in range(0, len(data), 2)]    # two segments a step
    runs = []
    for graph in (False, True):
        tr = trainer(tmp_path, cfg_for(preset, seq_len=32, batch_size=2, detach_every=2, **kw), f"c{int(graph)}")
        if graph:
            tr.graphs = tr._with_graphs(EagerGraphs())
        if tr.amp == torch.float16:
            tr.loss_scale = 2.0**24      # overflows float16 until it has halved (five steps here)
        runs.append(([tr.train_step(b) | {"scale": tr.loss_scale} for b in data], tr))
    (eager, _), (graphed, tr) = runs
    assert len(tr.graphs.graphs) == graphs and len(tr._static) == graphs
    if tbptt and graphs:
        assert tr.graphs.replays == len(data) - 3                  # None, new shapes, warm-up, then replays
    for k in ("loss", "grad_norm", "skipped", "scale"):
        assert [repr(o[k]) for o in graphed] == [repr(o[k]) for o in eager], k  # bit for bit (nan too)
    if tr.amp == torch.float16:
        skipped = [o["skipped"] for o in eager]
        assert any(skipped) and skipped.count(False) >= 3, skipped


# ------------------------------------------------------------------------------------------------------------- GPU

@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles FlexAttention afresh: across the many presets of this file its compiled wrapper would reach
    dynamo's recompile limit and fall back to the unfused eager form, which copies a CPU tensor (no capture)."""
    if torch.cuda.is_available():
        torch._dynamo.reset()
    yield


def follow(tmp_path, preset: str, data: list[Batch], **train_kw) -> tuple[list[dict], list[dict], Trainer]:
    """(eager outputs, graphed outputs, graphed trainer) of train_step over ``data``, from the same initial weights."""
    outs = []
    for graph in (False, True):
        tr = trainer(tmp_path, cfg_for(preset, device="cuda", cuda_graph=graph, **train_kw), f"g{int(graph)}")
        outs.append([tr.train_step(b) for b in data])
    return outs[0], outs[1], tr


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("preset", [p for p in memlm.list_presets() if p.endswith("-debug")])
def test_graphed_training_follows_eager(tmp_path, preset):
    """Every family (its debug preset): the same losses, gradient norms and auxiliary losses step by step."""
    vocab = memlm.preset(preset).model.vocab_size
    data = batches(8, 4, 64, min(vocab, 256))
    eager, graphed, tr = follow(tmp_path, preset, data)
    assert len(tr.graphs.graphs) == 1 and tr.graphs.replays == 7    # one warm-up step, then one capture replayed
    for k in ("loss", "grad_norm") + tuple(k for k in eager[0] if k.startswith("aux/")):
        got, want = torch.tensor([o[k] for o in graphed]), torch.tensor([o[k] for o in eager])
        assert rel_err(got, want) < 2e-2, (k, got, want)     # bf16 autocast, atomics: not bit for bit
    assert eager[-1]["loss"] < eager[0]["loss"] - 0.1 and graphed[-1]["loss"] < graphed[0]["loss"] - 0.1


@pytest.mark.gpu
@cuda
def test_one_graph_per_kind_of_batch(tmp_path):
    """Batches with and without document starts inside the rows launch different kernels: two graphs, replayed in
    turn, each step still what eager training computes."""
    data = batches(9, 4, 64, 256, resets_every=3)
    eager, graphed, tr = follow(tmp_path, "atlas-mag-debug", data)
    assert len(tr.graphs.graphs) == 2 and tr.graphs.replays == 9 - 2
    got, want = torch.tensor([o["loss"] for o in graphed]), torch.tensor([o["loss"] for o in eager])
    assert rel_err(got, want) < 2e-2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("preset", ["transformer-debug", "atlas-mag-debug"])   # atlas: the walk as custom operators
def test_graphed_with_compile_and_accumulation(tmp_path, preset):
    data = [batches(2, 2, 64, 256, seed=i) for i in range(5)]      # two micro-batches a step
    eager, graphed, tr = follow(tmp_path, preset, data, compile=True, grad_accum=2, batch_size=2)
    assert tr.graphs.replays == 4
    got, want = torch.tensor([o["loss"] for o in graphed]), torch.tensor([o["loss"] for o in eager])
    assert rel_err(got, want) < 2e-2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("preset", ["transformer-debug", "atlas-mag-debug"])
def test_graphed_float16_follows_eager_through_overflows(tmp_path, preset):
    """float16: the loss scale is read from a device tensor, so the steps skipped on an overflow and the halved scale
    after them are eager training's, and the graph keeps replaying across scale changes."""
    data = batches(10, 4, 64, 256)
    runs = []
    for graph in (False, True):
        tr = trainer(tmp_path, cfg_for(preset, device="cuda", cuda_graph=graph, dtype="float16"), f"h{int(graph)}")
        tr.loss_scale = 2.0**24        # overflows float16 until it has halved enough
        runs.append(([tr.train_step(b) | {"scale": tr.loss_scale} for b in data], tr))
    (eager, _), (graphed, tr) = runs
    skipped = [o["skipped"] for o in eager]
    assert any(skipped) and not all(skipped[-3:]), skipped
    assert [o["skipped"] for o in graphed] == skipped and [o["scale"] for o in graphed] == [o["scale"] for o in eager]
    assert len(tr.graphs.graphs) == 1 and tr.graphs.replays == len(data) - 1    # one warm-up, then capture + replays
    got, want = torch.tensor([o["loss"] for o in graphed]), torch.tensor([o["loss"] for o in eager])
    assert rel_err(got, want) < 2e-2, (got, want)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("preset, graphs", [("atlas-mag-debug", 1), ("transformer-swa-debug", 1),
                                            ("transformer-debug", 0)])
def test_graphed_tbptt_follows_eager(tmp_path, preset, graphs):
    """tbptt: the carried state is copied into the graph's static state before each replay, so the losses (which
    depend on it) are eager training's. A state whose shapes change (full attention's growing cache) runs every step
    eagerly and keeps no static buffers; fixed shapes are graphed from the third step (warm-up, capture, replays)."""
    data = [batches(16, 4, 32, 256, streams=True)[i: i + 2] for i in range(0, 16, 2)]   # two segments a step
    eager, graphed, tr = follow(tmp_path, preset, data, tbptt=True, detach_every=2, seq_len=32)
    assert len(tr.graphs.graphs) == graphs and len(tr._static) == graphs
    assert tr.graphs.replays == (len(data) - 3 if graphs else 0)
    got, want = torch.tensor([o["loss"] for o in graphed]), torch.tensor([o["loss"] for o in eager])
    assert rel_err(got, want) < 2e-2, (got, want)


@pytest.mark.gpu
@cuda
def test_a_host_sync_in_the_model_stops_with_one_line(tmp_path):
    """A model that reads the device inside its forward cannot be captured: one line that says so and where, after the
    eager warm-up step went through. In a fresh process: a failed capture can leave CUDA's RNG unusable."""
    code = f"""
import torch, memlm
from memlm.layers import attention
from memlm.errors import UserError
from tests.train.test_cuda_graph import batches, cfg_for, trainer
from pathlib import Path
orig = attention.Attention.forward
def syncing(self, x, *a, **kw):
    if float(x.sum()) != float(x.sum()):
        print("nan")
    return orig(self, x, *a, **kw)
attention.Attention.forward = syncing
tr = trainer(Path({str(tmp_path)!r}), cfg_for("transformer-debug", device="cuda", cuda_graph=True), "s")
data = batches(2, 4, 64, 256)
tr.train_step(data[0])
try:
    tr.train_step(data[1])
except UserError as e:
    print("ERR", e)
"""
    import subprocess
    import sys
    import os
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root, env=env)
    line = [s for s in r.stdout.splitlines() if s.startswith("ERR ")]
    assert line, r.stdout + r.stderr
    msg = line[0]
    assert "train.cuda_graph=true: capturing the step as a CUDA graph failed" in msg and "\n" not in msg, msg
    assert "(at memlm/" in msg and "set train.cuda_graph=false" in msg, msg
