"""The fast ROUGE-L novelty index gives exactly the all-pairs loop's decisions (and rouge_score's, when installed)."""

from __future__ import annotations

import random

import pytest

from tunelab.data.rouge import (
    NaiveRougeIndex,
    RougeIndex,
    lcs_bits,
    lcs_length,
    match_masks,
    rouge_l,
    rouge_tokens,
)

WORDS = "give a list of the best ways to write an email explain why sky is blue sort these numbers in order".split()


def test_bit_parallel_lcs_equals_the_dynamic_programme():
    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.choice("abcdef") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 40))]
        assert lcs_bits(match_masks(a), len(a), b) == lcs_length(a, b)
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4


def test_tokens_are_rouge_scores_and_chinese_is_character_level():
    assert rouge_tokens("Write a one-sentence poem, café!") == ["write", "a", "one", "sentence", "poem", "caf"]
    assert rouge_tokens("给出三个GPT的例子") == ["给", "出", "三", "个", "gpt", "的", "例", "子"]
    # 2 * lcs / (m + n): "请写一首关于春天的诗" vs "请写一首关于秋天的诗": lcs 9 of 10 and 10
    assert rouge_l(rouge_tokens("请写一首关于春天的诗"), rouge_tokens("请写一首关于秋天的诗")) == pytest.approx(0.9)


def _candidates(rng: random.Random, n: int) -> list[list[str]]:
    """Instructions with many near-duplicates (a word dropped, swapped or added) and exact repeats."""
    out: list[list[str]] = []
    for _ in range(n):
        if out and rng.random() < 0.6:
            t = list(rng.choice(out))
            op = rng.random()
            if op < 0.3 and len(t) > 1:
                del t[rng.randrange(len(t))]
            elif op < 0.6:
                t[rng.randrange(len(t))] = rng.choice(WORDS)
            elif op < 0.9:
                t.insert(rng.randrange(len(t) + 1), rng.choice(WORDS))
        else:
            t = [rng.choice(WORDS) for _ in range(rng.randint(1, 14))]
        out.append(t)
    return out


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.0])
def test_index_decides_exactly_as_all_pairs(threshold):
    rng = random.Random(int(threshold * 10))
    fast, naive = RougeIndex(threshold), NaiveRougeIndex(threshold)
    kept = 0
    for tokens in _candidates(rng, 400):
        f, n = fast.most_similar(tokens), naive.most_similar(tokens)
        assert (f[1] is None) == (n[1] is None), (tokens, f, n)
        if n[1] is not None:  # rejected: the same most similar instruction and the same score, bit for bit
            assert f == n
        else:
            fast.add(tokens)
            naive.add(tokens)
            kept += 1
    assert 0 < kept < 400 or threshold in (0.0, 1.0)
    assert fast.exact_checks < fast.pairs  # it pruned


def test_index_equals_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(5)
    texts = [" ".join(t) for t in _candidates(rng, 200)]
    fast, kept = RougeIndex(0.7), []
    for text in texts:
        score, doc = fast.most_similar(rouge_tokens(text))
        peer = max((scorer.score(text, k)["rougeL"].fmeasure for k in kept), default=0.0)
        assert (doc is not None) == (peer > 0.7), text
        if doc is not None:
            assert score == peer
        else:
            fast.add(rouge_tokens(text))
            kept.append(text)
