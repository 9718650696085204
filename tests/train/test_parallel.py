"""Tests for memlm.train.parallel: two gloo processes on CPU train exactly like one process on the same global batch
(DDP, FSDP2, TBPTT), and checkpoints move between world sizes (2 → 1, 1 → 2).

Notation: W = 2 processes, b rows per rank, B = b·W rows of a global micro-batch, T tokens per row.

One launch of W worker processes (this file run as a script, with the RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
variables torchrun would set, a free port, CPU only, a timeout) runs every distributed case; the single-process
references run in the test process. The loss trajectories must agree to float tolerance: a wrong normaliser, a
missing gradient average, overlapping or missing rows, or state rows in the wrong order all break them.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import memlm
from memlm.data.packing import Batch, Packer, shard_rows
from memlm.data.tokenizer import ByteTokenizer
from memlm.errors import UserError
from memlm.ops.testing import rel_err
from memlm.train import parallel
from memlm.train.checkpoint import DCP_DIR, find_checkpoint, list_checkpoints
from memlm.train.metrics import read_jsonl
from memlm.train.trainer import Trainer

W = 2
TIMEOUT_S = 300
TEXT = ("Memory is the treasury and guardian of all things. The river keeps its course by the stones it has "
        "carried; the child keeps the tune her grandmother sang. A ship in harbour is safe, but that is not what "
        "ships are for. Every morning the baker counts the loaves, and every evening he counts the coins. ")

# name: (preset, global rows B, steps, save_every, train overrides). grad_accum=2 exercises no_sync /
# set_requires_gradient_sync; the FSDP case also checkpoints activations; deltanet carries a recurrent state (TBPTT);
# atlas-mag reports an auxiliary loss (must average over ranks, not add up) and reads its parameters in init_state
# (its blocks join FSDP's root unit).
CASES = {
    "ddp": ("transformer-debug", 4, 6, 3, {"parallel": "ddp", "grad_accum": 2}),
    "fsdp": ("transformer-debug", 4, 6, 3, {"parallel": "fsdp", "grad_accum": 2, "activation_checkpointing": True}),
    "tbptt": ("deltanet-debug", 4, 4, 2, {"parallel": "ddp", "tbptt": True, "detach_every": 2}),
    "aux": ("atlas-mag-debug", 4, 4, 2, {"parallel": "fsdp"}),
}


def texts(n: int = 60) -> list[str]:
    words = TEXT.split()
    return [" ".join(words[(7 * i) % len(words):] + words[:(7 * i) % len(words)]) + f" ({i})" for i in range(n)]


def case_cfg(name: str, world: int, **extra):
    preset, rows, steps, save_every, over = CASES[name]
    cfg = memlm.preset(preset)
    base = {"seq_len": 32, "batch_size": rows // world, "steps": steps, "warmup": 2, "lr": 3e-3, "eval_every": save_every,
            "eval_batches": 2, "sample_every": steps, "sample_tokens": 6, "save_every": save_every, "keep_last": 10,
            "log_every": 1, "tensorboard": False, "device": "cpu"}
    cfg.train = cfg.train.replace(**(base | over | extra))
    return cfg


def make_trainer(name: str, world: int, out: Path, resume=None, **extra) -> Trainer:
    """The same global data for any world size: streams of B = batch_size × world rows (each rank keeps its rows)."""
    cfg = case_cfg(name, world, **extra)
    t, tok = cfg.train, ByteTokenizer()
    mode = "streams" if t.tbptt else "packed"
    data = Packer(texts(), tok, batch_size=t.batch_size * world, seq_len=t.seq_len, mode=mode, seed=t.seed)
    val = Packer(texts(90)[60:], tok, batch_size=t.batch_size * world, seq_len=t.seq_len, mode=mode, shuffle=False,
                 loop=False)
    return Trainer(cfg, out_dir=out, data=data, val_data=val, tokenizer=tok, log=lambda s: None, resume=resume)


def records(out: Path) -> dict[int, dict]:
    """step → merged metric records (loss, grad_norm, val_loss, sample) of a run folder."""
    merged: dict[int, dict] = {}
    for r in read_jsonl(out / "metrics.jsonl"):
        merged.setdefault(r["step"], {}).update(r)
    return merged


def series(recs: dict[int, dict], key: str, steps) -> torch.Tensor:
    return torch.tensor([recs[s][key] for s in steps], dtype=torch.float64)


# ------------------------------------------------------------------------------------------ the worker processes

def _worker(spec_path: str) -> None:
    """One rank: run every job of the spec in order (all ranks run the same jobs)."""
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    for job in spec["jobs"]:
        tr = make_trainer(job["case"], W, Path(job["out"]), resume=job.get("resume"))
        tr.fit()
    parallel.shutdown()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_TAKEN = ("EADDRINUSE", "address already in use")   # rank 0's store could not listen on the chosen port


def launch(tmp: Path, jobs: list[dict], attempts: int = 3) -> None:
    """Run the jobs in W processes joined through env:// (what torchrun sets up), on CPU with gloo.

    The port is free when chosen but not reserved: another process (a second test run, a gloo connection's ephemeral
    port) can take it before rank 0 listens. Only that failure is retried, on a new port."""
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs}))
    for attempt in range(1, attempts + 1):
        codes = _run_workers(tmp, spec, _free_port())
        if codes == [0] * W:
            return
        logs = [(tmp / f"rank{r}.log").read_text() for r in range(W)]
        if attempt < attempts and any(m in log for log in logs for m in PORT_TAKEN):
            continue
        tails = "\n".join(f"--- rank {r} (exit {c}):\n" + log[-3000:] for r, (c, log) in enumerate(zip(codes, logs)))
        pytest.fail(f"distributed workers failed or ran past {TIMEOUT_S} s (attempt {attempt} of {attempts}):\n{tails}")


def _run_workers(tmp: Path, spec: Path, port: int) -> list[int | None]:
    """Start W workers on ``port``, wait for them (a failed rank stops the others) and return their exit codes."""
    root = str(Path(memlm.__file__).resolve().parent.parent)
    procs, logs = [], []
    for r in range(W):
        env = os.environ | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(W), "LOCAL_WORLD_SIZE": str(W),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "",
                            "OMP_NUM_THREADS": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        log = open(tmp / f"rank{r}.log", "w")  # noqa: SIM115 — closed below
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(spec)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(2)  # give the peer a moment to report its side, then stop everything
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    return [p.returncode for p in procs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references here, then one launch of W processes for every distributed job."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("parallel")
    try:
        for name in CASES:
            make_trainer(name, 1, tmp / f"{name}-1").fit()
        save = {name: CASES[name][3] for name in CASES}
        jobs = [{"case": name, "out": str(tmp / f"{name}-2")} for name in CASES]
        # 1 → 2: continue the single-process run from its first checkpoint in two processes
        jobs += [{"case": name, "out": str(tmp / f"{name}-1to2"),
                  "resume": str(tmp / f"{name}-1" / "checkpoints" / f"step_{save[name]:06d}")} for name in ("ddp", "fsdp")]
        t0 = time.perf_counter()
        launch(tmp, jobs)
        print(f"distributed jobs: {time.perf_counter() - t0:.1f}s")
        yield tmp
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_train_like_one(runs, name):
    """Same global batch → the same losses, gradient norms and validation losses, step after step."""
    steps = range(1, CASES[name][2] + 1)
    one, two = records(runs / f"{name}-1"), records(runs / f"{name}-2")
    assert rel_err(series(two, "loss", steps), series(one, "loss", steps)) < 1e-5
    assert rel_err(series(two, "grad_norm", steps), series(one, "grad_norm", steps)) < 1e-4
    val_steps = [s for s in steps if "val_loss" in one[s]]
    assert val_steps and rel_err(series(two, "val_loss", val_steps), series(one, "val_loss", val_steps)) < 1e-5
    assert two[steps[-1]]["tokens"] == one[steps[-1]]["tokens"]  # tokens are counted over all ranks
    assert isinstance(two[steps[-1]].get("sample"), str) and two[steps[-1]]["sample"]  # rank 0 sampled
    # training actually moved (otherwise equal trajectories would prove little)
    assert one[steps[-1]]["loss"] < one[1]["loss"] - 0.3


@pytest.mark.parametrize("name", list(CASES))
def test_two_process_checkpoint_resumes_in_one_process(runs, name, tmp_path):
    """A 2-process checkpoint (DCP shards + consolidated weights) continues in one process exactly as the 2-process
    run continued (optimizer moments, data cursor, TBPTT state rows all restored)."""
    _, _, steps, save, _ = CASES[name]
    ckpt_dir = runs / f"{name}-2" / "checkpoints" / f"step_{save:06d}"
    assert (ckpt_dir / DCP_DIR).is_dir() and (ckpt_dir / "model.safetensors").is_file()
    assert not (ckpt_dir / "optimizer.pt").exists()
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    assert state["world_size"] == W and state["step"] == save
    torch.set_num_threads(1)
    out = tmp_path / "resumed"
    tr = make_trainer(name, 1, out, resume=ckpt_dir)
    assert tr.step == save and tr.dist is None
    tr.fit()
    after = range(save + 1, steps + 1)
    resumed, two = records(out), records(runs / f"{name}-2")
    assert rel_err(series(resumed, "loss", after), series(two, "loss", after)) < 1e-5
    # a fresh optimizer (moments lost) would not follow: the check can fail
    fresh = make_trainer(name, 1, tmp_path / "fresh")
    fresh.model.load_state_dict(memlm.load_model(ckpt_dir).state_dict())
    fresh.data.load_state_dict(state["data"])
    fresh.step = save
    losses = [fresh.train_step(fresh._next_batches())["loss"] for _ in after]
    assert rel_err(torch.tensor(losses, dtype=torch.float64), series(two, "loss", after)) > 1e-4


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_one_process_checkpoint_resumes_in_two_processes(runs, name):
    _, _, steps, save, _ = CASES[name]
    after = range(save + 1, steps + 1)
    cont, one = records(runs / f"{name}-1to2"), records(runs / f"{name}-1")
    assert sorted(cont) == list(after)
    assert rel_err(series(cont, "loss", after), series(one, "loss", after)) < 1e-5


def test_distributed_checkpoint_is_a_plain_model_folder(runs, capsys):
    """rank 0's consolidated weights: memlm.load_model and `memlm info` read the FSDP checkpoint as any other."""
    from memlm.cli.main import main

    path = find_checkpoint(runs / "fsdp-2")
    assert path.name == "step_000006" and len(list_checkpoints(runs / "fsdp-2" / "checkpoints")) == 2
    model = memlm.load_model(path)
    ref = memlm.load_model(find_checkpoint(runs / "fsdp-1"))
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert rel_err(a, b) < 1e-4, k
    assert main(["info", str(path)]) == 0
    assert "step" in capsys.readouterr().out
    assert not list((runs / "fsdp-2" / "checkpoints").glob(".step_*"))  # no temporary folder left behind


