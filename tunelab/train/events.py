"""The run's event stream (`events.jsonl`, always written) and its live view on a terminal."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class EventLog:
    """Append-only JSONL: one object per line with `event`, `time` and fields, flushed at each write."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self._f = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """All events of a run, in order."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class LiveView:
    """A progress bar on a terminal; on a pipe or file, one plain line every `log_every` steps."""

    def __init__(self, total: int, log_every: int, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True, quiet=quiet)  # quiet: the other processes of torchrun
        self.total, self.log_every = total, log_every
        self.bar: Progress | None = None
        if self.console.is_terminal:
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("train", total=total, info="")

    def __enter__(self) -> LiveView:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, eta_s: float) -> None:
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
        if self.bar:
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.log_every == 0 or step == self.total:
            self.console.print(f"step {step}/{self.total}  {info}  eta {eta_s:.0f}s", highlight=False)
            sys.stderr.flush()

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)
