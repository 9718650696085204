"""Figures for docs/benchmarks.md from the raw GPU results in docs/results (no GPU needed; matplotlib).

    python benchmarks/plot_results.py            # writes docs/img/bench_*.png

- bench_delta_rule.png: chunked delta rule forward + backward, 65,536 tokens (H 8, D 64, bf16), tokens/s against
  sequence length: memlm, flash-linear-attention 0.6.0, SDPA causal (flash attention) for scale.
- bench_decode.png: decode latency against context length, batch 1: one step's attention (CUDA-graph
  replay; memlm's split-KV Triton kernel against SDPA) and a whole token through the engine (compiled CUDA-graph
  step) for transformer-34m and gated-deltanet-34m.
- bench_training.png: training tokens/s and peak memory at batch 16 × 2048 (bf16, eager) of atlas-mag-small, its
  memory-off ablation, the same-size transformer and titans-mag-small.
Every figure names its raw file; the machine is in that file's meta line.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DELTA = "delta_rule_half_bwd_dots_run2_h100_2026-11-22.jsonl"      # memlm (final kernels) and fla, same process
SDPA = "delta_rule_kernels_h100_2026-11-22.jsonl"                  # SDPA causal at the same shapes
DECODE = "decode_attention_h100_2026-11-22.jsonl"
ENGINE = "decode_engine_ring_h100_2026-11-22.jsonl"               # whole-model decode through the engine
TRAIN = "atlas_reads_bf16_h100_2026-11-22.jsonl"


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str, x: str, y: str) -> dict[str, list[tuple[float, float]]]:
    """{rows[key]: sorted [(x, y)]} over the rows that have all three fields."""
    out = defaultdict(list)
    for r in rows:
        if key in r and x in r and y in r:
            out[r[key]].append((r[x], r[y]))
    return {k: sorted(v) for k, v in out.items()}


def ticks(ax, xs) -> None:
    """Label a log x axis at the measured points only."""
    from matplotlib.ticker import NullLocator
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(xs, [f"{x // 1024}K" for x in xs])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    args.out.mkdir(parents=True, exist_ok=True)

    tokens = 65536
    delta = [r for r in records(DELTA) if r.get("variant", "default") == "default" and not r.get("gated")]
    lines = {k: [(t, tokens / ms / 1e3) for t, ms in v] for k, v in series(delta, "impl", "T", "ms").items()}
    sdpa = series(records(SDPA), "impl", "T", "fwd_bwd_ms").get("sdpa-causal", [])
    lines["SDPA causal (flash)"] = [(t, tokens / ms / 1e3) for t, ms in sdpa]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in lines.items():
        ax.plot(*zip(*pts), marker="o", label={"memlm": "memlm delta rule", "fla": "fla 0.6.0 delta rule"}.get(name, name))
    ax.set(xscale="log", xlabel="sequence length T", ylabel="M tokens/s (fwd + bwd)",
           title=f"delta rule fwd+bwd, {tokens:,} tokens, H 8, D 64, bf16, H100")
    ticks(ax, [t for t, _ in lines["memlm"]])
    ax.legend(fontsize=8)
    ax.text(0.01, 0.01, f"raw: docs/results/{DELTA}", transform=ax.transAxes, fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out / "bench_delta_rule.png", dpi=120)

    dec = series(records(DECODE), "impl", "L", "graph_us")
    fig, (ax, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, pts in dec.items():
        ax.plot(*zip(*pts), marker="o", label={"triton": "memlm split-KV Triton", "sdpa": "SDPA"}.get(name, name))
    ax.set(xscale="log", yscale="log", xlabel="context length", ylabel="µs per step (graph replay)",
           title="decode attention, batch 1, bf16, H100")
    ticks(ax, [L for L, _ in dec["triton"]])
    ax.legend(fontsize=8)
    ax.text(0.01, 0.01, f"raw: docs/results/{DECODE}", transform=ax.transAxes, fontsize=6)
    engine = [r for r in records(ENGINE) if r.get("mode") == "cuda_graph_compiled" and r.get("loop") == "engine"]
    per_model = {m: dict(pts) for m, pts in series(engine, "model", "context", "ms_per_token").items()}  # last run
    for name, pts in per_model.items():
        a2.plot(list(pts), list(pts.values()), marker="o", label=name)
    a2.set(xscale="log", xlabel="context length", ylabel="ms per new token", ylim=(0, None),
           title="whole decode step, engine, batch 1, bf16, H100")
    ticks(a2, sorted({c for pts in per_model.values() for c in pts}))
    a2.legend(fontsize=8)
    a2.text(0.01, 0.01, f"raw: docs/results/{ENGINE}", transform=a2.transAxes, fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out / "bench_decode.png", dpi=120)

    train = [r for r in records(TRAIN) if "tokens_per_s" in r]
    names = [r["model"].replace("transformer(d512,L6,H8)", "transformer").replace(":memory_off", "\nmemory off")
             for r in train]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4))
    a1.bar(names, [r["tokens_per_s"] / 1e3 for r in train])
    a1.set(ylabel="k tokens/s", title="training, B 16 × 2048, bf16, eager")
    a2.bar(names, [r["peak_mem_gib"] for r in train], color="tab:orange")
    a2.set(ylabel="peak GiB", title="peak CUDA memory")
    for a in (a1, a2):
        a.tick_params(axis="x", labelsize=7)
    fig.text(0.01, 0.01, f"H100; raw: docs/results/{TRAIN}", fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out / "bench_training.png", dpi=120)
    print("wrote", *(str(args.out / f) for f in ("bench_delta_rule.png", "bench_decode.png",
                                                   "bench_training.png")))


if __name__ == "__main__":
    main()
