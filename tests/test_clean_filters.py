"""Every cleaning filter on text with a known answer, in English and in Chinese."""

from __future__ import annotations

import pytest

from tunelab.clean.config import LanguageFilter, LineFilter, PiiFilter, QualityFilter, UnicodeFilter
from tunelab.clean.language import language_reason
from tunelab.clean.lines import clean_lines, line_key, line_keys, line_reason
from tunelab.clean.pii import mask_pii, valid_id_card
from tunelab.clean.quality import is_chinese, quality_reason, repetition_reason
from tunelab.clean.unicode import fix_unicode

EN = ("The river flows past the old mill, and the baker walks to the harbour with bread for the sailors. "
      "They have been at sea for many days and are glad to see the town again. In the evening the lanterns "
      "are lit along the quay, and the children of the town run to meet the boats that come in with the tide. "
      "The old tailor sits by his window and watches them, and he remembers the years when he too went to sea "
      "with his father and his brothers.")
ZH = ("河水流过老磨坊，面包师带着面包走向港口，送给那些在海上漂了很多天的水手。他们终于又看到了这座小镇，心里非常"
      "高兴。到了晚上，码头上的灯笼一盏一盏亮起来，镇上的孩子们跑去迎接随着潮水回来的船。老裁缝坐在窗前看着他们，"
      "想起了自己年轻的时候，也曾和父亲、兄弟们一起出海打鱼。")


# --- unicode -----------------------------------------------------------------------------------------------


def test_mojibake_of_utf8_read_as_cp1252_is_repaired_in_english_and_chinese():
    cfg = UnicodeFilter()
    text, changes = fix_unicode("CafÃ© naÃ¯ve rÃ©sumÃ©", cfg)
    assert text == "Café naïve résumé" and "mojibake_repaired" in changes
    broken = "你好，世界。".encode().decode("cp1252", errors="replace")
    assert broken != "你好，世界。"
    text, _ = fix_unicode(broken, cfg)
    assert text == "你好，世界。"  # full-width punctuation is kept, not turned into ASCII


def test_unrepairable_mojibake_drops_the_document():
    cfg = UnicodeFilter()
    gbk_as_latin1 = "你好，世界，今天天气很好。".encode("gbk").decode("latin-1")
    assert fix_unicode(gbk_as_latin1, cfg) == (None, ["mojibake"])
    assert fix_unicode("锟斤拷锟斤拷" + ZH[:20], cfg) == (None, ["mojibake"])
    assert fix_unicode(ZH, cfg) == (ZH, [])  # correct Chinese is untouched
    assert fix_unicode(EN, cfg) == (EN, [])


def test_control_characters_and_nfc():
    cfg = UnicodeFilter()
    text, changes = fix_unicode("a\x00b\u200bc\r\nd e\u0301", cfg)  # NUL, zero-width space, CRLF, e + combining acute
    assert text == "abc\nd é" and set(changes) == {"control_removed", "normalized"}
    text, _ = fix_unicode("中\ufeff文\x07。", cfg)
    assert text == "中文。"


# --- lines -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, rule", [
    ("Home | About | Contact", "navigation"), ("首页 > 新闻 > 正文", "navigation"),
    ("首页 新闻 体育 财经 娱乐", "navigation"),
    ("Leave a reply", "boilerplate"), ("Share on Facebook", "boilerplate"), ("点击这里阅读全文", "boilerplate"),
    ("分享到：微信 微博 QQ", "boilerplate"), ("12 comments", "counter"), ("阅读 1234", "counter"),
    ("© 2024 Example Inc. All rights reserved.", "copyright"), ("版权所有 京ICP备12345678号", "copyright"),
    ("http://a.example/x http://b.example/y", "links"), ("This site uses cookies to improve your visit.", "c4"),
    ("请阅读我们的隐私政策。", "c4"),
    ("Next, we go home.", None), ("谢谢你的回复。", None), ("and/or the A/B test", None), (EN[:80], None),
    (ZH[:40], None),
])
def test_line_rules(line, rule):
    assert line_reason(line, LineFilter()) == rule


def test_clean_lines_keeps_text_removes_boilerplate_and_citations():
    doc = f"Home | News | Sport\n{EN}[1]\nShare on Twitter\n{ZH}\n版权所有 © 2024"
    text, gone, reason = clean_lines(doc, LineFilter())
    assert reason is None and text == f"{EN}\n{ZH}"
    assert [r for r, _ in gone] == ["navigation", "boilerplate", "copyright"]
    assert clean_lines("Lorem ipsum dolor sit amet.\n" + EN, LineFilter())[2] == "lorem_ipsum"


