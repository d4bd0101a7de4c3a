"""Select records from JSONL/JSON files: a sub-domain slice of a data set (one town's facts, one topic's dialogues).

`select_records(paths, out, ...)` keeps the records whose keys match `where` (every key; a value or a list of
accepted values), that contain one of `contains` (in any string value, messages included) and none of `exclude`,
skips the first `skip` kept records and stops at `limit`; it writes them unchanged, one JSON object a line, or
(`text=True`) as `{"text": ...}` documents (every string value joined by newlines) for perplexity and
pretraining. The pipeline's `data select` stage; the output is written atomically and never touches its inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.data.text import resolve_files
from tunelab.errors import DataError
from tunelab.io import atomic_write_text
from tunelab.outputs import check_outputs


def read_json_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file (one a line) or a .json file (a list of them)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise DataError(f"{path}: a .json data file must hold a list of objects")
        return records
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{n}: not a JSON object ({e}); fix or remove that line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: a record must be a JSON object")
        out.append(record)
    return out


def _strings(value: Any) -> list[str]:
    """Every string inside a value (nested lists and objects too), in order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _matches(record: dict, where: dict[str, Any], contains: list[str], exclude: list[str]) -> bool:
    for key, want in where.items():
        accepted = want if isinstance(want, list) else [want]
        if key not in record or str(record[key]) not in {str(a) for a in accepted}:
            return False
    text = "\n".join(_strings(record))
    if contains and not any(c in text for c in contains):
        return False
    return not any(x in text for x in exclude)


def select_records(paths: list[str | Path], out: str | Path, where: dict[str, Any] | None = None,
                   contains: list[str] = (), exclude: list[str] = (), skip: int = 0, limit: int | None = None,
                   text: bool = False) -> dict[str, Any]:
    """Write the selected records of `paths` to `out` (.jsonl); returns the counts and the output path."""
    check_outputs([out], {"data": paths})
    files = [f for p in paths for f in resolve_files(p) if f.suffix in (".jsonl", ".json")]
    records = [r for f in files for r in read_json_records(f)]
    kept = [r for r in records if _matches(r, where or {}, list(contains), list(exclude))]
    kept = kept[skip:]
    kept = kept[:limit] if limit is not None else kept
    if not kept:
        raise DataError(f"{', '.join(map(str, paths))}: no record is selected (of {len(records)} read) by "
                        f"where={where or {}}, contains={list(contains)}, exclude={list(exclude)}, skip={skip}; "
                        f"loosen the selection")
    rows = [{"text": "\n".join(_strings(r))} if text else r for r in kept]
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"path": str(out), "read": len(records), "selected": len(kept), "files": [str(f) for f in files]}
