"""Infinity-Window vs exact full attention vs a plain sliding window: perplexity on long book documents, memory per
token, and teleport recall against exact attention (docs/infinity-window.md).

    python scripts/infinity_window_eval.py --train-minutes 8            # train the small model, then evaluate
    python scripts/infinity_window_eval.py --model runs/iw-small        # evaluate a saved model
    python scripts/infinity_window_eval.py --hot 256 --doc-len 4096 --docs 4 --json out/iw.jsonl --plot docs/img/x.png

The model (unless --model): a byte-level Llama-style transformer (d 128, 4 layers, 4 heads of 32, full attention, RoPE)
trained for --train-minutes on CPU on 512-token windows of the books corpus (all but the held-out books), a quarter
of the rows being passkey documents (scripts/passkey_tiers.py evaluates those). Evaluation documents are the first
--doc-len bytes of --docs held-out books, fed in chunks of --chunk tokens with the state carried, under three
attention memories: "full" (exact, KV cache grows with the document), "swa" (the same weights, a sliding window of
--hot tokens) and "tiers" (--hot exact tokens + warm tiers; codebooks calibrated on training text). Notation: T
tokens, W_h hot tokens, L layers.
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import memlm
from memlm.config.model import ModelConfig
from memlm.layers.attention import AttentionConfig
from memlm.memory.kvtiers import KVTierConfig, TieredAttention, apply_kv_tiers, calibrate, tier_memory

BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "books.jsonl.xz"  # beside the repo
HELD_OUT = 6  # the last books are never trained on


def load_books(path: Path) -> list[str]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def passkey_doc(rng: random.Random, filler: str, length: int, tok) -> list[int]:
    """Filler with "The pass key is NNNNN. Remember it." at a random depth, ending with the question and answer."""
    key = f"{rng.randrange(10000, 100000)}"
    needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    ask = tok.encode(f" What is the pass key? The pass key is {key}.")
    n_fill = max(0, length - len(needle) - len(ask))
    start = rng.randrange(0, max(1, len(filler) - n_fill - 1))
    fill = tok.encode(filler[start:start + n_fill])[:n_fill]
    at = rng.randrange(0, len(fill) + 1)
    return (fill[:at] + needle + fill[at:] + ask)[:length]


def small_model() -> memlm.MemoryLM:
    layers = [AttentionConfig() for _ in range(4)]
    return memlm.build_model(ModelConfig(vocab_size=263, d_model=128, n_heads=4, layers=layers, max_seq_len=8192))


def train(minutes: float, out: Path, seq_len: int = 512, batch: int = 8, passkey_frac: float = 0.25,
          seed: int = 0) -> memlm.MemoryLM:
    """AdamW with warm-up + cosine on random windows of the training books (and passkey rows), for ``minutes``."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = memlm.load_tokenizer("byte")
    books = load_books(BOOKS)[:-HELD_OUT]
    text = "\n\n".join(books)
    model = small_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    t0, step, est_steps = time.time(), 0, None
    while time.time() - t0 < minutes * 60:
        rows = []
        for _ in range(batch):
            if rng.random() < passkey_frac:
                rows.append(passkey_doc(rng, text, seq_len + 1, tok))
            else:
                a = rng.randrange(0, len(text) - 4 * seq_len)
                rows.append(tok.encode(text[a:a + 2 * seq_len])[:seq_len + 1])
        x = torch.tensor(rows)
        if est_steps is None and step == 5:
            est_steps = int(minutes * 60 / ((time.time() - t0) / 5))
        total = est_steps or 10_000
        lr = 2e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
        for g in opt.param_groups:
            g["lr"] = lr
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t0:.0f}s", file=sys.stderr)
        step += 1
    model.eval()
    model.save_pretrained(out)
    (out / "train.json").write_text(json.dumps({"steps": step, "minutes": minutes, "seq_len": seq_len, "batch": batch,
                                                "passkey_frac": passkey_frac, "final_loss": loss.item()}))
    return model


