"""``memlm bench``: train several presets under identical conditions, evaluate them all, write a leaderboard.

Notation: N token budget per preset, B rows per step, T training sequence length, V vocabulary.

Identical conditions: one tokenizer (every model's vocabulary is set to the tokenizer's, rounded up to 64, unless
``vocab="preset"``), one data order (same sources, seed, packing, B and T for all; TBPTT stream mode is switched off
so every preset sees the same packed rows), one budget: steps = ⌈N / (B·T)⌉. Each preset keeps its own optimizer,
learning rate and schedule. A preset that does not exist gets a row saying so.

Resumable and incremental: each preset's run lives in ``OUT/runs/<preset>`` (checkpoints every quarter of the
run); a finished run is not trained again and a finished evaluation not run again, so a killed command continues
where it stopped, and one command per preset followed by one with all presets assembles the full leaderboard.
Per preset ``OUT/runs/<preset>/bench.json`` holds its row; ``OUT/leaderboard.{md,json}`` and the plots are
rewritten at the end of every command.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memlm.errors import UserError
from memlm.eval.runner import EvalConfig, clean_json, read_results, run_eval, validation_documents

BENCH_FILE = "bench.json"


@dataclass(kw_only=True)
class BenchConfig:
    presets: list[str]
    tokens: int
    out: str
    data: list[str] = field(default_factory=list)  # empty: the built-in demo corpus
    val_data: list[str] = field(default_factory=list)
    val_every: int | None = None  # hold out every k-th document (None: 10 for the demo corpus, else the preset's)
    tokenizer: str = "byte"
    seq_len: int = 512
    batch_size: int = 16
    seed: int = 1337
    device: str = "auto"
    vocab: str = "match"  # "match": vocab = tokenizer's (rounded to 64); "preset": keep the preset's
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE for every preset
    n_evals: int = 8  # validation points along each run (the loss curves)
    eval_batches: int = 16
    keep_tbptt: bool = False
    retrain: bool = False  # delete a preset's earlier run and train it from scratch
    reeval: bool = False  # evaluate finished runs again (new tasks / lengths) without retraining
    eval: EvalConfig = field(default_factory=EvalConfig)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def run_config(name: str, b: BenchConfig, tok) -> Any:
    """The preset's RunConfig under the bench's shared conditions."""
    import memlm
    from memlm.config.base import apply_overrides

    cfg = apply_overrides(memlm.preset(name), b.overrides)
    steps = max(1, math.ceil(b.tokens / (b.batch_size * b.seq_len)))
    t = cfg.train
    t.data, t.val_data, t.tokenizer = list(b.data), list(b.val_data), b.tokenizer
    t.val_every_doc = b.val_every or (t.val_every_doc if b.data else 10)
    t.seq_len, t.batch_size, t.grad_accum, t.steps, t.seed, t.device = b.seq_len, b.batch_size, 1, steps, b.seed, \
        b.device
    t.warmup = min(t.warmup, max(1, steps // 10))
    t.eval_every, t.eval_batches = max(1, steps // max(1, b.n_evals)), b.eval_batches
    t.sample_every, t.save_every, t.keep_last, t.tensorboard, t.wandb = 0, max(1, steps // 4), 1, False, False
    t.log_every = max(1, steps // 50)
    if not b.keep_tbptt:
        t.tbptt = False
    m = cfg.model
    if b.vocab == "match":
        m.vocab_size = _round_up(tok.vocab_size, 64)
    elif tok.vocab_size > m.vocab_size:
        raise UserError(f"{name}: tokenizer has {tok.vocab_size} ids, the preset's vocabulary only {m.vocab_size}")
    m.max_seq_len = max(m.max_seq_len, b.seq_len)
    return cfg.__class__.from_dict(cfg.to_dict())  # re-validated


def _metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def bench_one(name: str, b: BenchConfig, tok, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume / reuse) and evaluate one preset; returns its leaderboard row (also saved as bench.json)."""
    import memlm
    from memlm.train.trainer import Trainer

    out = Path(b.out)
    run_dir = out / "runs" / name
    if name not in memlm.list_presets():
        return {"preset": name, "status": "missing", "note": "preset does not exist yet"}
    saved = run_dir / BENCH_FILE
    if b.retrain and run_dir.exists():
        shutil.rmtree(run_dir)  # --retrain: start this preset from scratch
    if saved.is_file():
        row = json.loads(saved.read_text())
        if row.get("status") == "ok" and row.get("tokens_budget") == b.tokens and not b.reeval:
            log(f"bench {name}: done before, reusing {saved}")
            return row
    cfg = run_config(name, b, tok)
    t0 = time.time()
    trainer = Trainer(cfg, out_dir=run_dir, resume="auto", tokenizer=tok,
                      log=lambda s: log(f"[{name}] {s}"))
    if trainer.step < cfg.train.steps:
        trainer.fit()
    val = trainer.evaluate()
    model = trainer.model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        _, st = model(torch.zeros(1, b.seq_len, dtype=torch.long, device=dev))
    state_bytes = st.nbytes()
    rows = _metrics(run_dir)
    tok_s = [r["tok_s"] for r in rows if "tok_s" in r]
    # Median of the second half: past warm-up and compilation, and robust to the windows that held a validation.
    tok_s = sorted(tok_s[len(tok_s) // 2:] or tok_s)
    eval_dir = run_dir / "eval"
    meta = {"preset": name, "params": model.num_params(), "non_embedding_params": model.num_params(non_embedding=True),
            "train_tokens": trainer.tokens, "train_len": b.seq_len, "tokenizer": b.tokenizer}
    val_docs = None if b.eval.data else validation_documents(cfg.train.to_dict(), log)
    run_eval(model, tok, b.eval, eval_dir, train_len=b.seq_len, val_docs=val_docs, meta=meta,
             log=lambda s: log(f"[{name}] {s}"))
    # a training stopped early (SIGTERM, time limit) is evaluated and shown, but marked partial and never reused:
    # the next bench command resumes it from its last checkpoint
    done = trainer.step >= cfg.train.steps
    row = {"preset": name, "status": "ok" if done else "partial", "family": cfg.family, "params": meta["params"],
           "non_embedding_params": meta["non_embedding_params"], "steps": trainer.step, "tokens": trainer.tokens,
           "tokens_budget": b.tokens, "val_loss": val.get("val_loss"), "val_ppl": val.get("val_ppl"),
           "tok_s": tok_s[len(tok_s) // 2] if tok_s else None, "state_bytes": state_bytes,
           "train_seconds": trainer.elapsed, "seconds": time.time() - t0, "eval_dir": str(eval_dir),
           "curve": [{"step": r["step"], **{k: r[k] for k in ("loss", "val_loss") if k in r}} for r in rows
                     if "loss" in r or "val_loss" in r]}
    if not done:
        row["note"] = f"training stopped at step {trainer.step} of {cfg.train.steps}; rerun the command to resume"
        log(f"bench {name}: {row['note']}")
    saved.write_text(json.dumps(clean_json(row), indent=1))
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def run_bench(b: BenchConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Bench every preset in b.presets (in order), then write the leaderboard; returns the rows."""
    from memlm.data.tokenizer import load_tokenizer

    if b.tokens < 1:
        raise UserError("--tokens must be ≥ 1")
    if b.vocab not in ("match", "preset"):
        raise UserError(f"vocab={b.vocab!r}: choose match or preset")
    tok = load_tokenizer(b.tokenizer)
    out = Path(b.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in b.presets:
        try:
            rows.append(bench_one(name, b, tok, log))
        except UserError as e:
            rows.append({"preset": name, "status": "error", "note": str(e)})
            log(f"bench {name}: {e}")
    write_leaderboard(rows, out, b)
    return rows


# ---------------------------------------------------------------------------------------------- leaderboard


def _eval_records(row: dict) -> list[dict]:
    p = Path(row.get("eval_dir", "")) / "results.jsonl"
    return read_results(p) if p.is_file() else []


def _qa_by_length(recs: list[dict], task: str) -> dict[int, float]:
    from memlm.eval.metrics import mean

    g: dict[int, list[float]] = {}
    for r in recs:
        if r.get("task") == task and "rank" in r:
            g.setdefault(r["length"], []).append(r["rank"])
    return {L: mean(v) for L, v in sorted(g.items())}


def headline(row: dict, recs: list[dict], train_len: int) -> dict[str, Any]:
    """The numbers a leaderboard row shows, computed from a preset's eval records."""
    from memlm.eval.metrics import mean

    h: dict[str, Any] = {}
    for r in recs:
        if r.get("task") == "ppl" and r.get("kind") == "overall":
            h["ppl_in"] = r.get("ppl_train_len")
        if r.get("task") == "stream" and r.get("kind") == "overall":
            h["stream_gain"] = r.get("delta_nll")
        if r.get("task") == "probe" and r.get("kind") == "overall":
            h["probe_gain"] = r.get("delta_nll")
    pos = [r for r in recs if r.get("task") == "ppl" and r.get("kind") == "position" and r["lo"] >= train_len]
    if pos:
        h["ppl_beyond"] = math.exp(sum(r["nll"] * r["tokens"] for r in pos) / sum(r["tokens"] for r in pos))
    for task in ("passkey", "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey", "babilong_qa1",
                 "vt"):
        by = _qa_by_length(recs, task)
        if by:
            h[task] = {f"{L / train_len:g}x": v for L, v in by.items()}
    for mode in ("stateless", "session", "persistent"):
        v = [r["rank"] for r in recs if r.get("task") == "cross_session" and r.get("mode") == mode
             and r.get("variant") == "recall"]
        if v:
            h[f"xs_{mode}"] = mean(v)
    mq = [r["acc"] for r in recs if r.get("task") == "mqar" and "acc" in r]
    if mq:
        h["mqar"] = mean(mq)
    rev = [r["rank"] for r in recs if r.get("task") == "reversal" and r.get("direction") == "reverse"]
    if rev:
        h["reversal_rev"] = mean(rev)
    return h


def write_leaderboard(rows: list[dict], out: Path, b: BenchConfig) -> Path:
    """leaderboard.md / leaderboard.json and plots (loss curves, NIAH heatmaps, tokens/s, state bytes)."""
    from memlm.eval.report import _plt, fmt, human_bytes, md_table, niah_grid

    T = b.seq_len
    shown = ("ok", "partial")  # partial: trained for fewer tokens than the budget (its tokens column says how many)
    for r in rows:
        if r.get("status") in shown:
            r["headline"] = headline(r, _eval_records(r), T)
    ok = [r for r in rows if r.get("status") in shown]
    md = ["# memlm leaderboard", "",
          (f"Every preset trained on the same data order with the `{b.tokenizer}` tokenizer for {b.tokens:,} tokens "
           f"(batch {b.batch_size} × {T} tokens), then evaluated by `memlm eval` (lengths {b.eval.lengths})."), ""]
    main = []
    for r in rows:
        if r.get("status") not in shown:
            main.append([r["preset"]] + ["–"] * 11 + [f"{r['status']}: {r.get('note', '')}"])
            continue
        h = r["headline"]
        pk = h.get("passkey", {})
        main.append([r["preset"], f"{r['non_embedding_params'] / 1e6:.1f}M / {r['params'] / 1e6:.1f}M", r["tokens"],
                     r["val_loss"], h.get("ppl_in"), h.get("ppl_beyond"), h.get("stream_gain"),
                     " ".join(fmt(v) for v in pk.values()) or "–", h.get("mqar"),
                     f"{fmt(h.get('xs_session'))} / {fmt(h.get('xs_persistent'))} / {fmt(h.get('xs_stateless'))}",
                     f"{r['tok_s']:,.0f}" if r.get("tok_s") else "–", human_bytes(r.get("state_bytes")),
                     r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"])
    md += [md_table(["preset", "params (non-emb / all)", "tokens", "val loss", f"ppl ≤{T}", f"ppl >{T}",
                     "Δ NLL reset−carried", "passkey rank " + " ".join(f"{L / T:g}x" for L in b.eval.lengths),
                     "MQAR acc", "x-session session / persistent / stateless", "train tok/s", f"state/seq @{T}",
                     "status"], main), ""]
    md += [("Columns: val loss = validation NLL (nats/token) on the held-out split after training; ppl ≤T / >T = "
           "perplexity at positions inside / beyond the training length (state carried); Δ NLL = streaming loss "
           "with the state reset per segment minus carried (> 0: the carried memory helps); passkey rank = "
           "likelihood ranking accuracy per length multiple (chance 0.2); MQAR acc = mean over widths and pair "
           "counts; x-session = cross-session recall rank (stateless is the control, at chance ≈ 0.2)."), ""]
    for task in ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey", "babilong_qa1", "vt"):
        lines = [[r["preset"]] + [fmt(v) for v in r["headline"].get(task, {}).values()] for r in ok
                 if task in r["headline"]]
        if lines:
            cols = list(next(r["headline"][task] for r in ok if task in r["headline"]).keys())
            md += [f"### {task} (rank by length)", "", md_table(["preset"] + cols, lines), ""]
    for r in ok:
        md.append(f"- {r['preset']}: [eval report]({Path(r['eval_dir']).relative_to(out)}/report.md)"
                  if Path(r["eval_dir"]).is_relative_to(out) else f"- {r['preset']}: {r['eval_dir']}/report.md")
    md.append("")
    plt = _plt()
    if plt is not None and ok:
        md += _plots(plt, ok, out, T, niah_grid)
    (out / "leaderboard.md").write_text("\n".join(md) + "\n")
    (out / "leaderboard.json").write_text(json.dumps(clean_json({"config": {
        "presets": b.presets, "tokens": b.tokens, "tokenizer": b.tokenizer, "seq_len": T, "batch_size": b.batch_size,
        "data": b.data, "seed": b.seed, "vocab": b.vocab}, "rows": rows}), indent=1))
    return out / "leaderboard.md"


def _plots(plt, ok: list[dict], out: Path, T: int, niah_grid) -> list[str]:
    from memlm.eval.report import heatmap

    md = []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in ok:
        pts = [(c["step"], c["val_loss"]) for c in r["curve"] if "val_loss" in c]
        tr = [(c["step"], c["loss"]) for c in r["curve"] if "loss" in c]
        line, = ax.plot([p[0] for p in tr], [p[1] for p in tr], lw=0.8, alpha=0.5)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=line.get_color(),
                    label=r["preset"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token): train (thin), validation (dots)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    md += ["![loss curves](loss_curves.png)", ""]
    for key, name, label in (("tok_s", "tokens_per_s.png", "training tokens/s"),
                             ("state_bytes", "state_bytes.png", f"state bytes per sequence at {T} tokens")):
        vals = [(r["preset"], r.get(key) or 0) for r in ok]
        fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.35 * len(vals)))
        ax.barh([v[0] for v in vals], [v[1] for v in vals])
        if key == "state_bytes" and any(v[1] > 0 for v in vals):
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        md += [f"![{label}]({name})", ""]
    grids = []
    for r in ok:
        recs = [x for x in _eval_records(r) if x.get("task") == "passkey"]
        if recs and any(x.get("depth") is not None for x in recs):
            grids.append((r["preset"], *niah_grid(recs, "rank")))
    if grids:
        n = len(grids)
        cols = min(3, n)
        rows_n = math.ceil(n / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 2.6 * rows_n), squeeze=False)
        for ax, (name, grid, depths, lengths) in zip(axes.flat, grids):
            heatmap(ax, grid, [f"{d:.0%}" for d in depths], [f"{L / T:g}x" for L in lengths], f"{name}: passkey")
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "niah_heatmaps.png", dpi=110)
        plt.close(fig)
        md += ["![passkey heatmaps (likelihood ranking, depth × length)](niah_heatmaps.png)", ""]
    return md


__all__ = ["BenchConfig", "bench_one", "headline", "run_bench", "run_config", "write_leaderboard"]
