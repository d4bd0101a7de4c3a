"""The training loop shared by pretraining and fine-tuning: one function, read top to bottom.

AdamW with decoupled weight decay on matrices only; linear warmup then cosine decay, computed from the
step (no scheduler state to lose); gradient accumulation where the loss of every micro-batch is summed
over its trainable tokens and divided by the trainable tokens of the whole accumulation window, so
micro-batch 8 x 1 and 1 x 8 give the same update; gradient clipping; bf16 autocast where the hardware
supports it; periodic evaluation; an event per step in `events.jsonl`.

It does not know what it trains: it gets the parameters to optimise and a function that returns the
micro-batches of a step (`{"input_ids", "labels", optional "attention_mask" or "position_ids"}` (packed rows),
labels -100 where no loss is taken, aligned with the inputs; the loss shifts by one).
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.config import TrainSection
from tunelab.errors import TunelabError, warn
from tunelab.models import auto_is_bf16
from tunelab.train.checkpoint import Resume, set_rng_state
from tunelab.train.distributed import (
    Dist,
    ShardedLM,
    full_value,
    shard_rows,
    sum_across,
    sum_gradients,
)
from tunelab.train.events import EventLog, LiveView
from tunelab.train.loss import chunked_loss_sum

Batch = dict[str, torch.Tensor]
SINGLE = Dist()  # one process


@dataclass
class LoopResult:
    """What a run did: per-step losses, evaluations, throughput and memory."""

    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0  # trainable (loss) tokens processed
    wall_s: float = 0.0
    peak_memory_mb: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast if asked for, or under `auto` where the hardware multiplies bf16 fast (a GPU that supports it,
    a CPU with AMX: `models.auto_is_bf16`); otherwise None (fp32, no autocast)."""
    if precision == "bf16" or (precision == "auto" and auto_is_bf16(device)):
        return torch.bfloat16
    return None


def lr_at(step: int, cfg: TrainSection) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to lr*min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32 over positions whose (shifted) label is not -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


def count_loss_tokens(batch: Batch) -> int:
    """Number of positions that carry a loss in a micro-batch."""
    return int((batch["labels"][:, 1:] != -100).sum())


def full_logits_loss_sum(model: torch.nn.Module, batch: Batch, dtype: torch.dtype | None) -> torch.Tensor:
    """The plain way, kept as the reference the chunked loss is tested against: full logits, then the loss."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids"), use_cache=False).logits  # a cache unpacks the mask
    return token_loss_sum(logits, batch["labels"])


def forward_loss_sum(model: torch.nn.Module, batch: Batch, dtype: torch.dtype | None) -> torch.Tensor:
    """Forward one micro-batch and return its summed token loss, never holding its full logits.

    The head and the cross-entropy run in chunks over the positions that carry a loss (`loss.py`). A model
    sharded by FSDP (`distributed.ShardedLM`) runs the same loss as its forward, inside FSDP's hooks.
    """
    if isinstance(model, ShardedLM):
        return model(batch, dtype)
    return chunked_loss_sum(model, batch, dtype)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainSection) -> torch.optim.AdamW:
    """AdamW; no weight decay on vectors (norms, biases)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


@contextlib.contextmanager
def stop_events(events: EventLog, dist: Dist):
    """An `interrupted` (Ctrl-C) or `failed` (an error) event when the steps stop early, so `tunelab runs` tells an
    interrupted run from a failed one (a killed process writes nothing)."""
    try:
        yield
    except KeyboardInterrupt:
        if dist.is_main:
            events.write("interrupted")
        raise
    except Exception as e:
        if dist.is_main:
            events.write("failed", error=f"{type(e).__name__}: {e}"[:500])
        raise


