"""`memlm demo`: train a small model on the built-in public-domain corpus on CPU, evaluate it and sample from it.

The default is a 4-layer, d=128 Llama-style model (about 0.8M parameters) trained for a few minutes on 2 cores;
any preset can be given instead (its training settings are shrunk to the demo budget).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import memlm
from memlm.config.presets import transformer
from memlm.config.train import RunConfig, TrainConfig
from memlm.data import demo_corpus_path

DEMO_PROMPTS = ("It is a truth universally acknowledged", "HAMLET. To be")


def demo_config(preset_name: str | None, steps: int) -> RunConfig:
    train = TrainConfig(data=[str(demo_corpus_path())], seq_len=256, batch_size=16, steps=steps, lr=3e-3,
                        warmup=max(10, steps // 20), min_lr_ratio=0.1, eval_every=max(1, steps // 3), eval_batches=8,
                        sample_every=0, save_every=steps, log_every=max(1, steps // 15), tensorboard=False,
                        val_every_doc=10)
    if preset_name in (None, "", "demo"):
        return RunConfig(model=transformer(128, 4, 4, 2, 263), train=train, family="transformer",
                         description="demo model")
    cfg = memlm.preset(preset_name)
    cfg.train = train.replace(tokenizer=cfg.train.tokenizer)
    return cfg


def _fresh_dir(out: str) -> Path:
    p = Path(out)
    if not p.exists() or not any(p.iterdir()):
        return p
    for i in range(2, 1000):
        q = p.with_name(f"{p.name}-{i}")
        if not q.exists():
            return q
    return p.with_name(f"{p.name}-{int(time.time())}")


def run_demo(out_dir: str = "runs/demo", steps: int | None = None, preset_name: str | None = None) -> dict:
    from memlm.inference.engine import generate
    from memlm.train.trainer import Trainer

    steps = steps or 400
    cfg = demo_config(preset_name, steps)
    out = _fresh_dir(out_dir)
    print(f"memlm demo: training {cfg.model.name or 'the demo model'} on {Path(cfg.train.data[0]).name} "
          f"for {steps} steps → {out}")
    t0 = time.time()
    trainer = Trainer(cfg, out_dir=out)
    result = trainer.fit()
    val = trainer.evaluate()
    bpb = val["val_loss"] / math.log(2) if val else float("nan")
    print(f"\nvalidation: loss {val.get('val_loss', float('nan')):.3f} nats/token, perplexity "
          f"{val.get('val_ppl', float('nan')):.2f}, {bpb:.3f} bits/byte (uniform would be 8)")
    model = trainer.model.eval()
    for prompt in DEMO_PROMPTS:
        gen = generate(model, trainer.tok, prompt, max_new_tokens=160, temperature=0.7, top_k=40, seed=0)
        text = "".join(gen)
        print(f"\n--- sample ---\n{prompt}{text}")
    ckpt = result.get("checkpoint")
    print(f"\ndone in {time.time() - t0:.0f}s. Try:\n  memlm generate {out} --prompt 'It is a truth'\n"
          f"  memlm chat {out}\n  memlm info {out}")
    return result | {"val": val, "checkpoint": ckpt, "out_dir": str(out)}
