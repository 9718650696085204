"""Training throughput of memlm presets next to Hugging Face LlamaForCausalLM of the same shape, in one process.

Each model runs the same loop: bf16 autocast forward, token cross-entropy, backward, clip, fused AdamW step.
Prints one JSON line per (model, mode) with tokens/s, step time, peak memory and MFU (6·N·tokens / time / peak).

    python benchmarks/train_throughput.py --presets transformer-34m --hf-llama --batch 16 --seq 2048 --compile both
    python benchmarks/train_throughput.py --presets transformer-34m --cuda-graph   # each step replayed from a graph
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

import memlm
from memlm.train.cuda_graph import StepGraphs

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def hf_llama(cfg: memlm.ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    a = cfg.layers[0]
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=a.n_kv_heads or cfg.n_heads, max_position_embeddings=4096,
                     rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_base,
                     attn_implementation="sdpa")
    return LlamaForCausalLM(hc)


def run(name: str, model, fwd, *, batch: int, seq: int, steps: int, warmup: int, compile_: bool, vocab: int,
        cuda_graph: bool = False) -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    step_fn = fwd
    if compile_:
        step_fn = torch.compile(fwd)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(dev)
    inp, lab = x[:, :-1], x[:, 1:]
    graphs = StepGraphs(model.parameters()) if cuda_graph and dev.type == "cuda" else None
    # no autocast weight cache across steps under a CUDA graph (as the trainer)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda", cache_enabled=graphs is None)

    def body():
        with amp:
            loss = step_fn(model, inp, lab)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return loss

    def one_step():
        opt.zero_grad(set_to_none=True)
        loss = body() if graphs is None else graphs.run("step", body)
        opt.step()
        return loss

    if dev.type == "cuda":   # the peak from the first step on: a CUDA graph's memory is taken at its capture
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        one_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tok_s = batch * seq / dt
    peak = peak_flops()
    return {"model": name, "compile": compile_, "cuda_graph": cuda_graph, "params": n_params, "batch": batch,
            "seq": seq,
            "tokens_per_s": round(tok_s), "step_ms": round(dt * 1e3, 2), "loss": round(loss.item(), 4),
            "mfu": round(6 * n_params * tok_s / peak, 4) if peak else None,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None}


def memlm_fwd(model, inp, lab):
    logits, _ = model(inp)
    return F.cross_entropy(logits.flatten(0, 1).float(), lab.flatten())


def hf_fwd(model, inp, lab):
    logits = model(input_ids=inp).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), lab.flatten())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="*", default=["transformer-34m"])
    ap.add_argument("--hf-llama", action="store_true", help="also run HF LlamaForCausalLM shaped like the first preset")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--cuda-graph", action="store_true", help="replay each step's forward, backward and clip from a "
                    "CUDA graph (memlm.train.cuda_graph, what train.cuda_graph does); the optimizer stays eager")
    args = ap.parse_args()
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps({"meta": meta}), flush=True)
    for p in args.presets:
        cfg = memlm.preset(p).model
        for c in modes:
            torch.manual_seed(0)
            r = run(f"memlm:{p}", memlm.build_model(cfg), memlm_fwd, batch=args.batch, seq=args.seq, steps=args.steps,
                    warmup=args.warmup, compile_=c, vocab=cfg.vocab_size, cuda_graph=args.cuda_graph)
            print(json.dumps(r), flush=True)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.hf_llama:
        cfg = memlm.preset(args.presets[0]).model
        for c in modes:
            torch.manual_seed(0)
            r = run("hf:LlamaForCausalLM", hf_llama(cfg), hf_fwd, batch=args.batch, seq=args.seq, steps=args.steps,
                    warmup=args.warmup, compile_=c, vocab=cfg.vocab_size, cuda_graph=args.cuda_graph)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
