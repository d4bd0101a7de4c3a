"""The serving engine: one thread owns the model and batches every running request at the token level.

Between two decode steps the engine takes in what arrived (requests, cancellations, adapters to forget), drops
rows whose client left, and admits waiting requests while the batch has room: a group of them is prefilled in
one left-padded forward (each row's adapter slot set in the LoRA bank), its first tokens sampled, and the group
joins the running batch (its KV cache left-padded to the batch's length and concatenated). Then one decode step
runs for every row at once, and a row that finished (a stop token, a stop string, max_tokens, the context) leaves
at once: its cache rows are dropped, and columns every row pads are cut off. Positions are explicit per row
(`position_ids`), so a row's tokens do not depend on what it shares the batch with (up to float rounding).

Text goes out incrementally: the reply is decoded again after each token, and what could still be the start of
a stop string, or an incomplete UTF-8 character, is held back; a stop string itself is never sent.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tunelab.serve.adapters import AdapterInfo, ServeError
from tunelab.serve.lora_bank import LoraBank, LoraWeights

log = logging.getLogger("tunelab.serve")


@dataclass
class Sampling:
    """How one request generates: greedy at temperature 0, else top-p sampling from its own seeded generator."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_ids: set[int] = field(default_factory=set)
    min_tokens: int = 0  # stop ids cannot be sampled before this many tokens (vLLM's min_tokens)


class Request:
    """One generation: prompt ids, the adapter (None: the base model) and sampling. `emit` receives, from the
    engine thread, `("text", delta)` events, then `("done", finish_reason, prompt_tokens, completion_tokens)`, or
    `("error", ServeError)`. `cancel()` (any thread) makes the engine drop it before its next step."""

    def __init__(self, prompt_ids: list[int], adapter: AdapterInfo | None, sampling: Sampling,
                 emit: Callable[[tuple], None]):
        self.prompt_ids, self.adapter, self.sampling, self.emit = list(prompt_ids), adapter, sampling, emit
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Row:
    """A running request: its bank slot, the tokens it generated, the text it sent, its sampler."""

    def __init__(self, req: Request, slot: int):
        self.req, self.slot = req, slot
        self.generated: list[int] = []
        self.sent = ""
        self.last = -1  # the newest token, not yet in the KV cache
        seed = req.sampling.seed if req.sampling.seed is not None else random.getrandbits(63)
        self.gen = torch.Generator().manual_seed(seed) if req.sampling.temperature > 0 else None


