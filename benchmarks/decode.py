"""Batch-1 decode speed: memlm eager (dynamic states) vs static states vs CUDA graph, next to Hugging Face
``LlamaForCausalLM.generate`` (dynamic and static cache) of the same shape with random weights, in one process.

Notation: C context (prompt) tokens, N decoded tokens.

For each model and context C: one prefill of C random tokens, then N greedy tokens per mode. Two loops per memlm mode:
``loop="device"`` feeds the argmax back on the device (no host round trip: the launch cost of a step is all that
shows) and ``loop="engine"`` runs ``Engine.generate_ids`` (sampling, streaming, one host sync per token, as in chat).
HF runs ``generate`` with a streamer that timestamps every token (``loop="generate"``) and a bare forward loop with
its dynamic cache (``loop="device"``). Per-token latency is measured after the first token (prefill excluded).
One JSON line per measurement, then one summary line per model (latency at the longest context / the shortest).

    python benchmarks/decode.py --quick      # the H100 run, < 60 s: contexts 1K/4K/16K, 4 presets + HF
    python benchmarks/decode.py --tiny       # CPU smoke test: debug presets, contexts 32/96
    python benchmarks/decode.py --presets transformer-34m --contexts 1024 16384 --new-tokens 256
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import memlm
from memlm.inference.engine import Engine
from memlm.inference.sampling import SamplingConfig

QUICK = ["transformer-34m", "gated-deltanet-34m", "atlas-mag-medium", "onyx-11m"]
TINY = ["transformer-debug", "gated-deltanet-debug", "atlas-mag-debug", "onyx-debug"]
GREEDY = SamplingConfig(temperature=0)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def emit(**row) -> dict:
    print(json.dumps(row), flush=True)
    return row


def device_loop(step, tok: torch.Tensor, state, n: int, warm: int, dev: torch.device) -> float:
    """Seconds per token of ``n`` greedy steps fed on the device (after ``warm`` untimed steps)."""
    for _ in range(warm):
        logits, state = step(tok, state)
        tok = logits.argmax(-1)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        logits, state = step(tok, state)
        tok = logits.argmax(-1)
    sync(dev)
    return (time.perf_counter() - t0) / n


def per_token(stamps: list[float]) -> float:
    """Mean gap between consecutive tokens, the first (which includes the prompt's last step) excluded."""
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return sum(gaps) / max(len(gaps), 1)


def bench_memlm(name: str, model, ctx: int, args, dev: torch.device, dtype: torch.dtype) -> list[dict]:
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), device=dev)
    base = Engine(model, prefill_chunk=args.prefill_chunk)
    sync(dev)
    t0 = time.perf_counter()
    _, before = base.prefill(ids[:, :-1])                   # the state before the prompt's last token
    logits, after = base.step(ids[:, -1], before)
    sync(dev)
    common = {"bench": "decode", "impl": "memlm", "model": name, "context": ctx, "new_tokens": args.new_tokens,
              "dtype": str(dtype).removeprefix("torch."), "prefill_s": round(time.perf_counter() - t0, 3)}
    rows = []
    for mode in args.modes:
        base = mode.removesuffix("_compiled")   # "*_compiled": the static step through torch.compile
        eng = Engine(model, prefill_chunk=args.prefill_chunk, static_cache=base != "eager",
                     cuda_graph=base == "cuda_graph", compile_step=base != mode)
        with torch.inference_mode():
            st, step, _ = eng.decode_plan(after, args.new_tokens + args.warmup + 1)
        if eng.decode_mode != {"eager": "dynamic"}.get(base, base):
            rows.append(emit(**common, mode=mode, skipped=f"ran as {eng.decode_mode}: {eng.notes}"))
            continue
        with torch.inference_mode():
            s = device_loop(step, logits.argmax(-1), st, args.new_tokens, args.warmup, dev)
        rows.append(emit(**common, mode=mode, loop="device", tokens_per_s=round(1 / s, 1),
                         ms_per_token=round(s * 1e3, 3)))
        if mode in args.engine_modes:
            stamps = []
            sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=0)
            gen = eng.generate_ids([[int(ids[0, -1])]], args.new_tokens, sampling, state=before, ignore_eos=True)
            for _ in gen:
                stamps.append(time.perf_counter())
            s = per_token(stamps)
            rows.append(emit(**common, mode=mode, loop="engine", tokens_per_s=round(1 / s, 1),
                             ms_per_token=round(s * 1e3, 3), ran_as=eng.decode_mode,
                             sampling=f"temperature={args.temperature},top_p={args.top_p}"))
    return rows


