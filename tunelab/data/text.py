"""Plain-text documents from .txt, .jsonl and .json files, with errors that name the file and line."""

from __future__ import annotations

import glob
import json
from pathlib import Path

from tunelab.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
# formats other readers take (data clean: .jsonl.gz, .parquet; finetune: .csv) that are not plain text here
NOT_TEXT_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip", ".parquet", ".arrow", ".csv")


def resolve_files(path: str | Path) -> list[Path]:
    """A file, every .txt/.jsonl/.json file under a directory (sorted), or the files matching a glob.

    The output directory of `tunelab data clean` / `data dedup` stands for its shards (data/part-*.jsonl), not its
    reports."""
    p = Path(path)
    if p.is_file():
        return [_text_file(p)]
    if p.is_dir() and is_cleaned_output(p):
        return sorted((p / "data").glob("part-*.jsonl"))
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{p}: directory holds no .txt, .jsonl or .json files")
        return files
    matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True) if Path(m).is_file())
    if not matches:
        raise DataError(f"{path}: no such file, directory or glob match; check the path "
                        f"(relative paths are relative to {Path.cwd()})")
    return [_text_file(m) for m in matches]


def _text_file(f: Path) -> Path:
    """`f`, unless its suffix names a compressed or columnar format (which would be read as garbled text)."""
    if f.suffix.lower() in NOT_TEXT_SUFFIXES:
        raise DataError(f"{f}: unsupported file type {f.suffix!r} here; give .txt (documents separated by blank "
                        f"lines), .jsonl or .json files, or a `tunelab data clean` output directory (data clean "
                        f"reads .jsonl.gz and .parquet)")
    return f


def is_cleaned_output(p: Path) -> bool:
    """A directory `tunelab data clean` or `data dedup` wrote: its documents are the shards in data/."""
    from tunelab.outputs import read_marker

    marker = read_marker(p)
    return marker is not None and marker.get("kind") in ("cleaned data", "deduplicated data")


def read_documents(path: str | Path, text_key: str = "text") -> list[str]:
    """All documents of a source, in file order.

    `.txt`: documents are separated by one or more blank lines. `.jsonl`: one JSON object per line with
    the text under `text_key`. `.json`: a list of strings or of objects with `text_key`.
    """
    docs: list[str] = []
    for f in resolve_files(path):
        docs.extend(_read_file(f, text_key))
    if not docs:
        raise DataError(f"{path}: no documents found (the file is empty or holds only blank text)")
    return docs


def _read_file(f: Path, text_key: str) -> list[str]:
    text = read_text_file(f)
    if f.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                docs.append(_text_of(_parse_json(line, f"{f}:{n}"), text_key, f"{f}:{n}"))
        return [d for d in docs if d.strip()]
    if f.suffix == ".json":
        data = _parse_json(text, str(f))
        if not isinstance(data, list):
            raise DataError(f"{f}: expected a JSON list of documents (strings or objects with '{text_key}')")
        docs = [_text_of(item, text_key, f"{f}[{i}]") for i, item in enumerate(data)]
        return [d for d in docs if d.strip()]
    paragraphs = text.replace("\r\n", "\n").split("\n\n")
    return [p.strip("\n") for p in paragraphs if p.strip()]


def _parse_json(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def _text_of(item: object, text_key: str, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get(text_key), str):
        return item[text_key]
    keys = ", ".join(item) if isinstance(item, dict) else type(item).__name__
    raise DataError(f"{where}: no text under key '{text_key}' (found: {keys}); "
                    f"set the source's text_key to the key that holds the text")


def read_text_file(f: Path) -> str:
    """The file's text (UTF-8, a byte-order mark ignored), or a DataError naming it and the fix."""
    try:
        return f.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{f}: not UTF-8 text (byte {e.start}); convert the file to UTF-8") from None
    except OSError as e:
        raise DataError(f"{f}: cannot read ({e.strerror or e})") from None


def bos_ids(tokenizer) -> list[int]:
    """The ids the tokenizer's own rule puts before every text: [BOS] when its `add_special_tokens=True` encoding
    starts with its BOS token (Gemma's `<bos>`, Llama-3's `<|begin_of_text|>`), else [] (GPT-2-style and tunelab's
    own tokenizers; SmolLM2, whose `bos_token` is `<|im_start|>` but which adds nothing)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else []


def with_bos(ids: list[int], bos: list[int]) -> list[int]:
    """`ids` started with `bos` (from `bos_ids`), unless they already start with it: a chat template that renders
    `{{ bos_token }}` as text gives a BOS token of its own, which must not be doubled."""
    return list(ids) if ids[:len(bos)] == bos else bos + list(ids)
