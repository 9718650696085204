"""Text material for the generators: made-up names and keys, value formats, filler and real-text haystacks, and
the one function that lays needles into a haystack at a claimed depth.

Notation: L target length in tokens, d depth (fraction of the context's tokens that come before a needle), S number
of haystack sentences.

Everything is a pure function of a ``random.Random`` (seeded from strings, which Python hashes with SHA-512, so
examples are identical across processes and PYTHONHASHSEED values). Names and keys are spelled from syllables so
they never occur in the corpus text a haystack is cut from; the filler sentences are written for memlm.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

from memlm.errors import UserError

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gl", "k", "kr", "l", "m", "n", "p", "pl", "r", "s", "st", "t", "tr",
           "v", "z", "sh", "th", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea", "io")
_CODAS = ("", "", "n", "r", "l", "s", "m", "k", "nd", "st", "x")

# Written for memlm: plain, slightly varied statements that carry no retrievable facts.
FILLER = (
    "The lamps along the harbour road were lit one by one.",
    "A cart loaded with turnips rolled slowly past the mill.",
    "Somewhere upstairs a clock struck the half hour.",
    "The baker swept flour from the step before opening the shop.",
    "Rain gathered in the gutters and ran down toward the square.",
    "Two gulls argued over a crust on the seawall.",
    "The ferry left on time, as it did every morning.",
    "In the orchard the ladders leaned against the oldest trees.",
    "Nobody remembered who had painted the gate green.",
    "The market stalls were folded away before dusk.",
    "A thin wind came off the hills and rattled the shutters.",
    "The schoolhouse bell was rung twice and then fell silent.",
)

INSTRUCTION = ("Somewhere in the text below there are short notes. Read everything carefully: a question about the "
               "notes comes at the end.\n")


def syllable_word(rng: random.Random, n_syllables: int = 2) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syllables))


def made_up_words(rng: random.Random, n: int, *, n_syllables: int = 2, avoid: set[str] | None = None) -> list[str]:
    """n distinct made-up lowercase words (not in ``avoid``)."""
    out: list[str] = []
    seen = set(avoid or ())
    while len(out) < n:
        w = syllable_word(rng, n_syllables)
        if w not in seen and len(w) >= 4:
            seen.add(w)
            out.append(w)
    return out


def person_names(rng: random.Random, n: int, avoid: set[str] | None = None) -> list[str]:
    """n distinct made-up "Given Family" names."""
    firsts = made_up_words(rng, n, avoid=avoid)
    lasts = made_up_words(rng, n, avoid=set(firsts) | set(avoid or ()))
    return [f"{a.capitalize()} {b.capitalize()}" for a, b in zip(firsts, lasts)]


def number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def uuid_value(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def distinct_values(rng: random.Random, make, n: int, *, avoid: set[str], forbid_in: str = "") -> list[str]:
    """n values from ``make(rng)`` that are not in ``avoid`` and do not occur in ``forbid_in`` (the context)."""
    out: list[str] = []
    seen = set(avoid)
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        v = make(rng)
        if v not in seen and v not in forbid_in:
            seen.add(v)
            out.append(v)
    if len(out) < n:
        raise UserError(f"could not draw {n} distinct values not in the context")
    return out


# ---------------------------------------------------------------------------------------------- haystacks

_SENT_SPLIT = re.compile(r"(?<=[.!?;])\s+")
_WS = re.compile(r"\s+")
MAX_SENTENCE_CHARS = 160


def split_sentences(text: str) -> list[str]:
    """Sentences of plain text; long ones are cut at spaces so a needle's depth is placed to within a sentence."""
    out = []
    for s in _SENT_SPLIT.split(_WS.sub(" ", text).strip()):
        while len(s) > MAX_SENTENCE_CHARS:
            cut = s.rfind(" ", 0, MAX_SENTENCE_CHARS)
            cut = cut if cut > 0 else MAX_SENTENCE_CHARS
            out.append(s[:cut])
            s = s[cut:].strip()
        if s:
            out.append(s)
    return out


@lru_cache(maxsize=4)
def corpus_sentences(path: str, max_chars: int = 3_000_000) -> tuple[str, ...]:
    """Sentences from the documents at ``path`` (any memlm data source), up to ``max_chars`` characters of text."""
    from memlm.data.sources import open_sources

    sents: list[str] = []
    total = 0
    for doc in open_sources(path):
        if not doc.text:
            continue
        for s in split_sentences(doc.text):
            sents.append(s)
            total += len(s)
        if total >= max_chars:
            break
    if len(sents) < 10:
        raise UserError(f"haystack {path}: too little text ({len(sents)} sentences)")
    return tuple(sents)


