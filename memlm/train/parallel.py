"""Several processes, one model: DDP / FSDP2 wrapping, rank-sharded batches and distributed checkpoints, all on
torch.distributed (NCCL on GPUs, gloo on CPU) and launched by torchrun. The trainer applies it around the model;
no layer knows about it.

Notation: W world size (processes), r rank (0 … W−1), b rows per rank per micro-batch (train.batch_size),
B = b·W rows of a global micro-batch, N valid target tokens of one optimizer step over ALL ranks, CE_r the summed
token cross-entropy of rank r's rows, A_r the auxiliary losses rank r's mixers report.

Exact data parallelism. Every rank packs the same global batch and keeps rows r::W (``data.packing.shard_rows``).
Rank r backpropagates W·CE_r/N + A_r; DDP's all-reduce and FSDP's reduce-scatter average over ranks, so every
rank ends up with (1/W)·Σ_r W·∇CE_r/N = ∇(Σ_r CE_r)/N — the gradient one process computes on the global batch —
plus the mean over ranks of the auxiliary gradients (the trainer weights them 1/W): exact for auxiliary losses that
are means over rows, an approximation for nonlinear batch statistics (a router's load balance).
Memory states are per row, so no row ever needs another rank's rows: the split is exact for every mixer, TBPTT
included (rank r always holds the same streams). Reported losses and the non-finite guard use all-reduced values,
and a stop signal is agreed by all-reduce, so every rank takes the same decisions at the same step.

Checkpoints with W > 1 (``step_NNNNNN/``): ``dcp/`` holds model + optimizer as torch.distributed.checkpoint shards
(``get_state_dict`` / ``set_state_dict``: resharded on load, any world size, DDP ↔ FSDP). Rank 0 also writes the
consolidated ``model.safetensors`` + ``config.json``, so ``memlm info`` / ``generate`` / ``memlm.load_model`` and a
single-process resume (the optimizer is read from ``dcp/`` without a process group) work unchanged.
``trainer_state.json`` holds the global data cursor and ``world_size``; ``tbptt_state.safetensors`` the carried state
of all B rows in global row order; ``rng.pt`` is rank 0's RNG, ``rng_rank{r}.pt`` rank r's. The folder is written
under a temporary name and renamed by rank 0 after a barrier, exactly as a single process does. With several
nodes the run folder must be on a filesystem every node sees.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from memlm.errors import UserError
from memlm.train import checkpoint as ckpt

MODES = ("ddp", "fsdp")


# ------------------------------------------------------------------------------------------------ launch / setup

def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables torchrun sets; (0, 1, 0) in a plain process."""
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None


def precision_dtypes(name: str, device: torch.device) -> tuple[torch.dtype | None, torch.dtype | None]:
    """train.mixed_precision → (FSDP parameter dtype, gradient-reduce dtype); None keeps float32.

    auto: bfloat16 for both on CUDA, float32 on CPU (gloo reduces fp32; CPU bf16 matmuls are slow)."""
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    bf16, fp32 = torch.bfloat16, torch.float32
    return {"float32": (None, None), "bfloat16": (bf16, bf16), "bfloat16-reduce-float32": (bf16, fp32)}[name]


def setup(t: Any, device: torch.device) -> Distributed | None:
    """Join the process group torchrun described (env://: MASTER_ADDR/PORT, RANK, WORLD_SIZE) when WORLD_SIZE > 1.

    Returns None in a single process (train.parallel is then ignored: nothing changes). ``device`` is what
    train.device resolved to; a CUDA device becomes cuda:LOCAL_RANK (one GPU per process, NCCL), cpu uses gloo.
    """
    rank, world, local = launch_env()
    if world <= 1:
        return None
    if t.parallel == "none":
        raise UserError(f"train.parallel=none but {world} processes were launched (WORLD_SIZE={world}); use "
                        f"train.parallel=ddp or fsdp, or run one process")
    mode = "ddp" if t.parallel == "auto" else t.parallel
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPU(s); launch at most "
                            f"that many processes per node (--nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"distributed training runs on cuda (NCCL) or cpu (gloo), not {device}")
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
        except ValueError as e:  # a missing MASTER_ADDR / MASTER_PORT
            raise UserError(f"cannot join the process group ({e}); launch with torchrun or memlm train --nproc N") \
                from None
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise UserError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, the environment "
                        f"says {rank} of {world}")
    return Distributed(rank=rank, world=world, local_rank=local, device=device, mode=mode,
                       mixed_precision=t.mixed_precision)


