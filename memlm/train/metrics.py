"""Training metrics: JSON lines always, TensorBoard and Weights & Biases when asked for and installed, progress lines.

Every record is one JSON object per line in ``out_dir/metrics.jsonl`` with at least ``step``; the trainer writes
train records (loss, lr, grad_norm, tokens, tok_s, aux/*, mixer/*), eval records (val_loss, val_ppl) and sample
records (sample). Numbers that are not finite are written as null (JSON has no NaN).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memlm.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def _plain(v: Any) -> Any:
    """A JSON-friendly value: tensors become numbers, non-finite floats become None."""
    if isinstance(v, torch.Tensor):
        v = v.detach().float().mean().item() if v.numel() != 1 else v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def truncate_jsonl(path: str | os.PathLike, after_step: int) -> None:
    """Drop records with step > after_step (and unreadable lines) — a resumed run re-does those steps."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= after_step:
            keep.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


class MetricsLogger:
    """Writes metric records to JSONL (always), TensorBoard and W&B (optional). Use as a context manager."""

    def __init__(self, out_dir: str | os.PathLike, *, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "memlm", run_config: dict | None = None, log: Callable[[str], None] = print,
                 resume_step: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 — kept open for the run, closed in close()
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            except ImportError:
                log("note: tensorboard is not installed; metrics go to metrics.jsonl only (pip install tensorboard)")
        if wandb:
            try:
                import wandb as _wandb

                self._wandb = _wandb
                _wandb.init(project=wandb_project, config=run_config or {}, dir=str(self.out_dir),
                            name=self.out_dir.name, resume="allow")
            except ImportError:
                warnings.warn("train.wandb is set but wandb is not installed (pip install wandb); not logging to W&B",
                              stacklevel=2)

    def write(self, step: int, record: dict[str, Any]) -> None:
        rec = {"step": int(step)} | {k: _plain(v) for k, v in record.items()}
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        scalars = {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            if isinstance(rec.get("sample"), str):
                self._tb.add_text("sample", rec["sample"], step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k != "step" and v is not None}, step=step)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All readable records of a metrics file."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else (f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}")


def progress_line(step: int, total: int, loss: float, lr: float, tok_s: float, eta_s: float,
                  extra: dict[str, float] | None = None) -> str:
    """``step 120/1000 | loss 2.3456 | lr 3.00e-04 | 12.3k tok/s | ETA 4m05s`` (one line, no carriage returns)."""
    width = len(str(total))
    parts = [f"step {step:>{width}}/{total}", f"loss {loss:.4f}", f"lr {lr:.2e}", f"{format_rate(tok_s)} tok/s",
             f"ETA {format_duration(eta_s)}"]
    for k, v in (extra or {}).items():
        parts.append(f"{k} {v:.4g}")
    return " | ".join(parts)
