"""Checkpoints: one folder per save, written to a temporary folder and renamed, the last N kept.

Layout of ``out_dir/checkpoints/step_000123/`` (the same model files as ``MemoryLM.save_pretrained``, so
``memlm.load_model(ckpt_dir)`` works on it):

    model.safetensors     weights
    config.json           {"memlm_version": 1, "model": {...}, "train": {...}}
    optimizer.pt          optimizer state_dict (torch.save; read back with torch.load(weights_only=True))
    trainer_state.json    step, tokens seen, data cursor, best validation loss, non-finite counters, timestamps
    rng.pt                torch CPU/CUDA, python `random` and numpy RNG states, as tensors and plain lists
    tbptt_state.safetensors   the ModelState carried across steps (TBPTT runs only)
    memlm_tokenizer.json (+ tokenizer.json)   the tokenizer, so ``memlm.load_tokenizer(ckpt_dir)`` works

A run of several processes (train/parallel.py) writes the same files plus ``dcp/`` (model + optimizer as
torch.distributed.checkpoint shards, instead of optimizer.pt) and ``rng_rank{r}.pt``; model.safetensors is then
the consolidated copy rank 0 writes, and ``load_checkpoint`` reads the optimizer from ``dcp/``.

``out_dir/checkpoints/latest`` names the newest complete checkpoint; it is replaced atomically after the folder
is in place, so a crash at any point leaves the previous checkpoint and ``latest`` intact.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from memlm.errors import UserError
from memlm.io import _fsync_dir, atomic_replace_dir, atomic_write_text

CKPT_DIR = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"
RNG = "rng.pt"
TBPTT_STATE = "tbptt_state.safetensors"
DCP_DIR = "dcp"  # torch.distributed.checkpoint folder of a multi-process checkpoint
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``root`` (a checkpoints folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))
             and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def _is_checkpoint(p: Path) -> bool:
    return p.is_dir() and (p / TRAINER_STATE).is_file() and (p / WEIGHTS).is_file()


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a run folder, a checkpoints folder or a checkpoint folder to one checkpoint folder.

    A run folder or checkpoints folder resolves to the one named by ``latest`` (or the highest step when
    ``latest`` is missing or stale). Raises UserError when there is none.
    """
    p = Path(path)
    if _is_checkpoint(p):
        return p
    if not p.exists():
        raise UserError(f"{p}: no such run or checkpoint folder")
    for root in (p / CKPT_DIR, p):
        latest = root / LATEST
        if latest.is_file():
            cand = root / latest.read_text(encoding="utf-8").strip()
            if _is_checkpoint(cand):
                return cand
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise UserError(f"{p}: no checkpoint found (expected {CKPT_DIR}/step_NNNNNN/ with {TRAINER_STATE})")


# ------------------------------------------------------------------------------------------------------- RNG states