class Haystack:
    """A sentence source: ``"filler"`` (memlm's own sentences, repeated) or a corpus path (real text).

    ``take(rng, n_tokens, tok)`` returns consecutive sentences (from a seeded start) with their token counts."""

    def __init__(self, source: str = "filler", *, max_chars: int = 3_000_000) -> None:
        self.source = source
        self.sentences = FILLER if source == "filler" else corpus_sentences(source, max_chars)
        self._ntok: dict[tuple[int, str], int] = {}

    @property
    def kind(self) -> str:
        return "filler" if self.source == "filler" else "text"

    def _count(self, tok, sents: list[str]) -> list[int]:
        key = id(tok)
        todo = [s for s in dict.fromkeys(sents) if (key, s) not in self._ntok]
        if todo:
            enc = tok.encode_batch([" " + s for s in todo]) if hasattr(tok, "encode_batch") else \
                [tok.encode(" " + s) for s in todo]
            for s, ids in zip(todo, enc):
                self._ntok[(key, s)] = len(ids)
        return [self._ntok[(key, s)] for s in sents]

    def take(self, rng: random.Random, n_tokens: int, tok) -> tuple[list[str], list[int]]:
        sents: list[str] = []
        counts: list[int] = []
        total, done = 0, n_tokens <= 0
        i = rng.randrange(len(self.sentences))
        while not done:
            batch = [self.sentences[(i + j) % len(self.sentences)] for j in range(64)]
            i += 64
            for s, c in zip(batch, self._count(tok, batch)):
                # Stop at whichever side of the target is nearer (a long sentence may overshoot a lot).
                if total >= n_tokens or total + c - n_tokens > n_tokens - total:
                    done = True
                    break
                sents.append(s)
                counts.append(c)
                total += c
        return sents, counts


@dataclass
class Built:
    """A context with inserts: ``text``, its token count, and per insert (token start, claimed depth)."""

    text: str
    n_tokens: int
    positions: list[int]
    depths: list[float]


def build_context(tok, haystack: Haystack, rng: random.Random, n_tokens: int, inserts: list[tuple[float, str]],
                  *, prefix: str = "") -> Built:
    """``prefix`` + about ``n_tokens`` tokens of haystack with each insert (depth d ∈ [0, 1], text) placed at the
    sentence boundary nearest to a fraction d of the haystack; inserts keep their list order at equal depths.

    The returned positions are exact token offsets (the context is re-encoded up to each insert), so a test can
    check that a needle is where its depth says."""
    if n_tokens > 0:
        sents, counts = haystack.take(rng, n_tokens, tok)
    else:
        sents, counts = [], []
    total = sum(counts)
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    # slot j = before sentence j (j = len(sents): at the end)
    placed: dict[int, list[int]] = {}
    for idx, (d, _) in enumerate(inserts):
        if not 0.0 <= d <= 1.0:
            raise UserError(f"needle depth {d} must be in [0, 1]")
        target = d * total
        j = min(range(len(cum)), key=lambda k: (abs(cum[k] - target), k))
        placed.setdefault(j, []).append(idx)
    pieces: list[str] = []
    owner: list[int | None] = []  # the insert index of each piece (None: a haystack sentence)
    for j in range(len(sents) + 1):
        for idx in placed.get(j, []):
            pieces.append(inserts[idx][1])
            owner.append(idx)
        if j < len(sents):
            pieces.append(sents[j])
            owner.append(None)
    starts: dict[int, int] = {}
    c = len(prefix)
    for piece, who in zip(pieces, owner):
        if who is not None:
            starts[who] = c
        c += len(piece) + 1
    text = prefix + " ".join(pieces)
    # Tokens strictly before the insert (the joining space belongs to the insert's first token under BPE).
    positions = [len(tok.encode(text[:starts[i]].rstrip(" "))) for i in range(len(inserts))]
    return Built(text, len(tok.encode(text)), positions, [d for d, _ in inserts])


__all__ = ["FILLER", "INSTRUCTION", "Built", "Haystack", "build_context", "corpus_sentences", "distinct_values",
           "made_up_words", "number", "person_names", "split_sentences", "syllable_word", "uuid_value"]
