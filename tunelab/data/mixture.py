"""Weighted mixing of packed sources, deterministic from the seed.

Each training sample is one packed block; its source is drawn with probability proportional to the
source weight (so weights are token shares, as in Megatron's blended datasets), and within a source
blocks are taken in a seeded random order that is reshuffled every epoch of that source. The whole
schedule is a pure function of (block counts, weights, number of samples, seed): a resumed run can
recompute it and continue at any offset, and a longer run begins with the same samples as a shorter one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Schedule:
    """For sample k: `source[k]` and the block `index[k]` within that source."""

    source: np.ndarray
    index: np.ndarray
    n_blocks: list[int]

    def counts(self) -> list[int]:
        return np.bincount(self.source, minlength=len(self.n_blocks)).tolist()

    def effective_epochs(self) -> list[float]:
        """How many passes over each source the schedule makes (`w·T/D`)."""
        return [c / n for c, n in zip(self.counts(), self.n_blocks)]


def mixture_schedule(n_blocks: list[int], weights: list[float], n_samples: int, seed: int) -> Schedule:
    """Draw `n_samples` (source, block) pairs: sources by weight, blocks by per-epoch shuffles."""
    probs = np.asarray(weights, dtype=np.float64)
    probs = probs / probs.sum()
    source = np.random.default_rng([seed, 0]).choice(len(n_blocks), size=n_samples, p=probs)
    index = np.empty(n_samples, dtype=np.int64)
    for s, n in enumerate(n_blocks):
        where = np.flatnonzero(source == s)
        rng = np.random.default_rng([seed, 1, s])  # one stream per source: prefixes are stable
        epochs = -(-len(where) // n)
        order = [rng.permutation(n) for _ in range(epochs)]
        index[where] = np.concatenate(order)[: len(where)] if order else where
    return Schedule(source=source, index=index, n_blocks=list(n_blocks))
