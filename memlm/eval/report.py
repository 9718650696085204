"""Summaries, markdown tables and PNG plots of evaluation records (results.jsonl).

Notation: L prompt length in tokens, d needle depth in [0, 1], P MQAR pairs, D width.

``summarize`` reduces records to means per task × length (× depth, × memory mode). ``write_report`` renders
report.md next to the plots: NIAH depth × length heatmaps, perplexity by position, streaming carried vs reset,
the memory on/off probe, MQAR accuracy vs state size. Plots need matplotlib (the ``dev`` extra); without it the
report says so and keeps its tables.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from memlm.eval import metrics as M

QA_METRICS = ("rank", "em", "contains")


def _is_qa(r: dict) -> bool:
    return "rank" in r and r.get("task") not in ("cross_session",)


def _agg(rows: Iterable[dict], keys: Iterable[str] = QA_METRICS + ("chance",)) -> dict[str, float]:
    rows = list(rows)
    out: dict[str, Any] = {"n": len(rows)}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        if vals:
            out[k] = M.mean(vals)
    return out


def summarize(records: list[dict]) -> dict[str, Any]:
    """Means per task and length (and depth / mode / direction where the task has them)."""
    out: dict[str, Any] = {"tasks": {}, "errors": [r for r in records if "error" in r]}
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if "error" not in r:
            by_task[r["task"]].append(r)
    for task, rows in by_task.items():
        if task == "cross_session":
            groups: dict[str, list[dict]] = defaultdict(list)
            for r in rows:
                groups[f"{r['mode']}/{r['variant']}/{r['gap']}"].append(r)
            out["tasks"][task] = {k: _agg(v, QA_METRICS + ("chance", "stale")) for k, v in groups.items()}
        elif task == "reversal":
            d: dict[str, Any] = {}
            for direction in ("forward", "reverse"):
                sub = [r for r in rows if r.get("direction") == direction]
                d[direction] = {"overall": _agg(sub), "by_length": _by(sub, "length")}
            out["tasks"][task] = d
        elif rows and _is_qa(rows[0]):
            s = {"overall": _agg(rows), "by_length": _by(rows, "length")}
            if any(r.get("depth") is not None for r in rows):
                s["by_depth"] = {f"{L}@{dep}": v for (L, dep), v in _by2(rows, "length", "depth").items()}
            out["tasks"][task] = s
        elif task == "mqar":
            out["tasks"][task] = [{k: r.get(k) for k in ("width", "pairs", "acc", "state_bytes", "params")}
                                  for r in rows]
        else:
            out["tasks"][task] = rows
    return out


def _by(rows: list[dict], key: str) -> dict[Any, dict]:
    g: dict[Any, list[dict]] = defaultdict(list)
    for r in rows:
        g[r.get(key)].append(r)
    return {k: _agg(v) for k, v in sorted(g.items(), key=lambda kv: (kv[0] is None, kv[0]))}


def _by2(rows: list[dict], k1: str, k2: str) -> dict[tuple, dict]:
    g: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        g[(r.get(k1), r.get(k2))].append(r)
    return {k: _agg(v) for k, v in g.items()}


# ---------------------------------------------------------------------------------------------- formatting


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.{digits}f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------------------------------- plots


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def heatmap(ax, grid: list[list[float | None]], rows: list[str], cols: list[str], title: str) -> None:
    """Draw a [rows × cols] grid of values in [0, 1] with the numbers written in."""
    import numpy as np

    arr = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    im = ax.imshow(arr, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            if not np.isnan(arr[i, j]):
                ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    return im


def niah_grid(rows: list[dict], metric: str = "rank") -> tuple[list[list[float | None]], list[float], list[int]]:
    """(grid [depth × length] of mean ``metric``, depths, lengths) for one task's records."""
    depths = sorted({r["depth"] for r in rows if r.get("depth") is not None})
    lengths = sorted({r["length"] for r in rows})
    g = _by2([r for r in rows if metric in r], "depth", "length")
    grid = [[g.get((d, L), {}).get(metric) for L in lengths] for d in depths]
    return grid, depths, lengths


