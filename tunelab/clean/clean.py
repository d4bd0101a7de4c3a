"""`tunelab data clean`: stream shards through the filters, write cleaned shards and a report.

Two passes over the shards, each shard a task of the engine (a process pool or Ray):

1. read a shard (bad lines skipped or stopping the run, as `on_error` says), repair its Unicode, write it to
   `work/stage1/`, and count the distinct lines of each document (the keys of CCNet's corpus-wide count);
2. after the counts of every shard are added up (bucket by bucket, so the count never holds the corpus in
   memory), filter each shard's lines (boilerplate, links, C4, lines repeated across documents), then its
   documents (Gopher quality and repetition, language), mask PII, and write `data/part-NNNNN.jsonl`.

Memory is one document at a time plus one shard's line counts; the output keeps every key of the input records,
with the cleaned text under `text_key`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.clean.config import CleanConfig
from tunelab.clean.engine import Engine
from tunelab.clean.readers import read_shard, resolve_inputs
from tunelab.clean.report import changed, check_something_read, merge, new_tally, removed, render_html
from tunelab.clean.shards import check_on_error, fingerprint, prepare_run, problem_handler, read_done, shard_name
from tunelab.io import atomic_write_json, atomic_write_text, atomic_writer

KIND = "cleaned data"
ENTRIES = ["data", "report.json", "report.html"]
BUCKETS = 16
Progress = Callable[[str, int, int], None]


def run_clean(inputs: list[str | Path], out: str | Path, cfg: CleanConfig | None = None, *, workers: int = 1,
              engine: str = "local", address: str | None = None, on_error: str = "skip",
              recipe: str | Path | None = None, progress: Progress | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Clean `inputs` (files, directories, globs) into `out`; returns the report (also `out`/report.json)."""
    cfg = cfg or CleanConfig()
    check_on_error(on_error)
    start = time.time()
    files = resolve_inputs(inputs)
    out = Path(out)
    state = {"kind": KIND, "recipe": cfg.model_dump(mode="json"), "inputs": fingerprint(files),
             "on_error": on_error}
    resumed = prepare_run(out, KIND, ENTRIES, [*inputs, *files], recipe, state)
    work = out / "work"
    for d in ("stage1", "lines", "read", "done"):
        (work / d).mkdir(exist_ok=True)
    recipe_json = cfg.model_dump(mode="json")
    tasks1 = [{"input": str(f), "index": i, "work": str(work), "cfg": recipe_json, "on_error": on_error}
              for i, f in enumerate(files)]
    def read_or_done(t: dict) -> Path:
        """Pass 1 of a shard is done when pass 2 is, or when its stats and its repaired shard are both there."""
        name = shard_name(t["index"])
        if (work / "done" / f"{name}.json").exists():
            return work / "done" / f"{name}.json"
        return work / ("read" if (work / "stage1" / f"{name}.jsonl").exists() else "stage1") / f"{name}.json"

    with Engine(engine, workers, address) as eng:
        _run_stage("reading, unicode", _pass1, tasks1, read_or_done, eng, progress, log)
        repeated_file = work / "repeated.npy"
        if not repeated_file.exists():
            keys = _repeated_lines(work, len(files), cfg.lines.repeated_min_docs)
            with atomic_writer(repeated_file, "wb") as f:
                np.save(f, keys)
        tasks2 = [{**t, "out": str(out)} for t in tasks1]
        _run_stage("filtering", _pass2, tasks2, lambda t: work / "done" / f"{shard_name(t['index'])}.json",
                   eng, progress, log)
    report = _report(files, work, cfg, start, resumed, workers, engine)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.html", render_html(f"tunelab data clean: {out}", report))
    for d in ("stage1", "lines"):
        shutil.rmtree(work / d, ignore_errors=True)
    check_something_read(report, out)
    return {**report, "out": str(out)}


