"""Shared fixtures: a small bilingual corpus and a tokenizer trained on it (tests make their own data)."""

from __future__ import annotations

import json
import random

import pytest

WORDS_EN = "river stone lantern baker harbour meadow copper violet orchard tailor falcon willow".split()
WORDS_ZH = list("山河湖海城村花草鸟鱼红蓝绿金银铜")


def make_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Short documents with repeated structure, so a micro model can learn something in a few steps."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        if i % 3 == 2:
            docs.append("".join(rng.choice(WORDS_ZH) for _ in range(rng.randint(8, 30))) + "。")
        else:
            docs.append(" ".join(rng.choice(WORDS_EN) for _ in range(rng.randint(5, 25))) + ".")
    return docs


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in make_corpus(400)),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_file):
    from tunelab.vocab.train import train_tokenizer_files

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer_files([corpus_file], out, vocab_size=400)
    return out


def make_chats(n: int, seed: int = 0) -> list[dict]:
    """Multi-turn chats in OpenAI messages form with a learnable answer: the reply names a word's colour."""
    rng = random.Random(seed)
    colours = dict(zip(WORDS_EN, "red blue green red blue green red blue green red blue green".split()))
    chats = []
    for _ in range(n):
        messages = [{"role": "system", "content": "Answer with one word."}] if rng.random() < 0.3 else []
        for _turn in range(rng.randint(1, 3)):
            word = rng.choice(WORDS_EN)
            messages += [{"role": "user", "content": f"colour of {word}?"},
                         {"role": "assistant", "content": colours[word]}]
        chats.append({"messages": messages})
    return chats


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in make_chats(120)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory, tokenizer_dir):
    """A micro Llama saved as a standard HF directory (with the ChatML tokenizer), as `tunelab pretrain` writes."""
    from tunelab.models import create_model, load_tokenizer, save_model

    tok = load_tokenizer(tokenizer_dir)
    out = tmp_path_factory.mktemp("base") / "model"
    save_model(create_model("micro", "llama", tok, seed=0), tok, out)
    return out
