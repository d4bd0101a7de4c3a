"""Checkpoints a run resumes from exactly, written so that a process killed at any moment leaves a usable one.

A checkpoint is a directory `<run>/checkpoints/step-NNNNNN/` holding:
  trainable.safetensors   the method's trainable tensors only (a LoRA checkpoint holds no frozen base weight)
  optimizer.pt            the optimizer state (AdamW moments and step counts)
  rng-rank<R>.pt          Python, NumPy and torch (CPU and CUDA) random states of each process
  state.json              the step (the data position: every stage draws a step's batches from the step number,
                          so epoch, sample order and offset follow from it and are recorded for people), the
                          losses so far, the evaluations so far, the run's wall time and peak memory so far (a
                          resumed run's summary counts the run before it), the resolved recipe, library versions
                          and a fingerprint of each data file
With `train.checkpoint_format: sharded` the first two are replaced by `dcp/`, the shards every process writes
with torch.distributed.checkpoint (`sharded.py`); such a checkpoint resumes on any number of processes, and with
`train.checkpoint: async` it is written in the background while training goes on (at most one save in flight).
It is written under a temporary name, fsynced and renamed; then `<run>/checkpoints/latest` (a one-line text
file naming it) is replaced atomically; then checkpoints beyond the newest `keep` are deleted. An async save is
renamed and pointed to only once every process has written its shards. A kill during a save (in the background
too) leaves only a temporary directory, which is ignored and cleaned up. The learning-rate schedule is a pure
function of the step, so it has no state to save.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

from tunelab import __version__
from tunelab.errors import TunelabError
from tunelab.io import atomic_write_json, atomic_write_text, usual_mode
from tunelab.train.distributed import full_optimizer_state, full_state, shard_optimizer_state
from tunelab.train.sharded import (
    DCP_DIR,
    CheckpointError,
    ShardedWriter,
    is_sharded,
    load_optimizer,
    load_trainable,
    sharded_state,
)

# Keys that may differ between the run and its resume without changing what is computed (a run directory
# may be moved or renamed).
# A checkpoint holds the same tensors under `train.distributed` ddp and fsdp alike, so either may resume the other;
# a resume reads a checkpoint in the format it was written in, whatever train.checkpoint_format says now.
FREE_KEYS = ("out_dir", "name", "train.resume", "train.resume_force", "train.log_every", "train.save_every",
             "train.keep_checkpoints", "train.distributed", "train.checkpoint", "train.checkpoint_format")


@dataclass
class Resume:
    """What a resumed run continues from."""

    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any] | None
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    path: Path | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)  # evaluations up to the checkpoint (the last one's)
    total_wall_s: float = 0.0  # the run's elapsed time up to the checkpoint, across earlier resumes
    peak_memory_mb: float = 0.0  # the highest peak of the processes that ran before
    method: Any = None  # set for a sharded checkpoint: its optimizer state is read by the method's parameter names

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore the optimizer state into `optimizer` (created over the parameters as they are now sharded)."""
        if self.method is not None:
            load_optimizer(self.path, self.method, optimizer)
            return
        optimizer.load_state_dict(self.optimizer)
        shard_optimizer_state(optimizer)  # FSDP: a full checkpoint holds full tensors; keep this process's shards


def fingerprint(paths: list[str | Path]) -> dict[str, str]:
    """`{path: sha256}` of every data file behind `paths` (files, directories or globs as the stages read them)."""
    from glob import glob

    files: list[Path] = []
    for p in paths:
        q = Path(p)
        if q.is_dir():
            files += sorted(f for f in q.rglob("*") if f.is_file())
        elif q.is_file():
            files.append(q)
        else:
            files += sorted(Path(m) for m in glob(str(p), recursive=True) if Path(m).is_file())
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[str(f)] = h.hexdigest()
    return out


