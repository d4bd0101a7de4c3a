"""Lint encoded SFT data before training: lengths, truncation, examples with nothing to learn, duplicates, leakage.

Duplicates and train/eval overlap are exact matches of the normalised example (roles and contents with
runs of whitespace collapsed) when the `Example`s are given, else of the encoded ids and labels. A
duplicate is counted once per repeat (three copies: two duplicates) and listed as a pair of `where`s
(first occurrence, repeat); an overlap pair is (eval `where`, train `where`). Length percentiles use the
token counts before truncation (nearest rank).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from tunelab.data.chat import Encoded
from tunelab.data.records import Example

SHOW = 5  # how many `where`s a report lists per finding


def lint_examples(train: list[Encoded], eval: list[Encoded] | None = None,
                  train_examples: Sequence[Example] | None = None,
                  eval_examples: Sequence[Example] | None = None) -> dict[str, Any]:
    """A JSON-ready report on the encoded training (and evaluation) examples."""
    lengths = sorted(e.n_tokens_before_truncation for e in train)
    empty = [e.where for e in train if e.n_trainable == 0]
    train_keys = _keys(train, train_examples)
    first: dict[Any, str] = {}
    duplicates: list[list[str]] = []
    for key, e in zip(train_keys, train):
        if key in first:
            duplicates.append([first[key], e.where])
        else:
            first[key] = e.where
    report: dict[str, Any] = {
        "n_examples": len(train),
        "tokens": {f"p{q}": _percentile(lengths, q) for q in (50, 90, 99)} | {"max": lengths[-1] if lengths else 0},
        "n_truncated": sum(e.truncated for e in train),
        "share_truncated": round(sum(e.truncated for e in train) / len(train), 4) if train else 0.0,
        "trainable_tokens": sum(e.n_trainable for e in train),
        "no_trainable": {"count": len(empty), "examples": empty[:SHOW]},
        "duplicates": {"count": len(duplicates), "examples": duplicates[:SHOW]},
    }
    if eval is not None:
        overlap = [[e.where, first[key]] for key, e in zip(_keys(eval, eval_examples), eval) if key in first]
        eval_empty = [e.where for e in eval if e.n_trainable == 0]
        report["eval"] = {"n_examples": len(eval), "trainable_tokens": sum(e.n_trainable for e in eval),
                          "no_trainable": {"count": len(eval_empty), "examples": eval_empty[:SHOW]}}
        report["train_eval_overlap"] = {"count": len(overlap), "examples": overlap[:SHOW]}
    return report


def format_lint(report: dict[str, Any]) -> list[str]:
    """A few lines for a person: sizes, lengths, and each problem found with where to look."""
    t = report["tokens"]
    lines = [f"data: {report['n_examples']} training examples, {report['trainable_tokens']:,} trainable tokens; "
             f"tokens per example p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']}"]
    if report["n_truncated"]:
        lines.append(f"truncated: {report['n_truncated']} ({report['share_truncated']:.1%}) longer than max_len, "
                     f"cut at the end")
    empty, dups = report["no_trainable"], report["duplicates"]
    if empty["count"]:
        lines.append(f"no trainable token: {empty['count']} (e.g. {', '.join(empty['examples'][:3])}); "
                     f"no assistant turn, or all of it cut by max_len")
    if dups["count"]:
        pairs = "; ".join(f"{a} = {b}" for a, b in dups["examples"][:3])
        lines.append(f"duplicates: {dups['count']} repeated training examples (e.g. {pairs})")
    if "eval" in report:
        ev, overlap = report["eval"], report["train_eval_overlap"]
        line = f"eval: {ev['n_examples']} examples, {ev['trainable_tokens']:,} trainable tokens"
        if ev["no_trainable"]["count"]:
            line += f", {ev['no_trainable']['count']} with no trainable token"
        if overlap["count"]:
            pairs = "; ".join(f"{a} = {b}" for a, b in overlap["examples"][:3])
            line += f"; {overlap['count']} also in the training data (e.g. {pairs})"
        lines.append(line)
    return lines


def _keys(encoded: list[Encoded], examples: Sequence[Example] | None) -> list[Any]:
    """One hashable identity per example: the normalised example when given, else ids and labels."""
    if examples is None:
        return [(tuple(e.input_ids), tuple(e.labels)) for e in encoded]
    if len(examples) != len(encoded):
        raise ValueError(f"{len(examples)} examples for {len(encoded)} encoded ones; pass matching lists")
    return [_normalised(ex) for ex in examples]


def _normalised(ex: Example) -> str:
    if ex.messages is None:
        return "text:" + " ".join((ex.text or "").split())
    return json.dumps([[m["role"], " ".join(m["content"].split())] for m in ex.messages], ensure_ascii=False)


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]