def test_cli_nproc_launches_torchrun(tmp_path, capsys):
    """`memlm train --nproc 2` re-runs itself under torchrun (FSDP2 on gloo here); the checkpoint is sharded and
    `memlm generate` reads it in one process."""
    from memlm.cli.main import main

    out = tmp_path / "run"
    sets = ["train.seq_len=32", "train.batch_size=2", "train.eval_every=0", "train.sample_every=0",
            "train.tensorboard=false", "train.parallel=fsdp", "train.log_every=1"]
    cmd = [sys.executable, "-m", "memlm", "train", "--nproc", str(W), "--preset", "transformer-debug", "--steps", "2",
           "--device", "cpu", "--out", str(out)] + [a for kv in sets for a in ("--set", kv)]
    root = str(Path(memlm.__file__).resolve().parent.parent)
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "fsdp over 2 processes (gloo" in r.stdout  # logged once, by rank 0
    assert r.stdout.count("tokens/step") == 1
    path = find_checkpoint(out)
    assert (path / DCP_DIR).is_dir() and json.loads((path / "trainer_state.json").read_text())["world_size"] == W
    assert [rec["step"] for rec in read_jsonl(out / "metrics.jsonl") if "loss" in rec] == [1, 2]
    assert main(["generate", str(out), "--prompt", "The", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_a_taken_port_is_retried_on_a_new_one(tmp_path, monkeypatch):
    """The first port offered is held by another listener: rank 0 cannot listen there, and the launch goes on with a
    new port instead of failing the module's every test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        ports = [held.getsockname()[1]]
        free = _free_port
        monkeypatch.setattr(sys.modules[__name__], "_free_port", lambda: ports.pop() if ports else free())
        launch(tmp_path, [{"case": "ddp", "out": str(tmp_path / "ddp-2")}])
    assert not ports and records(tmp_path / "ddp-2")[CASES["ddp"][2]]["loss"] > 0


# ------------------------------------------------------------------------------------------ single-process pieces

def test_shard_rows_partitions_the_global_batch():
    g = torch.arange(6 * 5).reshape(6, 5)
    batch = Batch(g, g + 100, g % 7 == 0)
    parts = [shard_rows(batch, r, 3) for r in range(3)]
    rows = sorted(int(p.input_ids[i, 0]) for p in parts for i in range(2))
    assert rows == g[:, 0].tolist()  # disjoint and complete
    assert torch.equal(parts[1].input_ids, g[1::3]) and torch.equal(parts[1].labels, g[1::3] + 100)
    assert torch.equal(parts[2].reset, (g % 7 == 0)[2::3])
    with pytest.raises(UserError, match="cannot be split over 4"):
        shard_rows(batch, 0, 4)


def test_activation_checkpointing_recomputes_blocks_with_identical_results(tmp_path):
    """Same losses and gradients as without; each block's forward really runs twice per step (recompute)."""
    torch.set_num_threads(1)
    calls = []
    results = {}
    for ac in (False, True):
        tr = make_trainer("ddp", 1, tmp_path / str(ac), parallel="none", activation_checkpointing=ac)
        handle = tr.model.blocks[0].mixer.register_forward_hook(lambda *a, _ac=ac: calls.append(_ac))
        out = [tr.train_step(tr._next_batches()) for _ in range(2)]
        handle.remove()
        grads = torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None])
        results[ac] = ([o["loss"] for o in out], grads, list(tr.model.state_dict()))
    assert results[True][0] == results[False][0] and torch.equal(results[True][1], results[False][1])
    assert results[True][2] == results[False][2]  # same parameter names: checkpoints stay interchangeable
    assert calls.count(True) == 2 * calls.count(False)


def test_torchrun_command_drops_nproc():
    for argv in (["train", "--nproc", "2", "--steps", "3"], ["train", "--nproc=2", "--steps", "3"],
                 ["train", "--npro", "2", "--steps", "3"]):
        cmd = parallel.torchrun_command(argv, 2)
        assert cmd[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
        assert cmd[7:] == ["memlm.cli.main", "train", "--steps", "3"]


def test_config_and_setup_without_a_process_group(monkeypatch):
    with pytest.raises(ValueError, match="parallel"):
        memlm.TrainConfig(parallel="zero3")
    with pytest.raises(ValueError, match="mixed_precision"):
        memlm.TrainConfig(mixed_precision="fp8")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert parallel.setup(memlm.TrainConfig(parallel="fsdp"), torch.device("cpu")) is None  # one process: ignored
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="parallel=none"):
        parallel.setup(memlm.TrainConfig(parallel="none"), torch.device("cpu"))
    assert parallel.precision_dtypes("auto", torch.device("cpu")) == (None, None)
    assert parallel.precision_dtypes("auto", torch.device("cuda", 0)) == (torch.bfloat16, torch.bfloat16)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
