"""Train a small byte-level transformer from scratch on passkey prompts, so that it retrieves (docs/infinity-window.md).

    python scripts/passkey_train.py --out runs/pk-small                 # 4000 steps: ~20 min on one idle CPU thread
    python scripts/passkey_tiers.py --model runs/pk-small --hot 64 --ratios 4 8 16 --trials 40

Every row is a passkey prompt of L tokens, L uniform in [--min-len, --max-len] (default 2–4 × 64): filler from the
training books (all but the held-out ones) with " The pass key is NNNNN. Remember it. NNNNN is the pass key. " at a
uniformly random depth, then " What is the pass key? The pass key is NNNNN." Loss = mean next-token cross-entropy
over every token + --answer-weight × the mean over the 6 answer tokens (" " and the digits), so the retrieval is
learned quickly. Every --eval-every steps: exact-match accuracy on --eval-prompts held-out prompts in the evaluation
format of scripts/passkey_tiers.py (held-out filler, L = --max-len, the needle more than --hot tokens before the
question), teacher-forced — the argmax at all 6 answer positions right is exactly "greedy decoding returns the key".
Training stops when that accuracy reaches --target at --patience evaluations in a row, after --steps (warm-up 100,
cosine to 10 %), or after --minutes of wall time.
Notation: B rows, L tokens per row.
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
import torch.nn.functional as F

import memlm
from memlm.config.model import ModelConfig
from memlm.layers.attention import AttentionConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infinity_window_eval import BOOKS, HELD_OUT, load_books  # noqa: E402
from passkey_tiers import prompt  # noqa: E402


def build(layers: int, d_model: int, heads: int) -> memlm.MemoryLM:
    """Byte-level Llama-style transformer: full attention, RoPE, SwiGLU, RMSNorm."""
    return memlm.build_model(ModelConfig(vocab_size=263, d_model=d_model, n_heads=heads,
                                         layers=[AttentionConfig() for _ in range(layers)], max_seq_len=8192))


def with_numbers(text: str, rate: float, seed: int) -> str:
    """text with a random number of 1–5 digits inserted before each word with probability ``rate``: distractor digits
    (the training books have almost none; the held-out ones include the Bible's verse numbers), so the model must
    find the key by its context ("pass key is") rather than by being the only digits in the prompt."""
    if rate <= 0:
        return text
    rng = random.Random(seed)
    words = text.split(" ")
    for i in range(len(words)):
        if rng.random() < rate:
            words[i] = f"{rng.randrange(10 ** rng.randrange(1, 6))} {words[i]}"   # up to 1–5 digits
    return " ".join(words)


def batch(rng: random.Random, filler: str, length: int, gap: int, rows: int, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """rows prompts of ``length`` tokens followed by " NNNNN." -> ids [B, L + 7], answer mask [B, L + 6] over the
    positions that predict the 6 answer tokens. ``gap``: the needle ends more than this many tokens before the
    question (0: anywhere)."""
    ids, mask = [], torch.zeros(rows, length + 6, dtype=torch.bool)
    for b in range(rows):
        p, key, _, _ = prompt(rng, filler, length, gap, tok)
        ids.append(p + tok.encode(f" {key}."))
        mask[b, len(p) - 1:len(p) + 5] = True
    return torch.tensor(ids), mask


@torch.no_grad()
def passkey_accuracy(model, x: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of rows whose argmax is right at every answer position (= greedy decoding returns the key)."""
    model.eval()
    logits, _ = model(x[:, :-1])
    model.train()
    right = (logits.argmax(-1) == x[:, 1:]) | ~mask
    return right.all(-1).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/pk-small")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--hot", type=int, default=64, help="the evaluation's hot window (eval prompts: gap > hot)")
    ap.add_argument("--min-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--answer-weight", type=float, default=1.0)
    ap.add_argument("--distractors", type=float, default=0.03, help="per-word rate of random numbers in the filler")
    ap.add_argument("--steps", type=int, default=4000, help="optimizer steps (the cosine schedule's length)")
    ap.add_argument("--minutes", type=float, default=60.0, help="stop earlier after this much wall time")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = memlm.load_tokenizer("byte")
    books = load_books(BOOKS)
    train_text = with_numbers("\n\n".join(books[:-HELD_OUT]), args.distractors, args.seed)
    held_text = "\n\n".join(books[-HELD_OUT:])
    ex, em = batch(random.Random(12345), held_text, args.max_len, args.hot, args.eval_prompts, tok)
    model = build(args.layers, args.d_model, args.heads).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters", file=sys.stderr)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    t0, step, streak, log = time.time(), 0, 0, []
    acc = 0.0
    while step < args.steps and time.time() - t0 < args.minutes * 60:
        L = rng.randrange(args.min_len, args.max_len + 1)
        x, m = batch(rng, train_text, L, 0, args.batch, tok)
        frac = step / args.steps
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        logits, _ = model(x[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="none")
        ce = ce.view(x.shape[0], -1)
        loss = ce.mean() + args.answer_weight * ce[m].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            acc = passkey_accuracy(model, ex, em)
            rec = {"step": step, "seconds": round(time.time() - t0), "loss": round(ce.mean().item(), 3),
                   "answer_loss": round(ce[m].mean().item(), 3), "lr": lr, "eval_accuracy": acc}
            log.append(rec)
            print(json.dumps(rec), file=sys.stderr)
            streak = streak + 1 if acc >= args.target else 0
            if streak >= args.patience:
                break
    model.eval()
    out = Path(args.out)
    model.save_pretrained(out)
    info = {**{k: v for k, v in vars(args).items() if k not in ("out", "threads")}, "steps_done": step,
            "seconds": round(time.time() - t0), "parameters": n_params, "final_eval_accuracy": acc, "log": log}
    (out / "train.json").write_text(json.dumps(info, indent=1))
    print(f"saved {out} after {step} steps, held-out passkey accuracy {acc:.0%}", file=sys.stderr)


if __name__ == "__main__":
    main()
