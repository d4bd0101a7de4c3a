"""Unicode: normalisation, control characters, mojibake repaired by ftfy or the document dropped.

ftfy repairs text that was encoded as UTF-8 and decoded as Latin-1 or cp1252 (`Ã©` -> `é`, `ä½\\xa0å¥½` -> `你好`).
What it cannot repair (GBK read as Latin-1, the `锟斤拷` of a U+FFFD that went through GBK, U+FFFD itself, C1 control
characters) is counted as mis-decoding characters; a document whose share of them is above `max_mojibake_ratio`
is dropped. ftfy is told to leave full-width punctuation and curly quotes alone: they are correct Chinese and English.
"""

from __future__ import annotations

import re
import unicodedata

from tunelab.clean.config import UnicodeFilter

# C0 controls except \t \n, DEL, C1 controls, zero-width and direction marks, the BOM
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
C1 = re.compile("[\x80-\x9f]")
KUNKAO = re.compile("(锟斤拷|烫烫烫|屯屯屯)")  # U+FFFD / uninitialised bytes read as GBK
_FIXER = None


def _fixer_config():
    global _FIXER
    if _FIXER is None:
        import ftfy

        _FIXER = ftfy.TextFixerConfig(fix_character_width=False, uncurl_quotes=False, fix_latin_ligatures=False,
                                      unescape_html=False, normalization=None, explain=False,
                                      remove_control_chars=False, fix_line_breaks=False)
    return _FIXER


def mojibake_chars(text: str) -> int:
    """Characters that only mis-decoding produces: ftfy's badness count, U+FFFD, C1 controls, 锟斤拷-style runs."""
    from ftfy.badness import badness

    return badness(text) + text.count("\ufffd") + len(C1.findall(text)) + 3 * len(KUNKAO.findall(text))


def _may_be_mojibake(text: str) -> bool:
    """A fast gate before ftfy (~1 ms a page): ASCII text cannot hold mojibake; other text goes to ftfy when its
    badness heuristic fires or it holds U+FFFD, C1 controls or 锟斤拷-style runs."""
    if text.isascii():
        return False
    from ftfy.badness import is_bad

    return is_bad(text) or "\ufffd" in text or C1.search(text) is not None or KUNKAO.search(text) is not None


def fix_unicode(text: str, cfg: UnicodeFilter) -> tuple[str | None, list[str]]:
    """(fixed text, the changes made), or (None, [reason]) when the document is dropped as unrepairable."""
    changes: list[str] = []
    if cfg.fix_mojibake and _may_be_mojibake(text):
        import ftfy

        fixed = ftfy.fix_text(text, _fixer_config())
        if fixed != text:
            changes.append("mojibake_repaired")
            text = fixed
        if mojibake_chars(text) / len(text) > cfg.max_mojibake_ratio:
            return None, ["mojibake"]
    if cfg.remove_control:
        stripped = CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
        if stripped != text:
            changes.append("control_removed")
            text = stripped
    if cfg.normalize != "none":
        normal = unicodedata.normalize(cfg.normalize, text)
        if normal != text:
            changes.append("normalized")
            text = normal
    return text, changes