def shutdown() -> None:
    """Leave the process group (if any); the CLI calls this after training."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The torchrun command line that runs ``memlm <argv>`` in ``nproc`` processes on this node, --nproc removed."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if len(key) >= 4 and "--nproc".startswith(key):  # argparse also accepts unambiguous prefixes
            skip = "=" not in a
            continue
        out.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "memlm.cli.main", *out]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``memlm <argv>`` under torchrun with ``nproc`` processes; returns torchrun's exit status."""
    if launch_env()[1] > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        raise UserError("--nproc inside a torchrun launch: leave --nproc out (torchrun already started the processes)")
    proc = subprocess.Popen(torchrun_command(argv, nproc))
    try:
        return proc.wait()
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C and forwards it; wait for the checkpoints it triggers
        return proc.wait()


# ------------------------------------------------------------------------------------------------ model wrapping

def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every Block's forward during backward instead of keeping its activations.

    Non-reentrant torch.utils.checkpoint (the RNG is replayed: dropout masks match). It patches each block
    instance's forward, so parameter names and state_dict keys stay the same and FSDP's hooks stay outside the
    recomputed region (parameters are gathered once for backward, not again for the recompute)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        if getattr(block, "_memlm_checkpointed", False):
            continue

        def forward(*args: Any, _inner=block.forward, **kwargs: Any) -> Any:
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._memlm_checkpointed = True


def prepare_model(model: nn.Module, t: Any, par: Distributed | None) -> nn.Module:
    """Activation checkpointing (train.activation_checkpointing), then DDP / FSDP2 when ``par`` is set.

    Returns the module to call for training forwards (``model`` itself without a process group). Call before
    building the optimizer: FSDP2 replaces the parameters by sharded DTensors."""
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    if par is None:
        return model
    wrapped = par.wrap(model)
    if par.rank:  # same initial weights everywhere (seeded before), different dropout noise per rank from here on
        torch.manual_seed(t.seed + 7919 * par.rank)
    return wrapped


def _init_state_reads_params(block: nn.Module, device: torch.device) -> bool:
    """True when the mixer's initial state is computed from its parameters (a learned initial memory, even detached).

    A state built by ``model.init_state`` (TBPTT stream mode, sessions) is built outside the blocks' forwards, where
    FSDP still holds such a block's parameters sharded; such blocks stay in the root FSDP unit. (A forward with
    state=None needs no care: each mixer builds its fresh state inside its own forward.) Detected by watching every
    torch call init_state makes."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    ids = {id(p) for p in block.parameters()}
    metadata = {"__get__", "dim", "size", "numel", "element_size", "is_floating_point", "get_device"}  # not values

    class Watch(TorchFunctionMode):
        hit = False

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") not in metadata and any(id(a) in ids for a in tree_leaves((args, kwargs))):
                Watch.hit = True
            return func(*args, **kwargs)

    with Watch():
        st = block.mixer.init_state(1, device=device)
    return Watch.hit or any(isinstance(x, Tensor) and id(x) in ids for x in tree_leaves(st))


def optimizers_of(optimizer: Any) -> list:
    """The torch optimizers behind ``optimizer`` (a MultiOptimizer holds several)."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


