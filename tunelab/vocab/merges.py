"""Learn BPE merges on top of an existing byte-level BPE tokenizer's own segmentation.

Each pre-tokenised word of the corpus starts as the base tokenizer's tokens for it, and BPE training continues
from there: the most frequent adjacent pair becomes a new token, again and again. Appended after the base's merges
(BPE applies every original merge before any appended one), the new merges reproduce at encoding time the
segmentation learned here. The training itself is `tokenizers`' BpeTrainer (Rust), run over words whose
"characters" are the base's tokens: each distinct base token stands in as one private-use character.

Two rules keep the base intact:
- a new token holds at least one non-ASCII byte, so every ASCII text (English, code) is encoded exactly as
  before, id for id: a word is cut between two adjacent ASCII-only tokens, so that pair is never merged;
- a merge whose result the vocabulary already holds (the same bytes spelled by other pieces) is dropped, so no
  original id is ever produced in a new way, and no token is added twice.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

PRIVATE_USE = [(0xF0000, 0xFFFFD), (0x100000, 0x10FFFD)]  # the two supplementary private-use planes


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character byte-level BPE writes it as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


UNICODE_TO_BYTE = {c: b for b, c in byte_to_unicode().items()}
ASCII_CHARS = frozenset(c for c, b in UNICODE_TO_BYTE.items() if b < 0x80)


def token_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for (characters outside the alphabet count as their UTF-8)."""
    out = bytearray()
    for ch in token:
        b = UNICODE_TO_BYTE.get(ch)
        out.extend([b] if b is not None else ch.encode("utf-8"))
    return bytes(out)


def token_text(token: str) -> str:
    """The text of a byte-level token (a cut-off UTF-8 character shows as U+FFFD)."""
    return token_bytes(token).decode("utf-8", errors="replace")


def has_non_ascii(token: str) -> bool:
    return not ASCII_CHARS.issuperset(token)


class _Codes:
    """One private-use character per base token, and back."""

    SIZE0 = PRIVATE_USE[0][1] - PRIVATE_USE[0][0] + 1

    def __init__(self):
        self.code: dict[str, str] = {}
        self.tokens: list[str] = []

    def char(self, token: str) -> str:
        c = self.code.get(token)
        if c is None:
            n = len(self.tokens)
            if n >= self.SIZE0 + PRIVATE_USE[1][1] - PRIVATE_USE[1][0] + 1:
                raise ValueError("more distinct base tokens in the corpus than private-use characters")
            c = self.code[token] = chr(PRIVATE_USE[0][0] + n if n < self.SIZE0 else PRIVATE_USE[1][0] + n - self.SIZE0)
            self.tokens.append(token)
        return c

    def token(self, chars: str) -> str:
        """The byte-level token a string of codes spells."""
        lo0, hi0 = PRIVATE_USE[0]
        return "".join(self.tokens[ord(c) - lo0 if ord(c) <= hi0 else self.SIZE0 + ord(c) - PRIVATE_USE[1][0]]
                       for c in chars)


def _pieces(seq: list[str]) -> Iterable[list[str]]:
    """`seq` cut between every two adjacent ASCII-only tokens (pairs that must never merge)."""
    cur = [seq[0]]
    for a, b in zip(seq, seq[1:]):
        if not has_non_ascii(a) and not has_non_ascii(b):
            yield cur
            cur = []
        cur.append(b)
    yield cur


def learn_merges(words: Counter, segment: Callable[[str], list[str]], vocab: Iterable[str], n_merges: int,
                 min_frequency: int = 2) -> list[tuple[str, str]]:
    """Up to `n_merges` merges `(left, right)` of byte-level tokens learned over `words` (pre-tokenised word ->
    count); `segment(word)` gives the base tokenizer's tokens for a word. A pair must occur `min_frequency` times."""
    codes, counts = _Codes(), Counter()
    for word, count in words.items():
        if not has_non_ascii(word):
            continue
        for piece in _pieces(segment(word)):
            if len(piece) > 1:
                counts["".join(codes.char(t) for t in piece)] += count
    if not counts:
        return []
    known, extra = set(vocab), 0
    while True:  # merges whose result is known are dropped: ask the trainer for as many more, until enough
        learned = _train(counts, len(codes.tokens), n_merges + extra, min_frequency)
        merges = _new_only([(codes.token(a), codes.token(b)) for a, b in learned], known)
        if len(learned) < n_merges + extra or len(merges) >= n_merges:
            return merges[:n_merges]
        extra += n_merges - len(merges)


def _new_only(merges: list[tuple[str, str]], known: set[str]) -> list[tuple[str, str]]:
    """The merges whose result is neither in `known` nor made by an earlier merge."""
    seen, out = set(known), []
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            out.append((a, b))
    return out


def _train(counts: Counter, alphabet: int, n_merges: int, min_frequency: int) -> list[tuple[str, str]]:
    """BpeTrainer over the coded words (one per line, repeated by count): its merges, in order."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=alphabet + n_merges, min_frequency=min_frequency, show_progress=False,
                                  limit_alphabet=alphabet + 1)
    bpe.train_from_iterator((" ".join([w] * c) for w, c in counts.items()), trainer=trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