def sliding(model: memlm.MemoryLM, window: int) -> memlm.MemoryLM:
    """The same weights with every attention layer limited to a sliding window (a fresh model, weights copied)."""
    cfg = ModelConfig.from_dict(model.config.to_dict())
    for lc in cfg.layers:
        lc.window = window
    swa = memlm.build_model(cfg)
    swa.load_state_dict(model.state_dict())
    return swa.eval()


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """NLL [T-1] of ids [1, T], fed in chunks with the state carried (as the engine's prefill does)."""
    state, out = None, []
    for a in range(0, ids.shape[1] - 1, chunk):
        b = min(a + chunk, ids.shape[1] - 1)
        logits, state = model(ids[:, a:b], state)
        out.append(F.cross_entropy(logits[0].float(), ids[0, a + 1:b + 1], reduction="none"))
    return torch.cat(out)


@torch.no_grad()
def teleport_recall(model, tiered, ids: torch.Tensor, hot: int, n_queries: int = 16) -> dict[str, float]:
    """For sampled queries beyond the hot window: the share of exact attention mass (true positions, full cache)
    on tokens older than the hot window that falls inside the windows the tiers teleported; and the same for the
    flat search (every window scored), averaged over layers and heads."""
    caught: dict[str, list[float]] = {"tree": [], "flat": []}
    T = ids.shape[1]
    g = torch.Generator().manual_seed(0)
    qs = sorted(torch.randint(hot + 128, T, (n_queries,), generator=g).tolist())
    per_layer = []
    for li in range(len(tiered.blocks)):
        core = model.blocks[li].mixer.core
        x_in: dict = {}
        hook = model.blocks[li].mixer.register_forward_pre_hook(lambda m, a, box=x_in: box.setdefault("x", a[0]))
        model(ids)
        hook.remove()
        q, k, _ = core.project(x_in["x"])
        qr, kr = core.rotary(q, k, torch.arange(T)[None])
        per_layer.append((q, qr, kr))
    for t in qs:
        _, st = tiered(ids[:, :t])               # the tiers' state before query t
        for li, blk in enumerate(tiered.blocks):
            layer: TieredAttention = blk.mixer
            core, (q, qr, kr), s = layer.core, per_layer[li], st.layers[li]
            G = layer.hq // layer.hk
            att = torch.softmax((qr[0, :, t:t + 1] @ kr[0].repeat_interleave(G, 0)[:, :t + 1].transpose(-1, -2))[:, 0]
                                / math.sqrt(layer.dh), -1)
            old = att[:, : t - hot + 1]          # mass on tokens outside the hot window [Hq, t−W_h+1]
            qw = core.rotary._rotate(q[:, :, t:t + 1], torch.full((1, 1), layer.cfg.dist), 1.0)
            qw = qw.reshape(1, layer.hk, G, layer.dh)
            for mode in ("tree", "flat"):
                layer.cfg.search = mode
                sel = layer.teleport(qw, s, torch.full((1, G), t), torch.zeros(1, G, dtype=torch.long))
                layer.cfg.search = "tree"
                for h in range(layer.hq):
                    mask = torch.zeros(old.shape[1], dtype=torch.bool)
                    for j in (j for j in sel[0, h // G, h % G].tolist() if j >= 0):
                        p0 = int(s.wpos[0, j])
                        mask[p0:p0 + layer.cfg.window] = True
                    tot = float(old[h].sum())
                    if tot > 1e-6:
                        caught[mode].append(float(old[h][mask].sum()) / tot)
    return {f"recall_{m}": sum(v) / max(len(v), 1) for m, v in caught.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a saved model folder (default: train one into runs/iw-small)")
    ap.add_argument("--train-minutes", type=float, default=9.0)
    ap.add_argument("--out-model", default="runs/iw-small")
    ap.add_argument("--hot", type=int, default=256)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--pq", type=int, default=8)
    ap.add_argument("--doc-len", type=int, default=4096)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # small matmuls on a shared CPU: one thread is often much faster
    if args.model:
        model = memlm.load_model(args.model)
    else:
        model = train(args.train_minutes, Path(args.out_model))
    tok = memlm.load_tokenizer("byte")
    books = load_books(BOOKS)
    docs = [torch.tensor([tok.encode(b[:args.doc_len * 2])[:args.doc_len]]) for b in books[-args.docs:]]
    calib = torch.tensor([tok.encode(books[0][:40_000])[:16_384]])
    cfgs = {"tiers": KVTierConfig(hot=args.hot, window=args.window, topk=args.topk, rank=args.rank, pq=args.pq,
                                  anchors=4, fanout=8, beam=4),
            "tiers-flat": KVTierConfig(hot=args.hot, window=args.window, topk=args.topk, rank=args.rank, pq=args.pq,
                                       anchors=4, search="flat")}
    t0 = time.time()
    books_cb = calibrate(model, calib, cfgs["tiers"])
    print(f"calibrated codebooks in {time.time() - t0:.1f}s", file=sys.stderr)
    variants = {"full": model, "swa": sliding(model, args.hot)}
    variants |= {n: apply_kv_tiers(model, c, codebooks=books_cb) for n, c in cfgs.items()}
    buckets = [(0, 512), (512, 1024), (1024, 2048), (2048, args.doc_len)]
    rows = []
    mem = tier_memory(variants["tiers"])
    L = args.doc_len
    for name, m in variants.items():
        t0 = time.time()
        nll = torch.stack([token_nll(m, d, args.chunk) for d in docs])       # [docs, T-1]
        row = {"variant": name, "hot": args.hot, "doc_len": L, "docs": args.docs,
               "ppl": math.exp(nll.mean().item()), "seconds": round(time.time() - t0, 1)}
        for a, b in buckets:
            row[f"ppl_{a}_{b}"] = math.exp(nll[:, a:b - 1].mean().item())
        exact = mem["exact_bytes_per_token"]
        if name == "full":
            row["bytes_accel"], row["bytes_host"] = exact * L, 0.0
        elif name == "swa":
            row["bytes_accel"], row["bytes_host"] = exact * args.hot, 0.0
        else:
            row["bytes_accel"], row["bytes_host"] = exact * args.hot, mem["warm_bytes_per_token"] * (L - args.hot)
        row["bytes_per_token"] = (row["bytes_accel"] + row["bytes_host"]) / L
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    rec = teleport_recall(model, variants["tiers"], docs[0][:, :2048], args.hot)
    summary = {"variant": "teleport-recall", **rec, "warm_bytes_per_token": mem["warm_bytes_per_token"],
               "exact_bytes_per_token": mem["exact_bytes_per_token"]}
    rows.append(summary)
    print(json.dumps(summary), file=sys.stderr)
    print_table(rows, buckets)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.plot:
        plot(rows, buckets, Path(args.plot))


def print_table(rows: list[dict], buckets) -> None:
    head = ["variant", "ppl"] + [f"ppl {a}–{b}" for a, b in buckets] + ["accel bytes/tok", "host bytes/tok"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        if "ppl" not in r:
            continue
        L = r["doc_len"]
        cells = [r["variant"], f"{r['ppl']:.3f}"] + [f"{r[f'ppl_{a}_{b}']:.3f}" for a, b in buckets]
        cells += [f"{r['bytes_accel'] / L:.0f}", f"{r['bytes_host'] / L:.0f}"]
        print("| " + " | ".join(cells) + " |")


def plot(rows: list[dict], buckets, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [f"{a}–{b}" for a, b in buckets]
    for r in rows:
        if "ppl" in r:
            a1.plot(xs, [r[f"ppl_{a}_{b}"] for a, b in buckets], marker="o", label=r["variant"])
    a1.set_xlabel("token position in the document")
    a1.set_ylabel("perplexity (bytes)")
    a1.set_title("perplexity by position")
    a1.legend()
    names = [r["variant"] for r in rows if "ppl" in r]
    acc = [r["bytes_accel"] / r["doc_len"] for r in rows if "ppl" in r]
    host = [r["bytes_host"] / r["doc_len"] for r in rows if "ppl" in r]
    a2.bar(names, acc, label="accelerator (hot / exact KV)")
    a2.bar(names, host, bottom=acc, label="host RAM (warm tiers)")
    a2.set_ylabel("KV bytes per token of the document")
    a2.set_title(f"memory at T = {rows[0]['doc_len']}")
    a2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
