"""`tunelab data dedup`: exact and near-duplicate removal across all shards, one survivor per cluster.

1. Per shard (a task of the engine): every document's exact key (a hash of its normalised text: NFKC, lower case,
   words and Chinese characters without punctuation or spacing) and MinHash signature over n-token shingles
   (`tunelab.clean.minhash`), saved in `work/sig/`.
2. Across all shards, band by band: documents whose r signature values of a band agree are candidates (the
   band is read from every shard's signature file, so only one band of the corpus is in memory); exact keys that
   agree likewise. Candidates are joined by union-find; each cluster keeps its first document in input order.
3. Per shard: the kept documents are written to `data/part-NNNNN.jsonl`; `clusters.jsonl` says which document was
   removed as a duplicate of which (`removed`, `survivor`: `file:line`; `kind`: exact or near; `similarity`: the
   signatures' estimated Jaccard).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.clean.config import DedupConfig
from tunelab.clean.engine import Engine
from tunelab.clean.minhash import exact_key, normal_tokens, optimal_bands, shingles, signatures
from tunelab.clean.readers import read_shard, resolve_inputs
from tunelab.clean.report import check_something_read, merge, new_tally, removed, render_html
from tunelab.clean.shards import check_on_error, fingerprint, prepare_run, problem_handler, read_done, shard_name
from tunelab.errors import ConfigError
from tunelab.io import atomic_write_json, atomic_write_text, atomic_writer

KIND = "deduplicated data"
ENTRIES = ["data", "clusters.jsonl", "report.json", "report.html"]
BATCH = 256  # documents per signature batch
Progress = Callable[[str, int, int], None]


def bands_rows(cfg: DedupConfig) -> tuple[int, int]:
    """The LSH banding: as given, or chosen from the threshold (datasketch's rule)."""
    if (cfg.bands is None) != (cfg.rows is None):
        raise ConfigError("set both bands and rows, or neither (then they are chosen from the threshold)")
    if cfg.bands is not None:
        if cfg.bands * cfg.rows > cfg.num_perm:
            raise ConfigError(f"bands * rows = {cfg.bands * cfg.rows} exceeds num_perm = {cfg.num_perm}")
        return cfg.bands, cfg.rows
    return optimal_bands(cfg.threshold, cfg.num_perm, cfg.false_positive_weight)


def run_dedup(inputs: list[str | Path], out: str | Path, cfg: DedupConfig | None = None, *, workers: int = 1,
              engine: str = "local", address: str | None = None, on_error: str = "skip",
              recipe: str | Path | None = None, progress: Progress | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Deduplicate `inputs` into `out`; returns the report (also `out`/report.json)."""
    from tunelab.clean.clean import _run_stage

    cfg = cfg or DedupConfig()
    check_on_error(on_error)
    bands, rows = bands_rows(cfg)
    start = time.time()
    files = resolve_inputs(inputs)
    out = Path(out)
    state = {"kind": KIND, "recipe": cfg.model_dump(mode="json"), "inputs": fingerprint(files),
             "on_error": on_error}
    resumed = prepare_run(out, KIND, ENTRIES, [*inputs, *files], recipe, state)
    work = out / "work"
    for d in ("sig", "done"):
        (work / d).mkdir(exist_ok=True)
    base = {"work": str(work), "out": str(out), "cfg": cfg.model_dump(mode="json"), "on_error": on_error,
            "inputs": [str(f) for f in files]}
    tasks = [{**base, "input": str(f), "index": i} for i, f in enumerate(files)]
    with Engine(engine, workers, address) as eng:
        _run_stage("signatures", _signatures, tasks, lambda t: work / "sig" / f"{shard_name(t['index'])}.json",
                   eng, progress, log)
        clusters_file = work / "clusters.npz"
        if not clusters_file.exists():
            if progress:
                progress("clustering", 0, 1)
            survivor, kind, sim = find_clusters(work, len(files), cfg, bands, rows)
            with atomic_writer(clusters_file, "wb") as f:
                np.savez(f, survivor=survivor, kind=kind, sim=sim)
            if progress:
                progress("clustering", 1, 1)
        _run_stage("writing", _write_kept, tasks, lambda t: work / "done" / f"{shard_name(t['index'])}.json",
                   eng, progress, log)
    report = _report(files, out, cfg, bands, rows, start, resumed, workers, engine)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.html", render_html(f"tunelab data dedup: {out}", report))
    check_something_read(report, out)
    return {**report, "out": str(out)}


def _signatures(task: dict) -> dict:
    cfg = DedupConfig.model_validate(task["cfg"])
    work, name = Path(task["work"]), shard_name(task["index"])
    tally = new_tally()
    on_problem = problem_handler(tally, task["on_error"])
    exact, lines, sigs, batch = [], [], [], []
    for record, n in read_shard(Path(task["input"]), cfg.text_key, on_problem):
        tokens = normal_tokens(record[cfg.text_key])
        tally["documents_in"] += 1
        tally["chars_in"] += len(record[cfg.text_key])
        exact.append(exact_key(tokens))
        lines.append(n)
        batch.append(shingles(tokens, cfg.ngram))
        if len(batch) == BATCH:
            sigs.append(signatures(batch, cfg.num_perm, cfg.seed))
            batch = []
    if batch:
        sigs.append(signatures(batch, cfg.num_perm, cfg.seed))
    sig = np.concatenate(sigs) if sigs else np.zeros((0, cfg.num_perm), np.uint32)
    with atomic_writer(work / "sig" / f"{name}.npy", "wb") as f:
        np.save(f, sig)
    with atomic_writer(work / "sig" / f"{name}.npz", "wb") as f:
        np.savez(f, exact=np.array(exact, dtype=np.uint64), lines=np.array(lines, dtype=np.int64))
    atomic_write_json(work / "sig" / f"{name}.json", tally)
    return tally


class UnionFind:
    """Union-find over 0..n-1 whose root is always the smallest member (the first document in input order)."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def _groups(keys: np.ndarray) -> list[np.ndarray]:
    """Indices of the rows of `keys` (1-D, or 2-D compared row-wise) that are equal, for every group of two or more."""
    if keys.ndim == 2:
        keys = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1]))).ravel()
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    if len(sk) < 2:
        return []
    boundaries = np.flatnonzero(sk[1:] != sk[:-1]) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(sk)]])
    return [order[s:e] for s, e in zip(starts, ends) if e - s > 1]


