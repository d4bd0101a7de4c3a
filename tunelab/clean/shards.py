"""The run directory of `data clean` / `data dedup`: output rule, resume state, shard names and completion.

A run writes `data/part-NNNNN.jsonl` (one per input shard), `report.json`, `report.html` and keeps its working
files in `work/`. `work/state.json` holds the recipe and the inputs' sizes and modification times: a rerun with the
same holds resumes (a shard is done when its stats file exists; every file is written to a temporary name and
renamed, so a killed run never leaves a shard that looks complete), a rerun with anything changed starts over.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.clean.report import problem
from tunelab.errors import ConfigError, DataError
from tunelab.io import atomic_write_json, clear_outputs
from tunelab.outputs import check_outputs, check_run_dir, open_run_dir

ON_ERROR = ("skip", "stop")


def shard_name(i: int) -> str:
    return f"part-{i:05d}"


def fingerprint(files: list[Path]) -> list[list]:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def prepare_run(out: Path, kind: str, entries: list[str], inputs: list, recipe: str | Path | None,
                state: dict[str, Any]) -> bool:
    """Check the output rule, open `out` and decide: True to resume (same state), False after starting afresh."""
    check_outputs([out], {"data": inputs, "recipe": recipe})  # the whole directory: it is cleared on a new start
    check_run_dir(out, kind, entries + ["work"], {"data": inputs, "recipe": recipe})
    open_run_dir(out, kind)
    state_file = out / "work" / "state.json"
    try:
        old = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if old == state:
        return True
    clear_outputs(out, entries + ["work"])
    for d in ("work", "data"):
        (out / d).mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_file, state)
    return False


def read_done(path: Path) -> dict | None:
    """A finished shard's stats, or None when the shard has not finished."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ConfigError(f"--on-error {on_error!r}: unknown; use skip (count and skip bad lines) or stop")


def problem_handler(tally: dict, on_error: str) -> Callable[[str, str], None]:
    """What a reader calls on a bad line: stop with that line, or count it (and keep the message) and go on."""
    def on_problem(kind: str, message: str) -> None:
        if on_error == "stop":
            raise DataError(f"{message} (--on-error skip skips such lines and counts them in the report)")
        problem(tally, kind, message)
    return on_problem
