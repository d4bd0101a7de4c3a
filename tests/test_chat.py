"""Loss masks from chat templates: exactly the assistant content and its end-of-turn token are trained."""

from __future__ import annotations

import pytest
from conftest import make_corpus
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tunelab.data.chat import (
    DEFAULT_TEMPLATE,
    PLAIN_TEMPLATE,
    chat_template_for,
    encode_example,
    end_of_turn_ids,
    prompt_for_generation,
    render,
)
from tunelab.data.records import Example
from tunelab.errors import DataError
from tunelab.vocab.train import CHAT_TEMPLATE

LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Qwen2.5-like (its non-tool branch, whitespace control included): a default system prompt when none is given.
QWEN_TEMPLATE = """
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "river stone"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "meadow"},
    {"role": "assistant", "content": "a2 copper"},
    {"role": "user", "content": "willow"},
    {"role": "assistant", "content": "a3."},
]
CHAT_ZH = [
    {"role": "user", "content": "你好，山河。"},
    {"role": "assistant", "content": "山河湖海，花草鸟鱼。"},
    {"role": "user", "content": "红蓝绿？"},
    {"role": "assistant", "content": "金银铜！ok"},
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def llama_tok(tokenizer_dir):
    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    t.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    t.chat_template = LLAMA3_TEMPLATE
    return t


@pytest.fixture(scope="module")
def plain_tok():
    """A tokenizer with no chat tokens and no chat template (a base model's)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(make_corpus(100), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def chat(messages):
    return Example(messages=messages, text=None, where="t.jsonl:1")


def trained(enc, tokenizer) -> str:
    assert len(enc.labels) == len(enc.input_ids)
    assert all(lab in (-100, i) for lab, i in zip(enc.labels, enc.input_ids))
    return tokenizer.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != -100])


def test_chatml_multi_turn_with_system(tok):
    template = chat_template_for(tok)
    enc = encode_example(chat(CHAT), tok, template, max_len=512)
    assert trained(enc, tok) == "a1<|im_end|>a2 copper<|im_end|>a3.<|im_end|>"
    assert enc.n_trainable == sum(lab != -100 for lab in enc.labels) > 3
    assert tok.decode(enc.input_ids) == render(CHAT, tok, template)  # the whole rendered chat, once
    assert not enc.truncated and enc.n_tokens_before_truncation == len(enc.input_ids)


def test_chinese_content(tok):
    enc = encode_example(chat(CHAT_ZH), tok, chat_template_for(tok), max_len=512)
    assert trained(enc, tok) == "山河湖海，花草鸟鱼。<|im_end|>金银铜！ok<|im_end|>"


def test_llama3_template_trims_and_writes_bos_once(llama_tok):
    messages = [dict(m) for m in CHAT]
    messages[4]["content"] = "  a2 copper \n"  # the template trims content
    enc = encode_example(chat(messages), llama_tok, chat_template_for(llama_tok), max_len=512)
    assert trained(enc, llama_tok) == "a1<|eot_id|>a2 copper<|eot_id|>a3.<|eot_id|>"
    bos = llama_tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert enc.input_ids[0] == bos and enc.input_ids.count(bos) == 1
    zh = encode_example(chat(CHAT_ZH), llama_tok, LLAMA3_TEMPLATE, max_len=512)
    assert trained(zh, llama_tok) == "山河湖海，花草鸟鱼。<|eot_id|>金银铜！ok<|eot_id|>"


def test_plain_template_ends_turns_with_eos(plain_tok):
    assert chat_template_for(plain_tok) == PLAIN_TEMPLATE
    enc = encode_example(chat(CHAT), plain_tok, PLAIN_TEMPLATE, max_len=512)
    # the space between "### Assistant:" (where the generation prompt ends) and the answer is trained too
    assert trained(enc, plain_tok) == " a1<|endoftext|> a2 copper<|endoftext|> a3.<|endoftext|>"
    text = plain_tok.decode(enc.input_ids)
    assert text.startswith("### System:\nbe brief\n\n### User:\nriver stone\n\n### Assistant: a1<|endoftext|>")
    assert end_of_turn_ids(plain_tok, PLAIN_TEMPLATE) == [plain_tok.eos_token_id]


