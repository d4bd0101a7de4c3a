"""Run one function over many shards: in this process, a local process pool (`workers`), or Ray.

The function takes a plain dict (a shard's task) and returns a plain dict (its stats). Results arrive as shards
finish (for the progress bar); the first error stops the run with that error (the shards already written stay,
and a rerun resumes from them). On Ray, the tasks are a Ray Dataset mapped with the same function, one row per
shard, so the shards are read and written where Ray schedules them (`address`: an existing cluster, e.g.
"auto" or "ray://head:10001"; none: a local Ray started for this run).
"""

from __future__ import annotations

import json
import multiprocessing
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
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
            self._ray_started = True

    def _ray_map(self, fn: Callable[[Task], dict], tasks: list[Task]) -> Iterator[dict]:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
        concurrency = min(self.workers, len(tasks)) if self.address is None else None
        try:
            for row in ds.map(_RowFn(fn), concurrency=concurrency, num_cpus=1).iter_rows():
                yield json.loads(row["result"])
        except Exception as e:
            cause = _tunelab_cause(e)
            if cause is not None:
                raise cause from None
            raise


class _RowFn:
    """A Ray Data row mapper: the task travels as JSON (one string column), so rows have one fixed schema."""

    def __init__(self, fn: Callable[[Task], dict]):
        self.fn = fn

    def __call__(self, row: dict) -> dict:
        return {"result": json.dumps(self.fn(json.loads(row["task"])))}


def _tunelab_cause(e: BaseException) -> BaseException | None:
    """The TunelabError a Ray task raised, unwrapped from Ray's exception types (so the CLI prints one line)."""
    from tunelab.errors import TunelabError

    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, TunelabError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return None
