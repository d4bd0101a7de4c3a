"""Line-level cleaning: boilerplate and spam lines, link lists, C4's line rules, lines repeated across documents.

- boilerplate: navigation bars (three or more short items between separators: `Home | News | Contact`,
  `首页 > 新闻 > 正文`), short share/login/comment/"read more" lines in English and Chinese, social counters
  (`12 comments`, `阅读 1234`), copyright and ICP licence lines;
- link lists: lines whose characters are mostly URLs;
- C4 (Raffel et al. 2020, as datatrove's C4QualityFilter): lines naming javascript, cookies, terms of use or a
  privacy policy are dropped, citation markers (`[1]`, `[citation needed]`, `[edit]`) are cut, and a document
  holding "lorem ipsum" is dropped whole;
- repeated (CCNet, Wenzek et al. 2020): a line whose normalised form (lower case, digits as 0, no punctuation or
  spaces) appears in at least `repeated_min_docs` documents of the corpus is boilerplate. The counts come from a
  first pass over every shard (`line_keys`), so the rule sees the whole corpus.
"""

from __future__ import annotations

import re

import xxhash

from tunelab.clean.config import LineFilter

NAV_SEPARATORS = re.compile(r"\s*(?:\||·|•|»|›|>|｜)\s*|\s+[/—–-]\s+")
ZH_NAV = re.compile(r"^[\u3400-\u9fff]{1,4}(?:\s+[\u3400-\u9fff]{1,4}){3,}$")  # 首页 新闻 体育 财经
NAV_ITEM = re.compile(r"^(?:\w+(?:\s+\w+){0,2})$")  # an item of at most three words (a Chinese run is one word)
SHORT_KEYWORDS = re.compile(
    r"\b(?:share(?: this)?|tweet|like us|follow us|log ?in|log ?out|sign ?in|sign ?up|register|subscribe|comments?|"
    r"leave a (?:comment|reply)|reply|print(?: this)?|email this|back to top|read more|click here|skip to (?:main )?"
    r"content|previous|next|home|menu|search)\b|分享|登录|登陆|注册|评论|回复|点赞|收藏|转发|关注我们|返回顶部|上一篇|"
    r"下一篇|阅读全文|阅读原文|点击|扫码|二维码|举报|首页|打印本页|关闭窗口|微信|微博|朋友圈|QQ空间|\b(?:facebook|twitter|"
    r"wechat|weibo|linkedin|whatsapp|qq)\b", re.IGNORECASE)
COUNTER = re.compile(r"^\s*(?:\d[\d,.]*\s*(?:likes?|comments?|shares?|views?|replies|retweets?)|"
                     r"(?:阅读|评论|点赞|浏览|转发|收藏)\s*[(（]?\s*\d+\s*[)）]?(?:\s*次)?)\s*$", re.IGNORECASE)
COPYRIGHT = re.compile(r"©|\bcopyright\b|all rights reserved|版权所有|版权声明|ICP\s*备|ICP证|公网安备", re.IGNORECASE)
URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
C4_LINE = re.compile(r"javascript|cookie|terms of use|terms of service|privacy policy|使用条款|隐私政策|隐私条款",
                     re.IGNORECASE)
CITATION = re.compile(r"\[\d+\]|\[citation needed\]|\[edit\]|\[编辑\]", re.IGNORECASE)
LOREM = re.compile(r"lorem ipsum", re.IGNORECASE)
TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+")  # one Chinese character, or a run of letters/digits
NORMAL_DROP = re.compile(r"[\W_]+")
DIGIT = re.compile(r"\d")
SHORT_LINE = 40  # characters: a keyword line longer than this is text that mentions the word


def words(text: str) -> list[str]:
    """Words as the rules count them: runs of letters or digits, and every Chinese character on its own."""
    return TOKEN.findall(text)


def normal_line(line: str) -> str:
    """CCNet's normal form: lower case, digits as 0, punctuation and white space removed."""
    return NORMAL_DROP.sub("", DIGIT.sub("0", line.lower()))


def line_key(line: str) -> int:
    """A stable 64-bit key of a line's normal form (the same in every process)."""
    return xxhash.xxh64_intdigest(normal_line(line).encode())


def line_keys(text: str, cfg: LineFilter) -> set[int]:
    """The keys of the distinct countable lines of one document (for the corpus-wide count)."""
    return {line_key(s) for s in text.split("\n") if len(normal_line(s)) >= cfg.repeated_min_chars}


def line_reason(line: str, cfg: LineFilter, repeated: set[int] | frozenset[int] = frozenset()) -> str | None:
    """Why a line is removed (the rule's name), or None to keep it."""
    s = line.strip()
    if not s:
        return None
    if cfg.boilerplate:
        if _is_navigation(s):
            return "navigation"
        if COUNTER.match(s):
            return "counter"
        if _is_boilerplate(s):
            return "boilerplate"
        if len(s) <= 200 and COPYRIGHT.search(s):
            return "copyright"
    if cfg.link_lists:
        url_chars = sum(len(m) for m in URL.findall(s))
        if url_chars and url_chars / len(s) >= cfg.max_link_ratio:
            return "links"
    if cfg.c4 and C4_LINE.search(s):
        return "c4"
    if cfg.min_words and len(words(s)) < cfg.min_words:
        return "short"
    if cfg.repeated and repeated and len(normal_line(s)) >= cfg.repeated_min_chars and line_key(s) in repeated:
        return "repeated"
    return None


def _is_boilerplate(s: str) -> bool:
    """A short line that is (almost) only share/login/comment/... words: what is left without them is at most
    30% of its letters and at most 8 of them ("Leave a reply", "点击这里阅读全文"; not "Next, we go home.")."""
    if len(s) > SHORT_LINE or not SHORT_KEYWORDS.search(s):
        return False
    total, rest = len(normal_line(s)), len(normal_line(SHORT_KEYWORDS.sub("", s)))
    return total > 0 and rest <= 0.3 * total and rest <= 8


def _is_navigation(s: str) -> bool:
    if ZH_NAV.match(s):
        return True
    items = [x for x in NAV_SEPARATORS.split(s) if x]
    if len(items) < 3 or len(s) > 120:
        return False
    return all(NAV_ITEM.match(x) and len(x) <= 16 for x in items)


def clean_lines(text: str, cfg: LineFilter, repeated: set[int] | frozenset[int] = frozenset()
                ) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """(kept text, [(rule, removed line)], reason the whole document is dropped or None)."""
    if cfg.c4 and LOREM.search(text):
        return None, [], "lorem_ipsum"
    kept: list[str] = []
    removed: list[tuple[str, str]] = []
    for line in text.split("\n"):
        reason = line_reason(line, cfg, repeated)
        if reason is None:
            kept.append(CITATION.sub("", line) if cfg.c4 else line)
        else:
            removed.append((reason, line))
    out = "\n".join(kept).strip("\n")
    removed_chars = sum(len(x) for _, x in removed)
    if removed and cfg.max_removed_fraction < 1 and removed_chars / max(len(text), 1) > cfg.max_removed_fraction:
        return None, removed, "too_many_lines_removed"
    return out, removed, None
