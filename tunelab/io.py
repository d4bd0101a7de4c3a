"""Atomic writes: a killed process never leaves a file or directory that looks complete but is not."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


def ensure_writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """Create `path` if needed and check that files can be written there, else a clear error."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".tunelab-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TunelabError(f"{p}: cannot write to this {what} ({e.strerror or e}); "
                           f"choose a writable location (e.g. out_dir=runs)") from None
    return p


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file via a temporary sibling and a rename."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    _fsync_dir(p.parent)


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write JSON (UTF-8, indented) atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def clear_outputs(run_dir: Path, names: list[str]) -> None:
    """Remove a previous run's results before a new run writes its own, so the two never mix."""
    for name in names:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, marker: str) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path`, on error it is deleted.

    The old `path` (if any) stays in place until the new one is complete, so an interrupted write
    leaves either the old complete directory or nothing, never a partial one under the final name.
    An existing non-empty `path` is only replaced when it holds `marker` (it is an earlier output of
    the same kind), never when it is the working directory or one of its parents.
    """
    final, cwd = Path(path).resolve(), Path.cwd().resolve()
    if final == cwd or final in cwd.parents:
        raise TunelabError(f"{path}: refusing to replace the current directory or a parent of it; "
                           f"give the name of a new directory")
    if final.exists() and not final.is_dir():
        raise TunelabError(f"{path} exists and is a file; give the name of a directory")
    if final.is_dir() and any(final.iterdir()) and not (final / marker).exists():
        raise TunelabError(f"{path} exists and is not an earlier output of this kind (it has no {marker}); "
                           f"refusing to replace it: give the name of a new or empty directory")
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise TunelabError(f"{path}: cannot write here ({e.strerror or e}); choose a writable location") from None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
