"""Run one function over many shards: in this process, a local process pool (`workers`), or Ray.

The function takes a plain dict (a shard's task) and returns a plain dict (its stats). Results arrive as shards
finish (for the progress bar); the first error stops the run with that error (the shards already written stay,
and a rerun resumes from them). On Ray, the tasks are a Ray Dataset mapped with the same function, one row per
shard, so the shards are read and written where Ray schedules them (`address`: an existing cluster, e.g.
"auto" or "ray://head:10001"; none: a local Ray started for this run).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any

from tunelab.errors import ConfigError

Task = dict[str, Any]
ENGINES = ("local", "ray")


class Engine:
    """Where shard tasks run; a context manager that starts the pool (or Ray) once for all of a run's stages."""

    def __init__(self, engine: str = "local", workers: int = 1, address: str | None = None):
        if engine not in ENGINES:
            raise ConfigError(f"--engine {engine!r}: unknown; use local (a process pool) or ray")
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1 (got {workers})")
        self.engine, self.workers, self.address = engine, workers, address
        self._pool: ProcessPoolExecutor | None = None
        self._ray_started = False

    def __enter__(self) -> Engine:
        if self.engine == "ray":
            self._start_ray()
        elif self.workers > 1:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._ray_started:
            import ray

            ray.shutdown()

    def map(self, fn: Callable[[Task], dict], tasks: list[Task]) -> Iterator[dict]:
        """`fn(task)` for every task; yields each result as its shard finishes (order not kept)."""
        if not tasks:
            return
        if self.engine == "ray":
            yield from self._ray_map(fn, tasks)
        elif self._pool is None or len(tasks) == 1:
            for t in tasks:
                yield fn(t)
        else:
            pending = {self._pool.submit(fn, t) for t in tasks}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for f in done:
                        yield f.result()
            finally:
                for f in pending:
                    f.cancel()

    def _start_ray(self) -> None:
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError:
            raise ConfigError("--engine ray needs Ray Data: pip install 'tunelab[ray]' (or pip install 'ray[data]')"
                              ) from None
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": self.address} if self.address else {"num_cpus": self.workers}
            os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, **kwargs)
            for name in ("ray", "ray.data"):
                logging.getLogger(name).setLevel(logging.ERROR)
            self._ray_started = True

    def _ray_map(self, fn: Callable[[Task], dict], tasks: list[Task]) -> Iterator[dict]:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # tunelab draws its own bar, per shard
        ctx.print_on_execution_start = False
        ctx.enable_auto_log_stats = False
        ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
        compute = ray.data.TaskPoolStrategy(size=min(self.workers, len(tasks))) if self.address is None else None
        for row in ds.map(_RowFn(fn), compute=compute, num_cpus=1).iter_rows():
            if row["error"]:
                raise _error(*json.loads(row["error"]))
            yield json.loads(row["result"])


class _RowFn:
    """A Ray Data row mapper: the task travels as JSON (one string column), so rows have one fixed schema."""

    def __init__(self, fn: Callable[[Task], dict]):
        self.fn = fn

    def __call__(self, row: dict) -> dict:
        from tunelab.errors import TunelabError

        try:
            return {"result": json.dumps(self.fn(json.loads(row["task"]))), "error": ""}
        except TunelabError as e:  # a user's error travels back as data: one line on the driver, no Ray traceback
            return {"result": "", "error": json.dumps([type(e).__module__, type(e).__name__, str(e)])}


def _error(module: str, name: str, message: str) -> Exception:
    """The TunelabError a shard task raised on a Ray worker, made again on the driver."""
    import importlib

    from tunelab.errors import TunelabError

    cls = getattr(importlib.import_module(module), name, TunelabError)
    return cls(message) if isinstance(cls, type) and issubclass(cls, TunelabError) else TunelabError(message)
