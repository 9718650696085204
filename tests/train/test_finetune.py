"""Fine-tuning: chat SFT puts loss on assistant tokens only; LoRA fine-tuning trains and saves adapters alone;
resume is bit-exact; base + adapter loads for generation."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import memlm
from memlm.cli.cmd_finetune import load_with_adapter
from memlm.cli.main import main as cli
from memlm.config.train import TrainConfig
from memlm.data.packing import IGNORE, Packer
from memlm.data.sources import Document
from memlm.data.tokenizer import ByteTokenizer
from memlm.errors import UserError
from memlm.layers.lora import load_lora
from memlm.ops.testing import assert_close
from memlm.train import checkpoint as ckpt
from memlm.train.finetune import FinetuneTrainer, LoraSpec, base_run_config, build_finetune_data
from memlm.train.tbptt import token_ce_sum

NAMES = ["ANNA", "BORIS", "CLARA", "DMITRI"]
SYSTEM, USER, ASSISTANT = set(b"0123456789"), set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"), set(b"abcdefghijklmnopqrstuvwxyz ")


pytestmark = pytest.mark.usefixtures("one_thread")


def conversation(i: int) -> list[dict]:
    n = NAMES[i % len(NAMES)]
    msgs = [{"role": "system", "content": "0042"}, {"role": "user", "content": f"HELLOIAM{n}"},
            {"role": "assistant", "content": f"hello {n.lower()}"}]
    if i % 2:
        msgs += [{"role": "user", "content": "ANDAGAIN"}, {"role": "assistant", "content": "again " + "x" * (i % 5)}]
    return msgs


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [json.dumps({"messages": conversation(i)}) for i in range(24)] + [json.dumps({"text": "PLAIN TEXT ROW"})]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_packed_chat_labels_are_assistant_tokens_only(chat_file):
    tok = ByteTokenizer()
    end = tok.special_tokens["<|end|>"]
    t = TrainConfig(data=[str(chat_file)], val_data=[str(chat_file)], batch_size=3, seq_len=40, tokenizer="byte")
    _, val = build_finetune_data(t, tok, chat=True)  # the validation stream reads every conversation exactly once
    n_targets = 0
    for b in val:
        ids, labels = b.input_ids, b.labels
        for r in range(ids.shape[0]):
            for i in range(ids.shape[1] - 1):
                nxt, lab = int(ids[r, i + 1]), int(labels[r, i])
                if nxt in SYSTEM or nxt in USER or (nxt >= 256 and nxt != end):
                    assert lab == IGNORE, f"prompt token {nxt} at ({r}, {i + 1}) carries loss"
                if lab != IGNORE:
                    assert lab == nxt, "labels must be the next token"
                    assert lab in ASSISTANT or lab == end, f"target {lab} is not an assistant token"
                    if lab == end:
                        assert int(ids[r, i]) in ASSISTANT, "only an assistant turn's <|end|> is a target"
        n_targets += int((labels != IGNORE).sum())
    want = sum(len(m["content"]) + 1 for i in range(24) for m in conversation(i) if m["role"] == "assistant")
    # a target whose next token falls into the following row is not counted by the check above, but is by this one
    assert n_targets == want, "every assistant token (and its <|end|>) must be a target exactly once"


def _loss_terms(model, messages):
    p = Packer([Document(None, messages)], ByteTokenizer(), batch_size=1, seq_len=200, loop=False, shuffle=False)
    b = next(p)
    logits, _ = model(b.input_ids, reset=b.reset)
    return token_ce_sum(logits, b.labels), int((b.labels != IGNORE).sum()), logits, b


def test_prompt_tokens_carry_no_loss_and_no_gradient():
    torch.manual_seed(0)
    model = memlm.build_model("transformer-debug")
    base = conversation(1)
    ce1, n1, _, _ = _loss_terms(model, base)
    # changing the prompt-token targets that come after every assistant token (a trailing user turn, a different
    # system prompt would shift context so it is not used here) must not change the loss
    ce2, n2, _, _ = _loss_terms(model, base + [{"role": "user", "content": "SOMETHINGELSEENTIRELY"}])
    assert n1 == n2 and torch.allclose(ce1, ce2, rtol=0, atol=1e-5)
    # control: as plain text (every token a target) the trailing turn adds loss — the check above can fail
    text = Packer(["".join(m["content"] for m in base)], ByteTokenizer(), batch_size=1, seq_len=200, loop=False)
    assert int((next(text).labels != IGNORE).sum()) > n1
    # the gradient of the loss w.r.t. the logits is exactly zero at every position without a target
    _, n, logits, b = _loss_terms(model, base)
    logits.retain_grad()
    (token_ce_sum(logits, b.labels) / n).backward()
    g = logits.grad[0].abs().sum(-1)
    assert (g[b.labels[0] == IGNORE] == 0).all() and (g[b.labels[0] != IGNORE] > 0).all()


def _cfg(path, chat_file, steps, out):
    _, cfg = base_run_config(path)
    cfg.train = cfg.train.replace(data=[str(chat_file)], val_data=[str(chat_file)], steps=steps, seq_len=32,
                                  batch_size=2, warmup=1, lr=1e-2, weight_decay=0.0, eval_every=0, sample_every=0,
                                  save_every=0, log_every=1, tensorboard=False, device="cpu", out_dir=str(out))
    return cfg


@pytest.fixture
def base_dir(tmp_path):
    torch.manual_seed(0)
    memlm.build_model("transformer-debug").save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.parametrize("lora", [True, False])
def test_finetune_resume_is_bit_exact(tmp_path, base_dir, chat_file, lora):
    spec = LoraSpec(4, targets="qkv,o_proj") if lora else None
    quiet = {"log": lambda s: None}
    a = FinetuneTrainer(_cfg(base_dir, chat_file, 3, tmp_path / "a"), base_dir, lora=spec, chat=True, **quiet)
    a.fit()
    b = FinetuneTrainer(_cfg(base_dir, chat_file, 2, tmp_path / "b"), base_dir, lora=spec, chat=True, **quiet)
    b.fit()
    c = FinetuneTrainer(_cfg(base_dir, chat_file, 3, tmp_path / "b"), base_dir, lora=spec, chat=True, resume=True,
                        **quiet)
    assert c.step == 2
    c.fit()
    base = load_file(str(base_dir / "model.safetensors"))
    for k, v in a.model.state_dict().items():
        assert torch.equal(c.model.state_dict()[k], v), f"resumed run differs at {k}"
        if lora and ".lora_" not in k:
            assert torch.equal(v, base[k]), f"LoRA fine-tuning changed base weight {k}"
    changed = [k for k, v in a.model.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert bool(changed) != lora  # full fine-tuning moves the base weights, LoRA never does


def test_cli_lora_chat_finetune_adapter_alone_and_loading(tmp_path, base_dir, chat_file, capsys):
    out = tmp_path / "sft"
    rc = cli(["finetune", str(base_dir), "--data", str(chat_file), "--chat", "--lora-rank", "4", "--lora-targets",
              "qkv,o_proj", "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2", "--out", str(out),
              "--save-merged", "--set", "eval_every=0", "--set", "sample_every=0", "--set", "tensorboard=false"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fine-tuning 2,560 of" in printed and '"adapter"' in printed
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["rank"] == 4 and meta["targets"] == ["qkv", "o_proj"] and meta["base_config_hash"]
    tensors = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert tensors and all(".lora_" in k for k in tensors) and any(v.abs().sum() > 0 for k, v in tensors.items()
                                                                   if k.endswith("lora_B"))
    model, _, _ = load_with_adapter(str(base_dir), str(out / "adapter"))
    merged = memlm.load_model(out / "merged")
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    assert_close(merged(x)[0], model(x)[0], tol=1e-5, name="merged folder vs base + adapter")
    assert not torch.equal(memlm.load_model(base_dir)(x)[0], model(x)[0])
    other = memlm.build_model("nyx-debug")
    with pytest.raises(UserError, match="made for base model"):
        load_lora(other, out / "adapter")
    assert ckpt.find_checkpoint(out).name == "step_000003"

