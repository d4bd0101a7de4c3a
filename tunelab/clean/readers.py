"""Stream documents from .jsonl, .jsonl.gz, .parquet and .txt shards, one record at a time.

Each input file is one shard. A bad line (invalid UTF-8, invalid JSON, not an object, no text under the key), an
empty file or a gzip stream cut short is a `Problem` naming the file and line: under `on_error="stop"` it raises a
`DataError` with that line; under `"skip"` it is counted and reading goes on (a cut gzip stream ends its shard).
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tunelab.data.text import is_cleaned_output
from tunelab.errors import DataError

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".txt")
OnProblem = Callable[[str, str], None]  # (kind, message)


def shard_suffix(p: Path) -> str | None:
    name = p.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def resolve_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files, directories (every supported file under them, sorted) and globs, in the order given, each once."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            if shard_suffix(p) is None:
                raise DataError(f"{p}: unsupported file type; give .jsonl, .jsonl.gz, .parquet or .txt files")
            found = [p]
        elif p.is_dir() and is_cleaned_output(p):  # an earlier clean/dedup output: its shards, not its reports
            found = sorted((p / "data").glob("part-*.jsonl"))
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and shard_suffix(f) and not _hidden(f, p))
            if not found:
                raise DataError(f"{p}: directory holds no .jsonl, .jsonl.gz, .parquet or .txt files")
        else:
            found = sorted(Path(m) for m in glob.glob(str(item), recursive=True)
                           if Path(m).is_file() and shard_suffix(Path(m)))
            if not found:
                raise DataError(f"{item}: no such file, directory or glob match; check the path "
                                f"(relative paths are relative to {Path.cwd()})")
        out.extend(f for f in found if f not in out)
    if not out:
        raise DataError("no input files given")
    return out


def _hidden(f: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in f.relative_to(root).parts)


def read_shard(path: Path, text_key: str, problem: OnProblem) -> Iterator[tuple[dict[str, Any], int]]:
    """(record, line or row number from 1) for every usable document of one shard; problems go to `problem`."""
    suffix = shard_suffix(path)
    n = 0
    try:
        if suffix == ".parquet":
            reader = _parquet(path, text_key, problem)
        elif suffix == ".txt":
            reader = _txt(path, problem)
        else:
            reader = _jsonl(path, text_key, problem, gz=suffix == ".jsonl.gz")
        for item in reader:
            n += 1
            yield item
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if n == 0:
        problem("empty file", f"{path}: no documents (the file is empty or holds only blank lines)")


def _lines(path: Path, gz: bool, problem: OnProblem) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if gz else open
    n = 0
    with opener(path, "rb") as f:
        try:
            for n, raw in enumerate(f, 1):  # noqa: B007 (n is used after the loop)
                yield n, raw
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            problem("truncated gzip", f"{path}:{n + 1}: gzip stream cut short or corrupt ({e}); the lines "
                                      f"before it are kept (re-download or re-compress the file)")


def _decode(raw: bytes, where: str, problem: OnProblem) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problem("invalid utf-8", f"{where}: not UTF-8 (byte {e.start} of the line); convert the file to UTF-8")
        return None


def _jsonl(path: Path, text_key: str, problem: OnProblem, gz: bool) -> Iterator[tuple[dict, int]]:
    for n, raw in _lines(path, gz, problem):
        where = f"{path}:{n}"
        line = _decode(raw, where, problem)
        if line is None or not line.strip():
            continue
        if n == 1:
            line = line.removeprefix("\ufeff")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problem("invalid json", f"{where}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not _has_text(record, text_key, where, problem):
            continue
        yield record, n


def _has_text(record: Any, text_key: str, where: str, problem: OnProblem) -> bool:
    if not isinstance(record, dict):
        problem("not an object", f"{where}: expected a JSON object with '{text_key}', got {type(record).__name__}")
        return False
    if not isinstance(record.get(text_key), str):
        keys = ", ".join(map(str, record)) or "none"
        if text_key in record:  # present but null, a number, a list...
            got = f"'{text_key}' holds {_kind(record[text_key])}, not a string"
        else:
            got = f"no key '{text_key}' holding a string"
        problem("missing text", f"{where}: {got} (keys: {keys}); pass --text-key (text_key=...) naming the key "
                                f"that holds the text")
        return False
    return True


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})"


def _txt(path: Path, problem: OnProblem) -> Iterator[tuple[dict, int]]:
    """Documents separated by blank lines (as tunelab pretrain reads .txt); the number is the first line's."""
    buf: list[str] = []
    start = 0
    for n, raw in _lines(path, False, problem):
        line = _decode(raw, f"{path}:{n}", problem)
        if line is None:
            continue
        if n == 1:
            line = line.removeprefix("\ufeff")
        if line.strip():
            if not buf:
                start = n
            buf.append(line.rstrip("\r\n"))
        elif buf:
            yield {"text": "\n".join(buf)}, start
            buf = []
    if buf:
        yield {"text": "\n".join(buf)}, start


def _parquet(path: Path, text_key: str, problem: OnProblem) -> Iterator[tuple[dict, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid (not a TunelabError) for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if text_key not in pf.schema_arrow.names:
        problem("missing text", f"{path}: no column '{text_key}' (columns: {', '.join(pf.schema_arrow.names)}); "
                                f"pass --text-key naming the column that holds the text")
        return
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            n += 1
            if _has_text(record, text_key, f"{path}[row {n}]", problem):
                yield record, n
