"""Language identification with py3langid (langid.py's model, shipped inside the wheel: nothing is downloaded).

A document is kept when its most likely language is one of `languages` with a normalised probability of at least
`min_score` (FineWeb keeps English at 0.65 with fastText). Only the first `MAX_CHARS` characters are classified.
"""

from __future__ import annotations

from tunelab.clean.config import LanguageFilter

MAX_CHARS = 1500
_IDENTIFIER = None


def identifier():
    """One py3langid identifier per process, with normalised probabilities (loaded on first use, ~0.5 s)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def detect(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the text's most likely language."""
    lang, score = identifier().classify(text[:MAX_CHARS])
    return lang, float(score)


def language_reason(text: str, cfg: LanguageFilter) -> tuple[str, str | None]:
    """(detected language, reason to drop or None)."""
    lang, score = detect(text)
    if not cfg.languages:
        return lang, None
    if lang not in cfg.languages:
        return lang, "other_language"
    if score < cfg.min_score:
        return lang, "low_confidence"
    return lang, None
