"""Gopher's document rules (Rae et al. 2021, appendix A; the thresholds of datatrove's Gopher filters).

Quality: number of words, mean word length, '#' and ellipsis per word, bullet and ellipsis lines, words with a
letter, stop words. Repetition: duplicate lines and paragraphs (count and characters), the most frequent 2-4-gram's
share of the characters, the share of characters in repeated 5-10-grams.

Chinese has no spaces between words, so a document that is mostly Chinese characters is counted in characters:
words are Chinese characters (and runs of Latin letters or digits), the word count is the character count over
`zh_chars_per_word`, the mean word length rule is not applied, the stop words are Chinese function characters, and
n-grams are of `n * zh_ngram_scale` characters.
"""

from __future__ import annotations

import re
from collections import Counter

from tunelab.clean.config import QualityFilter
from tunelab.clean.lines import words as tokens

STOP_EN = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
STOP_ZH = frozenset("的了是在和有我不这也就都你他她们")
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
LATIN = re.compile(r"[A-Za-z]")
BULLETS = ("•", "-", "*", "·", "●", "▪", "◦")
PARAGRAPHS = re.compile(r"\n\s*\n")


def is_chinese(text: str) -> bool:
    """Mostly Chinese: at least as many Chinese characters as Latin letters."""
    cjk = len(CJK.findall(text))
    return cjk > 0 and cjk >= len(LATIN.findall(text))


def quality_reason(text: str, cfg: QualityFilter) -> str | None:
    """The first Gopher quality rule the document fails (its name), or None."""
    zh = is_chinese(text)
    if zh:
        words = tokens(text)
        cjk = sum(1 for w in words if CJK.match(w))
        n_words = cjk / cfg.zh_chars_per_word + (len(words) - cjk)
    else:
        words = [w for w in text.split() if any(c.isalnum() for c in w)]
        n_words = len(words)
    if n_words < cfg.min_words:
        return "too_few_words"
    if n_words > cfg.max_words:
        return "too_many_words"
    if not zh:
        mean = sum(len(w) for w in words) / len(words)
        if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
            return "mean_word_length"
    if text.count("#") / n_words > cfg.max_symbol_ratio:
        return "hash_ratio"
    if (text.count("...") + text.count("…")) / n_words > cfg.max_symbol_ratio:
        return "ellipsis_ratio"
    lines = [s.strip() for s in text.split("\n") if s.strip()]
    if lines and sum(s.startswith(BULLETS) for s in lines) / len(lines) > cfg.max_bullet_lines:
        return "bullet_lines"
    if lines and sum(s.endswith(("...", "…")) for s in lines) / len(lines) > cfg.max_ellipsis_lines:
        return "ellipsis_lines"
    if sum(any(c.isalpha() for c in w) for w in words) / len(words) < cfg.min_alpha_words:
        return "alpha_words"
    stops = sum(1 for c in text if c in STOP_ZH) if zh else sum(w.lower().strip(".,;:!?\"'") in STOP_EN
                                                                  for w in words)
    if stops < cfg.min_stop_words:
        return "stop_words"
    return None


def _dup_fractions(parts: list[str]) -> tuple[float, float]:
    """(share of parts that repeat an earlier one, share of characters in them)."""
    seen: set[str] = set()
    dup = dup_chars = 0
    for p in parts:
        if p in seen:
            dup += 1
            dup_chars += len(p)
        seen.add(p)
    total_chars = sum(len(p) for p in parts)
    return dup / len(parts), dup_chars / max(total_chars, 1)


def _top_ngram_chars(words: list[str], n: int, sep: str) -> int:
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(sep.join(gram)) * count if count > 1 else 0


def _dup_ngram_chars(words: list[str], n: int, sep: str) -> int:
    """Characters of the words inside n-grams that occurred before (each word counted once)."""
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            covered[i:i + n] = [True] * n
        seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c) + (len(sep) * sum(covered) if sep else 0)


def repetition_reason(text: str, cfg: QualityFilter) -> str | None:
    """The first Gopher repetition rule the document fails (its name), or None."""
    paragraphs = [p for p in PARAGRAPHS.split(text) if p.strip()]
    if len(paragraphs) > 1:
        frac, chars = _dup_fractions(paragraphs)
        if frac > cfg.max_dup_para_fraction:
            return "dup_paragraphs"
        if chars > cfg.max_dup_para_chars:
            return "dup_paragraph_chars"
    lines = [s for s in text.split("\n") if s.strip()]
    if lines:
        frac, chars = _dup_fractions(lines)
        if frac > cfg.max_dup_line_fraction:
            return "dup_lines"
        if chars > cfg.max_dup_line_chars:
            return "dup_line_chars"
    zh = is_chinese(text)
    words, sep, scale = (tokens(text), "", cfg.zh_ngram_scale) if zh else (text.split(), " ", 1)
    total = sum(len(w) for w in words) + (len(sep) * max(len(words) - 1, 0))
    if not total:
        return None
    for n, limit in sorted(cfg.top_ngram_chars.items()):
        if _top_ngram_chars(words, n * scale, sep) / total > limit:
            return f"top_{n}gram"
    for n, limit in sorted(cfg.dup_ngram_chars.items()):
        if _dup_ngram_chars(words, n * scale, sep) / total > limit:
            return f"dup_{n}gram"
    return None
