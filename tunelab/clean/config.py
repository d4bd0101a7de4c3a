"""Recipes of `tunelab data clean` and `tunelab data dedup`: every filter on or off, with its thresholds.

Defaults follow the published rules (Gopher's quality and repetition rules, C4's line rules, CCNet's repeated
lines, FineWeb's MinHash settings), with Chinese variants where a rule counts words: Chinese is counted in
characters. See ../shared/reference/pipeline.md section 3 and the docstring of each filter module.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.config import Section

Fraction = float


class UnicodeFilter(Section):
    """Normalisation, control characters, mojibake repaired by ftfy (or the document dropped)."""

    enabled: bool = True
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    remove_control: bool = True  # C0/C1 control characters except tab and newline; zero-width characters
    fix_mojibake: bool = True  # ftfy: UTF-8 that was decoded as Latin-1/cp1252 (and similar) is decoded again
    max_mojibake_ratio: Fraction = Field(0.01, ge=0, le=1)  # after repair: share of mis-decoding characters


class LineFilter(Section):
    """Line-level removal: boilerplate and spam lines, link lists, C4's rules, lines repeated across documents."""

    enabled: bool = True
    boilerplate: bool = True  # navigation, share/login/comment, copyright lines (English and Chinese)
    link_lists: bool = True  # lines that are mostly URLs
    max_link_ratio: Fraction = Field(0.5, ge=0, le=1)  # share of a line's characters inside URLs
    c4: bool = True  # C4: lines naming javascript, cookies, terms of use, privacy policy; citation markers [1]
    min_words: int = Field(0, ge=0)  # C4 drops lines of < 3 words; off by default (Chinese, dialogue turns)
    repeated: bool = True  # CCNet: a line found in at least `repeated_min_docs` documents is boilerplate
    repeated_min_docs: int = Field(10, ge=2)
    repeated_min_chars: int = Field(8, ge=1)  # shorter lines ("Yes.", "好的。") are never counted
    max_removed_fraction: Fraction = Field(1.0, ge=0, le=1)  # RefinedWeb: drop a document losing more (1: never)


class QualityFilter(Section):
    """Gopher's document rules (quality and repetition); Chinese documents are counted in characters."""

    enabled: bool = True
    min_words: int = Field(50, ge=0)  # non-symbol words (Chinese: characters / zh_chars_per_word)
    max_words: int = Field(100_000, ge=1)
    min_mean_word_length: float = Field(3.0, ge=0)  # not applied to Chinese
    max_mean_word_length: float = Field(10.0, ge=0)
    max_symbol_ratio: Fraction = Field(0.1, ge=0)  # '#' and '...'/'…' per word
    max_bullet_lines: Fraction = Field(0.9, ge=0, le=1)
    max_ellipsis_lines: Fraction = Field(0.3, ge=0, le=1)
    min_alpha_words: Fraction = Field(0.8, ge=0, le=1)  # words with a letter (a Chinese character counts)
    min_stop_words: int = Field(2, ge=0)  # English: the, be, to, ...; Chinese: 的, 了, 是, ...
    zh_chars_per_word: float = Field(1.5, gt=0)  # Chinese word count = characters / this (for min/max_words)
    repetition: bool = True
    max_dup_line_fraction: Fraction = Field(0.30, ge=0, le=1)
    max_dup_para_fraction: Fraction = Field(0.30, ge=0, le=1)
    max_dup_line_chars: Fraction = Field(0.20, ge=0, le=1)
    max_dup_para_chars: Fraction = Field(0.20, ge=0, le=1)
    top_ngram_chars: dict[int, Fraction] = {2: 0.20, 3: 0.18, 4: 0.16}
    dup_ngram_chars: dict[int, Fraction] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    zh_ngram_scale: int = Field(2, ge=1)  # Chinese n-grams are of n * this characters (a word is ~1.5-2 chars)


class LanguageFilter(Section):
    """py3langid (its model ships in the wheel): keep documents in `languages` with at least `min_score`."""

    enabled: bool = True
    languages: list[str] = ["en", "zh"]  # ISO 639-1 codes; empty: keep every language, only label
    min_score: Fraction = Field(0.65, ge=0, le=1)  # FineWeb's fastText threshold


class PiiFilter(Section):
    """Mask e-mail addresses, phone numbers and Chinese resident ID numbers (off by default)."""

    enabled: bool = False
    email: bool = True
    phone: bool = True
    id_card: bool = True
    email_token: str = "<EMAIL>"
    phone_token: str = "<PHONE>"
    id_token: str = "<ID>"


class CleanConfig(Section):
    """`tunelab data clean`: every filter on or off, with its thresholds."""

    text_key: str = "text"  # key of the text in .jsonl/.parquet records
    unicode: UnicodeFilter = UnicodeFilter()
    lines: LineFilter = LineFilter()
    quality: QualityFilter = QualityFilter()
    language: LanguageFilter = LanguageFilter()
    pii: PiiFilter = PiiFilter()
    min_chars: int = Field(1, ge=1)  # a document shorter than this after cleaning is dropped
    examples: int = Field(8, ge=0)  # removed lines/documents kept per filter for the report


class DedupConfig(Section):
    """`tunelab data dedup`: exact duplicates (hash of normalised text) and near duplicates (MinHash LSH)."""

    text_key: str = "text"
    exact: bool = True
    near: bool = True
    threshold: Fraction = Field(0.8, gt=0, lt=1)  # Jaccard similarity of shingle sets that counts as duplicate
    num_perm: int = Field(128, ge=2)
    ngram: int = Field(5, ge=1)  # shingles: n consecutive tokens (an English word or one Chinese character)
    seed: int = Field(1, ge=0)  # the permutations (datasketch's default seed is 1)
    bands: int | None = Field(None, ge=1)  # both null: chosen from the threshold (datasketch's optimal_param)
    rows: int | None = Field(None, ge=1)
    false_positive_weight: Fraction = Field(0.5, ge=0, le=1)
    verify: bool = False  # keep a candidate pair only when its estimated Jaccard >= threshold
    examples: int = Field(8, ge=0)
