import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunelab.errors import ConfigError
from tunelab.vocab.train import train_tokenizer

MIXED = [
    "Hello, world! The harbour of 青禾 opens at 9:30.",
    "中文和English混合，标点符号：「引号」、（括号）……",
    "  leading spaces, trailing spaces  \n\ttabs\r\nand CRLF",
    "unseen characters: 鑫 𠀋 é (e + combining accent: e\u0301) ñ Ω 😀",
    "数字 3.14159 and code: def f(x): return x**2",
]


def test_roundtrip_english_chinese_exact(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)  # plain transformers, no tunelab
    for text in MIXED:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") == 3


def test_special_tokens_and_chat_template(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # special tokens are single ids, never split
    assert tok("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == 2
    text = tok.apply_chat_template([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"}],
                                   tokenize=False)
    assert text == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
    prompt = tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_learns_merges_from_the_corpus(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # words that are frequent in the corpus become few tokens; Chinese bytes merge into characters
    assert len(tok("lantern", add_special_tokens=False)["input_ids"]) <= 2
    assert len(tok("山", add_special_tokens=False)["input_ids"]) == 1


def test_vocab_too_small_is_an_error():
    with pytest.raises(ConfigError, match="vocab_size=100 is too small"):
        train_tokenizer(["abc"], vocab_size=100)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "cpsycound" / "cpsycound.jsonl").is_file(), reason="../shared/data absent")
def test_roundtrip_on_real_chinese_counselling_dialogues():
    lines = (SHARED / "cpsycound" / "cpsycound.jsonl").read_text(encoding="utf-8").splitlines()[:300]
    texts = [m["content"] for line in lines for m in json.loads(line)["messages"]]
    for split_cjk in (False, True):
        tok = train_tokenizer(texts[:2000], vocab_size=2000, split_cjk=split_cjk)
        for text in texts[2000:2300]:
            assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # with split_cjk no token holds more than one Chinese character
    assert all(sum("\u4e00" <= ch <= "\u9fff" for ch in tok.decode([i])) <= 1 for i in range(len(tok)))
