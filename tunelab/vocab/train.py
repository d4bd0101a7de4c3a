"""Train a byte-level BPE tokenizer (HF `tokenizers`) and save it as a Hugging Face tokenizer directory.

Byte-level BPE has no unknown token: every string, English, Chinese or emoji, encodes and decodes back
exactly. No Unicode normaliser is applied, on purpose, so `decode(encode(x)) == x` holds for any `x`.
Like GPT-2 and Qwen, the pre-tokeniser keeps a run of Chinese characters together, so BPE can learn
multi-character words; on small or repetitive corpora it learns whole phrases instead, and a prompt
that stops inside such a phrase tokenizes differently from the text it was trained on. `split_cjk`
isolates every CJK character first (at most one character per token), which is what the demo uses.
The directory holds `tokenizer.json`, `tokenizer_config.json` and the ChatML chat template below, and
loads with `transformers.AutoTokenizer.from_pretrained(dir)` without tunelab.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tunelab.data.chat import DEFAULT_TEMPLATE as CHAT_TEMPLATE
from tunelab.data.text import _read_file as read_file_documents
from tunelab.data.text import read_documents, resolve_files
from tunelab.errors import ConfigError
from tunelab.io import atomic_dir
from tunelab.outputs import check_outputs, check_replaceable

EOS, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

CJK = Regex(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
                    extra_special_tokens: list[str] = (), split_cjk: bool = False,
                    model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a transformers fast tokenizer."""
    if min_frequency < 0:
        raise ConfigError(f"min_frequency={min_frequency}: must be 0 or more")
    specials = SPECIAL_TOKENS + [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]
    if vocab_size < 256 + len(specials):
        raise ConfigError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                          f"{256 + len(specials)} (256 bytes + {len(specials)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_cjk:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(CJK, behavior="isolated"),
                                                     tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                 additional_special_tokens=[IM_START, IM_END] + specials[4:],
                                 clean_up_tokenization_spaces=False, model_max_length=model_max_length)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def train_tokenizer_files(paths: list[str | Path], out_dir: str | Path, vocab_size: int = 4096,
                          min_frequency: int = 2, text_key: str = "text",
                          extra_special_tokens: list[str] = (), split_cjk: bool = False,
                          log: Callable[[str], None] | None = None) -> PreTrainedTokenizerFast:
    """Train on the documents of text files (.txt/.jsonl/.json) and save atomically to `out_dir`.

    `log` gets one line per file read (its path and number of documents) and a total."""
    check_outputs([out_dir], {"corpus": paths})
    check_replaceable(out_dir, "tokenizer")
    docs: list[str] = []
    for p in paths:
        before = len(docs)
        for f in resolve_files(p):  # one file at a time, to say what each gave
            found = read_file_documents(f, text_key)
            docs.extend(found)
            if log:
                log(f"read {f}: {len(found):,} documents, {sum(map(len, found)):,} characters")
        if len(docs) == before:
            read_documents(p, text_key)  # raises its "no documents found" error
    if log:
        log(f"training on {len(docs):,} documents in all")
    tok = train_tokenizer(docs, vocab_size, min_frequency, extra_special_tokens, split_cjk)
    save_tokenizer(tok, out_dir, inputs={"corpus": paths})
    return tok


def save_tokenizer(tok: PreTrainedTokenizerFast, out_dir: str | Path, inputs: dict | None = None) -> Path:
    """Save a tokenizer directory atomically (never onto or around `inputs`, never over a non-tokenizer)."""
    with atomic_dir(out_dir, kind="tokenizer", inputs=inputs) as tmp:
        tok.save_pretrained(tmp)
    return Path(out_dir)

