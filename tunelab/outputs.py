"""Output safety: the one rule every command that writes follows, so that no command destroys a user's work.

1. An output location (a file or directory a command writes, replaces or removes) may never be, contain, or lie
   inside any input of the same command: model, base, adapter, tokenizer, data, recipe.
2. An existing directory is replaced (or, for a run directory, reused) only when it is this command's own earlier
   output of the same kind, identified by the marker file `.tunelab-output.json` the command wrote into it, never
   by the files it happens to hold. An empty directory may be used.

Refusals are `OutputError`s that name both paths; the CLI prints them on one line and exits 2. A run directory's
output locations are the entries the stage writes or removes there (`model/`, `adapter/`, `summary.json`,
`checkpoints/`, ...), so a recipe or data file a user keeps beside them (as the demo keeps its evaluation recipe
in `eval/`) is allowed, while a base model at `runs/<name>/model` is not.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

MARKER = ".tunelab-output.json"

PathLike = str | Path
Inputs = Mapping[str, PathLike | Iterable[PathLike] | None]


class OutputError(TunelabError):
    """An output would overwrite, delete or nest inside an input, or replace something tunelab did not write."""


def _paths(value: PathLike | Iterable[PathLike] | None) -> list[Path]:
    """The concrete paths an input names: a path, a list of them, or globs (expanded as the readers expand them)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str | Path) else list(value)
    out: list[Path] = []
    for item in items:
        if item is None or str(item) == "":
            continue
        text = str(item)
        matches = glob.glob(text, recursive=True) if glob.has_magic(text) else [text]
        out.extend(Path(m) for m in matches)
    return out


def _resolve(p: PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p)))).resolve()


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "lies inside"
    if out in inp.parents:
        return "contains"
    return None


def check_outputs(outputs: Iterable[PathLike], inputs: Inputs) -> None:
    """Refuse (an `OutputError` naming both paths) when an output is, contains or lies inside an input."""
    resolved_inputs = [(kind, p, _resolve(p)) for kind, value in inputs.items() for p in _paths(value)]
    for out in outputs:
        r_out = _resolve(out)
        for kind, given, r_in in resolved_inputs:
            rel = _relation(r_out, r_in)
            if rel:
                raise OutputError(f"refusing to write {out}: it {rel} the {kind} {given}, an input of this "
                                  f"command, which would be overwritten or deleted; choose an output outside it "
                                  f"(e.g. --out / name= another directory)")


def read_marker(directory: PathLike) -> dict[str, Any] | None:
    """The marker tunelab wrote into `directory`, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(directory: PathLike, kind: str) -> None:
    """Mark `directory` as tunelab's output of `kind` (written atomically)."""
    from tunelab import __version__
    from tunelab.io import atomic_write_json

    atomic_write_json(Path(directory) / MARKER, {"kind": kind, "tunelab": __version__})


def check_replaceable(directory: PathLike, kind: str) -> None:
    """Refuse unless `directory` is absent (and can be created), empty, or tunelab's own earlier output of `kind`."""
    d = Path(directory)
    final, cwd = _resolve(d), Path.cwd().resolve()
    if final == cwd or final in cwd.parents:
        raise OutputError(f"{d}: refusing to write into the current directory or a parent of it; "
                          f"give the name of a new directory")
    if d.exists() and not d.is_dir():
        raise OutputError(f"{d} exists and is a file; give the name of a directory")
    if not d.is_dir():
        _check_creatable(d, kind)
        return
    if not any(d.iterdir()):
        return
    marker = read_marker(d)
    if marker is None:
        raise OutputError(f"{d} exists and was not written by tunelab as {_a(kind)} (it has no {MARKER}); "
                          f"refusing to replace it: give the name of a new or empty directory")
    if marker.get("kind") != kind:
        raise OutputError(f"{d} is a tunelab {marker.get('kind')}, not {_a(kind)}; refusing to replace it: "
                          f"give the name of a new or empty directory")


def _a(kind: str) -> str:
    """`kind` with its indefinite article: "a model", "an adapter", "cleaned data" (a mass noun takes none)."""
    if kind.endswith(" data"):
        return kind
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


def _check_creatable(directory: Path, what: str) -> None:
    """The nearest existing ancestor of `directory` must be a writable directory."""
    p = _resolve(directory)
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"{directory}: cannot write this {what} here ({p} is not a writable directory); "
                          f"choose a writable location (e.g. out_dir=runs)")


def check_run_dir(run_dir: PathLike, kind: str, entries: Iterable[str], inputs: Inputs) -> Path:
    """Check that a stage may use `run_dir` (absent, empty or its own earlier run of `kind`) and that none of
    the entries it writes or removes there touches an input. Creates nothing: call `open_run_dir` to start."""
    d = Path(run_dir)
    check_outputs([d / e for e in entries], inputs)
    check_replaceable(d, kind)
    return d


def open_run_dir(run_dir: PathLike, kind: str) -> Path:
    """Create `run_dir` (checked by `check_run_dir`) and mark it as a `kind` run."""
    d = Path(run_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        if read_marker(d) is None:
            write_marker(d, kind)
    except OSError as e:
        raise OutputError(f"{d}: cannot write to this {kind} directory ({e.strerror or e}); "
                          f"choose a writable location (e.g. out_dir=runs)") from None
    return d
