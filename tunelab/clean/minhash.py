"""MinHash signatures, vectorised with numpy, with the maths of datasketch's default `MinHash` (scheme affine32).

Each shingle is hashed to 32 bits (xxh32), pre-mixed by the MurmurHash3 finalizer and permuted K times with
`a_k * h + b_k mod 2^32` (a_k odd: a bijection); the signature is the per-permutation minimum. The permutations come
from `numpy.random.RandomState(seed)` exactly as datasketch draws them, so a tunelab signature equals
`datasketch.MinHash(num_perm, seed, hashfunc=xxh32_intdigest).update_batch(shingles)` value for value
(tests/test_dedup.py checks it); computing a whole batch of documents in one array operation is what makes it
several times faster than one `MinHash` object per document.

Banding: K = b * r; a pair is a candidate when the r values of any band agree, with probability
`1 - (1 - s^r)^b` at Jaccard s. `optimal_bands` picks (b, r) as datasketch's `MinHashLSH` does, minimising the
weighted false-positive and false-negative areas under that curve around the threshold.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import numpy as np
import xxhash

TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+")  # a Chinese character, or a run of letters/digits
MAX32 = np.uint32(0xFFFFFFFF)


def normal_tokens(text: str) -> list[str]:
    """The text as dedup compares it: NFKC, lower case, words and single Chinese characters (no punctuation)."""
    return TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def exact_key(tokens: list[str]) -> int:
    """64-bit hash of the normalised text (exact duplicates differ only in case, spacing or punctuation)."""
    return xxhash.xxh64_intdigest(" ".join(tokens).encode())


def shingles(tokens: list[str], n: int) -> list[bytes]:
    """The distinct n-token shingles (a document shorter than n tokens is one shingle)."""
    if len(tokens) <= n:
        return [" ".join(tokens).encode()]
    return list({" ".join(tokens[i:i + n]).encode() for i in range(len(tokens) - n + 1)})


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) as datasketch's affine32 scheme draws them from RandomState(seed)."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def fmix32(h: np.ndarray) -> np.ndarray:
    """The MurmurHash3 32-bit finalizer (wrapping uint32 arithmetic)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def signatures(docs: list[list[bytes]], num_perm: int, seed: int) -> np.ndarray:
    """(len(docs), num_perm) uint32 MinHash signatures of documents given as lists of shingles (each non-empty)."""
    a, b = permutations(num_perm, seed)
    counts = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    hv = np.fromiter((xxhash.xxh32_intdigest(s) for d in docs for s in d), dtype=np.uint32, count=int(counts.sum()))
    with np.errstate(over="ignore"):
        phv = fmix32(hv)[:, None] * a[None, :] + b[None, :]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.minimum.reduceat(phv, starts, axis=0)


def collision_probability(s: float | np.ndarray, bands: int, rows: int):
    return 1 - (1 - np.asarray(s, dtype=float) ** rows) ** bands


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising fp_weight * P(candidate | s < t) area +
    (1 - fp_weight) * P(missed | s >= t) area (datasketch's `_optimal_param`, integrated on a fine grid)."""
    lo = np.linspace(0.0, threshold, 401)
    hi = np.linspace(threshold, 1.0, 401)
    best, arg = float("inf"), (1, 1)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(collision_probability(lo, b, r), lo)
            fn = np.trapezoid(1 - collision_probability(hi, b, r), hi)
            err = fp * fp_weight + fn * (1 - fp_weight)
            if err < best:
                best, arg = err, (b, r)
    return arg
