"""`tunelab vocab extend`: new tokens learned from a corpus, appended to a byte-level BPE base without changing it.

On SmolLM2-135M-Instruct's tokenizer (the `real_smollm2` fixture): every original token keeps its id, English gets
the same ids, Chinese and mixed text round-trip, the result loads in a process that never imports tunelab, and on
CPsyCounD's held-out dialogues tokens per character fall below 0.8. On the micro model: the resized model keeps
its old rows and logits, new rows start at their sub-tokens' mean, a tied head stays tied.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tunelab.cli import main
from tunelab.outputs import read_marker
from tunelab.vocab.extend import REPORT, extend_vocab, read_corpus
from tunelab.vocab.merges import has_non_ascii, learn_merges

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CPSYCOUND = SHARED / "cpsycound" / "cpsycound.jsonl"

ENGLISH = ("It was the best of times, it was the worst of times. Tokenizers split text into pieces; "
           "an English sentence like this one must get exactly the ids it had before: 42 == 42, x += 1.\n")
ZH_WORDS = ["我们", "朋友", "快乐", "学习", "心理", "咨询", "感受", "压力", "焦虑", "情绪", "家庭", "工作", "睡眠",
            "沟通", "理解", "支持", "帮助", "问题", "时候", "觉得", "希望", "可以", "因为", "所以", "现在", "自己"]
MIXED = ["你好世界", "我觉得压力很大，因为工作太忙了。", "Mixed 中文 and English: 咨询师 said “OK”！",
         "罕见字：鑫 𠀋 龘 and emoji 😀", "  spaces  \n\ttabs 和 换行\r\n"]


def zh_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Chinese sentences of a small vocabulary, with some English, so merges have something to learn."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(ZH_WORDS) for _ in range(rng.randint(6, 20))]
        cut = rng.randint(1, len(words) - 1)
        docs.append("".join(words[:cut]) + "，" + "".join(words[cut:]) + ("。" if rng.random() < 0.7 else
                                                                           "？ ok, see you"))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def smol_tokenizer(real_smollm2, tmp_path_factory):
    """SmolLM2's tokenizer files alone (a tokenizer directory)."""
    d = tmp_path_factory.mktemp("smol-tok") / "tok"
    d.mkdir()
    for f in real_smollm2.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def smol_extended(smol_tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smol-ext")
    corpus = write_jsonl(tmp / "zh.jsonl", zh_corpus(300))
    out = tmp / "ext"
    report = extend_vocab(smol_tokenizer, [corpus], 150, out)
    return out, report


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_original_ids_and_english_unchanged_chinese_round_trips(smol_tokenizer, smol_extended):
    out, report = smol_extended
    base, new = AutoTokenizer.from_pretrained(smol_tokenizer), AutoTokenizer.from_pretrained(out)
    assert report["added"] == 150 and len(new) == len(base) + 150 == 49152 + 150
    new_vocab = new.get_vocab()
    assert all(new_vocab[t] == i for t, i in base.get_vocab().items())
    base_spec = json.loads((smol_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    new_spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert new_spec["model"]["merges"][:len(base_spec["model"]["merges"])] == base_spec["model"]["merges"]
    assert new_spec["added_tokens"] == base_spec["added_tokens"]
    assert ids(new, ENGLISH) == ids(base, ENGLISH)
    assert new.all_special_tokens == base.all_special_tokens and new.chat_template == base.chat_template
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "我们是朋友"}]
    assert new.apply_chat_template(chat, tokenize=False) == base.apply_chat_template(chat, tokenize=False)
    for text in MIXED + zh_corpus(20, seed=1):
        assert new.decode(ids(new, text)) == text
    sentence = "我们是朋友，我觉得压力很大"
    assert len(ids(new, sentence)) < len(ids(base, sentence)) / 2
    assert max(ids(new, sentence)) >= 49152
    # every new token holds a non-ASCII byte and is new; the report measured English as unchanged
    added = [t for t, i in new_vocab.items() if i >= 49152]
    assert all(has_non_ascii(t) for t in added) and not set(added) & set(base.get_vocab())
    assert report["english"]["before"] == report["english"]["after"]
    assert report["held_out"]["after"]["tokens"] < report["held_out"]["before"]["tokens"]
    assert read_marker(out)["kind"] == "extended tokenizer"
    assert json.loads((out / REPORT).read_text(encoding="utf-8"))["added"] == 150


def test_loads_in_a_process_that_never_imports_tunelab(smol_extended):
    out, _ = smol_extended
    texts = MIXED + [ENGLISH]
    code = ("import json, sys\nfrom transformers import AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({str(out)!r})\n"
            f"texts = json.loads({json.dumps(texts)!r})\n"
            "enc = [tok(t, add_special_tokens=False)['input_ids'] for t in texts]\n"
            "assert [tok.decode(e) for e in enc] == texts\n"
            "assert not any(m.split('.')[0] == 'tunelab' for m in sys.modules)\n"
            "print(json.dumps({'n': len(tok), 'ids': enc}))\n")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(out)
    assert got == {"n": len(tok), "ids": [ids(tok, t) for t in texts]}


def test_learned_merges_are_new_non_ascii_and_deterministic():
    vocab = {c: i for i, c in enumerate("abcdefghĠ")} | {"ab": 9}
    segment = list  # one base token per character
    words = Counter({"abab": 5, "ĠabÃ": 4, "ÃÃ": 3, "cdcd": 9, "Ãc": 1})
    merges = learn_merges(words, segment, vocab, 10, min_frequency=2)
    assert merges == learn_merges(words, segment, vocab, 10, min_frequency=2)
    made = [a + b for a, b in merges]
    assert "cd" not in made  # ASCII-only pairs never merge, however frequent
    assert "ab" not in made  # already in the vocabulary
    assert all(has_non_ascii(t) for t in made) and len(set(made)) == len(made)
    assert "ÃÃ" in made
    assert learn_merges(Counter({"cdcd": 9, "hello": 3}), segment, vocab, 10) == []


@pytest.mark.skipif(not CPSYCOUND.is_file(), reason="../shared/data absent")
def test_cpsycound_held_out_tokens_per_char_at_most_0_8(smol_tokenizer, tmp_path):
    docs = read_corpus([CPSYCOUND])
    train = write_jsonl(tmp_path / "train.jsonl", docs[:1200])
    held_out = write_jsonl(tmp_path / "held.jsonl", docs[-150:])
    r = extend_vocab(smol_tokenizer, [train], 1500, tmp_path / "ext", held_out=0)
    tok, base = AutoTokenizer.from_pretrained(tmp_path / "ext"), AutoTokenizer.from_pretrained(smol_tokenizer)
    text = read_corpus([held_out])
    chars = sum(map(len, text))
    before = sum(len(ids(base, t)) for t in text) / chars
    after = sum(len(ids(tok, t)) for t in text) / chars
    print(f"CPsyCounD held-out tokens per character: {before:.3f} -> {after:.3f} (+{r['added']} tokens)")
    assert before > 1.5 and after <= 0.8
    assert all(tok.decode(ids(tok, t)) == t for t in text[:30])


# -- the model -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def new_chars_corpus(tmp_path_factory):
    """Chinese words the micro tokenizer never saw (it knows 山河湖海...), so it spells them in bytes."""
    return write_jsonl(tmp_path_factory.mktemp("zh") / "zh.jsonl", zh_corpus(200, seed=3))


def test_resized_tied_model_keeps_old_rows_and_logits(base_model_dir, new_chars_corpus, tmp_path, capsys):
    out = tmp_path / "ext-model"
    assert main(["vocab", "extend", str(base_model_dir), str(new_chars_corpus), "--add", "80", "--out", str(out),
                 "--model"]) == 0
    screen = capsys.readouterr().out
    assert "bits per byte on held-out text before training" in screen and "English sample" in screen
    base, model = AutoModelForCausalLM.from_pretrained(base_model_dir), AutoModelForCausalLM.from_pretrained(out)
    base_tok, tok = AutoTokenizer.from_pretrained(base_model_dir), AutoTokenizer.from_pretrained(out)
    n_old, rows = len(base_tok), base.get_input_embeddings().weight.shape[0]
    assert len(tok) == n_old + 80 and model.config.vocab_size == max(rows, len(tok)) == 480
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    old, new = base.get_input_embeddings().weight, model.get_input_embeddings().weight
    assert torch.equal(new[:n_old], old[:n_old])
    backend = base_tok.backend_tokenizer.model
    for i in (n_old, n_old + 40, n_old + 79):
        pieces = [base_tok.convert_tokens_to_ids(t.value) for t in backend.tokenize(tok.convert_ids_to_tokens(i))]
        assert len(pieces) >= 2
        torch.testing.assert_close(new[i], old[pieces].mean(0))
    x = torch.tensor([ids(base_tok, "river stone 山河 lantern")])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits[..., :n_old], base(x).logits[..., :n_old])
    report = json.loads((out / REPORT).read_text(encoding="utf-8"))
    m = report["model"]
    assert m["tied"] and m["rows_after"] == 480 and m["init"] == "sub-token-mean"
    assert set(m["loss"]["held-out text"]) == {"base", "resized_base_ids", "resized"}
    assert read_marker(out)["kind"] == "extended model"


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, tokenizer_dir):
    from tunelab.models import load_tokenizer, save_model

    tok = load_tokenizer(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("untied") / "model"
    save_model(LlamaForCausalLM(config), tok, out)
    return out


@pytest.mark.parametrize("init", ["mean", "random"])
def test_resized_untied_model_inits_both_matrices(untied_model_dir, new_chars_corpus, tmp_path, init):
    out = tmp_path / init
    r = extend_vocab(untied_model_dir, [new_chars_corpus], 20, out, model=True, init=init)
    base, model = AutoModelForCausalLM.from_pretrained(untied_model_dir), AutoModelForCausalLM.from_pretrained(out)
    n = r["vocab_size_before"]
    assert not r["model"]["tied"] and model.config.vocab_size == n + 20
    for get in ("get_input_embeddings", "get_output_embeddings"):
        old, new = getattr(base, get)().weight, getattr(model, get)().weight
        assert new.shape[0] == n + 20 and torch.equal(new[:n], old[:n])
        if init == "mean":
            torch.testing.assert_close(new[n:], old.mean(0).expand(20, -1))
        else:
            assert 0.01 < float(new[n:].detach().std()) < 0.04  # initializer_range 0.02


# -- bad inputs ------------------------------------------------------------------------------------------------

def refused(capsys, argv, *fragments):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for f in fragments:
        assert f in err, err
    return err


def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, base_model_dir, tokenizer_dir, new_chars_corpus,
                                                    smol_tokenizer, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    refused(capsys, ["vocab", "extend", tokenizer_dir, empty, "--add", "10", "--out", out], "no documents found")
    refused(capsys, ["vocab", "extend", tokenizer_dir, new_chars_corpus, "--add", "0", "--out", out], "--add 0")
    for name in ("corpus.jsonl.gz", "corpus.parquet"):  # were read as text: "not UTF-8 text (byte 1)"
        (tmp_path / name).write_bytes(b"\x1f\x8b\x08\x00")
        refused(capsys, ["vocab", "extend", tokenizer_dir, tmp_path / name, "--add", "10", "--out", out],
                f"{name}: unsupported file type")
    english = write_jsonl(tmp_path / "en.jsonl", [ENGLISH] * 50)
    refused(capsys, ["vocab", "extend", tokenizer_dir, english, "--add", "10", "--out", out], "nothing to learn")
    wordpiece = tmp_path / "wordpiece"
    wordpiece.mkdir()
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.save(str(wordpiece / "tokenizer.json"))
    refused(capsys, ["vocab", "extend", wordpiece, new_chars_corpus, "--add", "10", "--out", out],
            "tokenizer model WordPiece is not supported")
    spm = tmp_path / "spm"
    spm.mkdir()
    (spm / "tokenizer.model").write_bytes(b"\x00")
    refused(capsys, ["vocab", "extend", spm, new_chars_corpus, "--add", "10", "--out", out], "SentencePiece")
    mismatched = tmp_path / "mismatched"  # the micro model (448 rows) with SmolLM2's 49,152-token tokenizer
    shutil.copytree(base_model_dir, mismatched)
    for f in smol_tokenizer.iterdir():
        shutil.copy(f, mismatched / f.name)
    refused(capsys, ["vocab", "extend", mismatched, new_chars_corpus, "--add", "10", "--out", out, "--model"],
            "do not belong together")
    refused(capsys, ["vocab", "extend", tokenizer_dir, new_chars_corpus, "--add", "10", "--out", out, "--model"],
            "--model needs a model directory")
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


# -- training the new rows under LoRA ------------------------------------------------------------------------

@pytest.mark.parametrize("which, train_embeddings", [("tied", "new"), ("tied", "all"), ("untied", "new")])
def test_lora_trains_embedding_rows_peft_loads_them_and_export_merges(
        which, train_embeddings, base_model_dir, untied_model_dir, new_chars_corpus, tmp_path, capsys):
    from peft import PeftModel

    from tunelab.methods import load_adapter

    base = base_model_dir if which == "tied" else untied_model_dir
    ext = tmp_path / "ext"
    r = extend_vocab(base, [new_chars_corpus], 80, ext, model=True)
    first, n = r["first_new_id"], r["vocab_size_after"]
    run = ["finetune", f"model.base={ext}", f"data.train=[{new_chars_corpus}]", f"out_dir={tmp_path}", "name=ft",
           "method.name=lora", "method.r=2", "method.target_modules=[q_proj,v_proj]",
           f"method.train_embeddings={train_embeddings}", "train.steps=3", "train.micro_batch_size=2",
           "train.lr=0.05", "train.warmup_steps=0", "data.eval_fraction=0", "data.max_len=64"]
    assert main(run) == 0, capsys.readouterr().err
    adapter = tmp_path / "ft" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    rows = AutoModelForCausalLM.from_pretrained(ext).get_input_embeddings().weight.shape[0]
    span = list(range(first, n)) if train_embeddings == "new" else list(range(rows))
    expected = span if which == "tied" else {"embed_tokens": span, "lm_head": span}
    assert cfg["trainable_token_indices"] == expected
    tok = AutoTokenizer.from_pretrained(ext)
    x = torch.tensor([ids(tok, "我们是朋友，river 心理咨询")])
    assert int(x.max()) >= first
    plain = AutoModelForCausalLM.from_pretrained(ext)
    with torch.no_grad():
        before = plain(x).logits
        peft_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ext), adapter).eval()(x).logits
        model = AutoModelForCausalLM.from_pretrained(ext)
        load_adapter(model, adapter)
        tunelab_logits = model.eval()(x).logits
    assert (peft_logits - before).abs().max() > 1e-3  # the rows (and LoRA) trained
    torch.testing.assert_close(tunelab_logits, peft_logits, atol=1e-4, rtol=1e-4)
    merged = tmp_path / "merged"
    assert main(["export", str(adapter), "--out", str(merged)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged)(x).logits, peft_logits,
                                   atol=1e-4, rtol=1e-4)
    if which == "tied":
        m = AutoModelForCausalLM.from_pretrained(merged)
        assert m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_tokens_method_trains_only_the_new_rows_and_peft_loads_it(which, base_model_dir, untied_model_dir,
                                                                    new_chars_corpus, tmp_path, capsys):
    """Chinese-LLaMA's stage 1: only the new rows train; saved as a PEFT TRAINABLE_TOKENS adapter."""
    from peft import PeftModel

    from tunelab.methods import load_adapter

    ext = tmp_path / "ext"
    r = extend_vocab(base_model_dir if which == "tied" else untied_model_dir, [new_chars_corpus], 40, ext,
                     model=True)
    first = r["first_new_id"]
    run = ["finetune", f"model.base={ext}", f"data.train=[{new_chars_corpus}]", f"out_dir={tmp_path}", "name=ft",
           "method.name=tokens", "train.steps=3", "train.micro_batch_size=2", "train.lr=0.05",
           "train.warmup_steps=0", "data.eval_fraction=0", "data.max_len=64"]
    assert main(run) == 0, capsys.readouterr().err
    adapter = tmp_path / "ft" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TRAINABLE_TOKENS" and cfg["token_indices"] == list(range(first, first + 40))
    tok = AutoTokenizer.from_pretrained(ext)
    x = torch.tensor([ids(tok, "我们是朋友，river 心理咨询")])
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(ext)(x).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ext), adapter).eval()
        peft_logits = peft_model(x).logits
        model = AutoModelForCausalLM.from_pretrained(ext)
        load_adapter(model, adapter)
        torch.testing.assert_close(model.eval()(x).logits, peft_logits, atol=1e-5, rtol=1e-5)
    assert (peft_logits - before).abs().max() > 1e-3
    merged = tmp_path / "merged"
    assert main(["export", str(adapter), "--out", str(merged)]) == 0
    m, base = AutoModelForCausalLM.from_pretrained(merged), AutoModelForCausalLM.from_pretrained(ext)
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, peft_logits, atol=1e-5, rtol=1e-5)
    changed = [n for n, p in m.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert set(changed) <= {"model.embed_tokens.weight", "lm_head.weight"}
    w, w0 = m.get_input_embeddings().weight, base.get_input_embeddings().weight
    assert torch.equal(w[:first], w0[:first]) and not torch.equal(w[first:], w0[first:])
    # stage 2 (LoRA + train_embeddings=new) can start from the merged model: it still knows which rows are new
    assert json.loads((merged / "config.json").read_text())["tunelab_vocab_extension"]["first_new_id"] == first


@pytest.mark.parametrize("method", [["method.name=tokens"], ["method.name=lora", "method.train_embeddings=new"]])
def test_new_rows_train_with_packing(method, base_model_dir, new_chars_corpus, tmp_path, capsys):
    """The packed-attention check read the embedding's num_embeddings, which TrainableRows has not (AttributeError)."""
    ext = tmp_path / "ext"
    extend_vocab(base_model_dir, [new_chars_corpus], 20, ext, model=True)
    run = ["finetune", f"model.base={ext}", f"data.train=[{new_chars_corpus}]", f"out_dir={tmp_path}", "name=ft",
           *method, "data.packing=true", "train.steps=1", "train.micro_batch_size=2", "train.warmup_steps=0",
           "data.eval_fraction=0", "data.max_len=64"]
    assert main(run) == 0, capsys.readouterr().err
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").exists()
