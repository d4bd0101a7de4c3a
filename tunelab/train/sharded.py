"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP): every process writes its own shards, in the
foreground (`train.checkpoint: sync`) or in the background after staging its state in CPU memory (`async`).

The DCP part of a checkpoint is `step-NNNNNN/dcp/`: `.metadata` and one `__<rank>_0.distcp` file per process. It
holds the method's tensors under `trainable.` (as `Method.state_dict()` names them; FSDP's DTensor shards as they
are) and the optimizer state under `optimizer.` (keyed by parameter name by `get_optimizer_state_dict`, so it loads
into any sharding). A replicated tensor (every tensor under ddp) is written once, by one of the processes DCP
chooses so that each writes about the same number of bytes. DCP reshards on load: a checkpoint that N processes
wrote resumes on M.

Async saves run DCP's writer in a background thread over a process group of their own (gloo), so its collectives
never interleave with the training loop's; at most one save is in flight, and `checkpoint.py` moves `latest` only
when the save has completed, which DCP reports on the first process after every process has written its files.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from tunelab.errors import TunelabError

DCP_DIR = "dcp"
# DCP warns on every single-process save and load that it assumes one process; that is what tunelab means
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")


class CheckpointError(TunelabError):
    """A checkpoint that cannot be read, or that does not fit the model being trained."""


def is_sharded(path: Path) -> bool:
    """Whether checkpoint `path` holds DCP shards (else the full-tensor files)."""
    return (path / DCP_DIR / ".metadata").is_file()


def sharded_state(method, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a sharded checkpoint holds: the method's tensors and the optimizer state by parameter name (views of
    the live tensors, not copies)."""
    return {"trainable": method.state_dict(), "optimizer": get_optimizer_state_dict(method.model, optimizer)}


def _explain(e: BaseException) -> str:
    """The first process's own error inside DCP's wrapper (CheckpointException is a BaseException)."""
    if isinstance(e, CheckpointException):
        for failure in e.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            return f"{type(inner).__name__}: {inner}"
    return f"{type(e).__name__}: {e}"


def _load(target: dict[str, Any], path: Path) -> None:
    """Load `path`'s shards in place into `target` (DCP reshards them to the tensors `target` holds)."""
    try:
        dcp.load(target, checkpoint_id=path / DCP_DIR)
    except (CheckpointException, RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot load this sharded checkpoint ({_explain(e)[:300]}); it was written "
                              f"for another model or recipe, or is damaged") from None


