"""The cost of Self-Instruct's ROUGE-L novelty check as the pool of kept tasks grows: tunelab's inverted index vs the
all-pairs loop (tunelab's own dynamic programme, and the `rouge_score` package the original code calls, as Alpaca
calls it on pre-tokenised instructions and as Self-Instruct calls it on strings).

The pool: N instructions sampled from a word-bigram model of the 175 Alpaca seed tasks (their instructions, inputs
and outputs), 6-30 words, so the token statistics (stop words, common verbs) are those of real instructions. The
candidates: half fresh samples (mostly novel), half copies of pool members with one word dropped or replaced
(mostly rejected). Every method must reach the same decision on every candidate; the script stops otherwise.

    python benchmarks/self_instruct_rouge.py [--sizes 1000 10000 50000] [--seed-tasks FILE] [--grow 50000]

Prints, per pool size, the mean time to check one candidate and the ratios. `pip install rouge-score` (the
`bench` extra) for the peer rows.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

from tunelab.data.rouge import NaiveRougeIndex, RougeIndex, rouge_tokens

SEEDS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "alpaca_seed_tasks.jsonl"


def bigram_model(seed_file: Path) -> dict[str, list[str]]:
    follows: dict[str, list[str]] = defaultdict(list)
    for line in seed_file.read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        texts = [task["instruction"]] + [x for inst in task["instances"] for x in (inst["input"], inst["output"])]
        for text in texts:
            words = ["<s>"] + text.split()
            for a, b in zip(words, words[1:]):
                follows[a].append(b)
    return follows


def sample_instruction(follows: dict[str, list[str]], rng: random.Random) -> str:
    n = rng.randint(6, 30)
    words, w = [], "<s>"
    while len(words) < n:
        w = rng.choice(follows[w]) if follows.get(w) else rng.choice(follows["<s>"])
        words.append(w)
    return " ".join(words)


def perturbed(text: str, follows: dict[str, list[str]], rng: random.Random) -> str:
    words = text.split()
    i = rng.randrange(len(words))
    if rng.random() < 0.5 and len(words) > 6:
        del words[i]
    else:
        words[i] = rng.choice(follows["<s>"])
    return " ".join(words)


def timed(check, candidates) -> tuple[float, list[bool]]:
    t0 = time.perf_counter()
    decisions = [check(c) for c in candidates]
    return (time.perf_counter() - t0) / len(candidates), decisions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--seed-tasks", type=Path, default=SEEDS)
    ap.add_argument("--candidates", type=int, default=200, help="candidates timed with the index")
    ap.add_argument("--naive-pairs", type=int, default=150_000, help="pairs scored per all-pairs method and size")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--grow", type=int, default=0, help="only grow a pool to this many kept tasks with the index "
                                                       "(candidates as above, a third near-copies of kept ones)")
    args = ap.parse_args()
    if args.grow:
        grow(args)
        return
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        rouge_scorer = None
        print("rouge_score not installed (pip install rouge-score): peer rows skipped")
    follows = bigram_model(args.seed_tasks)
    rng = random.Random(0)
    pool = [sample_instruction(follows, rng) for _ in range(max(args.sizes))]
    print(f"pool: {len(pool):,} bigram instructions, {sum(len(rouge_tokens(p)) for p in pool) / len(pool):.1f} "
          f"tokens on average; threshold {args.threshold}")
    rows = []
    for size in args.sizes:
        fast, naive = RougeIndex(args.threshold), NaiveRougeIndex(args.threshold)
        t0 = time.perf_counter()
        for text in pool[:size]:
            fast.add(rouge_tokens(text))
        index_s = time.perf_counter() - t0
        for text in pool[:size]:
            naive.add(rouge_tokens(text))
        crng = random.Random(size)
        texts = [sample_instruction(follows, crng) if i % 2 == 0 else perturbed(crng.choice(pool[:size]), follows,
                                                                                   crng)
                 for i in range(args.candidates)]
        n_slow = max(2, min(args.candidates, args.naive_pairs // size))
        fast_s, fast_d = timed(lambda t, ix=fast: ix.most_similar(rouge_tokens(t))[1] is not None, texts)
        exact_share = fast.exact_checks / fast.pairs
        naive_s, naive_d = timed(lambda t, ix=naive: ix.most_similar(rouge_tokens(t))[1] is not None,
                                 texts[:n_slow])
        assert naive_d == fast_d[:n_slow], f"pool {size}: the index and the all-pairs loop disagree"
        row = {"size": size, "fast_ms": fast_s * 1e3, "naive_ms": naive_s * 1e3, "index_build_s": index_s,
               "exact_share": exact_share, "rejected": sum(fast_d) / len(fast_d), "naive_candidates": n_slow}
        if rouge_scorer is not None:
            scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
            pool_tokens = [scorer._tokenizer.tokenize(t) for t in pool[:size]]

            def alpaca(t, pool_tokens=pool_tokens, scorer=scorer):  # Alpaca: pre-tokenised, _score_lcs per pair
                new = scorer._tokenizer.tokenize(t)
                return max(rouge_scorer._score_lcs(new, p).fmeasure for p in pool_tokens) > args.threshold

            def self_instruct(t, size=size, scorer=scorer):  # Self-Instruct: scorer.score on the strings
                return max(scorer.score(t, p)["rougeL"].fmeasure for p in pool[:size]) > args.threshold

            n_peer = max(2, n_slow // 2)
            row["alpaca_ms"], d = timed(alpaca, texts[:n_peer])
            assert d == fast_d[:n_peer], f"pool {size}: the index and rouge_score (Alpaca's loop) disagree"
            row["self_instruct_ms"], d = timed(self_instruct, texts[:n_peer])
            assert d == fast_d[:n_peer], f"pool {size}: the index and rouge_score (Self-Instruct's loop) disagree"
            row["alpaca_ms"] *= 1e3
            row["self_instruct_ms"] *= 1e3
            row["peer_candidates"] = n_peer
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| kept tasks | tunelab index | all-pairs DP (tunelab) | rouge_score, Alpaca's loop | rouge_score, "
          "Self-Instruct's loop | exact LCS share | speed-up vs Alpaca's loop |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peer = r.get("alpaca_ms")
        print(f"| {r['size']:,} | {r['fast_ms']:.2f} ms | {r['naive_ms']:.1f} ms "
              f"({r['naive_ms'] / r['fast_ms']:.0f}x) | "
              + (f"{peer:.1f} ms | {r['self_instruct_ms']:.1f} ms | " if peer else "n/a | n/a | ")
              + f"{r['exact_share']:.2%} | " + (f"{peer / r['fast_ms']:.0f}x |" if peer else "n/a |"))
    print("(mean time to check one candidate against the whole pool; decisions identical across methods)")


def grow(args) -> None:
    """The whole novelty loop of a run that keeps `args.grow` tasks: every candidate checked, the novel ones kept."""
    follows = bigram_model(args.seed_tasks)
    rng = random.Random(1)
    index, kept, candidates = RougeIndex(args.threshold), [], 0
    t0, marks = time.perf_counter(), {}
    while len(kept) < args.grow:
        text = perturbed(rng.choice(kept), follows, rng) if kept and rng.random() < 1 / 3 else \
            sample_instruction(follows, rng)
        candidates += 1
        tokens = rouge_tokens(text)
        if index.most_similar(tokens)[1] is None:
            index.add(tokens)
            kept.append(text)
            if len(kept) in (1000, 10000, 50000, args.grow):
                marks[len(kept)] = (time.perf_counter() - t0, candidates)
    for n, (s, c) in sorted(marks.items()):
        print(f"grown to {n:,} kept tasks: {s:.1f} s for {c:,} candidates ({s / c * 1e3:.2f} ms per candidate)")
    print(f"exact LCS for {index.exact_checks:,} of {index.pairs:,} candidate-kept pairs "
          f"({index.exact_checks / index.pairs:.4%})")


if __name__ == "__main__":
    main()