def test_default_system_prompt_template(tok):
    enc = encode_example(chat(CHAT[1:]), tok, QWEN_TEMPLATE, max_len=512)
    assert trained(enc, tok) == "a1<|im_end|>a2 copper<|im_end|>a3.<|im_end|>"
    assert tok.decode(enc.input_ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                                "<|im_start|>user\nriver stone<|im_end|>\n")
    own = encode_example(chat(CHAT), tok, QWEN_TEMPLATE, max_len=512)  # a system message replaces the default
    assert trained(own, tok) == "a1<|im_end|>a2 copper<|im_end|>a3.<|im_end|>"
    assert tok.decode(own.input_ids).startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user")


def test_train_on_last_and_all(tok):
    template = chat_template_for(tok)
    last = encode_example(chat(CHAT), tok, template, max_len=512, train_on="last")
    assert trained(last, tok) == "a3.<|im_end|>"
    every = encode_example(chat(CHAT), tok, template, max_len=512, train_on="all")
    assert every.labels == every.input_ids and every.n_trainable == len(every.input_ids)
    with pytest.raises(DataError, match="train_on"):
        encode_example(chat(CHAT), tok, template, max_len=512, train_on="assistants")


def test_truncation_cuts_the_end(tok):
    template = chat_template_for(tok)
    full = encode_example(chat(CHAT), tok, template, max_len=512)
    cut = encode_example(chat(CHAT), tok, template, max_len=len(full.input_ids) - 3)
    assert cut.truncated and cut.n_tokens_before_truncation == len(full.input_ids)
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    # the cut removes ".", <|im_end|> (trained) and the final "\n" (a separator, never trained)
    assert full.labels[-3:] == [full.input_ids[-3], full.input_ids[-2], -100]
    assert cut.n_trainable == full.n_trainable - 2
    # a long user turn pushes the only assistant turn past the cut: nothing left to train
    long = [{"role": "user", "content": "river " * 100}, {"role": "assistant", "content": "ok"}]
    empty = encode_example(chat(long), tok, template, max_len=32)
    assert empty.truncated and empty.n_trainable == 0 and len(empty.input_ids) == 32


def test_conversation_starting_with_assistant(tok):
    messages = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "bye"}]
    enc = encode_example(chat(messages), tok, chat_template_for(tok), max_len=512)
    assert trained(enc, tok) == "hello<|im_end|>bye<|im_end|>"


def test_plain_text_example_trains_everything_and_ends_with_eos(tok):
    enc = encode_example(Example(None, "river stone 山河", "t.jsonl:3"), tok, chat_template_for(tok), max_len=64)
    assert enc.labels == enc.input_ids and enc.input_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids) == "river stone 山河<|endoftext|>"


def test_inconsistent_template_is_an_error(tok):
    # Qwen3-like: only the last assistant turn carries a thinking block, so prefixes render differently
    template = DEFAULT_TEMPLATE.replace(
        "message['content']",
        "(('<think></think>' if loop.last and message['role'] == 'assistant' else '') + message['content'])")
    with pytest.raises(DataError, match=r"t.jsonl:1: .*does not render prefixes consistently at assistant turn 2"):
        encode_example(chat(CHAT), tok, template, max_len=512)


def test_end_of_turn_ids_and_generation_prompt(tok, llama_tok):
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    assert end_of_turn_ids(tok, chat_template_for(tok)) == [im_end, eos]
    assert end_of_turn_ids(llama_tok, LLAMA3_TEMPLATE) == [llama_tok.convert_tokens_to_ids("<|eot_id|>"), eos]
    prompt = prompt_for_generation(CHAT[:2], tok, chat_template_for(tok))
    assert prompt == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nriver stone<|im_end|>\n" \
                     "<|im_start|>assistant\n"


def test_chat_template_for_sources(tok, tmp_path):
    assert chat_template_for(tok) == CHAT_TEMPLATE
    f = tmp_path / "t.jinja"
    f.write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    assert chat_template_for(tok, str(f)) == LLAMA3_TEMPLATE
    with pytest.raises(DataError, match="missing.jinja: chat template file not found"):
        chat_template_for(tok, str(tmp_path / "missing.jinja"))
    bare = AutoTokenizer.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    assert chat_template_for(bare) == DEFAULT_TEMPLATE  # has <|im_start|>/<|im_end|>