def test_repeated_lines_across_documents():
    cfg = LineFilter(repeated_min_docs=3)
    banner = "欢迎访问本站，获取更多精彩内容"
    assert line_key("Visit our shop today!") == line_key("visit our SHOP today")  # CCNet's normal form
    assert line_key("Call 555 1234") == line_key("Call 999 8888")  # digits as 0
    assert line_keys(f"{banner}\n好的。\n{banner}", cfg) == {line_key(banner)}  # distinct; short lines not counted
    text, gone, _ = clean_lines(f"{banner}\n{ZH}", cfg, repeated={line_key(banner)})
    assert text == ZH and gone == [("repeated", banner)]


def test_min_words_and_removed_fraction():
    text, gone, _ = clean_lines("two words\n" + EN, LineFilter(min_words=3))
    assert text == EN and gone == [("short", "two words")]
    nav = "\n".join(["Home | News | Sport"] * 5)
    assert clean_lines(nav + "\nA short line.", LineFilter(max_removed_fraction=0.05))[2] == "too_many_lines_removed"


# --- quality -----------------------------------------------------------------------------------------------


def test_gopher_quality_passes_prose_in_both_languages():
    cfg = QualityFilter()
    assert is_chinese(ZH) and not is_chinese(EN)
    assert quality_reason(EN, cfg) is None
    assert quality_reason(ZH, cfg) is None
    assert repetition_reason(EN, cfg) is None
    assert repetition_reason(ZH, cfg) is None


@pytest.mark.parametrize("text, reason", [
    ("Too short to be a document.", "too_few_words"),
    ("短短的一句话。", "too_few_words"),
    (" ".join(["supercalifragilisticexpialidocious"] * 60), "mean_word_length"),
    (EN + " #tag" * 20, "hash_ratio"),
    (EN + " and then..." * 20, "ellipsis_ratio"),
    ("\n".join(f"- the meadow beside the river, part {i}" for i in range(60)), "bullet_lines"),
    (" ".join(["1999 2000 2001 river"] * 30), "alpha_words"),
    ("\n".join(f"Stone river lantern meadow copper {i}." for i in range(40)), "stop_words"),
    ("山河湖海城村花草鸟鱼红蓝绿金银铜" * 8, "stop_words"),
])
def test_gopher_quality_rules(text, reason):
    assert quality_reason(text, QualityFilter()) == reason


@pytest.mark.parametrize("text, reason", [
    ("\n".join([EN[:60]] * 4 + [EN]), "dup_lines"),
    ("\n".join(["我们今天一起去公园散步吧。"] * 4 + [ZH]), "dup_lines"),
    (EN + "\n\n" + EN, "dup_paragraphs"),
    (" ".join(["the cat sat"] * 40), "top_2gram"),
    ("我们的" * 60, "top_2gram"),
])
def test_gopher_repetition_rules(text, reason):
    assert repetition_reason(text, QualityFilter()) == reason


def test_repeated_ngrams_in_chinese_count_characters():
    cfg = QualityFilter()
    doc = ZH + ZH[:60] + "。"  # 60 characters of the document again: 10-character n-grams repeated
    assert repetition_reason(doc, cfg) is not None
    assert repetition_reason(doc, cfg.model_copy(update={"repetition": False, "dup_ngram_chars": {},
                                                         "top_ngram_chars": {}})) is None


# --- language ----------------------------------------------------------------------------------------------


def test_language_filter():
    cfg = LanguageFilter()
    assert language_reason(EN, cfg) == ("en", None)
    assert language_reason(ZH, cfg) == ("zh", None)
    fr = "Le boulanger marche vers le port avec du pain pour les marins qui sont restés en mer pendant des jours."
    assert language_reason(fr, cfg) == ("fr", "other_language")
    assert language_reason(fr, LanguageFilter(languages=[])) == ("fr", None)  # label only
    assert language_reason(fr, LanguageFilter(languages=["fr"], min_score=1.0))[1] == "low_confidence"


# --- pii ---------------------------------------------------------------------------------------------------


def test_pii_masking_english_and_chinese():
    cfg = PiiFilter(enabled=True)
    text, counts = mask_pii("Write to jane.doe@example.co.uk or call (555) 123-4567 or +44 20 7946 0958.", cfg)
    assert text == "Write to <EMAIL> or call <PHONE> or <PHONE>."
    assert counts == {"email": 1, "phone": 2, "id_card": 0}
    assert valid_id_card("11010519491231002X") and not valid_id_card("110105194912310021")
    text, counts = mask_pii("张三的电话是13800138000，座机010-12345678，身份证号11010519491231002X，"
                            "订单号110105194912310021。", cfg)
    assert text == "张三的电话是<PHONE>，座机<PHONE>，身份证号<ID>，订单号110105194912310021。"
    assert counts == {"email": 0, "phone": 2, "id_card": 1}
    assert mask_pii("The year 2024 had 365 days.", cfg)[0] == "The year 2024 had 365 days."
