"""Build memlm/data/demo/books-demo.jsonl.xz: a small public-domain sample of the shared books corpus.

Usage: python scripts/make_demo_corpus.py [--src ../shared/data/corpus/books.jsonl.xz] [--out PATH]

Keeps whole works (Austen novels, Shakespeare plays and poems; all public domain) in the order of TITLES, with their
text/title/source fields, dropping works from the end of that list until the compressed size fits --max-bytes.
The output is deterministic (xz preset 9 | extreme, fixed selection).
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "corpus" / "books.jsonl.xz"
DEFAULT_OUT = ROOT / "memlm" / "data" / "demo" / "books-demo.jsonl.xz"
# Whole works, chosen for variety: two novels, comedies, tragedies, histories, the Sonnets.
TITLES = [
    "Pride And Prejudice", "Northanger Abbey",
    "Hamlet", "Macbeth", "Romeo And Juliet", "Midsummer Nights Dream", "Tempest", "Twelfth Night",
    "Much Ado About Nothing", "Julius Caesar", "Othello", "Lear", "Merchant Of Venice", "As You Like It",
    "Henry V", "Richard Iii", "Antony And Cleopatra", "Winters Tale", "Taming Of The Shrew", "Sonnets",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(DEFAULT_SRC))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--max-bytes", type=int, default=1_300_000, help="compressed size budget")
    args = ap.parse_args()

    works = {}
    with lzma.open(args.src, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("title") in TITLES and rec.get("source") in ("austen", "shakespeare") and rec["text"].strip():
                works[rec["title"]] = {"text": rec["text"], "title": rec["title"], "source": rec["source"]}
    missing = [t for t in TITLES if t not in works]
    if missing:
        raise SystemExit(f"not found in {args.src}: {missing}")

    chosen = [json.dumps(works[t], ensure_ascii=False) for t in TITLES]
    while True:  # drop works from the end until the sample fits the budget
        data = ("\n".join(chosen) + "\n").encode("utf-8")
        blob = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
        if len(blob) <= args.max_bytes or len(chosen) == 1:
            break
        chosen.pop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, out)
    print(f"{out}: {len(chosen)} works, {len(data):,} bytes of text, {len(blob):,} bytes compressed")


if __name__ == "__main__":
    main()