def _run_stage(label: str, fn, tasks: list[dict], done_file, eng: Engine, progress: Progress | None, log) -> None:
    todo = [t for t in tasks if read_done(done_file(t)) is None]
    finished = len(tasks) - len(todo)
    if progress:
        progress(label, finished, len(tasks))
    shown = 0
    for result in eng.map(fn, todo):
        finished += 1
        for line in result.get("problem_lines", []):
            if log and shown < 20:
                log(f"warning: skipped {line}")
            shown += 1
        if progress:
            progress(label, finished, len(tasks))
    if log and shown > 20:
        log(f"warning: ... and {shown - 20} more skipped lines (all counted in report.json)")


def _pass1(task: dict) -> dict:
    """Read one input shard, repair its Unicode, write it to work/stage1 and count its documents' line keys."""
    from tunelab.clean.lines import line_keys
    from tunelab.clean.unicode import fix_unicode

    cfg = CleanConfig.model_validate(task["cfg"])
    work, name = Path(task["work"]), shard_name(task["index"])
    tally = new_tally()
    on_problem = problem_handler(tally, task["on_error"])
    counts: Counter[int] = Counter()
    with atomic_writer(work / "stage1" / f"{name}.jsonl") as f:
        for record, n in read_shard(Path(task["input"]), cfg.text_key, on_problem):
            text = record[cfg.text_key]
            tally["documents_in"] += 1
            tally["chars_in"] += len(text)
            if cfg.unicode.enabled:
                fixed, changes = fix_unicode(text, cfg.unicode)
                for c in changes:
                    changed(tally, f"unicode.{c}")
                if fixed is None:
                    removed(tally, "unicode.mojibake", text, cfg.examples, documents=1)
                    continue
                record[cfg.text_key] = text = fixed
            if cfg.lines.enabled and cfg.lines.repeated:
                counts.update(line_keys(text, cfg.lines))
            f.write(json.dumps({"r": record, "n": n}, ensure_ascii=False, default=str) + "\n")
    keys = np.fromiter(counts.keys(), dtype=np.uint64, count=len(counts))
    vals = np.fromiter(counts.values(), dtype=np.uint32, count=len(counts))
    with atomic_writer(work / "lines" / f"{name}.npz", "wb") as fh:
        np.savez(fh, **{f"k{b}": keys[keys % BUCKETS == b] for b in range(BUCKETS)},
                 **{f"c{b}": vals[keys % BUCKETS == b] for b in range(BUCKETS)})
    atomic_write_json(work / "read" / f"{name}.json", tally)
    return tally


def _repeated_lines(work: Path, n_shards: int, min_docs: int) -> np.ndarray:
    """The line keys found in at least `min_docs` documents across all shards, counted one bucket at a time."""
    found = []
    for b in range(BUCKETS):
        keys, vals = [], []
        for i in range(n_shards):
            with np.load(work / "lines" / f"{shard_name(i)}.npz") as z:
                keys.append(z[f"k{b}"])
                vals.append(z[f"c{b}"])
        k = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        v = np.concatenate(vals) if vals else np.zeros(0, np.uint32)
        uniq, inv = np.unique(k, return_inverse=True)
        total = np.bincount(inv, weights=v, minlength=len(uniq))
        found.append(uniq[total >= min_docs])
    return np.sort(np.concatenate(found)) if found else np.zeros(0, np.uint64)


def _pass2(task: dict) -> dict:
    """Filter one repaired shard (lines, then documents) into data/part-NNNNN.jsonl."""
    cfg = CleanConfig.model_validate(task["cfg"])
    work, out, name = Path(task["work"]), Path(task["out"]), shard_name(task["index"])
    tally = new_tally()
    repeated = set(np.load(work / "repeated.npy").tolist()) if cfg.lines.enabled and cfg.lines.repeated else set()
    languages: Counter[str] = Counter()
    with open(work / "stage1" / f"{name}.jsonl", encoding="utf-8") as src, \
            atomic_writer(out / "data" / f"{name}.jsonl") as dst:
        for line in src:
            item = json.loads(line)
            record = item["r"]
            text = clean_text(record[cfg.text_key], cfg, tally, repeated, languages)
            if text is None:
                continue
            record[cfg.text_key] = text
            tally["documents_out"] += 1
            tally["chars_out"] += len(text)
            dst.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    tally["languages"] = dict(languages)
    atomic_write_json(work / "done" / f"{name}.json", tally)
    (work / "stage1" / f"{name}.jsonl").unlink(missing_ok=True)
    return tally


