"""Perplexity and bits per byte of text, with Hugging Face's sliding-window definition.

Each file's documents (read as pretraining reads them: `.txt` paragraphs split at blank lines, `.jsonl`/
`.json` under a text key) are joined with EOS between them into one token stream, as pretraining packs them
(each document starts with BOS when the tokenizer's rule adds one: `bos_ids`). The stream is scored with windows of
`max_length` tokens (default: the sequence length tunelab trained the model on, else its context) that start
every `stride` tokens; each window scores only the tokens the previous window
did not (the overlap is context, as labels -100 in HF's recipe), and a window never scores its own first
token, so with `stride == max_length` (disjoint windows) the first token of each window goes unscored, as in
HF's loop. (HF's guide multiplies each window's mean loss by one token fewer than it scored when windows
overlap; here every scored token counts once.) The EOS separators are scored too: the model has to predict
where a document ends. BOS (tokenizers whose rule adds one: Gemma, Llama-3) is context, never scored, and every
window starts with it: a window that begins inside a document gets BOS prepended (so it holds one stream token
fewer). Those models were trained and are used with BOS at position 0 of every sequence (Gemma without it
degrades badly), so a window without one would score the model off its training distribution.

Reported per file and in total: the number of scored tokens, mean NLL per token (nats), perplexity
exp(NLL/tokens), and bits per byte = total NLL / ln 2 / UTF-8 bytes of the documents' text (separators
count no bytes). Token perplexity depends on the tokenizer; bits per byte compares models across tokenizers.
Not supported: lm-eval's `loglikelihood_rolling` (disjoint windows with one prefix token), whose numbers
differ from these; per-document scoring (documents shorter than a window are scored with the text before
them as context).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.data.text import bos_ids, read_documents, resolve_files, with_bos
from tunelab.errors import ConfigError, DataError, warn
from tunelab.evaluate.common import Progress, context_length, device_of
from tunelab.models import TRAINED_SEQ_LEN, trained_seq_len


def window_spans(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a stream of `n_tokens` (HF's loop)."""
    if not 1 <= stride <= max_length:
        raise ConfigError(f"stride {stride} must be between 1 and max_length {max_length} (windows may "
                          f"overlap, never leave gaps)")
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        spans.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return [s for s in spans if s[2] < s[1]]


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """Documents joined with EOS into one stream of ids, each after BOS when the tokenizer's rule adds one."""
    ids, bos = [], bos_ids(tokenizer)
    for i, text in enumerate(texts):
        if i and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids.extend(with_bos(tokenizer(text, add_special_tokens=False)["input_ids"], bos))
    return ids


@torch.no_grad()
def stream_nll(model, ids: list[int], max_length: int, stride: int, batch_size: int = 4, pad_id: int = 0,
               progress: Progress | None = None, bos: list[int] = ()) -> tuple[float, int, int]:
    """(summed NLL in nats, scored tokens, windows) of one stream; windows are batched, right-padded.

    Right padding needs no attention mask: a causal model's logits at a position never see later positions.
    With `bos` (from `bos_ids`), every window starts with it (prepended where the stream has none there, so
    windows hold `max_length - len(bos)` stream tokens) and the stream's BOS tokens are not scored.
    """
    room = max_length - len(bos)
    spans = window_spans(len(ids), room, stride if stride > max_length else min(stride, room))
    device, stream = device_of(model), torch.tensor(ids, dtype=torch.long)
    targets = stream.masked_fill(stream == bos[0], -100) if bos else stream  # BOS is context, never scored
    bos = list(bos)
    total, count = 0.0, 0
    for i in range(0, len(spans), batch_size):
        chunk = spans[i:i + batch_size]
        leads = [bos if ids[b:b + len(bos)] != bos else [] for b, _, _ in chunk]
        batch = torch.full((len(chunk), max(e - b + len(lead) for (b, e, _), lead in zip(chunk, leads))), pad_id,
                           dtype=torch.long)
        for r, ((b, e, _), lead) in enumerate(zip(chunk, leads)):
            batch[r, :len(lead) + e - b] = torch.cat([torch.tensor(lead, dtype=torch.long), stream[b:e]])
        logits = model(input_ids=batch.to(device)).logits.float()
        for r, ((b, e, first), lead) in enumerate(zip(chunk, leads)):
            lo, hi = first - b + len(lead), e - b + len(lead)  # score positions lo..hi-1 from the logits one left
            scored = targets[first:e].to(device)
            total += F.cross_entropy(logits[r, lo - 1:hi - 1], scored, reduction="sum").item()
            count += int((scored != -100).sum())
        if progress:
            progress(min(i + batch_size, len(spans)), len(spans))
    return total, count, len(spans)


