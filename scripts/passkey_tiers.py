"""Passkey retrieval at 4–16× the hot window, with and without warm tiers (docs/infinity-window.md).

    python scripts/passkey_train.py --out runs/pk-small                      # a small model that retrieves (CPU)
    python scripts/passkey_tiers.py --model runs/pk-small --hot 64 --trials 40 --json out/pk.jsonl --plot out/pk.png
    python scripts/passkey_tiers.py --model runs/iw-small --train-minutes 7 --out-model runs/iw-passkey --hot 64

--train-minutes first fine-tunes --model on passkey prompts of 4 × --hot tokens (next-token loss on every token plus
the answer digits' loss again, so the retrieval is learned quickly), saving it to --out-model; the evaluation then
uses the fine-tuned weights. Full attention therefore sees 4× prompts in distribution and 8×, 16× beyond it.

A prompt of L tokens is book filler (held-out books) with " The pass key is NNNNN. Remember it. NNNNN is the pass
key. " at a random depth (always more than --hot tokens before the question), ending with " What is the pass key?
The pass key is"; the model decodes 6 tokens greedily, and a trial counts when they begin with " NNNNN". Variants: "full"
(exact attention over the whole prompt), "swa" (a sliding window of --hot tokens: no warm tier), "tiers" (--hot exact
tokens + warm tiers, tree search) and "tiers-flat" (warm tiers, every window scored). L = 4, 8, 16 × --hot.
The PQ codebooks are calibrated on passkey prompts with training-book filler (--calibration passkey, other keys and
filler than the evaluation's) or on plain book text (--calibration book, which holds no digits).

Mechanism, at the query that predicts the key's first digit (the prompt plus the answer's space): "needle fetched"
= the share of (layer, head) pairs whose teleported windows include a window of the needle; "retrieval head" = the
(layer, head) with the most exact-attention mass on the needle in the full model, and whether the tiers fetched the
needle for that head; "chance" = the probability that k windows drawn at random among those the query may see
include a needle window. Accuracies carry 95 % Wilson intervals. Notation: L prompt tokens, W_h hot tokens.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

import memlm
from memlm.inference.engine import Engine
from memlm.inference.sampling import SamplingConfig
from memlm.memory.kvtiers import KVTierConfig, apply_kv_tiers, calibrate, tier_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infinity_window_eval import BOOKS, HELD_OUT, load_books, sliding


def prompt(rng: random.Random, filler: str, length: int, hot: int, tok) -> tuple[list[int], str, int, tuple[int, int]]:
    """(ids, key, distance in tokens from the key to the end of the prompt, the needle's [start, end))."""
    key = f"{rng.randrange(10000, 100000)}"
    needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    ask = tok.encode(" What is the pass key? The pass key is")
    n_fill = length - len(needle) - len(ask)
    start = rng.randrange(0, len(filler) - 2 * n_fill)
    fill = tok.encode(filler[start:start + 2 * n_fill])[:n_fill]
    at = rng.randrange(0, n_fill - hot)  # the needle ends more than W_h tokens before the question
    ids = fill[:at] + needle + fill[at:] + ask
    return ids, key, len(ids) - (at + len(needle) // 2), (at, at + len(needle))


@torch.no_grad()
def needle_teleported(m, ids: list[int], span: tuple[int, int]) -> torch.Tensor:
    """Mechanism check, independent of whether the model can copy: at the last token of ids, for every (layer, head)
    of the tiered model m, whether its teleported windows include a window of the needle -> hit [layers, Hq] bool."""
    xs: dict[int, torch.Tensor] = {}
    hooks = [b.mixer.register_forward_pre_hook(lambda mod, a, i=i: xs.__setitem__(i, a[0]))
             for i, b in enumerate(m.blocks)]
    try:
        _, st = m(torch.tensor([ids[:-1]]))
        m(torch.tensor([ids[-1:]]), st)
    finally:
        for h in hooks:
            h.remove()
    t, hits = len(ids) - 1, []
    for i, b in enumerate(m.blocks):
        layer, s = b.mixer, st.layers[i]
        core = layer.core
        q, _, _ = core.project(xs[i])
        if core.q_norm is not None:
            q = core.q_norm(q)
        G = layer.hq // layer.hk
        qw = core.rotary._rotate(q.float(), torch.full((1, 1), layer.cfg.dist), 1.0) if core.rotary else q.float()
        sel = layer.teleport(qw.reshape(1, layer.hk, G, layer.dh), s, torch.full((1, G), t),
                             torch.zeros(1, G, dtype=torch.long))[0]           # [Hk, G, k]
        w = layer.cfg.window
        wpos = torch.cat([s.wpos[0], s.wpos.new_full((1,), -10 ** 9)])
        start = wpos[sel.clamp_min(-1)]                                         # −1 -> the sentinel
        hits.append(((start <= span[1] - 1) & (start + w > span[0]) & (sel >= 0)).any(-1).flatten())   # [Hq]
    return torch.stack(hits)


@torch.no_grad()
def needle_attention(model, ids: list[int], span: tuple[int, int]) -> torch.Tensor:
    """Exact full attention of the plain model at the last token of ids: the share of each (layer, head)'s attention
    mass on the needle's tokens -> [layers, Hq]. Its argmax is the head that retrieves the key."""
    xs: dict[int, torch.Tensor] = {}
    hooks = [b.mixer.register_forward_pre_hook(lambda mod, a, i=i: xs.__setitem__(i, a[0]))
             for i, b in enumerate(model.blocks)]
    try:
        model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    T, out = len(ids), []
    for i, b in enumerate(model.blocks):
        core = b.mixer.core
        q, k, _ = core.project(xs[i])
        if core.q_norm is not None:
            q, k = core.q_norm(q), core.k_norm(k)
        if core.rotary is not None:
            q, k = core.rotary(q, k, torch.arange(T)[None])
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        att = torch.softmax((q[0, :, -1:].float() @ k[0].float().transpose(-1, -2))[:, 0] / math.sqrt(q.shape[-1]), -1)
        out.append(att[:, span[0]:span[1]].sum(-1))                             # [Hq]
    return torch.stack(out)


def finetune(model, tok, filler: str, length: int, minutes: float, out: Path, batch: int = 16, seed: int = 0):
    """AdamW on passkey prompts followed by their answer: loss = mean CE over all tokens + mean CE over the digits."""
    import torch.nn.functional as F

    rng = random.Random(seed + 1000)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    t0, step = time.time(), 0
    while time.time() - t0 < minutes * 60:
        rows, answers = [], []
        for _ in range(batch):
            ids, key, _, _ = prompt(rng, filler, length - 6, min(32, length // 8), tok)
            ans = tok.encode(f" {key}")
            rows.append((ids + ans)[:length + 1])
            answers.append(len(ids) - 1)
        T = max(len(r) for r in rows)
        x = torch.zeros(batch, T, dtype=torch.long)
        m = torch.zeros(batch, T - 1, dtype=torch.bool)
        for b, r in enumerate(rows):
            x[b, :len(r)] = torch.tensor(r)
            m[b, answers[b]:answers[b] + 6] = True
        valid = torch.zeros(batch, T - 1, dtype=torch.bool)
        for b, r in enumerate(rows):
            valid[b, :len(r) - 1] = True
        logits, _ = model(x[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="none")
        ce = ce.view(batch, T - 1)
        loss = ce[valid].mean() + ce[m & valid].mean()
        lr = 1e-3 * min(1.0, (step + 1) / 20)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            print(f"passkey step {step} loss {loss.item():.3f} answer {ce[m & valid].mean().item():.3f} "
                  f"{time.time() - t0:.0f}s", file=sys.stderr)
        step += 1
    model.eval()
    model.save_pretrained(out)
    (out / "train.json").write_text(json.dumps({"finetune_steps": step, "minutes": minutes, "length": length}))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/iw-small")
    ap.add_argument("--hot", type=int, default=128)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--ratios", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-minutes", type=float, default=0.0, help="fine-tune on passkey prompts first")
    ap.add_argument("--out-model", default="runs/iw-passkey")
    ap.add_argument("--fanout", type=int, default=4, help="tree fan-out (4 with beam 2: the tree prunes from 9 windows)")
    ap.add_argument("--beam", type=int, default=2)
    names = ["full", "swa", "tiers", "tiers-flat", "tiers-a1", "tiers-fine", "tiers-fine-tree0", "tiers-fine-tree"]
    ap.add_argument("--variants", nargs="+", choices=names, default=names)
    ap.add_argument("--spread", type=float, default=1.0, help="κ of the tiers-fine-tree variant")
    ap.add_argument("--calibration", choices=["passkey", "book"], default="passkey",
                    help="text the PQ codebooks are trained on (see docs/infinity-window.md)")
    ap.add_argument("--seed", type=int, default=0, help="prompt seed (0: the prompts of earlier runs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="accuracy and needle-fetch plot (PNG)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = memlm.load_model(args.model)
    tok = memlm.load_tokenizer("byte")
    books = load_books(BOOKS)
    filler = "\n\n".join(books[-HELD_OUT:])
    if args.train_minutes > 0:  # fine-tune on training books only; evaluate on held-out filler
        model = finetune(model, tok, "\n\n".join(books[:-HELD_OUT]), 4 * args.hot, args.train_minutes,
                         Path(args.out_model))
    if args.calibration == "book":  # plain book text: no digits, so the needle's keys fall outside the codebooks
        calib = torch.tensor([tok.encode(books[0][:40_000])[:16_384]])
    else:  # passkey prompts on training-book filler (other keys, other filler than the evaluation's)
        crng, ids = random.Random(10_000 + args.seed), []
        while len(ids) < 16_384:
            ids += prompt(crng, "\n\n".join(books[:-HELD_OUT]), 4 * args.hot, 0, tok)[0]
        calib = torch.tensor([ids[:16_384]])
    base_cfg = {"hot": args.hot, "window": args.window, "topk": args.topk, "rank": 8, "pq": 8, "anchors": 4,
                "fanout": args.fanout, "beam": args.beam}
    dh = model.blocks[0].mixer.core.dh
    fine = {**base_cfg, "anchors": args.window, "pq": dh}
    tier_cfgs = {"tiers": KVTierConfig(**base_cfg), "tiers-flat": KVTierConfig(**base_cfg, search="flat"),
                 # one anchor per token: teleport scores a window by its best single key
                 "tiers-a1": KVTierConfig(**{**base_cfg, "anchors": args.window}, search="flat"),
                 # and fine key codes (one code byte per dimension; values still rank 8): a diagnostic upper bound
                 "tiers-fine": KVTierConfig(**fine, search="flat"),
                 # the same through the context tree, nodes scored by their mean anchor only (κ = 0) ...
                 "tiers-fine-tree0": KVTierConfig(**fine),
                 # ... and by mean + κ·‖q‖·spread
                 "tiers-fine-tree": KVTierConfig(**fine, spread=args.spread)}
    variants = {"full": model, "swa": sliding(model, args.hot)}
    for name in (n for n in args.variants if n in tier_cfgs):
        c = tier_cfgs[name]
        variants[name] = apply_kv_tiers(model, c, codebooks=calibrate(model, calib, c))
    variants = {n: variants[n] for n in args.variants}
    # the retrieval head: most exact-attention mass on the needle at the first digit's query, on prompts of 4× hot
    # (inside the training length of scripts/passkey_train.py, where full attention retrieves)
    space = tok.encode(" ")
    hrng = random.Random(20_000 + args.seed)
    probe = [prompt(hrng, filler, 4 * args.hot, args.hot, tok) for _ in range(16)]
    head_mass = torch.stack([needle_attention(model, ids + space, span) for ids, _, _, span in probe]).mean(0)
    r_layer, r_head = divmod(int(head_mass.argmax()), head_mass.shape[1])
    print(f"retrieval head: layer {r_layer} head {r_head} ({head_mass.max():.2f} of its attention on the needle)",
          file=sys.stderr)
    rows = []
    for ratio in args.ratios:
        L = ratio * args.hot
        rng = random.Random(ratio + 1000 * args.seed)
        trials = [prompt(rng, filler, L, args.hot, tok) for _ in range(args.trials)]
        for name, m in variants.items():
            eng = Engine(m, tok, prefill_chunk=256)
            t0, oks, hits, chance = time.time(), [], [], []
            for ids, key, _, span in trials:
                gen = eng.generate_ids([ids], max_new_tokens=6, sampling=SamplingConfig(temperature=0)).run()
                text = tok.decode(gen.rows[0].token_ids)
                oks.append(text.strip().startswith(key))
                if name.startswith("tiers"):   # at the query that predicts the first digit (prompt + " ")
                    hits.append(needle_teleported(m, ids + space, span))
                    c = m.kv_tiers
                    n = (len(ids) - c.hot) // c.window + 1                    # windows that query may see
                    hit_w = span[1] // c.window - span[0] // c.window + 1    # windows holding the needle
                    chance.append(1 - math.comb(n - hit_w, min(c.topk, n)) / math.comb(n, min(c.topk, n)))
            acc = sum(oks) / len(oks)
            lo, hi = wilson(sum(oks), len(oks))
            row = {"variant": name, "hot": args.hot, "ratio": ratio, "length": L, "trials": args.trials,
                   "accuracy": acc, "ci95": [round(lo, 3), round(hi, 3)],
                   "mean_distance": sum(t[2] for t in trials) / len(trials), "seconds": round(time.time() - t0, 1),
                   "seed": args.seed}
            if hits:
                c = m.kv_tiers
                row |= {"window": c.window, "topk": c.topk, "pq": c.pq, "rank": c.rank, "anchors": c.anchors,
                        "search": c.search, "fanout": c.fanout, "beam": c.beam, "spread": c.spread,
                        "calibration": args.calibration, **tier_memory(m)}
                top_hit = [bool(h[r_layer, r_head]) for h in hits]
                row["needle_fetched_heads"] = sum(h.float().mean().item() for h in hits) / len(hits)
                row["needle_fetched_layers"] = sum(h.any(1).float().mean().item() for h in hits) / len(hits)
                row["needle_fetched_retrieval_head"] = sum(top_hit) / len(top_hit)
                row["needle_chance_per_head"] = sum(chance) / len(chance)  # k windows picked at random
                got = [o for o, t in zip(oks, top_hit) if t]
                row["accuracy_when_fetched"] = sum(got) / len(got) if got else None
            if name == "full":  # how much of the retrieval head's exact attention still lands on the needle
                row["retrieval_head"] = [r_layer, r_head]
                row["retrieval_head_needle_mass"] = sum(
                    needle_attention(model, ids + space, span)[r_layer, r_head].item()
                    for ids, _, _, span in trials) / len(trials)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    names = list(variants)
    print("| prompt length | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for ratio in args.ratios:
        acc = {r["variant"]: r["accuracy"] for r in rows if r["ratio"] == ratio}
        print(f"| {ratio}× hot = {ratio * args.hot} | " + " | ".join(f"{acc[n]:.0%}" for n in names) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.plot:
        plot(rows, names, Path(args.plot))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate k / n."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def plot(rows: list[dict], names: list[str], path: Path) -> None:
    """Accuracy (with 95 % intervals) by prompt length for each variant, and the needle-fetch rates of the tiers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    marks = "osD^v<>p*h"
    for i, n in enumerate(names):
        rs = [r for r in rows if r["variant"] == n]
        x = [r["ratio"] * (1 + 0.025 * (i - (len(names) - 1) / 2)) for r in rs]   # side by side, not on top
        style = {"color": f"C{i}", "marker": marks[i % len(marks)], "label": n}
        err = [[100 * (r["accuracy"] - r["ci95"][0]) for r in rs], [100 * (r["ci95"][1] - r["accuracy"]) for r in rs]]
        a1.errorbar(x, [100 * r["accuracy"] for r in rs], yerr=err, capsize=3, **style)
        if n.startswith("tiers"):
            a2.plot(x, [r["needle_fetched_retrieval_head"] for r in rs], **style)
    rs = [r for r in rows if r["variant"].startswith("tiers")]
    if rs:
        chance = {r["ratio"]: r["needle_chance_per_head"] for r in rs}
        a2.plot(sorted(chance), [chance[k] for k in sorted(chance)], color="gray", ls=":", label="k random windows")
    ratios = sorted({r["ratio"] for r in rows})
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(ratios, [f"{r}×" for r in ratios])
        a.set_xlabel(f"prompt length (× hot window of {rows[0]['hot']})")
    a1.set_ylabel("passkey accuracy (%, 95 % interval)")
    a1.set_ylim(-5, 105)
    a1.set_title("passkey retrieval")
    a1.legend(fontsize=8)
    a2.set_ylabel("share of prompts")
    a2.set_ylim(-0.03, 1.05)
    a2.set_title("teleport fetched the needle for the retrieval head")
    a2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