def _plot_niah(plt, task: str, rows: list[dict], out: Path) -> str | None:
    grid, depths, lengths = niah_grid(rows, "rank")
    if not depths:
        return None
    panels = [("rank", "likelihood ranking")] + ([("contains", "generation (contains)")] if "contains" in rows[0]
                                                 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 + 1.0 * len(lengths) * len(panels), 1.2 + 0.45 * len(depths)),
                             squeeze=False)
    for ax, (metric, name) in zip(axes[0], panels):
        grid, depths, lengths = niah_grid(rows, metric)
        heatmap(ax, grid, [f"{d:.0%}" for d in depths], [str(L) for L in lengths], f"{task}: {name}")
        ax.set_xlabel("length (tokens)", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
    fig.tight_layout()
    name = f"niah_{task}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _plot_lines(plt, out: Path, name: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str,
                title: str, *, logx: bool = False, vline: float | None = None) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if vline is not None:
        ax.axvline(vline, color="grey", ls="--", lw=1, label="training length")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


# ---------------------------------------------------------------------------------------------- report


def write_report(records: list[dict], out_dir: str | Path, *, meta: dict | None = None, plots: bool = True) -> Path:
    """Write ``out_dir/report.md`` (and PNGs); returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = meta or {}
    plt = _plt() if plots else None
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r.get("task", "?")].append(r)
    md = ["# memlm eval report", ""]
    if meta:
        md += [md_table(["key", "value"], [[k, v] for k, v in meta.items()]), ""]
    md += [("Scores: **rank** = likelihood ranking of the true answer against distractors (1 = always first; "
            "chance is given), **em** = exact match of the greedy answer span (first line, first sentence), "
            "**contains** = fraction of expected answers found in the greedy output (RULER-style)."), ""]
    if plots and plt is None:
        md += ["_Plots skipped: matplotlib is not installed (pip install matplotlib)._", ""]
    qa = [t for t, rows in by_task.items() if rows and _is_qa(rows[0]) and t != "reversal"]
    if qa:
        lengths = sorted({r["length"] for t in qa for r in by_task[t] if "length" in r})
        md += ["## Retrieval and reasoning (rank / contains by length)", ""]
        rows = []
        for t in qa:
            g = _by(by_task[t], "length")
            chance = _agg(by_task[t]).get("chance")
            rows.append([t, chance] + [f"{fmt(g[L].get('rank'))} / {fmt(g[L].get('contains'))}" if L in g else "–"
                                       for L in lengths])
        md += [md_table(["task", "chance"] + [str(L) for L in lengths], rows), ""]
        for t in qa:
            if plt is not None and any(r.get("depth") is not None for r in by_task[t]):
                name = _plot_niah(plt, t, by_task[t], out)
                if name:
                    md += [f"![{t}]({name})", ""]
    md += _ppl_section(by_task, plt, out)
    md += _reversal_section(by_task.get("reversal", []))
    md += _cross_section(by_task.get("cross_session", []))
    md += _mqar_section(by_task.get("mqar", []), plt, out)
    md += _degen_section(by_task.get("degeneration", []))
    errors = [r for r in records if "error" in r]
    if errors:
        md += ["## Errors", "", md_table(["task", "error"], [[r["task"], r["error"][:200]] for r in errors]), ""]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def _ppl_section(by_task: dict, plt, out: Path) -> list[str]:
    md: list[str] = []
    ppl = [r for r in by_task.get("ppl", []) if "error" not in r]
    overall = [r for r in ppl if r.get("kind") == "overall"]
    if overall:
        o = overall[0]
        md += ["## Perplexity", "",
               (f"{o['docs']} documents, {o['tokens']:,} predicted tokens, up to {o['max_len']} tokens each, state "
                f"carried: NLL {o['nll']:.3f} (ppl {o['ppl']:.2f}); at positions below the training length "
                f"({o['train_len']}): NLL {o['nll_train_len']:.3f} (ppl {o['ppl_train_len']:.2f})."), ""]
        pos = [r for r in ppl if r.get("kind") == "position"]
        md += [md_table(["positions", "tokens", "NLL", "ppl"], [[f"[{r['lo']}, {r['hi']})", r["tokens"], r["nll"],
                                                                r["ppl"]] for r in pos]), ""]
        if plt is not None and pos:
            name = _plot_lines(plt, out, "ppl_by_position.png", {"ppl": ([r["hi"] for r in pos], [r["ppl"] for r in pos])},
                               "token position (bucket end)", "perplexity", "perplexity by position", logx=True,
                               vline=o.get("train_len"))
            md += [f"![perplexity by position]({name})", ""]
    titles = (("stream", ("carried", "reset"), "Streaming perplexity (state carried vs reset per segment)"),
              ("probe", ("on", "off"), "Memory on/off probe"))
    for task, (a, b), title in titles:
        rows = [r for r in by_task.get(task, []) if "error" not in r]
        seg = [r for r in rows if r.get("kind") == "segment"]
        ov = [r for r in rows if r.get("kind") == "overall"]
        if not ov:
            continue
        o = ov[0]
        md += [f"## {title}", ""]
        if task == "probe":
            md += [f"_{o['label']}_", ""]
        md += [(f"{o['docs']} documents, segments of {o['segment_len']} tokens: NLL {a} {o[f'nll_{a}']:.3f}, {b} "
                f"{o[f'nll_{b}']:.3f} (Δ = {o['delta_nll']:+.3f} nats/token)."), ""]
        md += [md_table(["segment", "start", f"NLL {a}", f"NLL {b}", "tokens"],
                        [[r["segment"], r["start"], r.get(f"nll_{a}"), r.get(f"nll_{b}"), r["tokens"]] for r in seg]),
               ""]
        if plt is not None and seg:
            name = _plot_lines(plt, out, f"{task}.png", {
                a: ([r["segment"] for r in seg], [r.get(f"nll_{a}") for r in seg]),
                b: ([r["segment"] for r in seg], [r.get(f"nll_{b}") for r in seg])},
                "segment index", "NLL (nats/token)", title)
            md += [f"![{task}]({name})", ""]
    return md


def _reversal_section(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if "error" not in r]
    if not rows:
        return []
    md = ["## Reversal (fact in a fresh memory, asked forward and in reverse; no leak)", ""]
    table = []
    for L, g in sorted(_by2(rows, "length", "direction").items()):
        table.append([L[0], L[1], g.get("rank"), g.get("em"), g.get("contains"), g.get("chance"), g["n"]])
    return md + [md_table(["length", "direction", "rank", "em", "contains", "chance", "n"], table), ""]


def _cross_section(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if "error" not in r]
    if not rows:
        return []
    g: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        g[(r["mode"], r["variant"], r["gap"])].append(r)
    table = []
    for (mode, variant, gap), rs in g.items():
        a = _agg(rs, QA_METRICS + ("chance", "stale"))
        table.append([mode, variant, gap, a.get("rank"), a.get("em"), a.get("stale"), a.get("chance"), a["n"]])
    return ["## Cross-session recall (through Session and its store)", "",
            "stateless is the control (must sit at chance); stale = the overwritten value ranked first.", "",
            md_table(["mode", "variant", "gap tokens", "rank", "em", "stale", "chance", "n"], table), ""]


def _mqar_section(rows: list[dict], plt, out: Path) -> list[str]:
    ok = [r for r in rows if "error" not in r]
    bad = [r for r in rows if "error" in r]
    if not rows:
        return []
    md = ["## MQAR (trained from scratch per width)", ""]
    if ok:
        md += [md_table(["width", "params", "state bytes", "pairs", "acc", "final loss"],
                        [[r["width"], r["params"], human_bytes(r["state_bytes"]), r["pairs"], r["acc"],
                          r["final_loss"]] for r in ok]), ""]
    md += [f"- width {r.get('width', '?')}: {r['error']}" for r in bad]
    if plt is not None and ok:
        series = {}
        for P in sorted({r["pairs"] for r in ok}):
            pts = sorted((r["state_bytes"], r["acc"]) for r in ok if r["pairs"] == P)
            series[f"P={P}"] = ([p[0] for p in pts], [p[1] for p in pts])
        name = _plot_lines(plt, out, "mqar.png", series, "state bytes per sequence", "accuracy",
                           "MQAR accuracy vs state size", logx=True)
        md += [f"![mqar]({name})", ""]
    return md


def _degen_section(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if "error" not in r]
    if not rows:
        return []
    cols = ["tok_distinct_1", "tok_distinct_2", "tok_rep_4", "tok_longest_run", "tok_longest_loop", "word_distinct_2",
            "word_rep_3", "tok_corpus_distinct_2"]
    md = ["## Degeneration", "", md_table(["decoding"] + cols, [[r["decoding"]] + [r.get(c) for c in cols]
                                                              for r in rows]), ""]
    ex = [r for r in rows if r.get("example")]
    for r in ex:
        md += [f"{r['decoding']} sample: `{r['example'][:200]!r}`", ""]
    return md


__all__ = ["fmt", "heatmap", "human_bytes", "md_table", "niah_grid", "summarize", "write_report"]
