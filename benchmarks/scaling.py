"""Data-parallel scaling of memlm training: tokens/s on 1 GPU and on N GPUs (torchrun) with the same per-GPU batch.

Notation: N processes (one GPU each), b rows per GPU, T tokens per row, S timed steps; tokens/s = N·b·T·S / time.
Scaling efficiency = tokens/s(N) / (N · tokens/s(1)); speedup = tokens/s(N) / tokens/s(1).

Every run goes through the real Trainer.train_step (bf16 autocast, clipping, AdamW, the DDP / FSDP2 wrapping of
memlm/train/parallel.py) on one fixed random batch, so data loading is not measured. The 1-GPU baseline is the plain
single-process trainer (torchrun with one process: no process group). The NCCL environment is used as it is set; the
NCCL_* variables are recorded. One JSON line per run, then one summary line per N > 1 and mode.

    python benchmarks/scaling.py --preset transformer-100m --nproc 2 --batch 8 --seq 2048 --steps 30
    python benchmarks/scaling.py --preset transformer-debug --device cpu --batch 2 --seq 64 --steps 3   # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    """One rank of one run (started by torchrun); rank 0 appends the result line to args.result."""
    import torch

    import memlm
    from memlm.data.packing import Batch
    from memlm.data.tokenizer import ByteTokenizer
    from memlm.train.trainer import Trainer

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cfg = memlm.preset(args.preset)
    cfg.train = cfg.train.replace(batch_size=args.batch, seq_len=args.seq, grad_accum=1, steps=10**9, warmup=10,
                                  eval_every=0, sample_every=0, save_every=0, tensorboard=False, log_every=10**9,
                                  device=args.device, parallel=args.parallel[0], compile=args.compile,
                                  activation_checkpointing=args.activation_checkpointing)
    V = cfg.model.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (args.batch * world, args.seq + 1), generator=g)  # the global batch; rank r uses r::N
    batch = Batch(x[:, :-1].clone(), x[:, 1:].clone(), torch.zeros(args.batch * world, args.seq, dtype=torch.bool))
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(cfg, out_dir=out, data=iter(()), tokenizer=ByteTokenizer(),
                     log=print if rank == 0 else (lambda s: None))
        cuda = tr.device.type == "cuda"

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()
            if tr.dist is not None:
                tr.dist.barrier()

        for _ in range(args.warmup):
            tr.train_step(batch)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out_step = tr.train_step(batch)
        sync()
        dt = time.perf_counter() - t0
        if rank == 0:
            tok_s = args.batch * world * args.seq * args.steps / dt
            rec = {"preset": args.preset, "nproc": world, "parallel": tr.dist.mode if tr.dist else "single",
                   "mixed_precision": cfg.train.mixed_precision if tr.dist else None, "compile": args.compile,
                   "activation_checkpointing": args.activation_checkpointing, "params": tr.model.num_params(),
                   "batch_per_gpu": args.batch, "seq": args.seq, "steps": args.steps,
                   "tokens_per_s": round(tok_s), "tokens_per_s_per_gpu": round(tok_s / world),
                   "step_ms": round(dt / args.steps * 1e3, 2), "loss": round(out_step["loss"], 4),
                   "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                   "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                   "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                   "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}
            with open(args.result, "a") as f:
                f.write(json.dumps(rec) + "\n")
    if tr.dist is not None:
        from memlm.train.parallel import shutdown

        shutdown()


def run(args: argparse.Namespace, nproc: int, parallel: str, result: Path) -> dict | None:
    """Launch one run under torchrun; returns its result line (None when it failed)."""
    before = result.read_text().count("\n") if result.exists() else 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), __file__,
           "--worker", "--result", str(result), "--preset", args.preset, "--batch", str(args.batch), "--seq",
           str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--parallel", parallel] + (["--compile"] if args.compile else []) + \
          (["--activation-checkpointing"] if args.activation_checkpointing else [])
    proc = subprocess.run(cmd, check=False, timeout=args.timeout, stdout=sys.stderr)  # progress to stderr, JSON to stdout
    lines = result.read_text().splitlines() if result.exists() else []
    if proc.returncode != 0 or len(lines) <= before:
        print(json.dumps({"nproc": nproc, "parallel": parallel, "error": f"exit status {proc.returncode}"}))
        return None
    rec = json.loads(lines[-1])
    print(json.dumps(rec), flush=True)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="transformer-100m")
    p.add_argument("--nproc", type=int, nargs="+", default=[2], help="process counts to compare with 1 (default 2)")
    p.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    p.add_argument("--batch", type=int, default=8, help="rows per GPU (the same at every N)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (DDP bucket rebuild, autotuning)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu (gloo: a smoke test)")
    p.add_argument("--compile", action="store_true", help="train.compile=true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.device != "cpu":
        import torch

        have = torch.cuda.device_count()
        if have < max(args.nproc):
            sys.exit(f"scaling.py: --nproc {max(args.nproc)} needs that many GPUs, this machine has {have}")
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "results.jsonl"
        base = run(args, 1, "ddp", result)  # one process: the plain trainer, whatever --parallel says
        for n in args.nproc:
            for mode in args.parallel:
                rec = run(args, n, mode, result)
                if base is None or rec is None:
                    continue
                speedup = rec["tokens_per_s"] / base["tokens_per_s"]
                print(json.dumps({"summary": True, "preset": args.preset, "nproc": n, "parallel": mode,
                                  "tokens_per_s_1": base["tokens_per_s"], "tokens_per_s_n": rec["tokens_per_s"],
                                  "speedup": round(speedup, 3), "scaling_efficiency": round(speedup / n, 3),
                                  "target_speedup": round(0.9 * n, 2)}), flush=True)


if __name__ == "__main__":
    main()