def clean_text(text: str, cfg: CleanConfig, tally: dict, repeated: set[int] | frozenset = frozenset(),
               languages: Counter | None = None) -> str | None:
    """One (Unicode-repaired) document through the line and document filters; None when it is dropped."""
    from tunelab.clean.language import language_reason
    from tunelab.clean.lines import clean_lines
    from tunelab.clean.pii import mask_pii
    from tunelab.clean.quality import quality_reason, repetition_reason

    limit = cfg.examples
    original = text
    if cfg.lines.enabled:
        kept, gone, reason = clean_lines(text, cfg.lines, repeated)
        for rule, line in gone:
            removed(tally, f"lines.{rule}", line, limit, lines=1)
        if reason is not None:
            removed(tally, f"lines.{reason}", text, limit, documents=1)
            return None
        text = kept
    if len(text.strip()) < cfg.min_chars:
        removed(tally, "empty_after_cleaning", text, limit, documents=1, example=original)
        return None
    if cfg.quality.enabled:
        reason = quality_reason(text, cfg.quality) or (
            repetition_reason(text, cfg.quality) if cfg.quality.repetition else None)
        if reason is not None:
            removed(tally, f"quality.{reason}", text, limit, documents=1)
            return None
    if cfg.language.enabled:
        lang, reason = language_reason(text, cfg.language)
        if languages is not None:
            languages[lang] += 1
        if reason is not None:
            removed(tally, f"language.{reason}", text, limit, documents=1)
            return None
    if cfg.pii.enabled:
        text, counts = mask_pii(text, cfg.pii)
        for kind, n in counts.items():
            if n:
                changed(tally, f"pii.{kind}", n)
    return text


def _report(files: list[Path], work: Path, cfg: CleanConfig, start: float, resumed: bool, workers: int,
            engine: str) -> dict[str, Any]:
    total = new_tally()
    languages: Counter[str] = Counter()
    shards = []
    for i, f in enumerate(files):
        p1 = read_done(work / "read" / f"{shard_name(i)}.json") or new_tally()
        p2 = read_done(work / "done" / f"{shard_name(i)}.json") or new_tally()
        languages.update(p2.get("languages", {}))
        p2["documents_in"], p2["chars_in"] = p1["documents_in"], p1["chars_in"]
        merge(total, p1 | {"documents_in": 0, "chars_in": 0, "documents_out": 0, "chars_out": 0}, cfg.examples)
        merge(total, p2, cfg.examples)
        shards.append({"input": str(f), "output": f"data/{shard_name(i)}.jsonl", "documents_in": p1["documents_in"],
                       "documents_out": p2["documents_out"], "skipped_lines": sum(p1["problems"].values())})
    total["languages"] = dict(languages.most_common())
    total["skipped_lines"] = sum(total["problems"].values())
    total["shards"] = shards
    total["recipe"] = cfg.model_dump(mode="json")
    total["summary"] = {"documents in": total["documents_in"], "documents out": total["documents_out"],
                        "characters in": total["chars_in"], "characters out": total["chars_out"],
                        "skipped input lines": total["skipped_lines"], "shards": len(files),
                        "engine": f"{engine} ({workers} worker{'s' if workers != 1 else ''})", "resumed": resumed,
                        "wall seconds": round(time.time() - start, 2)}
    total["wall_s"] = round(time.time() - start, 3)
    return total
