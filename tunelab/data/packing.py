"""Pretraining blocks: documents → tokens with EOS after each document → `seq_len` blocks, no padding.

Concatenate-and-chunk (GPT-3 style): documents are joined with an end-of-sequence token and cut into
full blocks, so no position is padding; only the tail that does not fill a block is dropped (reported).
Documents can span two blocks and attention is not masked between documents: the EOS token marks the
boundary. Each document starts with BOS when the tokenizer's rule adds one (Gemma, Llama-3: `bos_ids`), as
those models' own pretraining does. Labels equal the inputs (the loss shifts by one), the Hugging Face convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunelab.data.text import bos_ids, with_bos
from tunelab.errors import DataError


@dataclass
class Packed:
    """Blocks of token ids, shape [n_blocks, seq_len], and the bookkeeping to report."""

    blocks: np.ndarray
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
    for toks, end, n in zip(token_lists, ends, lengths):
        flat[end - n:end - 1] = toks
        flat[end - 1] = eos_id
    n_blocks = total // seq_len
    if n_blocks == 0:
        raise DataError(f"{where}: only {total} tokens, fewer than one block of seq_len={seq_len}; "
                        f"add text or lower data.seq_len")
    blocks = flat[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    return Packed(blocks=blocks, n_docs=len(token_lists), n_tokens=total, n_dropped=total - n_blocks * seq_len)
