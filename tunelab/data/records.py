"""Instruction and chat records (Alpaca, OpenAI messages, ShareGPT, plain text) → `Example`s.

Sources: a file, a directory (every supported file inside, sorted) or a glob, in `.jsonl` (one record a
line), `.json` (a list of records), `.csv` (a header row; a `messages` / `conversations` cell holds a JSON
list) or `.parquet` (needs `pyarrow`). Every `Example` remembers where it came from (`path:line` for JSONL
and CSV, `path[i]` for a JSON list or a Parquet row), and every error names that place and the fix.

Formats, detected per record by its keys (first match wins) unless `fmt` names one:

- `messages`: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}]}`.
- `sharegpt`: `{"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"chatgpt"|"system", "value": str}]}`.
- `alpaca`: `{"instruction", "input"?, "output"}` → user = instruction + "\\n\\n" + input (when non-empty),
  assistant = output.
- `seed`: a Self-Instruct / Alpaca seed task, `{"instruction", "instances": [{"input", "output"}, ...]}` → one
  Alpaca-style example from its first instance.
- `text`: `{"text": str}`, a plain document trained on every token.

All chat formats take an optional top-level `system` string (a system turn put first). Other keys
(`id`, `task`, ...) are ignored. One file holds one format: a record whose format differs from the
file's first record is an error. Tool turns are not supported (an error says so).

Policies:
- Consecutive turns of one role (real data has them, e.g. 341 of CPsyCounD's 3,084 dialogues):
  `same_role="merge"` (default) joins them into one turn, contents joined with "\\n";
  `same_role="error"` stops at the record, naming its line and the turn's index in the record's list
  (from 0).
- A system turn is only allowed first. Empty content strings are kept (they are valid text); content that
  is not a string is an error. A chat without an assistant turn is read; it has nothing to train on under
  `train_on="assistant"`, which lint reports.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunelab.data.text import read_text_file
from tunelab.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
FORMATS = ("alpaca", "messages", "sharegpt", "seed", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
UNSUPPORTED_ROLES = ("tool", "function", "function_call", "observation", "ipython")
JSON_COLUMNS = ("messages", "conversations")  # CSV cells that hold a JSON list


@dataclass
class Example:
    """One training example: a chat (`messages`) or a plain document (`text`), and where it came from."""

    messages: list[dict[str, str]] | None
    text: str | None
    where: str


def read_examples(path: str | Path, fmt: str = "auto", same_role: str = "merge") -> list[Example]:
    """Every example of a file, directory or glob, in file order; `fmt` "auto" detects each file's format."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"format {fmt!r}: unknown; use one of auto, {', '.join(FORMATS)}")
    if same_role not in ("merge", "error"):
        raise DataError(f"same_role {same_role!r}: unknown; use merge or error")
    examples: list[Example] = []
    for f in _resolve_files(path):
        file_fmt = None
        n = 0
        for record, where in _records(f):
            n += 1
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object (a record), got {type(record).__name__}")
            this = fmt if fmt != "auto" else detect_format(record, where)
            if file_fmt is None:
                file_fmt = this
            elif this != file_fmt:
                raise DataError(f"{where}: a {this} record in a file of {file_fmt} records (from its first record); "
                                f"keep one format per file, or set the format explicitly")
            examples.append(_to_example(record, this, where, same_role))
        if n == 0:
            raise DataError(f"{f}: empty file (no records); remove it or add records")
    return examples