def train(model: torch.nn.Module, params: list[torch.nn.Parameter], step_batches: Callable[[int], list[Batch]],
          cfg: TrainSection, events: EventLog, evaluate: Callable[[], dict[str, Any]] | None = None,
          view: LiveView | None = None, checkpoint: Callable[[int, torch.optim.Optimizer, LoopResult], None] |
          None = None, resume: Resume | None = None, on_step: Callable[[int], None] | None = None,
          dist: Dist = SINGLE) -> LoopResult:
    """Run optimizer steps up to `cfg.steps`; `step_batches(step)` gives that step's (global) micro-batches.

    `resume` continues a checkpointed run: its optimizer state, random states, losses, evaluations, peak memory
    and step (the stage has already loaded the trainable weights); `wall_s` and `peak_memory_mb` then count the
    run before the resume too. `checkpoint(step, optimizer, result)` is called when
    `cfg.save_every` says and after the last step. `on_step(step)` is the method's hook after each step.
    Under torchrun every process takes its rows of each micro-batch (see `distributed.py`); under FSDP `model` is
    the `ShardedLM` and `params` its sharded trainable parameters.
    """
    device = next(model.parameters()).device
    dtype = autocast_dtype(cfg.precision, device)
    optimizer = make_optimizer(params, cfg)
    result = LoopResult()
    start = 0
    if resume is not None:
        resume.load_optimizer(optimizer)  # a full or sharded checkpoint's state, cut as the parameters are now
        result = LoopResult(losses=list(resume.losses), evals=list(resume.evals), tokens=resume.tokens,
                            wall_s=resume.wall_s, peak_memory_mb=resume.peak_memory_mb)
        start = resume.step
        if resume.rng is not None:
            set_rng_state(resume.rng)
    if cfg.warmup_steps > cfg.steps and start == 0 and dist.is_main:
        warn(f"train.warmup_steps={cfg.warmup_steps} is more than the run's {cfg.steps} steps: the learning rate "
             f"never reaches train.lr (it peaks at {lr_at(cfg.steps - 1, cfg) / cfg.lr:.0%} of it); lower "
             f"train.warmup_steps")
    view = view or LiveView(cfg.steps, cfg.log_every)
    model.train()
    with view, stop_events(events, dist):
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = step_batches(step)
            n_tokens = sum(count_loss_tokens(b) for b in batches)  # over the global batch, on every process
            loss_sum = 0.0
            for batch in batches:
                batch = {k: v.to(device) for k, v in shard_rows(batch, dist).items()}
                loss = forward_loss_sum(model, batch, dtype)
                (loss / max(n_tokens, 1)).backward()
                loss_sum += loss.item()
            sum_gradients(params, dist)
            loss_sum = sum_across(loss_sum, dist)
            grad_norm = full_value(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
            if not (math.isfinite(loss_sum) and torch.isfinite(grad_norm)):
                raise TunelabError(f"step {step + 1}: the loss or gradient is not finite (loss {loss_sum}, "
                                   f"grad norm {float(grad_norm)}); lower train.lr (now {cfg.lr}) or use "
                                   f"precision=fp32. Nothing was saved for this run.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(step + 1)

            loss_value = loss_sum / max(n_tokens, 1)
            result.losses.append(loss_value)
            result.tokens += n_tokens
            result.wall_s += time.perf_counter() - t0  # training time only, evaluation excluded
            result.peak_memory_mb = max(result.peak_memory_mb, peak_memory_mb(device))
            elapsed = result.wall_s
            eta = elapsed / (step + 1 - start) * (cfg.steps - step - 1) if step + 1 > start else 0.0
            if dist.is_main:
                events.write("step", step=step + 1, loss=loss_value, lr=lr, grad_norm=float(grad_norm),
                             tokens=n_tokens, tokens_per_s=round(result.tokens / elapsed, 1), eta_s=round(eta, 1),
                             peak_memory_mb=round(peak_memory_mb(device), 1))
                view.step(step + 1, loss_value, lr, result.tokens / elapsed, eta)

            last = step + 1 == cfg.steps
            if evaluate and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                metrics = {"step": step + 1, **evaluate()}
                model.train()
                result.evals.append(metrics)
                if dist.is_main:
                    events.write("eval", **metrics)
                    view.note(f"eval at step {step + 1}: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
            if checkpoint is not None:
                checkpoint(step + 1, optimizer, result)
    if evaluate and cfg.steps > 0 and not (result.evals and result.evals[-1]["step"] == cfg.steps):
        # resumed from the last checkpoint (the run had finished, or stopped before writing its output) and the
        # checkpoint holds no final evaluation: evaluate the weights it holds
        metrics = {"step": cfg.steps, **evaluate()}
        result.evals.append(metrics)
        if dist.is_main:
            events.write("eval", **metrics)
    result.peak_memory_mb = max(result.peak_memory_mb, peak_memory_mb(device))
    return result