def saved_tensors(path: Path, prefix: str) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` of the tensors a sharded checkpoint holds under `prefix` (from its metadata alone)."""
    try:
        meta = FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
    except Exception as e:  # a truncated or foreign .metadata file: unpickling can raise anything
        raise CheckpointError(f"{path}: cannot read {DCP_DIR}/.metadata ({type(e).__name__}: {e}); the checkpoint "
                              f"is damaged or was not written by tunelab") from None
    return {k[len(prefix) + 1:]: tuple(m.size) for k, m in meta.items()
            if k.startswith(prefix + ".") and isinstance(m, TensorStorageMetadata)}


def check_fits(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """CheckpointError unless the checkpoint's trainable tensors are exactly `tensors`' names and shapes."""
    saved = saved_tensors(path, "trainable")
    missing = sorted(set(tensors) - set(saved))
    extra = sorted(set(saved) - set(tensors))
    wrong = [f"{k} {saved[k]} vs {tuple(tensors[k].shape)}" for k in sorted(set(saved) & set(tensors))
             if saved[k] != tuple(tensors[k].shape)]
    if missing or extra or wrong:
        what = "; ".join(filter(None, [
            f"{len(missing)} tensor(s) of this method missing (first: {missing[0]})" if missing else "",
            f"{len(extra)} tensor(s) this method does not have (first: {extra[0]})" if extra else "",
            f"shapes differ (checkpoint vs this model: {wrong[0]})" if wrong else ""]))
        raise CheckpointError(f"{path}: the checkpoint does not fit this model and method: {what}; resume it with "
                              f"the recipe that wrote it, or start a new run")


def load_trainable(path: Path, method) -> dict[str, torch.Tensor]:
    """The method's tensors from a sharded checkpoint, whole (whatever the number of processes that wrote it).

    Called before any FSDP sharding, on every process of the run (each reads all of them)."""
    live = method.state_dict()
    check_fits(path, live)
    target = {"trainable": {k: torch.empty_like(v, device="cpu") for k, v in live.items()}}
    _load(target, path)
    return target["trainable"]


def saved_optimizer_params(path: Path) -> set[str]:
    """Names of the parameters whose optimizer state a sharded checkpoint holds (`optimizer.state.<name>.<key>`)."""
    meta = FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
    prefix = "optimizer.state."
    return {k[len(prefix):].rsplit(".", 1)[0] for k in meta if k.startswith(prefix)}


def _allocate_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Give exactly `params` an optimizer state (a step with zero gradients and zero learning rate changes no
    weight), so that the state DCP loads into has their shapes and shardings; parameters without saved state
    (e.g. LoRA-Dash's directions before its switch) keep none, as in the run that wrote the checkpoint."""
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def load_optimizer(path: Path, method, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer state of a sharded checkpoint into `optimizer`, in whatever way its parameters are
    sharded now (each process reads the parts it holds)."""
    saved = saved_optimizer_params(path)
    names = {p: n for n, p in method.model.named_parameters()}  # the names get_optimizer_state_dict gives
    params = [p for group in optimizer.param_groups for p in group["params"]]
    unknown = sorted(saved - {names.get(p) for p in params})
    if unknown:
        raise CheckpointError(f"{path}: the checkpoint holds optimizer state for {len(unknown)} parameter(s) this "
                              f"run does not train (first: {unknown[0]}); resume it with the recipe that wrote it")
    if optimizer.state:
        raise CheckpointError("the optimizer already has a state; load a checkpoint into a fresh one")
    _allocate_state(optimizer, [p for p in params if names.get(p) in saved])
    state = get_optimizer_state_dict(method.model, optimizer)
    target = {"optimizer": state}
    _load(target, path)
    # not strict: a parameter that had no state when the checkpoint was written still has none
    set_optimizer_state_dict(method.model, optimizer, target["optimizer"], options=StateDictOptions(strict=False))


class ShardedWriter:
    """Writes DCP shards, now (`sync`) or in the background (`async`, at most one save in flight).

    `write(state, directory, done, optimizer)` calls `done()` once every process has written its files: at once
    when sync; when async, from `poll()` (each step), from the next `write` (which waits for the one in flight
    first) or from `wait()`. Async, the copy to CPU memory (staging) runs in a thread too, while the next step's
    forward and backward passes run (they read the weights and optimizer state, never write them): a pre-hook on
    `optimizer` holds its next `step()` until the copy is complete (`staging_wait_s` adds up that wait). The
    staging buffers are kept between saves, so later saves copy into memory that is already there.
    """

    def __init__(self, mode: str, world_size: int):
        self.mode = mode
        self.group = None
        self.stager = None
        if mode == "async":
            if world_size > 1:  # collectives from the writer thread must not share the loop's process group
                self.group = dist.new_group(backend="gloo")
            pin = torch.cuda.is_available()
            self.stager = DefaultStager(StagingOptions(use_pinned_memory=pin, use_shared_memory=False,
                                                       use_async_staging=True, use_non_blocking_copy=False))
        self.pending: tuple[Future, Callable[[], None], Path] | None = None
        self.staging: Future | None = None  # the copy to memory of the save in flight, until it completes
        self.hooked: torch.optim.Optimizer | None = None
        self.staging_wait_s = 0.0

    def write(self, state: dict[str, Any], directory: Path, done: Callable[[], None],
              optimizer: torch.optim.Optimizer | None = None) -> None:
        self.wait()
        try:
            if self.mode == "async":
                response = dcp.async_save(state, checkpoint_id=directory, process_group=self.group,
                                          async_stager=self.stager)
                if isinstance(response, AsyncSaveResponse):
                    self._hold_step(optimizer, response.staging_completion)
                    response = response.upload_completion
                self.pending = (response, done, directory)
                return
            dcp.save(state, checkpoint_id=directory)
        except (CheckpointException, RuntimeError, OSError) as e:
            raise CheckpointError(f"{directory}: writing the checkpoint failed ({_explain(e)[:300]})") from None
        done()

    def _hold_step(self, optimizer: torch.optim.Optimizer | None, staged: Future) -> None:
        """Until `staged` completes, `optimizer.step()` waits for it (without an optimizer: wait now)."""
        if optimizer is None:
            staged.result()
            return
        self.staging = staged
        if self.hooked is not optimizer:  # one hook per optimizer, for every save
            optimizer.register_step_pre_hook(self._wait_for_staging)
            self.hooked = optimizer

    def _wait_for_staging(self, *_: Any) -> None:
        if self.staging is not None:
            t0 = time.perf_counter()
            staged, self.staging = self.staging, None
            staged.result()
            self.staging_wait_s += time.perf_counter() - t0

    def poll(self) -> None:
        """Finish the save in flight if it has completed (never blocks)."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) has completed, then finish it."""
        if self.pending is None:
            return
        future, done, directory = self.pending
        self.pending = None
        try:
            future.result()
        except (CheckpointException, RuntimeError, OSError) as e:
            raise CheckpointError(f"{directory}: writing the checkpoint in the background failed "
                                  f"({_explain(e)[:300]})") from None
        done()

    def close(self) -> None:
        """Wait for the save in flight and free the staging buffers."""
        self.wait()
        if self.stager is not None:
            self.stager.close()
            self.stager = None
