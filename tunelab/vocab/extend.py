"""Extend a byte-level BPE tokenizer with tokens learned from a domain corpus (Chinese-LLaMA style, for BPE).

The corpus is split into words by the base's own normaliser and pre-tokeniser; new merges are learned over the
base's segmentation of those words (`merges.py`) and appended after the base's merges, each new token at the next
free id. So every original token keeps its id, ASCII text (English, code) gets exactly the ids it got before,
`decode(encode(x)) == x` holds wherever it held for the base, and the special tokens, the chat template and the
tokenizer settings are the base's. The result is a tokenizer directory (or, with `model=True`, the base model
resized to the new vocabulary: `resize.py`) that `transformers.AutoTokenizer` loads alone, with
`vocab_report.json`: tokens per character before and after on held-out corpus documents and on an English sample,
and the longest and most frequent new tokens.

Supported bases: a `tokenizer.json` whose model is BPE (no dropout, no subword prefix or suffix) with a ByteLevel
pre-tokeniser, alone or in a sequence (GPT-2, SmolLM2, Llama 3, Qwen 2). Not supported yet: SentencePiece
tokenizers (Llama 2, Mistral, Gemma: `tokenizer.model`, or BPE with `byte_fallback` and no ByteLevel step),
WordPiece and Unigram models.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tunelab.data.text import _parse_json, _text_of, read_text_file, resolve_files
from tunelab.errors import ConfigError, DataError, ModelError
from tunelab.vocab.merges import learn_merges, token_text

REPORT = "vocab_report.json"
KIND_TOKENIZER, KIND_MODEL = "extended tokenizer", "extended model"

ENGLISH_SAMPLE = (
    "The harbour master opened the gates at half past nine, and the first boats came in with the tide. "
    "Counsellors often begin by asking what brought a client here today, then listen without judging. "
    "def mean(xs): return sum(xs) / len(xs)  # an average, in Python\n"
    "Prices rose 3.5% in March; the committee will meet again on 12 May 2025 to review the figures. "
    "She said: \"I'm not sure it'll work, but we've got nothing to lose.\" He laughed and agreed."
)


# -- reading ----------------------------------------------------------------------------------------------------

def read_corpus(paths: list[str | Path], text_key: str = "text") -> list[str]:
    """Documents of .txt/.jsonl/.json files, directories or globs, in order; a chat record (`messages`) is one
    document of its turns' contents, one per line."""
    docs: list[str] = []
    for p in paths:
        for f in resolve_files(p):
            docs.extend(_file_documents(f, text_key))
    if not docs:
        raise DataError(f"{', '.join(map(str, paths))}: no documents found (the corpus is empty or holds only "
                        f"blank text); give text files with the domain's text")
    return docs


