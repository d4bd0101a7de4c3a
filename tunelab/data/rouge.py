"""ROUGE-L novelty against a growing pool of instructions, fast at tens of thousands of kept tasks.

Self-Instruct keeps a new instruction only when its ROUGE-L F-measure against every instruction kept so far is at
most a threshold (0.7). The original loop scores the candidate against the whole pool, an LCS table per pair, so a
run slows down as the pool grows. `RougeIndex` gives the same decisions with far less work:

- ROUGE-L F of token lists of lengths m and n with an LCS of length l is 2PR/(P+R), P = l/n, R = l/m, i.e.
  2l/(m+n), and l can never exceed the multiset overlap of the two lists (the number of tokens they share,
  counted with repetition). An inverted index (token -> the kept instructions that hold it and how often) gives
  every kept instruction's overlap with the candidate in a few vectorised additions over its tokens' postings.
- Only those whose upper bound 2*overlap/(m+n) can pass the threshold get an exact LCS (bit-parallel, one big-int
  step per token), the most promising first, stopping as soon as no bound can beat the best score found.

Scores are computed with the formula and float operations of the `rouge_score` package (`_score_lcs`: precision,
recall, then 2PR/(P+R)), and tokens as its default tokenizer makes them (lower case, runs of [a-z0-9]), so the
decisions equal the package's all-pairs loop, bit for bit; CJK characters (which that tokenizer drops) are one
token each: character-level ROUGE for Chinese, Japanese and Korean. `NaiveRougeIndex` is the all-pairs reference.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

# runs of [a-z0-9] (rouge_score's default tokens), or one CJK ideograph, kana or hangul syllable
_TOKEN = re.compile(r"[a-z0-9]+|[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_EPS = 1e-9  # the bound is pruned with a margin, so float rounding can never drop a candidate that passes


def rouge_tokens(text: str) -> list[str]:
    """Tokens for ROUGE-L: lower-cased [a-z0-9] runs (as rouge_score makes them), and each CJK character."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: list, b: list) -> int:
    """The length of the longest common subsequence of two token lists (the dynamic programme, as reference)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def fmeasure(lcs: int, m: int, n: int) -> float:
    """ROUGE-L F of lists of lengths m (target) and n (prediction) with an LCS of `lcs`, as rouge_score computes it."""
    if m == 0 or n == 0:
        return 0.0
    precision, recall = lcs / n, lcs / m
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_l(a: list, b: list) -> float:
    """ROUGE-L F-measure of two token lists (symmetric)."""
    return fmeasure(lcs_length(a, b), len(a), len(b))


def match_masks(a: list) -> dict:
    """For each token of `a`, the bit set of the positions where it occurs (for `lcs_bits`)."""
    masks: dict = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    return masks


def lcs_bits(masks: dict, m: int, b: list) -> int:
    """LCS length of `a` (given as `match_masks(a)` and its length m) and `b`: the bit-parallel algorithm
    (Allison-Dix / Hyyrö), one big-integer step per token of `b`."""
    full = (1 << m) - 1
    v = full
    for t in b:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


class _Postings:
    """A growable pair of arrays: the kept instructions holding one token, and how often each holds it."""

    __slots__ = ("ids", "counts", "size")

    def __init__(self) -> None:
        self.ids = np.empty(4, dtype=np.int32)
        self.counts = np.empty(4, dtype=np.int32)
        self.size = 0

    def append(self, doc: int, count: int) -> None:
        if self.size == len(self.ids):
            self.ids = np.concatenate([self.ids, np.empty_like(self.ids)])
            self.counts = np.concatenate([self.counts, np.empty_like(self.counts)])
        self.ids[self.size], self.counts[self.size] = doc, count
        self.size += 1


class RougeIndex:
    """The kept instructions' tokens, and the most similar one to a candidate when it is above `threshold`."""

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self.docs: list[list[str]] = []
        self._lengths = np.empty(1024, dtype=np.int32)
        self._postings: dict[str, _Postings] = {}
        self.exact_checks = 0  # exact LCS computations so far (the all-pairs loop does len(self) per candidate)
        self.pairs = 0  # candidate-kept pairs the all-pairs loop would have scored

    def __len__(self) -> int:
        return len(self.docs)

    def add(self, tokens: list[str]) -> None:
        """Keep an instruction (its tokens)."""
        doc = len(self.docs)
        self.docs.append(tokens)
        if doc == len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.empty_like(self._lengths)])
        self._lengths[doc] = len(tokens)
        for t, c in Counter(tokens).items():
            self._postings.setdefault(t, _Postings()).append(doc, c)

    def most_similar(self, tokens: list[str]) -> tuple[float, int | None]:
        """(score, index) of the kept instruction with the highest ROUGE-L F when that is above the threshold
        (the lowest index among equals), else (the highest exact score found, or 0.0, None): the candidate is
        novel exactly when the index is None."""
        n = len(self.docs)
        self.pairs += n
        m = len(tokens)
        if n == 0 or m == 0:
            return 0.0, None
        overlap = np.zeros(n, dtype=np.int32)
        for t, c in Counter(tokens).items():
            p = self._postings.get(t)
            if p is not None:
                ids = p.ids[:p.size]
                overlap[ids] += np.minimum(p.counts[:p.size], c)
        bound = 2.0 * overlap / (m + self._lengths[:n])
        survivors = np.flatnonzero(bound > self.threshold - _EPS)
        if survivors.size == 0:
            return 0.0, None
        order = survivors[np.lexsort((survivors, -bound[survivors]))]  # highest bound first, then lowest index
        masks = match_masks(tokens)
        best, best_doc = 0.0, None
        for doc in order.tolist():
            if best_doc is not None and bound[doc] + _EPS < best:
                break  # no later bound can beat the best (ties keep the lowest index: see below)
            other = self.docs[doc]
            self.exact_checks += 1
            score = fmeasure(lcs_bits(masks, m, other), m, len(other))
            if score > best or (score == best and best_doc is not None and doc < best_doc):
                best, best_doc = score, doc
        if best > self.threshold:
            return best, best_doc
        return best, None


class NaiveRougeIndex:
    """The all-pairs reference: an exact LCS table against every kept instruction, as Self-Instruct does."""

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self.docs: list[list[str]] = []

    def __len__(self) -> int:
        return len(self.docs)

    def add(self, tokens: list[str]) -> None:
        self.docs.append(tokens)

    def most_similar(self, tokens: list[str]) -> tuple[float, int | None]:
        best, best_doc = 0.0, None
        for doc, other in enumerate(self.docs):
            score = rouge_l(tokens, other)
            if score > best:
                best, best_doc = score, doc
        return (best, best_doc) if best > self.threshold else (best, None)