def rng_state() -> dict[str, Any]:
    """The random states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def versions() -> dict[str, str]:
    return {"tunelab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


class Checkpointer:
    """Saves checkpoints of a run every `every` steps (0: only at the end) and keeps the newest `keep`.

    `fmt` is `train.checkpoint_format` (full: rank 0 writes full tensors; sharded: every process its DCP shards) and
    `mode` is `train.checkpoint` (async: sharded saves complete in the background; `poll()` each step publishes
    one that has, `close()` waits for it). It also keeps the run's clock: `elapsed()` is the wall time since this
    process set up the run, plus the elapsed time an interrupted run had recorded in the checkpoint it resumed from
    (`prior_wall_s`).
    """

    def __init__(self, run_dir: str | Path, every: int, keep: int, config: dict[str, Any],
                 data: dict[str, str], rank: int = 0, world_size: int = 1, prior_wall_s: float = 0.0,
                 fmt: str = "full", mode: str = "sync", method=None):
        self.dir = Path(run_dir) / "checkpoints"
        self.every, self.keep, self.config, self.data = every, keep, config, data
        self.rank, self.world_size = rank, world_size
        self.prior_wall_s, self.started = prior_wall_s, time.time()
        self.format, self.method = fmt, method
        self.writer = ShardedWriter(mode, world_size) if fmt == "sharded" else None

    def elapsed(self) -> float:
        """The run's total wall time so far (this process's, plus what the run before the resume recorded)."""
        return self.prior_wall_s + time.time() - self.started

    def due(self, step: int, last: bool) -> bool:
        return last or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
             losses: list[float], tokens: int, wall_s: float, epoch_info: dict[str, Any] | None = None,
             evals: list[dict[str, Any]] | None = None, peak_memory_mb: float = 0.0) -> Path:
        """Write checkpoint `step` (rank 0 writes the shared files, every rank its random states).

        Every rank calls it. Full: FSDP-sharded tensors are gathered first (one full tensor at a time, to CPU) and
        rank 0 writes them. Sharded: each rank writes its shards (async: stages them and returns; the checkpoint
        is published later, once complete).
        """
        state = {"step": step, "world_size": self.world_size, "format": self.format, "losses": losses,
                 "tokens": tokens, "wall_s": wall_s, "total_wall_s": round(self.elapsed(), 3),
                 "peak_memory_mb": peak_memory_mb, "evals": evals or [],
                 "data_position": {"step": step, **(epoch_info or {})}, "config": self.config, "data": self.data,
                 "versions": versions()}
        if self.writer is not None:
            return self._save_sharded(step, trainable, optimizer, state)
        main = self.rank == 0
        trainable, optimizer_state = full_state(trainable, main), full_optimizer_state(optimizer, main)
        final, tmp = self._begin(step)
        torch.save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
        if main:
            save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                      str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
            torch.save(optimizer_state, tmp / "optimizer.pt")
            atomic_write_json(tmp / "state.json", state)
        _barrier(self.world_size)
        if main:
            self._publish(tmp, final)
        _barrier(self.world_size)
        return final

    def _save_sharded(self, step: int, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                      state: dict[str, Any]) -> Path:
        self.writer.wait()  # at most one save in flight: the one before is published first
        final, tmp = self._begin(step)
        torch.save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
        if self.rank == 0:
            atomic_write_json(tmp / "state.json", state)
        shards = sharded_state(self.method, optimizer)
        shards["trainable"] = trainable
        self.writer.write(shards, tmp / DCP_DIR, (lambda: self._publish(tmp, final)) if self.rank == 0 else _nothing,
                          optimizer)
        return final

    def _begin(self, step: int) -> tuple[Path, Path]:
        """The final and temporary directories of checkpoint `step`; the temporary one made afresh (stale ones
        left by a killed save removed)."""
        final = self.dir / f"step-{step:06d}"
        tmp = self.dir / f".step-{step:06d}.tmp"
        if self.rank == 0:
            for stale in self.dir.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(self.world_size)
        return final, tmp

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rank 0, once every file of `tmp` is written: fsync, rename to `final`, point `latest` at it, prune."""
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                usual_mode(f)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(self.dir / "latest", final.name + "\n")
        for old in sorted(self.dir.glob("step-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def poll(self) -> None:
        """Publish the async save in flight if every process has written it (never blocks)."""
        if self.writer is not None:
            self.writer.poll()

    def close(self) -> None:
        """Wait for the async save in flight and publish it; every process calls it after its last save."""
        if self.writer is not None:
            self.writer.close()
            _barrier(self.world_size)  # `latest` names the last checkpoint before any process goes on


def _nothing() -> None:
    pass


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "state.json").is_file() else None


def load_resume(run_dir: str | Path, config: dict[str, Any], data: dict[str, str], force: bool = False,
                rank: int = 0, world_size: int = 1, method=None) -> Resume:
    """The latest checkpoint of `run_dir`, refused when the recipe or the data changed (unless `force`).

    A sharded checkpoint needs `method` (injected, not yet sharded): its tensors are read into the shapes the
    method has, on any number of processes. A full one resumes on the number of processes that wrote it."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise TunelabError(f"{run_dir}: no complete checkpoint to resume from (checkpoints/latest is missing); "
                           f"start without --resume, or use train.resume=auto to resume only when there is one")
    state = read_state(path)
    sharded = is_sharded(path)
    changes = config_changes(state["config"], config) + data_changes(state["data"], data)
    if state.get("world_size", 1) != world_size and not sharded:
        changes.append(f"world size {state.get('world_size', 1)} -> {world_size} (a full checkpoint resumes on "
                       f"as many processes as wrote it; train.checkpoint_format=sharded ones on any number)")
    if changes and not force:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise TunelabError(f"{path}: cannot resume, the run changed since this checkpoint: {shown}. "
                           f"Restore them, start a new run (another name), or pass --force-resume "
                           f"(train.resume_force=true) to continue anyway")
    rng_file = path / f"rng-rank{rank}.pt"
    resume = Resume(step=state["step"], trainable={}, optimizer={},
                    rng=torch.load(rng_file, weights_only=False) if rng_file.is_file() else None,
                    losses=state["losses"], tokens=state["tokens"], wall_s=state["wall_s"], path=path,
                    evals=state.get("evals", []), total_wall_s=state.get("total_wall_s", state["wall_s"]),
                    peak_memory_mb=state.get("peak_memory_mb", 0.0))
    if sharded:
        resume.trainable, resume.method = load_trainable(path, method), method
    else:
        resume.trainable = load_file(str(path / "trainable.safetensors"))
        resume.optimizer = torch.load(path / "optimizer.pt", weights_only=False)
    return resume


STATE_KEYS = ("step", "config", "data", "losses", "tokens", "wall_s")


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's `state.json`; CheckpointError when `path` is not a complete tunelab checkpoint."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a tunelab checkpoint (state.json: {e}); give a checkpoint directory "
                              f"<run>/checkpoints/step-NNNNNN, or the run directory for its latest") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise CheckpointError(f"{path}/state.json is not a tunelab checkpoint's state (it needs "
                              f"{', '.join(STATE_KEYS)}); give a directory tunelab wrote under <run>/checkpoints/")
    if not (is_sharded(path) or (path / "trainable.safetensors").is_file()):
        raise CheckpointError(f"{path}: the checkpoint has neither {DCP_DIR}/ nor trainable.safetensors; it is "
                              f"incomplete (copied in part?): use another checkpoint of the run")
    return state


def checkpoint_tensors(path: Path, method) -> dict[str, torch.Tensor]:
    """The method's tensors a checkpoint of either format holds, whole, read on one process."""
    if is_sharded(path):
        return load_trainable(path, method)
    return load_file(str(path / "trainable.safetensors"))


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every recipe value that differs (keys in FREE_KEYS are ignored)."""
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if name in FREE_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def data_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """What changed among the data files: added, removed, or different content."""
    out = [f"data file {f} changed" for f in sorted(set(old) & set(new)) if old[f] != new[f]]
    out += [f"data file {f} is new" for f in sorted(set(new) - set(old))]
    out += [f"data file {f} is gone" for f in sorted(set(old) - set(new))]
    return out


def clear_checkpoints(run_dir: str | Path) -> None:
    """Remove a previous run's checkpoints before a fresh (not resumed) run starts."""
    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def prepare_resume(run_dir: str | Path, train_cfg, config: dict[str, Any], data: dict[str, str], method,
                   rank: int = 0, world_size: int = 1) -> tuple[Resume | None, Checkpointer]:
    """Load the checkpoint to resume from (into `method`) as `train.resume` asks, or clear old ones; and a saver."""
    resume = None
    if train_cfg.resume is True or (train_cfg.resume == "auto" and latest_checkpoint(run_dir) is not None):
        resume = load_resume(run_dir, config, data, train_cfg.resume_force, rank, world_size, method)
        method.load_state_dict(resume.trainable)
    elif rank == 0:
        clear_checkpoints(run_dir)
    _barrier(world_size)
    saver = Checkpointer(run_dir, train_cfg.save_every, train_cfg.keep_checkpoints, config, data, rank, world_size,
                         prior_wall_s=resume.total_wall_s if resume else 0.0, fmt=train_cfg.checkpoint_format,
                         mode=train_cfg.checkpoint, method=method)
    return resume, saver


def checkpoint_callback(saver: Checkpointer, method, steps: int, position=None):
    """The loop's `checkpoint(step, optimizer, result)`: save the method's tensors when a checkpoint is due.

    `position(step)` describes the data position for people (epoch, offset, ...); resuming needs only the step.
    """
    def checkpoint(step: int, optimizer: torch.optim.Optimizer, result) -> None:
        saver.poll()  # an async save that has completed is published
        if saver.due(step, step == steps):
            saver.save(step, method.state_dict(), optimizer, result.losses, result.tokens, result.wall_s,
                       position(step) if position else None, result.evals, result.peak_memory_mb)
        if step == steps:
            saver.close()  # the last checkpoint is complete before the run writes its results
    return checkpoint


def begin_events(events, resume: Resume | None, evaluate, world_size: int = 1, **start: Any) -> dict[str, Any]:
    """Write a run's `start` event and its step-0 evaluation, or a `resume` event; return the step-0 metrics.

    A resumed run takes its step-0 metrics from the events the interrupted run wrote (empty when this process
    writes no events). `evaluate` is None when there is nothing held out.
    """
    if resume is None:
        events.write("start", world_size=world_size, **start)
        before = evaluate() if evaluate else {}
        if before:
            events.write("eval", step=0, **before)
        return before
    events.write("resume", step=resume.step, checkpoint=str(resume.path), world_size=world_size)
    path = Path(events.path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []  # not /dev/null
    records = [json.loads(line) for line in lines if line.strip()]
    first = next((e for e in records if e["event"] == "eval" and e["step"] == 0), {})
    return {k: v for k, v in first.items() if k not in ("event", "time", "step")}


def resume_note(resume: Resume | None) -> dict[str, Any]:
    """What a resumed run's summary says about its figures: they include the run before the resume."""
    if resume is None:
        return {}
    return {"resume_note": f"resumed from the checkpoint at step {resume.step}: train_wall_s, total_wall_s and "
                           f"peak_memory_mb include the run before it up to that checkpoint "
                           f"({resume.total_wall_s:.1f}s; the time from that checkpoint to the interruption is not "
                           f"counted); eval_after is the evaluation at the last step"}