def _file_documents(f: Path, text_key: str) -> list[str]:
    text = read_text_file(f)
    if f.suffix == ".jsonl":
        items = [(_parse_json(line, f"{f}:{n}"), f"{f}:{n}") for n, line in enumerate(text.splitlines(), 1)
                 if line.strip()]
    elif f.suffix == ".json":
        data = _parse_json(text, str(f))
        if not isinstance(data, list):
            raise DataError(f"{f}: expected a JSON list of documents (strings or objects with '{text_key}')")
        items = [(item, f"{f}[{i}]") for i, item in enumerate(data)]
    else:
        return [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    docs = []
    for item, where in items:
        if isinstance(item, dict) and text_key not in item and isinstance(item.get("messages"), list):
            docs.append("\n".join(m["content"] for m in item["messages"]
                                  if isinstance(m, dict) and isinstance(m.get("content"), str)))
        else:
            docs.append(_text_of(item, text_key, where))
    return [d for d in docs if d.strip()]


def split_held_out(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): the last `fraction` of the documents are held out."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"--held-out {fraction:g}: give a fraction of the documents in [0, 1) (e.g. 0.05)")
    n = math.ceil(len(docs) * fraction) if fraction else 0
    if n and n >= len(docs):
        n = len(docs) - 1
    return (docs[:len(docs) - n], docs[len(docs) - n:]) if n else (docs, [])


# -- the base ---------------------------------------------------------------------------------------------------

def load_base(base: str | Path):
    """(transformers tokenizer, parsed tokenizer.json) of a supported base; a ModelError naming what is not."""
    from tunelab.models import load_tokenizer, require_local_dir

    d = require_local_dir(base, "base tokenizer")
    path = d / "tokenizer.json"
    if not path.is_file():
        spm = " (it has tokenizer.model: a SentencePiece tokenizer)" if (d / "tokenizer.model").is_file() else ""
        raise ModelError(f"{d}: no tokenizer.json{spm}; vocab extend supports byte-level BPE tokenizers saved as "
                         f"tokenizer.json (GPT-2, SmolLM2, Llama 3, Qwen 2); SentencePiece is not supported yet")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not readable JSON ({e})") from None
    check_supported(spec, path)
    return load_tokenizer(d), spec


def check_supported(spec: dict, where: Path) -> None:
    """Refuse a tokenizer.json that is not byte-level BPE, naming its model type."""
    model = spec.get("model") or {}
    kind = model.get("type") or "unknown"
    supported = "vocab extend supports byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen 2)"
    if kind != "BPE":
        raise ModelError(f"{where}: tokenizer model {kind} is not supported yet; {supported}")
    if not _has_byte_level(spec.get("pre_tokenizer")):
        fallback = " with byte_fallback (SentencePiece style, e.g. Llama 2, Mistral)" if model.get("byte_fallback") \
            else ""
        raise ModelError(f"{where}: tokenizer model BPE{fallback} without a ByteLevel pre-tokenizer is not "
                         f"supported yet; {supported}")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise ModelError(f"{where}: BPE with {key}={model[key]!r} is not supported yet; {supported}")


def _has_byte_level(pre) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return pre.get("type") == "Sequence" and any(_has_byte_level(p) for p in pre.get("pretokenizers", []))


def count_words(tokenizer, docs: list[str]) -> Counter:
    """Pre-tokenised words of `docs` (as the base's normaliser and pre-tokeniser split them) -> count."""
    backend = tokenizer.backend_tokenizer
    normalizer, pre = backend.normalizer, backend.pre_tokenizer
    words: Counter = Counter()
    for doc in docs:
        text = normalizer.normalize_str(doc) if normalizer is not None else doc
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    return words


# -- extending --------------------------------------------------------------------------------------------------

def extended_spec(spec: dict, merges: list[tuple[str, str]], first_id: int) -> dict:
    """A copy of tokenizer.json with the new tokens at ids `first_id`... and their merges after the base's."""
    out = json.loads(json.dumps(spec))
    model = out["model"]
    as_pairs = not model["merges"] or isinstance(model["merges"][0], list)
    for i, (a, b) in enumerate(merges):
        model["vocab"][a + b] = first_id + i
        model["merges"].append([a, b] if as_pairs else f"{a} {b}")
    return out


def next_free_id(spec: dict) -> int:
    ids = list(spec["model"]["vocab"].values()) + [t["id"] for t in spec.get("added_tokens", [])]
    return max(ids) + 1


def write_tokenizer(tokenizer, spec: dict, directory: Path):
    """Save the base's tokenizer files into `directory` with tokenizer.json replaced by `spec`; the reloaded
    tokenizer (plain transformers)."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(directory)
    for stale in ("vocab.json", "merges.txt"):  # slow-tokenizer copies of the base's vocabulary
        (directory / stale).unlink(missing_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=2) + "\n",
                                              encoding="utf-8")
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


# -- measuring --------------------------------------------------------------------------------------------------

def rates(tokenizer, texts: list[str]) -> dict:
    """Characters, tokens, tokens per character and characters per 1,000 tokens of `texts`."""
    chars = sum(len(t) for t in texts)
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
    return {"chars": chars, "tokens": tokens, "tokens_per_char": tokens / chars if chars else None,
            "chars_per_1000_tokens": 1000 * chars / tokens if tokens else None}


def check_extension(base_tok, new_tok, spec: dict, texts: list[str], added: int) -> None:
    """The promises of the module docstring, checked on the written tokenizer (a ModelError if one fails)."""
    problems = []
    if len(new_tok) != len(base_tok) + added:
        problems.append(f"it has {len(new_tok)} tokens, expected {len(base_tok) + added}")
    vocab = new_tok.get_vocab()
    if any(vocab.get(t) != i for t, i in base_tok.get_vocab().items()):
        problems.append("an original token changed its id")
    ids = lambda tok, x: tok(x, add_special_tokens=False)["input_ids"]  # noqa: E731
    if ids(new_tok, ENGLISH_SAMPLE) != ids(base_tok, ENGLISH_SAMPLE):
        problems.append("the English sample is encoded differently")
    for x in texts[:200]:
        if base_tok.decode(ids(base_tok, x)) == x and new_tok.decode(ids(new_tok, x)) != x:
            problems.append(f"decode(encode(x)) != x for {x[:40]!r}")
            break
    if base_tok.all_special_tokens != new_tok.all_special_tokens or \
            getattr(base_tok, "chat_template", None) != getattr(new_tok, "chat_template", None):
        problems.append("the special tokens or the chat template changed")
    if problems:
        raise ModelError(f"the extended tokenizer fails its checks ({'; '.join(problems)}); this is a tunelab "
                         f"bug: please report it with the base tokenizer's name")


def new_token_stats(new_tok, first_id: int, merges, texts: list[str], top: int = 10) -> dict:
    """The longest new tokens and the new tokens used most in `texts`."""
    texts_of = {first_id + i: token_text(a + b) for i, (a, b) in enumerate(merges)}
    used: Counter = Counter()
    for ids in (new_tok(texts, add_special_tokens=False)["input_ids"] if texts else []):
        used.update(i for i in ids if i >= first_id)
    longest = sorted(texts_of.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]
    return {"longest": [{"id": i, "text": t} for i, t in longest],
            "most_frequent": [{"id": i, "text": texts_of[i], "count": c} for i, c in used.most_common(top)]}


# -- the command ------------------------------------------------------------------------------------------------

def extend_vocab(base: str | Path, corpus: list[str | Path], add: int, out: str | Path, model: bool = False,
                 init: str = "sub-token-mean", held_out: float = 0.05, min_frequency: int = 2,
                 text_key: str = "text", log: Callable[[str], None] | None = None) -> dict:
    """Learn up to `add` tokens from `corpus`, write the extended tokenizer (or, with `model`, the resized model)
    to `out` atomically, and return the report (also `out/vocab_report.json`)."""
    from tunelab.io import atomic_dir
    from tunelab.outputs import check_outputs, check_replaceable
    from tunelab.vocab.resize import INITS, check_model_dir

    started = time.time()
    say = log or (lambda _line: None)
    if isinstance(add, bool) or not isinstance(add, int) or add < 1:
        raise ConfigError(f"--add {add}: give the number of new tokens to learn, 1 or more (e.g. --add 8000)")
    if min_frequency < 1:
        raise ConfigError(f"--min-frequency {min_frequency}: must be 1 or more")
    if init not in INITS:
        raise ConfigError(f"--init {init!r}: choose one of {', '.join(INITS)}")
    inputs = {"base": base, "corpus": list(corpus)}
    kind = KIND_MODEL if model else KIND_TOKENIZER
    check_outputs([out], inputs)
    check_replaceable(out, kind)
    base_tok, spec = load_base(base)
    if model:
        check_model_dir(base, base_tok)
    docs = read_corpus(corpus, text_key)
    train_docs, eval_docs = split_held_out(docs, held_out)
    say(f"corpus: {len(docs):,} documents, {sum(map(len, docs)):,} characters; {len(eval_docs):,} held out")
    words = count_words(base_tok, train_docs)
    backend_model = base_tok.backend_tokenizer.model
    merges = learn_merges(words, lambda w: [t.value for t in backend_model.tokenize(w)],
                          spec["model"]["vocab"], add, min_frequency)
    if not merges:
        raise DataError(f"{', '.join(map(str, corpus))}: nothing to learn: no pair of tokens with a non-ASCII "
                        f"character occurs {min_frequency}+ times in the training documents (the base already "
                        f"encodes this text as well as merges can, or it is ASCII, whose encoding must not "
                        f"change); give a corpus in the new language or domain")
    first_id = next_free_id(spec)
    new_spec = extended_spec(spec, merges, first_id)
    say(f"learned {len(merges):,} new tokens (ids {first_id:,}..{first_id + len(merges) - 1:,}) in "
        f"{time.time() - started:.1f}s")
    measured = eval_docs or train_docs
    with atomic_dir(out, kind=kind, inputs=inputs) as tmp:
        new_tok = write_tokenizer(base_tok, new_spec, tmp)
        check_extension(base_tok, new_tok, new_spec, measured, len(merges))
        report = {
            "base": str(base), "corpus": [str(c) for c in corpus], "requested": add, "added": len(merges),
            "first_new_id": first_id, "vocab_size_before": len(base_tok), "vocab_size_after": len(new_tok),
            "min_frequency": min_frequency,
            "documents": {"training": len(train_docs), "held_out": len(eval_docs)},
            "measured_on": "held-out documents" if eval_docs else "the training documents (no held-out)",
            "held_out": {"before": rates(base_tok, measured), "after": rates(new_tok, measured)},
            "english": {"before": rates(base_tok, [ENGLISH_SAMPLE]), "after": rates(new_tok, [ENGLISH_SAMPLE])},
            "new_tokens": new_token_stats(new_tok, first_id, merges, measured),
        }
        if model:
            from tunelab.vocab.resize import resize_model_dir
            report["model"] = resize_model_dir(base, base_tok, new_tok, tmp, init, measured, say)
        report["wall_s"] = round(time.time() - started, 1)
        (tmp / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    report["out_dir"] = str(out)
    return report


def summary_lines(r: dict) -> list[str]:
    """The one-screen summary of a report."""
    h, e = r["held_out"], r["english"]
    ctx = lambda x: f"{2048 * x['chars'] / x['tokens']:,.0f}" if x["tokens"] else "-"  # noqa: E731
    lines = [f"added {r['added']:,} of {r['requested']:,} requested tokens: vocabulary {r['vocab_size_before']:,} "
             f"-> {r['vocab_size_after']:,}"]
    if r["added"] < r["requested"]:
        lines.append(f"  (the corpus has no more pairs seen {r['min_frequency']}+ times; a larger corpus or "
                     f"--min-frequency 1 gives more)")
    lines += [
        f"{r['measured_on']} ({h['before']['chars']:,} characters): tokens per character "
        f"{h['before']['tokens_per_char']:.3f} -> {h['after']['tokens_per_char']:.3f}; characters per 1,000 tokens "
        f"{h['before']['chars_per_1000_tokens']:,.0f} -> {h['after']['chars_per_1000_tokens']:,.0f}; characters in "
        f"2,048 tokens {ctx(h['before'])} -> {ctx(h['after'])}",
        f"English sample ({e['before']['chars']:,} characters): tokens per character "
        f"{e['before']['tokens_per_char']:.3f} -> {e['after']['tokens_per_char']:.3f} (ids identical)",
        "longest new tokens: " + ", ".join(repr(t["text"]) for t in r["new_tokens"]["longest"]),
        "most used new tokens: " + ", ".join(f"{t['text']!r} ({t['count']:,})"
                                             for t in r["new_tokens"]["most_frequent"]),
    ]
    if "model" in r:
        m = r["model"]
        lines.append(f"model: embedding {m['rows_before']:,} -> {m['rows_after']:,} rows "
                     f"({'tied head' if m['tied'] else 'input and output rows'}, new rows: {m['init']})")
        for name, x in m["loss"].items():
            lines.append(f"  bits per byte on {name} before training: base {x['base']:.4f}, resized model with "
                         f"the base's ids {x['resized_base_ids']:.4f}, with the new tokenizer {x['resized']:.4f}")
    lines.append(f"written to {r['out_dir']} ({REPORT}); {r['wall_s']:.0f}s")
    return lines