def hf_llama(cfg, max_pos: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    a = cfg.layers[0]
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=a.n_kv_heads or cfg.n_heads, max_position_embeddings=max_pos,
                     rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_base,
                     attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(hc)


class _Clock:
    """A generate() streamer that only records when each piece arrives (the prompt first, then every token)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def bench_hf(like: str, model, ctx: int, args, dev: torch.device, dtype: torch.dtype) -> list[dict]:
    from transformers import DynamicCache, GenerationConfig

    ids = torch.randint(0, model.config.vocab_size, (1, ctx), device=dev)
    common = {"bench": "decode", "impl": "hf", "model": f"LlamaForCausalLM like {like}", "context": ctx,
              "new_tokens": args.new_tokens, "dtype": str(dtype).removeprefix("torch.")}
    rows = []
    for cache in ("dynamic", "static"):
        gc = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
        if cache == "static":
            gc.cache_implementation = "static"
            gc.disable_compile = True  # newer transformers compile a static-cache forward on their own: minutes
        clock = _Clock()
        try:
            with torch.inference_mode():
                model.generate(ids, generation_config=gc, streamer=clock)
        except Exception as e:  # noqa: BLE001 — an old/new transformers may refuse an option; report, go on
            why = f"{type(e).__name__}: {e}"[:300]
            rows.append(emit(**common, mode=f"{cache}_cache", loop="generate", skipped=why))
            continue
        s = per_token(clock.stamps)   # stamps[0]: the prompt, stamps[1]: the first token (after the prefill)
        rows.append(emit(**common, mode=f"{cache}_cache", loop="generate", tokens_per_s=round(1 / s, 1),
                         ms_per_token=round(s * 1e3, 3)))
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)

        def step(tok, pkv):
            o = model(input_ids=tok[:, None], past_key_values=pkv, use_cache=True)
            return o.logits[:, -1], o.past_key_values

        s = device_loop(step, out.logits[:, -1].argmax(-1), out.past_key_values, args.new_tokens, args.warmup, dev)
    rows.append(emit(**common, mode="dynamic_cache", loop="device", tokens_per_s=round(1 / s, 1),
                     ms_per_token=round(s * 1e3, 3)))
    return rows


def summary(rows: list[dict]) -> None:
    """Per model and mode: latency at the longest context over the shortest, and the speed-up over HF generate."""
    hf = {r["context"]: r for r in rows if r.get("impl") == "hf" and r.get("mode") == "dynamic_cache"
          and r.get("loop") == "generate" and "ms_per_token" in r}
    keys = {(r["model"], r["mode"], r["loop"]) for r in rows if r.get("impl") == "memlm" and "ms_per_token" in r}
    for model, mode, loop in sorted(keys):
        rs = sorted((r for r in rows if (r.get("model"), r.get("mode"), r.get("loop")) == (model, mode, loop)
                     and "ms_per_token" in r), key=lambda r: r["context"])
        lo, hi = rs[0], rs[-1]
        emit(bench="decode_summary", model=model, mode=mode, loop=loop, contexts=[r["context"] for r in rs],
             tokens_per_s=[r["tokens_per_s"] for r in rs],
             latency_ratio_longest_shortest=round(hi["ms_per_token"] / lo["ms_per_token"], 3),
             speedup_vs_hf_generate=[round(hf[r["context"]]["ms_per_token"] / r["ms_per_token"], 1)
                                     if r["context"] in hf else None for r in rs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the GPU run: 4 presets, contexts 1K/4K/16K, 32 new tokens")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: debug presets, contexts 32/96, 8 tokens")
    ap.add_argument("--presets", nargs="*", default=None)
    ap.add_argument("--contexts", type=int, nargs="*", default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prefill-chunk", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=0.0, help="engine loop sampling (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="engine loop nucleus mass")
    ap.add_argument("--modes", nargs="*", default=["eager", "static", "cuda_graph"],
                    choices=["eager", "static", "cuda_graph", "static_compiled", "cuda_graph_compiled"],
                    help="*_compiled: torch.compile the static step first (fused kernels; compiling takes minutes)")
    ap.add_argument("--engine-modes", nargs="*", default=None, help="modes also timed through Engine.generate_ids "
                    "(default: all; --quick: cuda_graph only)")
    ap.add_argument("--hf", default=None, help="the preset whose shape HF Llama takes (default: the first "
                    "transformer preset; 'none' skips HF)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="skip models not started within this many seconds "
                    "(default: 50 with --quick, unlimited otherwise)")
    args = ap.parse_args()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tiny:
        presets, contexts, n = TINY, [32, 96], 8
    elif args.quick:
        presets, contexts, n = QUICK, [1024, 4096, 16384], 32
    else:
        presets, contexts, n = QUICK, [1024, 4096, 16384], 256
    args.presets = args.presets or presets
    args.contexts = args.contexts or contexts
    args.new_tokens = args.new_tokens or n
    args.budget_s = args.budget_s or (50.0 if args.quick else float("inf"))
    if args.engine_modes is None:
        args.engine_modes = ["cuda_graph"] if args.quick else list(args.modes)
    if any(m.startswith("cuda_graph") for m in args.modes) and dev.type != "cuda":
        args.modes = [m for m in args.modes if not m.startswith("cuda_graph")]
        args.engine_modes = [m.replace("cuda_graph", "static") for m in args.engine_modes]
        emit(bench="decode_note", note=f"no CUDA graphs on {dev.type}: cuda_graph mode skipped")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    if dev.type == "cpu":
        torch.set_num_threads(min(4, torch.get_num_threads()))
    emit(bench="decode_meta", device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
         torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    t0 = time.perf_counter()
    rows: list[dict] = []
    hf_like = args.hf or next((p for p in args.presets if p.startswith("transformer")), "none")
    if hf_like != "none":
        try:
            import transformers
        except ImportError:
            emit(bench="decode_note", note="transformers not installed: HF rows skipped")
            hf_like = "none"
        else:
            emit(bench="decode_note", note=f"transformers {transformers.__version__}")
    jobs = list(args.presets)
    if hf_like != "none":   # HF right after the preset it is shaped like (the comparison survives a time cut)
        jobs.insert(jobs.index(hf_like) + 1 if hf_like in jobs else len(jobs), "hf")
    for job in jobs:
        if time.perf_counter() - t0 > args.budget_s:
            emit(bench="decode_note", note=f"{job} skipped: past the {args.budget_s:.0f} s budget")
            continue
        torch.manual_seed(0)
        if job == "hf":
            model = hf_llama(memlm.preset(hf_like).model, max_pos=max(args.contexts) + args.new_tokens + 64)
            model = model.to(device=dev, dtype=dtype).eval()
        else:
            model = memlm.build_model(job).to(device=dev, dtype=dtype)
        for ctx in args.contexts:
            rows += bench_hf(hf_like, model, ctx, args, dev, dtype) if job == "hf" else \
                bench_memlm(job, model, ctx, args, dev, dtype)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    summary(rows)
    emit(bench="decode_done", seconds=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
