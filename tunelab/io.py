"""Atomic writes: a killed process never leaves a file or directory that looks complete but is not."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


def usual_mode(path: str | Path) -> None:
    """Give a file the permissions `open()` gives new files under the umask (0644 under umask 022).

    safetensors writes its files through a private temporary file, so they come out 0600, unlike every other
    file of a model or adapter directory.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


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


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """An open file (text "w" or binary "wb") that appears under `path` only once closed without error."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
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
def atomic_dir(path: str | Path, kind: str, inputs: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path`, on error it is deleted.

    The old `path` (if any) stays in place until the new one is complete, so an interrupted write
    leaves either the old complete directory or nothing, never a partial one under the final name.
    The output rule of `tunelab.outputs` applies: `path` may not be, contain or lie inside any of
    `inputs`, and an existing non-empty `path` is only replaced when tunelab marked it as a `kind`.
    """
    from tunelab.outputs import check_outputs, check_replaceable, write_marker

    check_outputs([path], inputs or {})
    check_replaceable(path, kind)
    final = Path(path).resolve()
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise TunelabError(f"{path}: cannot write here ({e.strerror or e}); choose a writable location") from None
    try:
        yield tmp
        write_marker(tmp, kind)
        for f in tmp.rglob("*"):
            if f.is_file():
                usual_mode(f)
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
