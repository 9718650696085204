"""`memlm eval` and `memlm bench` end to end on CPU (the bench smoke test: 2 debug presets, a tiny token budget)."""
from __future__ import annotations

import json

import pytest

from memlm.cli.main import main


def test_eval_cli_on_a_preset(tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["eval", "transformer-debug", "--tasks", "ppl", "passkey", "reversal", "--lengths", "1x", "2x",
               "--depths", "0,100", "--samples", "1", "--max-docs", "2", "--no-plots", "--out", str(out)])
    assert rc == 0
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["task"] for r in recs} == {"ppl", "passkey", "reversal"}
    assert sorted({r["length"] for r in recs if r["task"] == "passkey"}) == [128, 256]  # 1x, 2x of seq_len 128
    assert "transformer-debug" in (out / "report.md").read_text()


def test_eval_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "transformer-debug", "--tasks", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown eval task 'nope'" in capsys.readouterr().err
    assert main(["eval", "transformer-debug", "--lengths", "-3", "--out", str(tmp_path)]) == 2
    assert main(["eval", "--list"]) == 0
    assert "passkey" in capsys.readouterr().out


def test_bench_smoke_two_debug_presets_and_a_missing_one(tmp_path, capsys):
    """CPU smoke test of the leaderboard pipeline — a smoke test, not a result."""
    out = tmp_path / "bench"
    args = ["bench", "--presets", "transformer-debug", "gated-deltanet-debug", "no-such-preset-30m",
            "--tokens", "6k", "--seq-len", "64", "--batch-size", "4", "--evals", "2", "--out", str(out),
            "--eval-tasks", "ppl", "stream", "passkey", "cross_session", "mqar", "--eval-lengths", "1x", "2x",
            "--depths", "0,100", "--samples", "1", "--session-gaps", "0", "--max-docs", "2", "--no-generate",
            "--mqar", "widths=32", "pairs=2", "steps=10", "seq_len=32", "vocab_size=32", "batch_size=4"]
    assert main(args) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {r["preset"]: r for r in board["rows"]}
    assert rows["no-such-preset-30m"]["status"] == "missing"
    for name in ("transformer-debug", "gated-deltanet-debug"):
        r = rows[name]
        assert r["status"] == "ok" and r["tokens"] == 24 * 4 * 64  # ⌈6000 / 256⌉ steps: the same for both
        assert r["val_loss"] is not None and r["state_bytes"] > 0 and r["tok_s"] > 0
        assert (out / "runs" / name / "eval" / "results.jsonl").is_file()
        assert r["headline"]["passkey"].keys() == {"1x", "2x"} and "mqar" in r["headline"]
    # identical conditions: the saved training configs agree on everything that decides the data and the budget
    cfgs = [json.loads(next((out / "runs" / n / "checkpoints").glob("step_*/config.json")).read_text())["train"]
            for n in ("transformer-debug", "gated-deltanet-debug")]
    for k in ("data", "seq_len", "batch_size", "steps", "seed", "tokenizer", "tbptt", "val_every_doc"):
        assert cfgs[0][k] == cfgs[1][k], k
    md = (out / "leaderboard.md").read_text()
    assert "no-such-preset-30m" in md and "preset does not exist yet" in md
    pytest.importorskip("matplotlib")
    for png in ("loss_curves.png", "tokens_per_s.png", "state_bytes.png", "niah_heatmaps.png"):
        assert (out / png).is_file()
    # a second command reuses both finished runs (no retraining, no re-evaluation)
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("done before") == 2
    again = json.loads((out / "leaderboard.json").read_text())
    assert [r.get("seconds") for r in again["rows"]] == [r.get("seconds") for r in board["rows"]]
