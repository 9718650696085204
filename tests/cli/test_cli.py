"""The command line as a user drives it: --help everywhere, one-line errors with exit code 2, and the
train → info → generate → chat → memory flow on a tiny run."""
import json
import subprocess
import sys

import pytest

from memlm.cli.main import _parser, main

COMMANDS = [a for a in _parser()._subparsers._group_actions[0].choices]


def run(*args, stdin=None):
    r = subprocess.run([sys.executable, "-m", "memlm.cli.main", *args], input=stdin, capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_has_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "memlm" in out


@pytest.mark.parametrize("argv, words", [
    (["train", "--preset", "nope-preset"], "unknown preset"),
    (["train", "--set", "train.lr=abc"], "train.lr"),
    (["train", "--config", "missing.json"], "no such file"),
    (["generate", "no/such/dir"], "no such model"),
    (["info", "no/such/dir"], "no such model"),
    (["presets", "--family", "zzz"], "no such family"),
    (["generate", "transformer-debug", "--kv-tiers", "hot=abc"], "--kv-tiers"),
    (["generate", "transformer-debug", "--adapter", "no/such/adapter"], "adapter"),
])
def test_user_mistakes_are_one_line_exit_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_presets_lists_every_preset_with_counts(capsys):
    assert main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"]: r for r in rows}
    assert names["nyx-30m"]["params"] == 30_020_096
    assert all(r["params"] > 0 and r["family"] for r in rows)


def test_train_generate_chat_memory_flow(tmp_path):
    run_dir = tmp_path / "run"
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"The quick brown fox {i} jumps over the lazy dog. " * 8})
                              for i in range(60)))
    code, out, err = run("train", "--preset", "transformer-debug", "--data", str(data), "--out", str(run_dir),
                         "--steps", "6", "--set", "train.batch_size=2", "--set", "train.seq_len=64",
                         "--set", "train.eval_every=3", "--set", "train.sample_every=0", "--set", "train.tensorboard=false")
    assert code == 0, err
    assert (run_dir / "checkpoints" / "latest").exists() and (run_dir / "metrics.jsonl").exists()
    # a second fresh run into the same folder is refused, resume is accepted
    code, _, err = run("train", "--preset", "transformer-debug", "--data", str(data), "--out", str(run_dir), "--steps", "6")
    assert code == 2 and "resume" in err
    # resuming needs no preset: the run's own config is used
    code, out, err = run("train", "--resume", "--out", str(run_dir), "--steps", "8", "--set", "train.sample_every=0")
    assert code == 0, err
    # a bad optimizer option is one line, not a traceback
    code, _, err = run("train", "--preset", "transformer-debug", "--out", str(tmp_path / "r2"), "--steps", "1",
                       "--set", 'train.optimizer_options={"bogus": 1}')
    assert code == 2 and "optimizer_options" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run("info", str(run_dir))
    assert code == 0 and json.loads(out)["trainer_state"]["step"] == 8
    code, out, err = run("generate", str(run_dir), "--prompt", "The quick", "--max-new-tokens", "12", "--seed", "0",
                         "--save-state", str(tmp_path / "s.safetensors"))
    assert code == 0 and out.startswith("The quick"), err
    code, out, err = run("memory", "show", str(tmp_path / "s.safetensors"), "--model", str(run_dir))
    assert code == 0 and json.loads(out)["tokens_seen"][0] >= 9
    code, out, err = run("chat", str(run_dir), "--max-new-tokens", "8", "--seed", "0", stdin="hello\nagain\n/exit\n")
    assert code == 0 and out.count("model>") == 2, err
    # a state for another model is refused with one line
    code, _, err = run("memory", "show", str(tmp_path / "s.safetensors"), "--model", "nyx-debug")
    assert code == 2 and "another model" in err