class Engine:
    """Continuous batching over `model` with a LoRA bank of `max_loaded` slots; `start()` runs it in a thread.

    `load(info)` reads an adapter's `LoraWeights` (called in the engine thread when the adapter is not resident).
    At most `max_batch` rows run at once; a prefill takes at most `max_prefill_tokens` prompt tokens (a longer
    prompt is prefilled alone); at most `max_waiting` requests wait (then `submit` answers 503).
    """

    def __init__(self, model, tokenizer, load: Callable[[AdapterInfo], LoraWeights], max_loaded: int = 8,
                 max_batch: int = 32, max_prefill_tokens: int = 2048, max_waiting: int = 1024):
        self.model, self.tokenizer, self.load = model, tokenizer, load
        self.bank = LoraBank(model, max_loaded)
        self.device = next(model.parameters()).device
        self.context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_batch, self.max_prefill_tokens, self.max_waiting = max_batch, max_prefill_tokens, max_waiting
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Request] = deque()
        self.pending = 0  # submitted and not yet admitted (read by other threads for the 503)
        self._lock = threading.Lock()
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask = self.lengths = None
        self.thread: threading.Thread | None = None
        self.steps = 0  # forwards run (prefills and decode steps), for tests and /health

    # --- other threads -------------------------------------------------------------------------------------------

    def start(self) -> Engine:
        self.thread = threading.Thread(target=self._run, name="tunelab-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.inbox.put(None)
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, req: Request) -> None:
        """Queue `req`; 503 when `max_waiting` requests are already waiting."""
        with self._lock:
            if self.pending >= self.max_waiting:
                raise ServeError(503, f"the server is busy: {self.pending} requests are waiting; retry later",
                                 code="server_busy")
            self.pending += 1
        self.inbox.put(req)

    def forget(self, info: AdapterInfo) -> None:
        """The adapter was unloaded: free its slot once the rows that use it finish."""
        self.inbox.put(("forget", info.key))

    @property
    def running(self) -> int:
        return len(self.rows)

    # --- the engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while self._drain(block=not self.rows and not self.waiting):
                self._drop_cancelled()
                if self.waiting:
                    self._admit()
                if self.rows:
                    self._guarded(self.rows, self._step)

    def _drain(self, block: bool) -> bool:
        """Take in everything queued (waiting for the first item when `block`); False on the stop sentinel."""
        try:
            item = self.inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            if isinstance(item, Request):
                self.waiting.append(item)
            else:
                self.bank.evict(item[1])
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._admitted(1)
        gone = [row for row in self.rows if row.req.cancelled]
        if gone:
            self._leave(gone)

    def _admitted(self, n: int) -> None:
        with self._lock:
            self.pending -= n

    def _admit(self) -> None:
        group: list[tuple[Request, int]] = []
        budget = self.max_prefill_tokens
        for req in list(self.waiting):
            if len(self.rows) + len(group) >= self.max_batch or (group and len(req.prompt_ids) > budget):
                break
            try:
                slot = 0 if req.adapter is None else self.bank.acquire(req.adapter.key,
                                                                       lambda a=req.adapter: self.load(a))
            except Exception as e:  # the adapter's files changed or vanished since they were validated
                self.waiting.remove(req)
                self._admitted(1)
                req.emit(("error", e if isinstance(e, ServeError) else
                          ServeError(500, f"adapter {req.adapter.name!r} could not be loaded", code="server_error")))
                continue
            if slot is None:  # every slot is held by running rows: wait for one to finish
                continue
            self.waiting.remove(req)
            group.append((req, slot))
            budget -= len(req.prompt_ids)
        if group:
            self._admitted(len(group))
            rows = [_Row(req, slot) for req, slot in group]
            self._guarded(rows, lambda: self._prefill(rows))

    def _guarded(self, rows: list[_Row], step: Callable[[], None]) -> None:
        """Run `step`; an unexpected error fails the rows it concerned and the running batch (500), and the
        server keeps serving the requests that come next."""
        try:
            step()
        except Exception:
            log.exception("engine step failed")
            failed = list(dict.fromkeys([*rows, *self.rows]))
            self.rows, self.cache, self.mask, self.lengths = [], None, None, None
            for row in failed:
                self.bank.release(row.slot)
                row.req.emit(("error", ServeError(500, "the engine failed on this request (see the server log)",
                                                  code="server_error")))

    def _prefill(self, rows: list[_Row]) -> None:
        n = [len(row.req.prompt_ids) for row in rows]
        width = max(n)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - n[i]:] = torch.tensor(row.req.prompt_ids)
            mask[i, width - n[i]:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        self.bank.set_rows([row.slot for row in rows])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                         logits_to_keep=1)
        self.steps += 1
        tokens = self._sample(out.logits[:, -1].float(), rows)
        self._join(rows, cache, mask, torch.tensor(n, device=self.device))
        self._leave([row for row, tok in zip(rows, tokens) if self._accept(row, tok)])

    def _step(self) -> None:
        rows = self.rows
        ids = torch.tensor([[row.last] for row in rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], 1)
        self.bank.set_rows([row.slot for row in rows])
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.lengths.unsqueeze(1),
                         cache=self.cache, use_cache=True)
        self.steps += 1
        self.lengths = self.lengths + 1
        tokens = self._sample(out.logits[:, -1].float(), rows)
        self._leave([row for row, tok in zip(rows, tokens) if self._accept(row, tok)])

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        for i, row in enumerate(rows):
            s = row.req.sampling
            if len(row.generated) < s.min_tokens and s.stop_ids:
                logits[i, list(s.stop_ids)] = float("-inf")
        tokens = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            s = row.req.sampling
            if s.temperature <= 0:
                continue
            probs = F.softmax(logits[i].cpu() / s.temperature, -1)
            if s.top_p < 1:
                p, order = probs.sort(descending=True)
                drop = p.cumsum(0) - p > s.top_p  # keep the smallest set whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter_(0, order[~drop], p[~drop])
            tokens[i] = int(torch.multinomial(probs, 1, generator=row.gen))
        return tokens

    def _accept(self, row: _Row, token: int) -> bool:
        """Record `token` for `row`, send the text that is now final; True when the row is finished."""
        req, s = row.req, row.req.sampling
        row.generated.append(token)
        row.last = token
        ids = row.generated[:-1] if token in s.stop_ids else row.generated
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        reason = None
        cut = min((i for i in (text.find(x) for x in s.stop) if i >= 0), default=-1)
        if token in s.stop_ids or cut >= 0:
            reason, text = "stop", text if cut < 0 else text[:cut]
        elif len(row.generated) >= s.max_tokens or len(req.prompt_ids) + len(row.generated) >= self.context:
            reason = "length"
        safe = len(text) if reason else _safe_prefix(text, s.stop)
        if safe > len(row.sent):
            req.emit(("text", text[len(row.sent):safe]))
            row.sent = text[:safe]
        if reason:
            req.emit(("done", reason, len(req.prompt_ids), len(row.generated)))
        return reason is not None

    def _join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, lengths: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.lengths = list(rows), cache, mask, lengths
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width, 2), _left_pad(new.keys, width, 2)])
            old.values = torch.cat([_left_pad(old.values, width, 2), _left_pad(new.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.lengths = torch.cat([self.lengths, lengths])
        self.rows += rows

    def _leave(self, gone: list[_Row]) -> None:
        if not gone:
            return
        for row in gone:
            self.bank.release(row.slot)
        keep = [i for i, row in enumerate(self.rows) if row not in gone]
        if not keep:
            self.rows, self.cache, self.mask, self.lengths = [], None, None, None
            return
        if len(keep) == len(self.rows):
            return  # rows of a prefill that finished before they joined
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.lengths = self.mask[index], self.lengths[index]
        cut = int((self.mask.shape[1] - self.lengths).min())  # columns every row pads
        if cut > 0:
            self.mask = self.mask[:, cut:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim)


def _safe_prefix(text: str, stops: list[str]) -> int:
    """How much of `text` is final: not an incomplete character at the end, nor the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = 0
    for stop in stops:
        held = max([held] + [k for k in range(1, min(len(stop), end + 1)) if text[end - k:end] == stop[:k]])
    return end - held
