"""Counts that shards add up (what each filter removed, with examples), and the HTML page of a report.

A tally is a plain dict, so it crosses process (and Ray) boundaries as JSON:
`{"documents_in", "documents_out", "chars_in", "chars_out", "removed": {rule: {"documents", "lines", "chars"}},
"changed": {rule: documents}, "examples": {rule: [text, ...]}, "problems": {kind: count}, "problem_lines": [...]}`.
"""

from __future__ import annotations

import html
from typing import Any

from tunelab.errors import DataError

PROBLEM_LINES = 50  # problem messages kept per shard and in the report (all are counted)
EXAMPLE_CHARS = 400


def new_tally() -> dict[str, Any]:
    return {"documents_in": 0, "documents_out": 0, "chars_in": 0, "chars_out": 0, "removed": {}, "changed": {},
            "examples": {}, "problems": {}, "problem_lines": []}


def removed(t: dict, rule: str, text: str, limit: int, documents: int = 0, lines: int = 0,
            example: str | None = None) -> None:
    """Count `text` (a document or a line) as removed by `rule`, and keep it (or `example`, what it was before
    other rules cut it) as an example while under `limit`."""
    r = t["removed"].setdefault(rule, {"documents": 0, "lines": 0, "chars": 0})
    r["documents"] += documents
    r["lines"] += lines
    r["chars"] += len(text)
    ex = t["examples"].setdefault(rule, [])
    text = text if example is None else example
    short = text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + " …"
    if len(ex) < limit and short not in ex:  # distinct examples: a boilerplate line is shown once
        ex.append(short)


def changed(t: dict, rule: str, n: int = 1) -> None:
    t["changed"][rule] = t["changed"].get(rule, 0) + n


def problem(t: dict, kind: str, message: str) -> None:
    t["problems"][kind] = t["problems"].get(kind, 0) + 1
    if len(t["problem_lines"]) < PROBLEM_LINES:
        t["problem_lines"].append(message)


def merge(total: dict, part: dict, limit: int) -> dict:
    """Add a shard's tally to `total` (examples up to `limit` per rule)."""
    for k in ("documents_in", "documents_out", "chars_in", "chars_out"):
        total[k] += part[k]
    for rule, r in part["removed"].items():
        dst = total["removed"].setdefault(rule, {"documents": 0, "lines": 0, "chars": 0})
        for k in dst:
            dst[k] += r[k]
    for rule, n in part["changed"].items():
        changed(total, rule, n)
    for rule, ex in part["examples"].items():
        dst = total["examples"].setdefault(rule, [])
        dst.extend([x for x in ex if x not in dst][:max(limit - len(dst), 0)])
    for kind, n in part["problems"].items():
        total["problems"][kind] = total["problems"].get(kind, 0) + n
    room = PROBLEM_LINES - len(total["problem_lines"])
    total["problem_lines"].extend(part["problem_lines"][:max(room, 0)])
    return total


def render_html(title: str, report: dict) -> str:
    """One self-contained page: the totals, a table of what each rule removed, examples, input problems."""
    e = html.escape
    rows = []
    for rule, r in sorted(report["removed"].items()):
        rows.append(f"<tr><td>{e(rule)}</td><td>{r['documents']:,}</td><td>{r['lines']:,}</td>"
                    f"<td>{r['chars']:,}</td></tr>")
    changes = "".join(f"<tr><td>{e(k)}</td><td>{v:,}</td></tr>" for k, v in sorted(report["changed"].items()))
    examples = []
    for rule, ex in sorted(report["examples"].items()):
        items = "".join(f"<li><pre>{e(x)}</pre></li>" for x in ex)
        examples.append(f"<details><summary>{e(rule)} ({len(ex)} examples)</summary><ol>{items}</ol></details>")
    problems = "".join(f"<tr><td>{e(k)}</td><td>{v:,}</td></tr>" for k, v in sorted(report["problems"].items()))
    problem_lines = "".join(f"<li><code>{e(x)}</code></li>" for x in report["problem_lines"])
    extra = "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in report.get("summary", {}).items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}pre{{white-space:pre-wrap;margin:0}}
details{{margin:.3em 0}}</style></head><body>
<h1>{e(title)}</h1>
<table>{extra}</table>
<h2>Removed, by rule</h2>
<table><tr><th>rule</th><th>documents</th><th>lines</th><th>characters</th></tr>{''.join(rows)}</table>
<h2>Changed in place (documents)</h2><table>{changes}</table>
<h2>Examples of what was removed</h2>{''.join(examples)}
<h2>Input problems (skipped)</h2><table>{problems}</table><ol>{problem_lines}</ol>
</body></html>
"""


def check_something_read(report: dict[str, Any], out: Any) -> None:
    """A run that read no document but skipped input lines is a user error (a wrong --text-key, say): DataError."""
    if report["documents_in"] == 0 and report["skipped_lines"]:
        most = max(report["problems"].items(), key=lambda kv: kv[1])[0]
        raise DataError(f"{out}: no document was read ({report['skipped_lines']:,} input lines or files skipped, "
                        f"most: {most}); check --text-key and the inputs' format (what was skipped: "
                        f"{out}/report.json)")
