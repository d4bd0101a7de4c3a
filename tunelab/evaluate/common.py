"""Small helpers the evaluation tasks share: context length, device, JSONL records, progress callbacks."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from tunelab.errors import DataError, ModelError

Progress = Callable[[int, int], None]  # (done, total), called as work advances
DEFAULT_CONTEXT = 2048  # for configs that do not state their positions


def context_length(model, override: int | None = None) -> int:
    """Tokens the model can attend to: `override` if given (never more than the model's positions)."""
    limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
    if override is not None and override > limit:
        raise ModelError(f"max_length {override} exceeds the model's {limit} positions "
                         f"(config.max_position_embeddings); use at most {limit}")
    return override or limit


def device_of(model) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def read_records(path: str | Path) -> list[tuple[dict, str]]:
    """(record, "file:line") for each object of a .jsonl file (or of a .json list), with clear errors."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found; give a .jsonl (one JSON object a line) or .json (a list) file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start}); convert the file to UTF-8") from None
    if p.suffix == ".json":
        data = _parse(text, str(p))
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of objects")
        items = [(r, f"{p}[{i}]") for i, r in enumerate(data)]
    else:
        items = [(_parse(line, f"{p}:{n}"), f"{p}:{n}") for n, line in enumerate(text.splitlines(), 1)
                 if line.strip()]
    for record, where in items:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if not items:
        raise DataError(f"{p}: no records (the file is empty)")
    return items


def _parse(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def wilson(hits: int, n: int, z: float = 1.96) -> list[float] | None:
    """Wilson score interval (95% by default) of a binomial proportion hits / n, as [low, high]; None when n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is sound for small n and for 0% or 100%."""
    if n <= 0:
        return None
    p, z2 = hits / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)]
