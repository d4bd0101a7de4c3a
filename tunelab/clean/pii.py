"""PII masking: e-mail addresses, phone numbers (Chinese mobile and landline, international) and Chinese resident
ID numbers (18 characters whose check digit is right, GB 11643-1999), each replaced by a token."""

from __future__ import annotations

import re

from tunelab.clean.config import PiiFilter

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
ID_CARD = re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]"
                     r"(?![0-9A-Za-z])")
PHONE = re.compile(
    r"(?<![\d+])(?:"
    r"(?:\+?86[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}"  # Chinese mobile: 138 0013 8000, +86 13800138000
    r"|0\d{2,3}-\d{7,8}"  # Chinese landline: 010-12345678
    r"|\+\d{1,3}[ .-]?\(?\d{2,4}\)?(?:[ .-]?\d{2,4}){2,3}"  # international: +44 20 7946 0958
    r"|\(\d{3}\)\s?\d{3}-\d{4}|\d{3}-\d{3}-\d{4}"  # North American: (555) 123-4567, 555-123-4567
    r")(?!\d)")
WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
CHECK = "10X98765432"


def valid_id_card(number: str) -> bool:
    """The check digit of an 18-character Chinese resident ID number is right."""
    total = sum(int(d) * w for d, w in zip(number[:17], WEIGHTS))
    return CHECK[total % 11] == number[17].upper()


def mask_pii(text: str, cfg: PiiFilter) -> tuple[str, dict[str, int]]:
    """(masked text, {"email"|"phone"|"id_card": how many were masked})."""
    counts = {"email": 0, "phone": 0, "id_card": 0}

    def sub(kind: str, token: str):
        def repl(m: re.Match) -> str:
            if kind == "id_card" and not valid_id_card(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return token
        return repl

    if cfg.email:
        text = EMAIL.sub(sub("email", cfg.email_token), text)
    if cfg.id_card:
        text = ID_CARD.sub(sub("id_card", cfg.id_token), text)
    if cfg.phone:
        text = PHONE.sub(sub("phone", cfg.phone_token), text)
    return text, counts