def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may touch, as tensors and plain lists (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    cuda = state.get("torch_cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------------------------------ save

def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(tmp: Path, *, model: torch.nn.Module, optimizer: Any, config: dict, trainer_state: dict,
                 rng: dict | None, tbptt_state: Any | None, tokenizer: Any | None = None,
                 weights: dict | None = None) -> None:
    """Write every file of a checkpoint into ``tmp`` (a separate function so tests can make it fail midway).

    weights: the full state dict to write instead of ``model.state_dict()`` (a sharded model's, gathered)."""
    sd = weights if weights is not None else {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    cfg_hash = getattr(getattr(model, "config", None), "config_hash", lambda: "")()
    save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt", "memlm_config_hash": cfg_hash})
    (tmp / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    if rng is not None:
        torch.save(rng, tmp / RNG)
    if tbptt_state is not None:
        tbptt_state.detach().save(tmp / TBPTT_STATE)
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(tmp)  # memlm.load_tokenizer(ckpt_dir) then finds the exact vocabulary the model was trained on
    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
    for f in tmp.iterdir():
        _fsync_file(f)


def save_checkpoint(root: str | os.PathLike, step: int, *, model: torch.nn.Module, optimizer: Any, config: dict,
                    trainer_state: dict, rng: dict | None = None, tbptt_state: Any | None = None,
                    keep_last: int = 3, tokenizer: Any | None = None) -> Path:
    """Write ``root/step_{step:06d}`` atomically, point ``root/latest`` at it, prune to the last ``keep_last``.

    config: {"memlm_version": 1, "model": {...}, "train": {...}}. Returns the checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*.tmp*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    name = checkpoint_name(step)
    final = root / name
    tmp = root / f".{name}.tmp{os.getpid()}"
    tmp.mkdir()
    try:
        _write_files(tmp, model=model, optimizer=optimizer, config=config,
                     trainer_state=trainer_state | {"saved_at": time.time()}, rng=rng, tbptt_state=tbptt_state,
                     tokenizer=tokenizer)
        _fsync_dir(tmp)
        atomic_replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, name + "\n")
    prune_checkpoints(root, keep_last)
    return final


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names). Returns the deleted."""
    root = Path(root)
    found = list_checkpoints(root)
    latest = (root / LATEST).read_text(encoding="utf-8").strip() if (root / LATEST).is_file() else None
    doomed = [p for p in found[:max(0, len(found) - max(1, keep_last))] if p.name != latest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ------------------------------------------------------------------------------------------------------------ load

def read_config(ckpt: str | os.PathLike) -> dict:
    path = Path(ckpt) / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read checkpoint config ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f"{path}: not a memlm checkpoint config (no \"model\" section)")
    return data


def check_model_config(ckpt: str | os.PathLike, model_cfg: dict) -> None:
    """Raise UserError (one line) when the checkpoint was made for another model config (the name is ignored)."""
    saved = dict(read_config(ckpt)["model"])
    want = dict(model_cfg)
    saved.pop("name", None)
    want.pop("name", None)
    if saved == want:
        return
    keys = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    diff = ", ".join(f"{k}: {_short(saved.get(k))} in checkpoint vs {_short(want.get(k))} now" for k in keys[:4])
    more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
    raise UserError(f"{ckpt}: checkpoint is for a different model config ({diff}{more}); "
                    f"use the same preset and --set overrides, or a new out_dir")


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def load_checkpoint(ckpt: str | os.PathLike, *, model: torch.nn.Module, optimizer: Any = None,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load weights (and optimizer state) into ``model`` / ``optimizer`` in place; check the model config first.

    Returns {"trainer_state": dict, "rng": dict | None, "config": dict, "tbptt_state_path": Path | None}.
    """
    ckpt = Path(ckpt)
    check_model_config(ckpt, model.config.to_dict())
    try:
        sd = load_file(str(ckpt / WEIGHTS), device=str(device))
    except Exception as e:  # noqa: BLE001 — safetensors raises several types on bad files
        raise UserError(f"{ckpt / WEIGHTS}: cannot read weights ({e})") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if optimizer is not None and not (ckpt / OPTIMIZER).is_file() and (ckpt / DCP_DIR).is_dir():
        from memlm.train.parallel import load_dcp_optimizer  # a multi-process checkpoint: any world size → 1

        load_dcp_optimizer(ckpt / DCP_DIR, model, optimizer)
    elif optimizer is not None:
        if not (ckpt / OPTIMIZER).is_file():
            raise UserError(f"{ckpt}: no {OPTIMIZER} (weights-only folder?); cannot resume training from it")
        try:
            opt_sd = torch.load(ckpt / OPTIMIZER, map_location=device, weights_only=True)
            optimizer.load_state_dict(opt_sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"{ckpt / OPTIMIZER}: optimizer state does not fit this run "
                            f"(was train.optimizer changed?): {e}") from None
    try:
        trainer_state = json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt / TRAINER_STATE}: cannot read ({e})") from None
    rng = torch.load(ckpt / RNG, weights_only=True) if (ckpt / RNG).is_file() else None
    return {"trainer_state": trainer_state, "rng": rng, "config": read_config(ckpt),
            "tbptt_state_path": ckpt / TBPTT_STATE if (ckpt / TBPTT_STATE).is_file() else None}
