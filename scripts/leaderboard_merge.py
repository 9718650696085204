"""Write the leaderboard from bench folders that came back from separate GPU commands (docs/leaderboard.md).

Each device command returns its bench folder without checkpoints; this merges them, fills the rows of presets whose
command was cut off (status partial / error / not run, with the reason), and calls the bench's own
`write_leaderboard`. Rows are whatever bench.json says, plus the overrides given here. Run it from the repository
root with a relative --out, so the rows' eval_dir (written into the board) is relative too.

    python scripts/leaderboard_merge.py --runs DIR/bench/runs --out docs/leaderboard_gpu --rows FIXES.json
FIXES.json: {"preset": {"status": ..., "note": ..., other fields}} applied over (or instead of) bench.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from memlm.eval.tasks import expand_tasks
from memlm.eval.bench import BenchConfig, write_leaderboard
from memlm.eval.runner import EvalConfig, parse_lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="the merged bench/runs folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--presets", nargs="+", required=True)
    ap.add_argument("--rows", default=None, help="JSON of per-preset row overrides")
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--eval-tasks", nargs="+", required=True)
    ap.add_argument("--eval-lengths", nargs="+", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    fixes = json.loads(Path(a.rows).read_text()) if a.rows else {}
    rows = []
    for p in a.presets:
        src = Path(a.runs) / p
        row = json.loads((src / "bench.json").read_text()) if (src / "bench.json").is_file() else {"preset": p}
        row.update(fixes.get(p, {}))
        if (src / "eval" / "results.jsonl").is_file():   # keep the raw records next to the leaderboard
            dst = out / "runs" / p
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / "eval" / "results.jsonl", dst / "results.jsonl")
            row["eval_dir"] = str(dst)
            (dst / "bench.json").write_text(json.dumps(row, indent=1))
        rows.append(row)
    ev = EvalConfig(tasks=expand_tasks(a.eval_tasks), lengths=parse_lengths(a.eval_lengths, a.seq_len))
    b = BenchConfig(presets=a.presets, tokens=a.tokens, out=str(out), tokenizer=a.tokenizer, seq_len=a.seq_len,
                    batch_size=a.batch_size, eval=ev)
    md = write_leaderboard(rows, out, b)
    # the device commands bring back no eval report.md, only the raw records copied above: link those instead
    text = md.read_text()
    for p in a.presets:
        if not (out / "runs" / p / "report.md").is_file():
            text = text.replace(f"[eval report](runs/{p}/report.md)", f"[raw eval records](runs/{p}/results.jsonl)")
    md.write_text(text)
    print(md)


if __name__ == "__main__":
    main()
