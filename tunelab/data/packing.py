"""Packing: pretraining documents into `seq_len` blocks, and fine-tuning examples into `max_len` rows.

Pretraining, concatenate-and-chunk (GPT-3 style): documents are joined with an end-of-sequence token and cut
into full blocks, so no position is padding; only the tail that does not fill a block is dropped (reported).
Documents can span two blocks. By default attention is not masked between documents (the EOS token marks the
boundary); `document_positions` gives, from the document starts `pack_documents` records, the position ids and
labels of document masking (`data.document_mask`): positions restart at each document, which the attention
masks follow (`tunelab.train.loss`), and a document's first token is not predicted from the one before it. Each
document starts with BOS when the tokenizer's rule adds one (Gemma, Llama-3: `bos_ids`), as those models' own
pretraining does; a block that starts mid-document gets no BOS of its own. Labels equal the inputs (the loss
shifts by one), the Hugging Face convention.

Fine-tuning (`data.packing`): `best_fit_decreasing` groups whole examples into rows of at most `max_len`
tokens (longest first, each into the fullest row it fits), so no example is split; an example longer than
`max_len` was already cut by its encoding's truncation rule and fills a row alone.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

import numpy as np

from tunelab.data.text import bos_ids, with_bos
from tunelab.errors import DataError


@dataclass
class Packed:
    """Blocks of token ids, shape [n_blocks, seq_len], and the bookkeeping to report."""

    blocks: np.ndarray
    starts: np.ndarray  # bool, the shape of `blocks`: True where a document begins
    n_docs: int
    n_tokens: int  # all tokens including one EOS per document
    n_dropped: int  # tail tokens that did not fill a block

    @property
    def efficiency(self) -> float:
        """Share of tokens that land in a training block (1.0 = nothing dropped, no padding)."""
        return 1.0 - self.n_dropped / self.n_tokens if self.n_tokens else 0.0


def tokenize_documents(docs: list[str], tokenizer, batch: int = 1000) -> list[list[int]]:
    """Token ids of each document, after BOS when the tokenizer's rule adds one (EOS is added by the packer)."""
    out: list[list[int]] = []
    bos = bos_ids(tokenizer)
    for i in range(0, len(docs), batch):
        out.extend(with_bos(ids, bos) for ids in tokenizer(docs[i:i + batch], add_special_tokens=False)["input_ids"])
    return out


def pack_documents(token_lists: list[list[int]], seq_len: int, eos_id: int, where: str = "data") -> Packed:
    """Concatenate documents with `eos_id` after each one and cut into full `seq_len` blocks."""
    if eos_id is None:
        raise DataError(f"{where}: the tokenizer has no EOS token; use a tokenizer that defines eos_token "
                        f"(in its tokenizer_config.json)")
    lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
    total = int(lengths.sum())
    flat = np.empty(total, dtype=np.int64)
    ends = np.cumsum(lengths)
    starts = np.zeros(total, dtype=bool)
    starts[ends - lengths] = True
    for toks, end, n in zip(token_lists, ends, lengths):
        flat[end - n:end - 1] = toks
        flat[end - 1] = eos_id
    n_blocks = total // seq_len
    if n_blocks == 0:
        raise DataError(f"{where}: only {total} tokens, fewer than one block of seq_len={seq_len}; "
                        f"add text or lower data.seq_len")
    blocks = flat[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    return Packed(blocks=blocks, starts=starts[: n_blocks * seq_len].reshape(n_blocks, seq_len),
                  n_docs=len(token_lists), n_tokens=total, n_dropped=total - n_blocks * seq_len)


def document_positions(blocks: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, position_ids) of document masking for `blocks` [B, T]: positions count from 0 at every document
    start (and at the block's first token), and the label of a document's first token is -100, since the token
    before it belongs to another document."""
    cols = np.arange(blocks.shape[1])
    last_start = np.maximum.accumulate(np.where(starts, cols, 0), axis=1)
    labels = blocks.copy()
    labels[starts] = -100
    return labels, cols - last_start


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose lengths sum to at most `capacity`: items longest first (ties in
    index order), each into the bin with the least room that still holds it, a new bin when none does. Bins are
    returned in the order they were opened, their items in the order they went in; deterministic."""
    if any(n > capacity or n < 1 for n in lengths):
        raise ValueError(f"best_fit_decreasing: every length must be in 1..{capacity}")
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin), sorted: the best fit is the first with enough room
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = bisect_left(room, (n, -1))
        if k == len(room):
            bins.append([i])
            free, b = capacity - n, len(bins) - 1
        else:
            free, b = room.pop(k)
            bins[b].append(i)
            free -= n
        if free > 0:
            insort(room, (free, b))
    return bins