def find_clusters(work: Path, n_shards: int, cfg: DedupConfig, bands: int, rows: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document (in global input order): its survivor's index, kind (0 kept, 1 exact, 2 near) and the
    estimated Jaccard with the survivor."""
    names = [shard_name(i) for i in range(n_shards)]
    exact = np.concatenate([np.load(work / "sig" / f"{n}.npz")["exact"] for n in names]) if names else np.zeros(0)
    sig_files = [np.load(work / "sig" / f"{n}.npy", mmap_mode="r") for n in names]
    n = len(exact)
    uf = UnionFind(n)
    if cfg.exact:
        for g in _groups(exact):
            for x in g[1:]:
                uf.union(int(g[0]), int(x))
    if cfg.near and n:
        for b in range(bands):
            band = np.concatenate([s[:, b * rows:(b + 1) * rows] for s in sig_files])
            for g in _groups(band):
                first = int(g[0])
                for x in g[1:]:
                    if cfg.verify and _jaccard(sig_files, first, int(x)) < cfg.threshold:
                        continue
                    uf.union(first, int(x))
    survivor = uf.roots()
    kind = np.zeros(n, dtype=np.int8)
    sim = np.ones(n, dtype=np.float32)
    dup = np.flatnonzero(survivor != np.arange(n))
    kind[dup] = np.where(exact[dup] == exact[survivor[dup]], 1, 2)
    for i in dup[kind[dup] == 2]:
        sim[i] = _jaccard(sig_files, int(i), int(survivor[i]))
    return survivor, kind, sim


def _row(sig_files: list[np.ndarray], i: int) -> np.ndarray:
    for s in sig_files:
        if i < len(s):
            return np.asarray(s[i])
        i -= len(s)
    raise IndexError(i)


def _jaccard(sig_files: list[np.ndarray], a: int, b: int) -> float:
    return float(np.mean(_row(sig_files, a) == _row(sig_files, b)))


def _write_kept(task: dict) -> dict:
    """Write the kept documents of one shard, and its part of the clusters file."""
    cfg = DedupConfig.model_validate(task["cfg"])
    work, out, i = Path(task["work"]), Path(task["out"]), task["index"]
    name = shard_name(i)
    offset = sum(len(np.load(work / "sig" / f"{shard_name(j)}.npz")["lines"]) for j in range(i))
    z = np.load(work / "clusters.npz")
    survivor, kind, sim = z["survivor"], z["kind"], z["sim"]
    where = _locations(work, task)
    tally = new_tally()
    parts = []
    with atomic_writer(out / "data" / f"{name}.jsonl") as dst:
        for j, (record, n) in enumerate(read_shard(Path(task["input"]), cfg.text_key, lambda k, m: None)):
            g = offset + j
            text = record[cfg.text_key]
            if survivor[g] == g:
                tally["documents_out"] += 1
                tally["chars_out"] += len(text)
                dst.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                continue
            label = "exact" if kind[g] == 1 else "near"
            removed(tally, f"dedup.{label}", text, cfg.examples, documents=1)
            parts.append({"removed": f"{task['input']}:{n}", "survivor": where(int(survivor[g])), "kind": label,
                          "similarity": round(float(sim[g]), 4)})
    with atomic_writer(work / "done" / f"{name}.clusters.jsonl") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in parts)
    atomic_write_json(work / "done" / f"{name}.json", tally)
    return tally


def _locations(work: Path, task: dict):
    """global index -> "file:line", every file named as the inputs were given (as `removed` names its own)."""
    files = task["inputs"]
    lines = [np.load(work / "sig" / f"{shard_name(j)}.npz")["lines"] for j in range(len(files))]
    starts = np.cumsum([0] + [len(x) for x in lines])

    def where(g: int) -> str:
        j = int(np.searchsorted(starts, g, side="right") - 1)
        return f"{files[j]}:{int(lines[j][g - starts[j]])}"
    return where


def _report(files: list[Path], out: Path, cfg: DedupConfig, bands: int, rows: int, start: float, resumed: bool,
            workers: int, engine: str) -> dict[str, Any]:
    work = out / "work"
    total = new_tally()
    with atomic_writer(out / "clusters.jsonl") as dst:
        for i in range(len(files)):
            name = shard_name(i)
            p1 = read_done(work / "sig" / f"{name}.json") or new_tally()
            p2 = read_done(work / "done" / f"{name}.json") or new_tally()
            merge(total, p1, cfg.examples)
            merge(total, p2, cfg.examples)
            dst.write((work / "done" / f"{name}.clusters.jsonl").read_text(encoding="utf-8"))
    z = np.load(work / "clusters.npz")
    survivor = z["survivor"]
    dups = survivor != np.arange(len(survivor))
    total["clusters"] = int(len(np.unique(survivor[dups])))
    total["exact_duplicates"] = int((z["kind"] == 1).sum())
    total["near_duplicates"] = int((z["kind"] == 2).sum())
    total["bands"], total["rows"] = bands, rows
    total["skipped_lines"] = sum(total["problems"].values())
    total["recipe"] = cfg.model_dump(mode="json")
    total["summary"] = {"documents in": total["documents_in"], "documents out": total["documents_out"],
                        "exact duplicates removed": total["exact_duplicates"],
                        "near duplicates removed": total["near_duplicates"],
                        "clusters": total["clusters"], "skipped input lines": total["skipped_lines"],
                        "shards": len(files),
                        "MinHash": f"{cfg.num_perm} permutations, {cfg.ngram}-token shingles, threshold "
                                   f"{cfg.threshold} -> {bands} bands x {rows} rows",
                        "engine": f"{engine} ({workers} worker{'s' if workers != 1 else ''})", "resumed": resumed,
                        "wall seconds": round(time.time() - start, 2)}
    total["wall_s"] = round(time.time() - start, 3)
    return total
