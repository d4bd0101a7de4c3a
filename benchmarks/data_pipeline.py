"""Near-duplicate detection and cleaning, measured against datasketch and datatrove in one run.

    .venv/bin/python benchmarks/data_pipeline.py                  # 100k synthetic docs + CPsyCounD
    .venv/bin/python benchmarks/data_pipeline.py --docs 20000 --clean-sizes 1000,4000   # a quick look

Corpora (generated here, seeded):
- synthetic: English (Zipf over 20k made-up words) and Chinese (Zipf over 3,500 characters) documents; 70% are
  originals, 10% exact copies (case and spacing changed), 20% near copies with a share of their tokens replaced at
  known edit rates (1, 3, 5, 10, 20%);
- CPsyCounD: the 3,084 real counselling dialogues (../shared/data/cpsycound) with planted exact and near copies
  the same way (skipped when the folder is absent).

Ground truth: a document is a duplicate when an earlier document's 5-token shingle set has Jaccard >= threshold
with it (exact copies: 1). Planted copies are checked against their original exactly; documents any method removed
that are not planted are checked against the document that method (or tunelab) paired them with, so real
duplicates inside CPsyCounD count as duplicates, not as false positives.

Methods, each in its own process on one core, near duplicates only, same threshold, permutations and shingles
(tunelab's tokens: words, and single Chinese characters):
- tunelab: `run_dedup` (vectorised MinHash, LSH bands, union-find), reading and writing JSONL shards;
- datasketch: `MinHash` per document + `MinHashLSH` (query, then insert when new), reading the same shards;
- datatrove: its 4-stage MinHash pipeline (signatures, buckets, cluster, filter + JsonlWriter) with a
  LocalPipelineExecutor, given the same word tokenizer (its default for English is spaCy, which is not installed:
  with spaCy datatrove's own reference throughput is ~160 docs/s) and the same bands x rows.
Throughput is documents per second of work (imports excluded); memory is the process's peak RSS (VmHWM).
Then `run_clean` on growing slices of the synthetic corpus: its peak memory should stay flat.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPSY = HERE.parent.parent / "shared" / "data" / "cpsycound" / "cpsycound.jsonl"
EDIT_RATES = (0.01, 0.03, 0.05, 0.10, 0.20)
SHARD = 10_000


# --- corpora -----------------------------------------------------------------------------------------------


def _vocab(rng: random.Random) -> tuple[list[str], list[float], list[str], list[float]]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = list({"".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(22_000)})[:20_000]
    hanzi = [chr(c) for c in range(0x4E00, 0x4E00 + 3500)]
    zipf = lambda n: [1 / (i + 1) for i in range(n)]  # noqa: E731
    return words, zipf(len(words)), hanzi, zipf(len(hanzi))


def _edit(text: str, rate: float, rng: random.Random, zh: bool, vocab) -> str:
    words, ww, hanzi, hw = vocab
    toks = list(text) if zh else text.split(" ")
    for i in rng.sample(range(len(toks)), max(1, round(len(toks) * rate))):
        toks[i] = rng.choices(hanzi, hw)[0] if zh else rng.choices(words, ww)[0]
    return ("" if zh else " ").join(toks)


def _exact_copy(text: str, zh: bool) -> str:
    return ("  " + text + " ") if zh else text.upper().replace(" ", "  ")


def plant(originals: list[tuple[str, bool]], n_total: int, rng: random.Random, vocab) -> tuple[list[dict], list]:
    """Originals plus exact and near copies, shuffled after their originals; (records, [(copy, original, rate)])."""
    docs = [{"text": t, "zh": zh} for t, zh in originals]
    planted = []
    n_exact = (n_total - len(originals)) // 3
    for k in range(n_total - len(originals)):
        src = rng.randrange(len(originals))
        text, zh = originals[src]
        rate = 0.0 if k < n_exact else EDIT_RATES[k % len(EDIT_RATES)]
        copy = _exact_copy(text, zh) if rate == 0 else _edit(text, rate, rng, zh, vocab)
        planted.append((len(docs), src, rate))
        docs.append({"text": copy, "zh": zh})
    return docs, planted


def synthetic(n: int, seed: int = 0) -> tuple[list[dict], list]:
    rng = random.Random(seed)
    vocab = _vocab(rng)
    words, ww, hanzi, hw = vocab
    originals = []
    for i in range(int(n * 0.7)):
        if i % 2:
            originals.append(("".join(rng.choices(hanzi, hw, k=rng.randint(100, 240))), True))
        else:
            originals.append((" ".join(rng.choices(words, ww, k=rng.randint(60, 160))), False))
    return plant(originals, n, rng, vocab)


def cpsycound(seed: int = 0) -> tuple[list[dict], list] | None:
    if not CPSY.is_file():
        return None
    rng = random.Random(seed)
    vocab = _vocab(rng)
    originals = []
    for line in CPSY.read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        originals.append(("\n".join(("来访者：" if m["role"] == "user" else "咨询师：") + m["content"] for m in msgs),
                          True))
    return plant(originals, int(len(originals) * 1.5), rng, vocab)


def write_shards(docs: list[dict], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for s in range(0, len(docs), SHARD):
        f = folder / f"shard-{s // SHARD:04d}.jsonl"
        f.write_text("".join(json.dumps({"id": i, "text": d["text"]}, ensure_ascii=False) + "\n"
                             for i, d in enumerate(docs[s:s + SHARD], s)), encoding="utf-8")
        files.append(f)
    return files


# --- the methods (each runs in a child process) ------------------------------------------------------------


def read_texts(folder: Path):
    for f in sorted(folder.glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)["text"]


def run_tunelab(folder: Path, work: Path, threshold: float, num_perm: int) -> list[int]:
    from tunelab.clean import DedupConfig, run_dedup

    files = sorted(folder.glob("*.jsonl"))
    run_dedup(files, work / "tunelab", DedupConfig(threshold=threshold, num_perm=num_perm, exact=False))
    removed = []
    for line in (work / "tunelab" / "clusters.jsonl").read_text(encoding="utf-8").splitlines():
        path, n = json.loads(line)["removed"].rsplit(":", 1)
        removed.append(files.index(Path(path)) * SHARD + int(n) - 1)
    return sorted(removed)


def run_datasketch(folder: Path, work: Path, threshold: float, num_perm: int) -> list[int]:
    from datasketch import MinHash, MinHashLSH

    from tunelab.clean.minhash import normal_tokens, shingles

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    removed, pairs = [], {}
    for i, text in enumerate(read_texts(folder)):
        m = MinHash(num_perm=num_perm, seed=1, hashfunc=int)  # the same shingle hashes as tunelab's
        m.update_batch(shingles(normal_tokens(text), 5).tolist())
        found = lsh.query(m)
        if found:
            removed.append(i)
            pairs[i] = min(found)
        else:
            lsh.insert(i, m)
    (work / "datasketch_pairs.json").write_text(json.dumps(pairs))
    return removed


def run_datatrove(folder: Path, work: Path, threshold: float, num_perm: int) -> list[int]:
    import struct

    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    from tunelab.clean.minhash import TOKEN, optimal_bands

    class SameTokens(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return TOKEN.findall(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    def reader(data, rank: int = 0, world_size: int = 1):
        for i, text in enumerate(read_texts(folder)):
            yield Document(text=text, id=str(i))

    bands, rows = optimal_bands(threshold, num_perm)
    # sha1 as FineWeb; datatrove's xxhash path passes str, which xxhash>=4 refuses
    cfg = MinhashConfig(n_grams=5, num_buckets=bands, hashes_per_bucket=rows,
                        hash_config=HashConfig(precision=64, hash_fc="sha1"))
    base = work / "datatrove"
    steps = [
        ([reader, MinhashDedupSignature(output_folder=str(base / "sigs"), config=cfg, language=SameTokens())], 1),
        ([MinhashDedupBuckets(input_folder=str(base / "sigs"), output_folder=str(base / "buckets"), config=cfg)],
         bands),
        ([MinhashDedupCluster(input_folder=str(base / "buckets"), output_folder=str(base / "remove"), config=cfg)], 1),
        ([reader, MinhashDedupFilter(input_folder=str(base / "remove")), JsonlWriter(str(base / "out"))], 1),
    ]
    for i, (pipeline, tasks) in enumerate(steps):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(base / f"logs{i}"),
                              skip_completed=False).run()
    raw = b"".join(f.read_bytes() for f in sorted((base / "remove").glob("*.remove")))
    return sorted(x[0] for x in struct.iter_unpack("<I", raw))


def run_clean_child(folder: Path, work: Path, *_):
    from tunelab.clean import run_clean

    r = run_clean(sorted(folder.glob("*.jsonl")), work / "clean")
    return {"documents_in": r["documents_in"], "documents_out": r["documents_out"]}


METHODS = {"tunelab": run_tunelab, "datasketch": run_datasketch, "datatrove": run_datatrove, "clean": run_clean_child}


def child(args: argparse.Namespace) -> None:
    import logging

    logging.disable(logging.WARNING)
    try:
        from loguru import logger
        logger.remove()
    except ImportError:
        pass
    start = time.perf_counter()
    result = METHODS[args.child](Path(args.folder), Path(args.work), args.threshold, args.num_perm)
    wall = time.perf_counter() - start
    Path(args.result).write_text(json.dumps({"result": result, "wall_s": wall, "peak_mb": _vm_hwm_mb()}))


def _vm_hwm_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that across fork and exec, so
    a child would report at least its parent's size (the parent holds the whole corpus)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(method: str, folder: Path, work: Path, args: argparse.Namespace) -> dict:
    """Run one method in a child process: its result, seconds of work and peak RSS (MB)."""
    result = work / f"{method}-{folder.name}.json"
    cmd = [sys.executable, __file__, "--child", method, "--folder", str(folder), "--work", str(work), "--result",
           str(result), "--threshold", str(args.threshold), "--num-perm", str(args.num_perm)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"{method}.log", "w"),
                            env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_DISABLE_IMPORT_WARNING": "1"})
    if proc.wait() != 0:
        raise SystemExit(f"{method} failed; see {work / f'{method}.log'}")
    return json.loads(result.read_text())


# --- scoring -----------------------------------------------------------------------------------------------


def shingle_set(text: str) -> set[int]:
    from tunelab.clean.minhash import normal_tokens, shingles

    return set(shingles(normal_tokens(text), 5).tolist())


def jaccard(a: str, b: str) -> float:
    x, y = shingle_set(a), shingle_set(b)
    return len(x & y) / len(x | y) if x | y else 1.0


def truth(docs: list[dict], planted: list, removed_by: dict[str, list[int]], partners: dict[int, int],
          threshold: float) -> set[int]:
    dup = {c for c, src, _ in planted if jaccard(docs[c]["text"], docs[src]["text"]) >= threshold}
    planted_ids = {c for c, _, _ in planted}
    for removed in removed_by.values():
        for i in removed:
            if i not in planted_ids and i in partners and jaccard(docs[i]["text"], docs[partners[i]]["text"]) >= \
                    threshold:
                dup.add(i)
    return dup


def score(removed: list[int], dup: set[int]) -> tuple[float, float]:
    r = set(removed)
    tp = len(r & dup)
    return (tp / len(r) if r else 1.0), (tp / len(dup) if dup else 1.0)


def partners_of(work: Path, folder: Path) -> dict[int, int]:
    """Who each removed document was paired with, by tunelab's clusters and datasketch's queries."""
    files = sorted(folder.glob("*.jsonl"))

    def index(loc: str) -> int:
        path, n = loc.rsplit(":", 1)
        return files.index(Path(path)) * SHARD + int(n) - 1

    pairs = {int(k): v for k, v in json.loads((work / "datasketch_pairs.json").read_text()).items()}
    for line in (work / "tunelab" / "clusters.jsonl").read_text(encoding="utf-8").splitlines():
        c = json.loads(line)
        pairs.setdefault(index(c["removed"]), index(c["survivor"]))
    return pairs


def dedup_table(name: str, docs: list[dict], planted: list, root: Path, args: argparse.Namespace) -> list[dict]:
    folder = root / name
    write_shards(docs, folder)
    work = root / f"work-{name}"
    work.mkdir()
    methods = ["tunelab", "datasketch"] + ([] if args.skip_datatrove else ["datatrove"])
    runs = {}
    for m in methods:
        print(f"[{name}] {m} on {len(docs):,} documents ...", flush=True)
        runs[m] = measure(m, folder, work, args)
        r = runs[m]
        print(f"[{name}] {m}: removed {len(r['result']):,} in {r['wall_s']:.1f}s "
              f"({len(docs) / r['wall_s']:,.0f} docs/s), peak {r['peak_mb']:,.0f} MB", flush=True)
    dup = truth(docs, planted, {m: r["result"] for m, r in runs.items()}, partners_of(work, folder), args.threshold)
    rows = []
    for m, r in runs.items():
        p, rec = score(r["result"], dup)
        rows.append({"corpus": name, "method": m, "documents": len(docs), "duplicates": len(dup),
                     "removed": len(r["result"]), "precision": p, "recall": rec,
                     "docs_per_s": len(docs) / r["wall_s"], "wall_s": r["wall_s"], "peak_mb": r["peak_mb"]})
    per_rate = {}
    for rate in (0.0, *EDIT_RATES):
        group = [c for c, _, x in planted if x == rate]
        per_rate[rate] = {"planted": len(group), "true dup": sum(c in dup for c in group),
                          **{m: sum(c in set(r["result"]) for c in group) for m, r in runs.items()}}
    print(f"[{name}] removed per edit rate (planted copies; 'true dup' = Jaccard >= {args.threshold}):", flush=True)
    for rate, row in per_rate.items():
        print(f"  {rate:>5.0%}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def clean_scaling(docs: list[dict], root: Path, sizes: list[int], args: argparse.Namespace) -> list[dict]:
    rows = []
    for n in sizes:
        folder = root / f"clean-{n}"
        write_shards(docs[:n], folder)
        work = root / f"work-clean-{n}"
        work.mkdir()
        print(f"[clean] {n:,} documents ...", flush=True)
        r = measure("clean", folder, work, args)
        rows.append({"documents": n, "docs_per_s": n / r["wall_s"], "peak_mb": r["peak_mb"],
                     "kept": r["result"]["documents_out"]})
        print(f"[clean] {n:,}: {n / r['wall_s']:,.0f} docs/s, peak {r['peak_mb']:,.0f} MB", flush=True)
    return rows


def print_tables(rows: list[dict], clean_rows: list[dict]) -> None:
    print("\n| corpus | method | docs | true dups | removed | precision | recall | docs/s | x datasketch | "
          "x datatrove | peak MB | mem x datasketch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = {x["method"]: x for x in rows if x["corpus"] == r["corpus"]}
        ds, dt = same["datasketch"], same.get("datatrove")
        vs_dt = f"{r['docs_per_s'] / dt['docs_per_s']:.2f}" if dt else "-"
        print(f"| {r['corpus']} | {r['method']} | {r['documents']:,} | {r['duplicates']:,} | {r['removed']:,} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {r['docs_per_s']:,.0f} | "
              f"{r['docs_per_s'] / ds['docs_per_s']:.2f} | {vs_dt} | {r['peak_mb']:,.0f} | "
              f"{r['peak_mb'] / ds['peak_mb']:.2f} |")
    if clean_rows:
        print("\n| data clean: documents | docs/s | peak MB | x smallest |")
        print("|---|---|---|---|")
        for r in clean_rows:
            print(f"| {r['documents']:,} | {r['docs_per_s']:,.0f} | {r['peak_mb']:,.0f} | "
                  f"{r['peak_mb'] / clean_rows[0]['peak_mb']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000, help="synthetic documents (default 100000)")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--clean-sizes", default="1000,4000,16000", help="slices of the corpus data clean runs on")
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--out", help="keep the corpora and results here (default: a temporary directory)")
    ap.add_argument("--child"), ap.add_argument("--folder"), ap.add_argument("--work"), ap.add_argument("--result")
    args = ap.parse_args()
    if args.child:
        return child(args)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tunelab-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    docs, planted = synthetic(args.docs)
    print(f"corpus of {len(docs):,} documents generated in {time.time() - start:.0f}s", flush=True)
    rows = dedup_table("synthetic", docs, planted, root, args)
    print_tables(rows, [])
    real = cpsycound()
    if real is not None:
        rows += dedup_table("cpsycound", *real, root, args)
    sizes = [int(x) for x in args.clean_sizes.split(",") if x]
    clean_rows = clean_scaling(docs, root, sizes, args) if sizes else []
    print_tables(rows, clean_rows)
    (root / "results.json").write_text(json.dumps({"dedup": rows, "clean": clean_rows}, indent=1))
    print(f"\nthreshold {args.threshold}, {args.num_perm} permutations, 5-token shingles; one core each; "
          f"{time.time() - start:.0f}s in all; results in {root}/results.json")


if __name__ == "__main__":
    main()