def perplexity(model, tokenizer, texts: list[str], max_length: int | None = None, stride: int | None = None,
               batch_size: int = 4, progress: Progress | None = None) -> dict:
    """NLL, perplexity and bits per byte of `texts` joined into one stream (see the module docstring)."""
    max_length = window_length(model, max_length)
    stride = stride or max(1, max_length // 2)
    ids = token_stream(tokenizer, texts)
    if len(ids) < 2:
        raise DataError("the text is shorter than two tokens: nothing to score")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll, tokens, windows = stream_nll(model, ids, max_length, stride, batch_size, pad, progress, bos_ids(tokenizer))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"documents": len(texts), "tokens": tokens, "bytes": n_bytes, "windows": windows, "nll_sum": nll,
            **_rates(nll, tokens, n_bytes)}


def window_length(model, max_length: int | None = None) -> int:
    """The window: `max_length`, else the sequence length tunelab trained the model on (recorded in its config.json),
    else the model's context. A window longer than the trained length is scored, with a warning."""
    trained = trained_seq_len(model)
    if max_length is None and trained is not None:
        return min(trained, context_length(model))
    return context_length(model, max_length)


def _rates(nll: float, tokens: int, n_bytes: int) -> dict:
    return {"nll": nll / tokens, "ppl": math.exp(nll / tokens),
            "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan")}


def read_text_files(path: str, text_key: str = "text") -> dict[str, list[str]]:
    """{file: documents} for a file, directory or glob of .txt/.jsonl/.json files."""
    return {str(f): read_documents(f, text_key) for f in resolve_files(path)}


def evaluate_perplexity(model, tokenizer, files: dict[str, list[str]], max_length: int | None = None,
                        stride: int | None = None, batch_size: int = 4, progress: Progress | None = None) -> dict:
    """Per-file and total NLL, perplexity and bits per byte; `metrics` holds the totals."""
    started, given = time.time(), max_length is not None
    trained, window = trained_seq_len(model), window_length(model, max_length)
    if trained is not None and window > trained:
        warn(f"perplexity windows of {window} tokens, beyond the {trained} positions the model was trained on "
             f"(config.json {TRAINED_SEQ_LEN}): expect a higher perplexity than in {trained}-token windows")
    per_file = []
    for path, texts in files.items():
        r = perplexity(model, tokenizer, texts, max_length, stride, batch_size, progress)
        per_file.append({"path": path, **r})
    nll, tokens = sum(f["nll_sum"] for f in per_file), sum(f["tokens"] for f in per_file)
    n_bytes = sum(f["bytes"] for f in per_file)
    total = _rates(nll, tokens, n_bytes)
    wall = time.time() - started
    max_length = window
    return {"metrics": {"ppl": total["ppl"], "bits_per_byte": total["bits_per_byte"], "nll": total["nll"]},
            "files": [{**f, "path": Path(f["path"]).as_posix()} for f in per_file], "tokens": tokens,
            "bytes": n_bytes, "max_length": max_length, "stride": stride or max(1, max_length // 2),
            "window_from": "max_length" if given else ("trained length" if trained else "model context"),
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1) if wall else None}