class Distributed:
    """The process group of a torchrun launch and what the trainer asks of it (see the module docstring)."""

    def __init__(self, *, rank: int, world: int, local_rank: int, device: torch.device, mode: str,
                 mixed_precision: str = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.rank, self.world, self.local_rank, self.device, self.mode = rank, world, local_rank, device, mode
        self.param_dtype, self.reduce_dtype = precision_dtypes(mixed_precision, device)
        self.wrapped: nn.Module | None = None
        self._sampler: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        p = "fp32" if self.param_dtype is None else str(self.param_dtype).split(".")[-1]
        r = "fp32" if self.reduce_dtype is None else str(self.reduce_dtype).split(".")[-1]
        params = f"{p} params, " if self.mode == "fsdp" else ""
        return f"{self.mode} over {self.world} processes ({dist.get_backend()}, {params}{r} gradient reduce)"

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            cuda = self.device.type == "cuda"
            # Buffers (rotary tables, CMS accumulators fed by synced gradients) are equal on every rank by
            # construction: no broadcast before every forward.
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else {"broadcast_buffers": False})  # the name changed in torch 2.13
            ddp = DDP(model, device_ids=[self.device.index] if cuda else None, gradient_as_bucket_view=True, **no_sync)
            if self.reduce_dtype == torch.bfloat16 and cuda:
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
            self.wrapped = ddp
            return ddp
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from memlm.layers.cms import cms_modules

        if any(True for _ in cms_modules(model)):
            raise UserError("train.parallel=fsdp does not support mlp=cms yet (its gradient gate keeps unsharded "
                            "accumulators); use train.parallel=ddp")
        # cast_forward_inputs=False: the ModelState passed in must stay float32 (recurrent memories).
        mp = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype,
                                  cast_forward_inputs=False)
        for block in model.blocks:
            # A block's parameters are gathered only while the block runs. Blocks used outside their own forward
            # (a learned initial state read by MemoryLM.forward; Oumnix switches calling block.norm1 directly)
            # stay in the root unit, gathered for the whole forward.
            if getattr(model, "oumnix", None) is None and not _init_state_reads_params(block, self.device):
                fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        self.wrapped = model
        return model

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool) -> Iterator[None]:
        """Inside, backward accumulates local gradients without communicating (all micro-batches but the last)."""
        if enabled or self.wrapped is None:
            yield
        elif self.mode == "ddp":
            with self.wrapped.no_sync():
                yield
        else:
            self.wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.wrapped.set_requires_gradient_sync(True)

    # ------------------------------------------------------------------------------------------- reductions
    def all_sum(self, values: Sequence[float | Tensor]) -> Tensor:
        """Σ over ranks of each value, as float64 [len(values)] on the device (one collective)."""
        x = torch.stack([torch.as_tensor(v, device=self.device).detach().to(torch.float64).reshape(())
                         for v in values])
        dist.all_reduce(x)
        return x

    def sum_int(self, n: int) -> int:
        return int(self.all_sum([n])[0].item())

    def global_loss(self, loss: Tensor, ce: Tensor, n: int, stop: bool) -> tuple[Tensor, Tensor, bool]:
        """This rank's step loss (CE_r / N + A_r / W) and CE_r → the global (Σ_r CE_r / N + mean_r A_r, Σ_r CE_r) and
        whether any rank wants to stop — one all-reduce."""
        n = max(int(n), 1)
        s = self.all_sum([ce, loss.detach() - ce.detach() / n, float(stop)])
        return s[0] / n + s[1], s[0], bool(s[2] > 0)

    @staticmethod
    def replicated(x: Tensor) -> Tensor:
        """A value FSDP returns as a DTensor (the gradient norm) as a plain tensor; others unchanged."""
        return x.full_tensor() if hasattr(x, "full_tensor") else x

    def barrier(self) -> None:
        dist.barrier()

    # ------------------------------------------------------------------------------------------- state rows
    def gather_rows(self, state: Any) -> Any:
        """This rank's ModelState [b rows] → the ModelState of all B rows in global order (row g on rank g % W)."""
        from memlm.models.state import cat_model_states

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, state.detach().to("cpu"))  # our own processes: pickle is fine here
        b = parts[0].batch_size
        return cat_model_states(parts).select([(g % self.world) * b + g // self.world for g in range(b * self.world)])

    def local_rows(self, state: Any) -> Any:
        """The global ModelState [B rows] → this rank's rows r::W."""
        if state.batch_size % self.world:
            raise UserError(f"the saved TBPTT state has {state.batch_size} rows, not a multiple of {self.world} "
                            f"processes")
        return state.select(list(range(self.rank, state.batch_size, self.world)))

    # ------------------------------------------------------------------------------------------- sampling
    def sampling_model(self, model: nn.Module) -> nn.Module | None:
        """A plain model for sampling on rank 0 (None elsewhere). FSDP: gathers the full weights (all ranks call)."""
        if self.mode == "ddp":
            return model if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from memlm.models.lm import MemoryLM

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        if self._sampler is None:
            self._sampler = MemoryLM(model.config).to(self.device)
        self._sampler.load_state_dict(full)
        return self._sampler

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, root: str | os.PathLike, step: int, *, model: nn.Module, optimizer: Any, config: dict,
                        trainer_state: dict, tbptt_state: Any | None = None, keep_last: int = 3,
                        tokenizer: Any | None = None) -> Path:
        """Every rank calls this; writes ``root/step_{step:06d}`` (layout in the module docstring) atomically."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        from memlm.io import _fsync_dir, atomic_replace_dir, atomic_write_text

        root = Path(root)
        name = ckpt.checkpoint_name(step)
        final, tmp = root / name, root / f".{name}.tmp-dist"  # one name for all ranks (no pid suffix)
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".step_*.tmp*"):  # left by a crash during an earlier save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        try:
            msd, osd = get_state_dict(model, optimizers_of(optimizer))
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / ckpt.DCP_DIR))
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            rows = self.gather_rows(tbptt_state) if tbptt_state is not None else None
            rng_file = tmp / (ckpt.RNG if self.is_main else f"rng_rank{self.rank}.pt")
            torch.save(ckpt.rng_state(), rng_file)
            ckpt._fsync_file(rng_file)
            if self.is_main:
                weights = {k: v.detach().contiguous().cpu() for k, v in full.items()}
                ckpt._write_files(tmp, model=model, optimizer=None, config=config, weights=weights, rng=None,
                                  trainer_state=trainer_state | {"world_size": self.world, "parallel": self.mode},
                                  tbptt_state=rows, tokenizer=tokenizer)
            self.barrier()  # every rank's files are in tmp
            if self.is_main:
                _fsync_dir(tmp)
                atomic_replace_dir(tmp, final)
                atomic_write_text(root / ckpt.LATEST, name + "\n")
                ckpt.prune_checkpoints(root, keep_last)
        except BaseException:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.barrier()  # nobody reads `latest` before it exists
        return final

    def load_checkpoint(self, path: str | os.PathLike, *, model: nn.Module, optimizer: Any = None,
                        device: torch.device | str = "cpu") -> dict[str, Any]:
        """``checkpoint.load_checkpoint`` for every rank: a distributed checkpoint (``dcp/``, any world size) or a
        single-process one (full weights + optimizer.pt, sharded here). Same return value."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(path)
        ckpt.check_model_config(path, model.config.to_dict())
        optims = optimizers_of(optimizer) if optimizer is not None else []
        if (path / ckpt.DCP_DIR).is_dir():
            _dcp_load(path / ckpt.DCP_DIR, model, optims, with_model=True, no_dist=False)
        else:  # written by one process: full weights and a numbered optimizer state, sharded / replicated here
            try:
                full = load_file(str(path / ckpt.WEIGHTS))
            except Exception as e:  # noqa: BLE001 — safetensors raises several types on bad files
                raise UserError(f"{path / ckpt.WEIGHTS}: cannot read weights ({e})") from None
            opts = StateDictOptions(full_state_dict=True)
            try:
                set_model_state_dict(model, full, options=opts)
            except (RuntimeError, KeyError) as e:
                raise UserError(f"{path}: weights do not match the model ({str(e).splitlines()[0]})") from None
            if optims:
                if not (path / ckpt.OPTIMIZER).is_file():
                    raise UserError(f"{path}: no {ckpt.OPTIMIZER} (weights-only folder?); cannot resume training")
                saved = torch.load(path / ckpt.OPTIMIZER, map_location="cpu", weights_only=True)
                set_optimizer_state_dict(model, optims, fqn_optimizer_state(saved, model, optims), options=opts)
        trainer_state = read_trainer_state(path)
        # RNG streams are per rank: rank 0 always continues its own; the others only at the same world size
        same_world = int(trainer_state.get("world_size", 1)) == self.world
        rng_file = path / (ckpt.RNG if self.is_main else f"rng_rank{self.rank}.pt")
        rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() and (self.is_main or same_world) else None
        return {"trainer_state": trainer_state, "rng": rng, "config": ckpt.read_config(path),
                "tbptt_state_path": path / ckpt.TBPTT_STATE if (path / ckpt.TBPTT_STATE).is_file() else None}


def _dcp_load(dcp_dir: Path, model: nn.Module, optims: list, *, with_model: bool, no_dist: bool) -> None:
    """Read model (optional) and optimizer state from a torch.distributed.checkpoint folder into the live objects."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optims)
    sd: dict[str, Any] = {"optim": osd} if optims else {}
    if with_model:
        sd["model"] = msd
    try:
        with warnings.catch_warnings():  # DCP warns that it loads in one process even when asked to (no_dist)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, checkpoint_id=str(dcp_dir), no_dist=no_dist)
        set_state_dict(model, optims, model_state_dict=sd.get("model", {}), optim_state_dict=sd.get("optim", {}))
    except Exception as e:  # noqa: BLE001 — DCP raises several types (CheckpointException, KeyError, RuntimeError)
        raise UserError(f"{dcp_dir}: cannot load the distributed checkpoint into this run (was the model or "
                        f"train.optimizer changed?): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_dcp_optimizer(dcp_dir: str | os.PathLike, model: nn.Module, optimizer: Any) -> None:
    """Load the optimizer state of a distributed checkpoint into a single-process optimizer (any saved world size)."""
    no_dist = not (dist.is_available() and dist.is_initialized())
    _dcp_load(Path(dcp_dir), model, optimizers_of(optimizer), with_model=False, no_dist=no_dist)


def fqn_optimizer_state(saved: dict, model: nn.Module, optims: list) -> dict:
    """A single-process ``optimizer.state_dict()`` (parameters numbered 0, 1, … per torch optimizer, in group order;
    a MultiOptimizer's {"optimizers": [...]}) → the {"state": {name: …}, "param_groups": [{"params": [name, …]}]}
    form ``set_optimizer_state_dict`` takes. The numbering follows the parameter order of ``optims``, which
    build_optimizer makes the same in every process."""
    names = {id(p): n for n, p in model.named_parameters()}
    inner = saved.get("optimizers", [saved])
    if len(inner) != len(optims):
        raise UserError(f"the saved optimizer state holds {len(inner)} optimizer(s), this run has {len(optims)} "
                        f"(was train.optimizer changed?)")
    state: dict[str, Any] = {}
    groups: list[dict] = []
    for opt, sd in zip(optims, inner):
        fqns = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        for i, st in sd["state"].items():
            state[fqns[int(i)]] = st
        for g in sd["param_groups"]:
            groups.append({**g, "params": [fqns[int(i)] for i in g["params"]]})
    return {"state": state, "param_groups": groups}


class NullMetrics:
    """What ranks other than 0 log metrics to: nothing."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, step: int, record: dict) -> None:
        return None


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / ckpt.TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path / ckpt.TRAINER_STATE}: cannot read ({e})") from None
