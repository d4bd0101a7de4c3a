"""BOS: where a tokenizer's own rule puts BOS before every text (Gemma, Llama-3), every sequence tunelab starts from
raw text starts with exactly one BOS; tokenizers without such a rule get none, as before."""

from __future__ import annotations

import pytest
import torch
from conftest import make_corpus
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tunelab.data.chat import DEFAULT_TEMPLATE, encode_example, prompt_for_generation
from tunelab.data.packing import pack_documents, tokenize_documents
from tunelab.data.records import Example
from tunelab.data.text import bos_ids, with_bos
from tunelab.evaluate.choice import STYLES, Question, build_prompt, fit_prompt
from tunelab.evaluate.perplexity import perplexity, token_stream
from tunelab.export import probe_inputs
from tunelab.models import create_model
from tunelab.serve.generate import complete, encode_prompts

GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                  "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
                  "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
CHAT = [{"role": "user", "content": "colour of river?"}, {"role": "assistant", "content": "blue"}]
TEXTS = ["river stone lantern baker harbour meadow copper violet " * 4, "山河湖海城村花草", "orchard tailor falcon."]


@pytest.fixture(scope="module")
def bos_tok():
    """A byte-level BPE tokenizer whose post-processor puts <bos> before every text, as Gemma's does."""
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(make_corpus(100), trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bpe.token_to_id("<bos>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.chat_template = GEMMA_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def bos_model(bos_tok):
    return create_model("micro", "llama", bos_tok, seed=0).eval()


@pytest.fixture(scope="module")
def plain(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def starts_with_one_bos(ids, bos_id: int) -> bool:
    ids = list(ids)
    return ids[0] == bos_id and ids.count(bos_id) == 1


def test_bos_ids_follow_the_tokenizers_own_rule(bos_tok, plain):
    assert bos_ids(bos_tok) == [bos_tok.bos_token_id] == bos_tok("x")["input_ids"][:1]
    assert bos_ids(plain) == [] and plain.bos_token_id is None
    plain_with_bos = AutoTokenizer.from_pretrained(plain.name_or_path, bos_token="<|im_start|>")  # like SmolLM2
    assert plain_with_bos.bos_token_id is not None and bos_ids(plain_with_bos) == []
    assert with_bos([5, 6], [2]) == [2, 5, 6] and with_bos([2, 5], [2]) == [2, 5] and with_bos([5], []) == [5]


def test_generation_prompts_start_with_one_bos_and_complete_equals_generate(bos_tok, bos_model):
    bos = bos_tok.bos_token_id
    bos_tok.padding_side = "left"
    enc = encode_prompts(bos_tok, ["river stone", "copper violet orchard tailor"])
    for row, mask in zip(enc["input_ids"], enc["attention_mask"]):
        assert starts_with_one_bos(row[mask.bool()], bos)
    chat_prompt = prompt_for_generation(CHAT[:1], bos_tok, GEMMA_TEMPLATE)  # the template writes <bos> itself
    assert chat_prompt.startswith("<bos>")
    assert starts_with_one_bos(encode_prompts(bos_tok, [chat_prompt])["input_ids"][0], bos)
    prompt = "river stone"
    ref = bos_model.generate(**bos_tok(prompt, return_tensors="pt"), max_new_tokens=4, do_sample=False,
                             pad_token_id=bos_tok.pad_token_id, eos_token_id=bos_tok.eos_token_id)
    expected = bos_tok.decode(ref[0, len(bos_tok(prompt)["input_ids"]):], skip_special_tokens=True)
    assert complete(bos_model, bos_tok, [prompt], max_new_tokens=4) == [expected]


def test_perplexity_starts_each_document_and_window_with_one_bos(bos_tok, bos_model):
    bos = bos_tok.bos_token_id
    ids = token_stream(bos_tok, TEXTS)
    assert ids.count(bos) == len(TEXTS) and ids[0] == bos
    # one window holds the whole stream (a window has room for BOS besides max_length - 1 stream tokens)
    r = perplexity(bos_model, bos_tok, TEXTS, max_length=len(ids) + 1, stride=len(ids) + 1)
    labels = torch.tensor([[-100 if i == bos else i for i in ids]])
    with torch.no_grad():
        loss = bos_model(torch.tensor([ids]), labels=labels).loss.item()
    assert r["windows"] == 1 and r["tokens"] == len(ids) - len(TEXTS)  # BOS is context, never scored
    assert r["nll"] == pytest.approx(loss, rel=1e-5)
    rows = []
    hook = bos_model.register_forward_pre_hook(lambda _m, _a, kw: rows.extend(kw["input_ids"].tolist()),
                                               with_kwargs=True)
    try:
        r = perplexity(bos_model, bos_tok, TEXTS, max_length=16, stride=8)
    finally:
        hook.remove()
    assert r["windows"] == len(rows) > 3 and all(len(row) <= 16 and row[0] == bos and row[1] != bos for row in rows)


def test_choice_prompts_start_with_one_bos_also_when_cut_or_wrapped(bos_tok):
    bos, style = bos_tok.bos_token_id, STYLES["ceval"]
    shots = [Question(f"river {i}?", ["red", "blue", "green", "gold"], i % 4, "dev") for i in range(3)]
    q = Question("stone?", ["red", "blue", "green", "gold"], 1, "test")
    ids, kept, cut = fit_prompt(bos_tok, "s", shots, q, style, budget=10_000)
    assert kept == 3 and not cut and starts_with_one_bos(ids, bos)
    ids, _, cut = fit_prompt(bos_tok, "s", [], q, style, budget=6)
    assert cut and len(ids) == 6 and starts_with_one_bos(ids, bos)

    def wrap(text):
        return prompt_for_generation([{"role": "user", "content": text}], bos_tok, GEMMA_TEMPLATE)

    ids, _, _ = fit_prompt(bos_tok, "s", shots, q, style, budget=10_000, wrap=wrap)
    assert starts_with_one_bos(ids, bos)


def test_packing_starts_each_document_with_one_bos(bos_tok):
    bos, eos = bos_tok.bos_token_id, bos_tok.eos_token_id
    docs = tokenize_documents(TEXTS, bos_tok)
    assert all(starts_with_one_bos(d, bos) for d in docs)
    flat = pack_documents(docs, seq_len=4, eos_id=eos).blocks.reshape(-1).tolist()
    starts = [0] + [k + 1 for k, i in enumerate(flat[:-1]) if i == eos]
    assert [k for k, i in enumerate(flat) if i == bos] == starts[:flat.count(bos)] and flat.count(bos) == len(TEXTS)


def test_chat_and_text_examples_start_with_one_bos(bos_tok):
    bos = bos_tok.bos_token_id
    own = encode_example(Example(CHAT, None, "t.jsonl:1"), bos_tok, GEMMA_TEMPLATE, max_len=512)  # renders <bos>
    assert starts_with_one_bos(own.input_ids, bos) and own.labels[0] == -100
    chatml = encode_example(Example(CHAT, None, "t.jsonl:1"), bos_tok, DEFAULT_TEMPLATE, max_len=512)  # renders none
    assert starts_with_one_bos(chatml.input_ids, bos) and chatml.labels[0] == -100
    assert chatml.input_ids[1:] == bos_tok(bos_tok.apply_chat_template(CHAT, chat_template=DEFAULT_TEMPLATE,
                                                                       tokenize=False), add_special_tokens=False
                                           )["input_ids"]
    trained = bos_tok.decode([i for i, lab in zip(chatml.input_ids, chatml.labels) if lab != -100])
    assert trained.startswith("blue") and "user" not in trained  # the mask is where it was, after the BOS
    text = encode_example(Example(None, "river stone", "t.jsonl:2"), bos_tok, GEMMA_TEMPLATE, max_len=64)
    assert starts_with_one_bos(text.input_ids, bos) and text.input_ids[-1] == bos_tok.eos_token_id


def test_probe_inputs_start_with_one_bos(bos_tok):
    rows = probe_inputs(bos_tok, n_random=0)
    assert len(rows) == 5 and all(starts_with_one_bos(r[0], bos_tok.bos_token_id) for r in rows)  # 4 texts, 1 chat


def test_tokenizer_without_a_rule_is_unchanged(plain):
    plain.padding_side = "left"
    prompts = ["river stone", "copper violet orchard"]
    enc, ref = encode_prompts(plain, prompts), plain(prompts, padding=True, add_special_tokens=False)
    assert enc["input_ids"].tolist() == ref["input_ids"] and enc["attention_mask"].tolist() == ref["attention_mask"]
    assert tokenize_documents(TEXTS, plain) == plain(TEXTS, add_special_tokens=False)["input_ids"]
    assert token_stream(plain, TEXTS[:1]) == plain(TEXTS[0], add_special_tokens=False)["input_ids"]
    shots, q = [], Question("stone?", ["red", "blue"], 1, "test")
    ids, _, _ = fit_prompt(plain, "s", shots, q, STYLES["ceval"], budget=10_000)
    assert ids == plain(build_prompt("s", shots, q, STYLES["ceval"]), add_special_tokens=False)["input_ids"]


def test_gemma3_complete_equals_transformers_generate_with_its_bos(real_gemma3):
    from tunelab.serve.generate import load_tuned

    model, tok, _ = load_tuned(real_gemma3)
    prompt = "The capital of France is"
    enc = tok(prompt, return_tensors="pt")  # the tokenizer's default encoding: <bos> first
    assert enc["input_ids"][0, 0] == tok.bos_token_id
    ref = model.generate(**enc, max_new_tokens=6, do_sample=False)[0, enc["input_ids"].shape[1]:]
    assert complete(model, tok, [prompt], max_new_tokens=6) == [tok.decode(ref, skip_special_tokens=True)]
