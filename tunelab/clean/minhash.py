"""MinHash signatures, vectorised with numpy, with the maths of datasketch's default `MinHash` (scheme affine32).

Each shingle is hashed to 32 bits (`shingles`), pre-mixed by the MurmurHash3 finalizer and permuted K times with
`a_k * h + b_k mod 2^32` (a_k odd: a bijection); the signature is the per-permutation minimum. The permutations come
from `numpy.random.RandomState(seed)` exactly as datasketch draws them, so a tunelab signature equals
`datasketch.MinHash(num_perm, seed, hashfunc=int).update_batch(shingle_hashes)` value for value
(tests/test_dedup.py checks it). Hashing each token once and combining n-grams in numpy, instead of building and
hashing a string per shingle, is most of the speed.

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
    return TOKEN.findall((text if text.isascii() else unicodedata.normalize("NFKC", text)).lower())


def exact_key(tokens: list[str]) -> int:
    """64-bit hash of the normalised text (exact duplicates differ only in case, spacing or punctuation)."""
    return xxhash.xxh64_intdigest(" ".join(tokens).encode())


_TOKEN_HASH: dict[str, int] = {}
TOKEN_CACHE = 1 << 21  # entries (a corpus's vocabulary repeats: most tokens are looked up, not hashed)


def token_hashes(tokens: list[str]) -> list[int]:
    """xxh32 of each token, through a per-process cache."""
    cache = _TOKEN_HASH
    try:
        return [cache[x] for x in tokens]
    except KeyError:
        if len(cache) > TOKEN_CACHE:
            cache.clear()
        for x in tokens:
            if x not in cache:
                cache[x] = xxhash.xxh32_intdigest(x.encode())
        return [cache[x] for x in tokens]


def shingles(tokens: list[str], n: int) -> np.ndarray:
    """32-bit hashes of the document's n-token shingles (a document shorter than n tokens is one shingle).

    Each token is hashed once (xxh32); a shingle's hash combines its n token hashes (multiply-add in uint64, then
    the MurmurHash3 64-bit finalizer, top 32 bits), so no shingle string is ever built. Repeated shingles need no
    removal: a minimum over a multiset is the minimum over its set."""
    t = np.array(token_hashes(tokens or [""]), dtype=np.uint64)
    k = min(n, len(t))
    length = len(t) - k + 1
    with np.errstate(over="ignore"):
        h = t[:length].copy()
        for j in range(1, k):
            h = h * np.uint64(0x100000001B3) + t[j:j + length]
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return (h >> np.uint64(32)).astype(np.uint32)


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


def signatures(docs: list[np.ndarray], num_perm: int, seed: int) -> np.ndarray:
    """(len(docs), num_perm) uint32 MinHash signatures of documents given as their shingle hashes (`shingles`).

    The permutations and minima run per document, on a (shingles x permutations) block small enough to stay in
    the CPU cache (one block for a whole batch is ~10x slower for its memory traffic)."""
    a, b = permutations(num_perm, seed)
    out = np.empty((len(docs), num_perm), dtype=np.uint32)
    with np.errstate(over="ignore"):
        for i, hv in enumerate(docs):
            out[i] = (fmix32(hv)[:, None] * a + b).min(axis=0)
    return out


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