def detect_format(record: dict, where: str) -> str:
    """The format a record's keys say: messages > conversations (ShareGPT) > instruction+output (Alpaca) >
    instruction+instances (a seed task) > text."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "instruction" in record and "instances" in record:
        return "seed"
    if "text" in record:
        return "text"
    raise DataError(f"{where}: cannot tell the record's format from its keys ({_keys(record)}); expected "
                    f"'messages', 'conversations', 'instruction' + 'output', or 'text'")


# ---------------------------------------------------------------------------------------------- files

def _resolve_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{p}: directory holds no {', '.join(SUFFIXES)} files")
        return files
    files = [p] if p.is_file() else sorted(Path(m) for m in glob.glob(str(path), recursive=True)
                                           if Path(m).is_file())
    if not files:
        raise DataError(f"{path}: no such file, directory or glob match; check the path "
                        f"(relative paths are relative to {Path.cwd()})")
    for f in files:
        if f.suffix not in SUFFIXES:
            raise DataError(f"{f}: unsupported file type {f.suffix or '(none)'}; use {', '.join(SUFFIXES)}")
    return files


def _records(f: Path) -> Iterator[tuple[object, str]]:
    """(record, where) for every record of a file."""
    if f.suffix == ".parquet":
        yield from _parquet_records(f)
        return
    text = read_text_file(f)
    if f.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield _parse_json(line, f"{f}:{n}"), f"{f}:{n}"
    elif f.suffix == ".json":
        if not text.strip():
            return
        data = _parse_json(text, str(f), hint="; a file of one JSON object per line must be named .jsonl")
        if not isinstance(data, list):
            raise DataError(f"{f}: expected a JSON list of records, got a {type(data).__name__}; "
                            f"a file of one JSON object per line must be named .jsonl")
        for i, record in enumerate(data):
            yield record, f"{f}[{i}]"
    else:
        yield from _csv_records(f, text)


def _csv_records(f: Path, text: str) -> Iterator[tuple[dict, str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num  # a quoted cell can span lines: name the row's first line
            where = f"{f}:{start}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} cells but the header has {len(header)}; "
                                f"quote cells that contain commas or newlines")
            record: dict[str, object] = dict(zip(header, row))
            for col in JSON_COLUMNS:
                if col in record:
                    record[col] = _parse_json(record[col], where, hint=f" in column '{col}'")
            yield record, where
    except csv.Error as e:
        raise DataError(f"{f}:{reader.line_num}: malformed CSV ({e})") from None


def _parquet_records(f: Path) -> Iterator[tuple[dict, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{f}: reading .parquet needs pyarrow; `pip install pyarrow`, "
                        f"or convert the file to .jsonl") from None
    try:
        rows = pq.read_table(f).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{f}: cannot read as Parquet ({e})") from None
    for i, row in enumerate(rows):
        yield row, f"{f}[{i}]"


def _parse_json(text: str, where: str, hint: str = "") -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno}){hint}") from None


# -------------------------------------------------------------------------------------------- records

def _to_example(record: dict, fmt: str, where: str, same_role: str) -> Example:
    if fmt == "text":
        text = _require(record, "text", fmt, where)
        if not text.strip():
            raise DataError(f"{where}: empty 'text'; remove the record")
        return Example(messages=None, text=text, where=where)
    if fmt == "seed":
        instances = record.get("instances")
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise DataError(f"{where}: a seed task needs 'instances': a non-empty list of {{\"input\", \"output\"}}")
        record = {"instruction": record.get("instruction"), **instances[0]}
        fmt = "alpaca"
    if fmt == "alpaca":
        instruction, output = _require(record, "instruction", fmt, where), _require(record, "output", fmt, where)
        extra = _optional_str(record, "input", where)
        user = "\n\n".join(part for part in (instruction, extra) if part)
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif fmt == "messages":
        turns = [_message(m, where, i) for i, m in enumerate(_turn_list(record, "messages", fmt, where))]
    else:
        turns = [_sharegpt_turn(t, where, i) for i, t in enumerate(_turn_list(record, "conversations", fmt, where))]
    turns = _check_roles(turns, where, same_role)
    system = _optional_str(record, "system", where)
    if system:
        if turns[0]["role"] == "system":
            raise DataError(f"{where}: both a top-level 'system' and a system turn; keep one of them")
        turns.insert(0, {"role": "system", "content": system})
    return Example(messages=turns, text=None, where=where)


def _require(record: dict, key: str, fmt: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: a {fmt} record needs '{key}' (found keys: {_keys(record)}); "
                        f"fix the record or set the right format")
    return _string(record[key], where, f"'{key}'")


def _optional_str(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    return "" if value is None else _string(value, where, f"'{key}'")


def _string(value: object, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def _turn_list(record: dict, key: str, fmt: str, where: str) -> list:
    if key not in record:
        raise DataError(f"{where}: a {fmt} record needs '{key}' (found keys: {_keys(record)}); "
                        f"fix the record or set the right format")
    turns = record[key]
    if not isinstance(turns, list):
        raise DataError(f"{where}: '{key}' must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise DataError(f"{where}: '{key}' is empty; remove the record or add turns")
    return turns


def _message(m: object, where: str, i: int) -> dict[str, str]:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
    role = m["role"]
    if role in UNSUPPORTED_ROLES:
        raise DataError(f"{where}: messages[{i}] has role {role!r}: tool and function turns are not supported; "
                        f"remove them or fold them into the surrounding turns")
    if role not in ROLES:
        raise DataError(f"{where}: messages[{i}] has unknown role {role!r}; use one of {', '.join(ROLES)}")
    return {"role": role, "content": _string(m["content"], where, f"messages[{i}].content")}


def _sharegpt_turn(t: object, where: str, i: int) -> dict[str, str]:
    if not isinstance(t, dict) or "from" not in t or "value" not in t:
        raise DataError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
    who = t["from"]
    if who in UNSUPPORTED_ROLES:
        raise DataError(f"{where}: conversations[{i}] is from {who!r}: tool and function turns are not "
                        f"supported; remove them or fold them into the surrounding turns")
    if who not in SHAREGPT_ROLES:
        raise DataError(f"{where}: conversations[{i}] is from unknown {who!r}; use one of "
                        f"{', '.join(SHAREGPT_ROLES)}")
    return {"role": SHAREGPT_ROLES[who], "content": _string(t["value"], where, f"conversations[{i}].value")}


def _check_roles(turns: list[dict[str, str]], where: str, same_role: str) -> list[dict[str, str]]:
    """Apply the same-role policy and check that a system turn comes only first."""
    out: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if out and out[-1]["role"] == turn["role"]:
            if same_role == "error":
                raise DataError(f"{where}: turn {i} is a second consecutive {turn['role']} turn; merge the two "
                                f"turns in the data or set same_role: merge")
            out[-1] = {"role": turn["role"], "content": out[-1]["content"] + "\n" + turn["content"]}
        elif turn["role"] == "system" and out:
            raise DataError(f"{where}: turn {i} is a system turn after turn 0; a system turn is only allowed "
                            f"first; move it to the start or drop it")
        else:
            out.append(dict(turn))
    return out


def _keys(record: dict) -> str:
    return ", ".join(map(str, record)) or "none"
