"""Passkey retrieval at 4–16× the hot window, with and without warm tiers (docs/infinity-window.md).

    python scripts/passkey_tiers.py --model runs/iw-small                 # the model scripts/infinity_window_eval.py trains
    python scripts/passkey_tiers.py --model runs/iw-small --hot 128 --trials 12 --json out/passkey.jsonl
    python scripts/passkey_tiers.py --model runs/iw-small --train-minutes 7 --out-model runs/iw-passkey --hot 64

--train-minutes first fine-tunes --model on passkey prompts of 4 × --hot tokens (next-token loss on every token plus
the answer digits' loss again, so the retrieval is learned quickly), saving it to --out-model; the evaluation then
uses the fine-tuned weights. Full attention therefore sees 4× prompts in distribution and 8×, 16× beyond it.

A prompt of L tokens is book filler (held-out books) with " The pass key is NNNNN. Remember it. NNNNN is the pass
key. " at a random depth (always more than --hot tokens before the question), ending with " What is the pass key?
The pass key is"; the model decodes 6 tokens greedily, and a trial counts when they begin with " NNNNN". Variants: "full"
(exact attention over the whole prompt), "swa" (a sliding window of --hot tokens: no warm tier), "tiers" (--hot exact
tokens + warm tiers, tree search) and "tiers-flat" (warm tiers, every window scored). L = 4, 8, 16 × --hot.
Notation: L prompt tokens, W_h hot tokens.
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
from memlm.memory.kvtiers import KVTierConfig, apply_kv_tiers, calibrate

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
def needle_teleported(m, ids: list[int], span: tuple[int, int]) -> tuple[float, float]:
    """Mechanism check, independent of whether the model can copy: at the prompt's last token, the share of
    (layer, head) pairs whose teleported windows include a window of the needle, and the share of layers where
    at least one head fetched it."""
    xs: dict[int, torch.Tensor] = {}
    hooks = [b.mixer.register_forward_pre_hook(lambda mod, a, i=i: xs.__setitem__(i, a[0]))
             for i, b in enumerate(m.blocks)]
    try:
        _, st = m(torch.tensor([ids[:-1]]))
        m(torch.tensor([ids[-1:]]), st)
    finally:
        for h in hooks:
            h.remove()
    t, per_head, per_layer = len(ids) - 1, [], []
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
        hit = ((start <= span[1] - 1) & (start + w > span[0]) & (sel >= 0)).any(-1)   # [Hk, G]
        per_head.append(hit.float().mean().item())
        per_layer.append(float(hit.any()))
    return sum(per_head) / len(per_head), sum(per_layer) / len(per_layer)


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
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = memlm.load_model(args.model)
    tok = memlm.load_tokenizer("byte")
    books = load_books(BOOKS)
    filler = "\n\n".join(books[-HELD_OUT:])
    if args.train_minutes > 0:  # fine-tune on training books only; evaluate on held-out filler
        model = finetune(model, tok, "\n\n".join(books[:-HELD_OUT]), 4 * args.hot, args.train_minutes,
                         Path(args.out_model))
    calib = torch.tensor([tok.encode(books[0][:40_000])[:16_384]])
    base_cfg = {"hot": args.hot, "window": args.window, "topk": args.topk, "rank": 8, "pq": 8, "anchors": 4,
                "fanout": 8, "beam": 4}
    cb = calibrate(model, calib, KVTierConfig(**base_cfg))
    variants = {"full": model, "swa": sliding(model, args.hot),
                "tiers": apply_kv_tiers(model, KVTierConfig(**base_cfg), codebooks=cb),
                "tiers-flat": apply_kv_tiers(model, KVTierConfig(**base_cfg, search="flat"), codebooks=cb)}
    rows = []
    for ratio in args.ratios:
        L = ratio * args.hot
        rng = random.Random(ratio)
        trials = [prompt(rng, filler, L, args.hot, tok) for _ in range(args.trials)]
        for name, m in variants.items():
            eng = Engine(m, tok, prefill_chunk=256)
            t0, ok, fetched, chance = time.time(), 0, [], []
            for ids, key, _, span in trials:
                gen = eng.generate_ids([ids], max_new_tokens=6, sampling=SamplingConfig(temperature=0)).run()
                text = tok.decode(gen.rows[0].token_ids)
                ok += text.strip().startswith(key)
                if name.startswith("tiers"):
                    fetched.append(needle_teleported(m, ids, span))
                    c = m.kv_tiers
                    n = (len(ids) - 1 - c.hot) // c.window + 1                # windows the last query may see
                    hit_w = span[1] // c.window - span[0] // c.window + 1    # windows holding the needle
                    chance.append(1 - math.comb(n - hit_w, min(c.topk, n)) / math.comb(n, min(c.topk, n)))
            row = {"variant": name, "hot": args.hot, "ratio": ratio, "length": L, "trials": args.trials,
                   "accuracy": ok / args.trials, "mean_distance": sum(t[2] for t in trials) / len(trials),
                   "seconds": round(time.time() - t0, 1)}
            if fetched:
                row["needle_fetched_heads"] = sum(f[0] for f in fetched) / len(fetched)
                row["needle_fetched_layers"] = sum(f[1] for f in fetched) / len(fetched)
                row["needle_chance_per_head"] = sum(chance) / len(chance)  # k windows picked at random
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


if __name__ == "__main__":
    main()
