"""Chat templates and loss masks: an `Example` → token ids and labels (-100 where there is no loss).

One template renders training data and generation prompts alike: the built-in "chatml" or "plain" when
named, a `.jinja` file if given, else the tokenizer's own `chat_template`, else the built-in ChatML
`DEFAULT_TEMPLATE` (tokenizers with `<|im_start|>` / `<|im_end|>`), else `PLAIN_TEMPLATE`
(`### User:` / `### Assistant:`, EOS ends a turn).

Masks come from the template itself, by rendering prefixes, so any template works without
`{% generation %}` markers: the conversation is rendered once and tokenized once with character offsets.
For assistant turn i, the content starts where `messages[:i]` rendered with the generation prompt ends,
and the turn ends where `messages[:i+1]` rendered ends. The trained tokens are those overlapping the
content (with any whitespace between the generation prompt and the content, as in "Assistant: " +
content, since the model must generate it) plus the first token at or after its end that still belongs
to the turn: the end-of-turn token (`<|im_end|>`, `<|eot_id|>`, EOS), so the model learns to stop. Role
headers, system and user turns and the separators after the end-of-turn token are never trained. A
template that does not render prefixes consistently (the content does not follow the generation
prompt) is an error naming the turn.

`train_on`: "assistant" (every assistant turn), "last" (the last assistant turn only), "all" (every
token). Plain-text examples are the text followed by EOS, all trained.

BOS: an example starts with the tokenizer's BOS when its rule adds one (`bos_ids`: Gemma, Llama-3), exactly once:
a template that renders `{{ bos_token }}` as text (Gemma's, Llama-3's, the plain one) already gives it, and
nothing is added then; for a template that does not, BOS is prepended (never trained, in the masked modes).

Truncation: the first `max_len` tokens are kept (the end is cut) and `truncated` is set. An example
whose trainable tokens all lie beyond the cut ends with `n_trainable == 0`; the caller decides (lint
reports it, training stops unless `allow_empty`). Needs a fast tokenizer (character offsets).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from tunelab.data.records import Example
from tunelab.data.text import bos_ids, with_bos
from tunelab.errors import DataError, ModelError

IGNORE = -100
TRAIN_ON = ("assistant", "last", "all")

# ChatML, as Qwen uses: each turn is <|im_start|>role\n...content...<|im_end|>\n. The tokenizers that
# `tunelab tokenizer train` writes carry this template (tunelab.vocab.train imports it from here).
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# For tokenizers without chat tokens (base models): markdown-style headers, EOS ends an assistant turn.
# The answer follows "### Assistant:" after a space, as words do in running text, so the first token of an
# answer is the one a base model knows (" west", not "west"); the generation prompt ends before that space.
PLAIN_TEMPLATE = (
    "{% if bos_token is defined and bos_token and bos_token != eos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Assistant: ' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
)

BUILT_IN = {"chatml": DEFAULT_TEMPLATE, "plain": PLAIN_TEMPLATE}

_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@dataclass
class Encoded:
    """Token ids and aligned labels (-100: no loss; the loop shifts by one) of one example, with bookkeeping."""

    input_ids: list[int]
    labels: list[int]
    where: str
    truncated: bool
    n_trainable: int
    n_tokens_before_truncation: int


def chat_template_for(tokenizer, path: str | None = None) -> str:
    """The template to use: "chatml" / "plain" (built-in), a `.jinja` file, else the tokenizer's, else built-in."""
    if path in BUILT_IN:
        return BUILT_IN[path]
    if path:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{path}: chat template file not found; check data.chat_template / --chat-template "
                            f"(a Jinja file such as chat_template.jinja)")
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: chat template file is not UTF-8 text (byte {e.start}); save it as UTF-8 "
                            f"(data.chat_template / --chat-template)") from None
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # named templates: take the default one
        own = own.get("default")
    if own:
        return own
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return DEFAULT_TEMPLATE
    if tokenizer.eos_token is None:
        raise ModelError("the tokenizer has no chat template, no <|im_start|>/<|im_end|> tokens and no EOS token; "
                         "give a chat template file (data.chat_template) or use a tokenizer that defines eos_token")
    return PLAIN_TEMPLATE


def render(messages: list[dict[str, str]], tokenizer, template: str, add_generation_prompt: bool = False) -> str:
    """The conversation as text, rendered by `template` (special tokens written as text)."""
    try:
        if not messages:  # apply_chat_template refuses an empty conversation; its generation prompt is defined
            rendered, _ = render_jinja_template([[]], chat_template=template,
                                                add_generation_prompt=add_generation_prompt,
                                                **tokenizer.special_tokens_map)
            return rendered[0]
        return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise DataError(f"{_template_name(tokenizer, template)} failed to render: {e}; fix the template or "
                        f"the conversation") from None


def prompt_for_generation(messages: list[dict[str, str]], tokenizer, template: str) -> str:
    """The prompt that asks the model for the next assistant turn."""
    return render(messages, tokenizer, template, add_generation_prompt=True)


def encode_example(ex: Example, tokenizer, template: str, max_len: int, train_on: str = "assistant") -> Encoded:
    """Token ids and labels of one example, cut to its first `max_len` tokens."""
    if train_on not in TRAIN_ON:
        raise DataError(f"train_on {train_on!r}: unknown; use one of {', '.join(TRAIN_ON)}")
    if ex.text is not None:
        ids = with_bos(tokenizer(ex.text, add_special_tokens=False)["input_ids"], bos_ids(tokenizer))
        ids.append(_eos_id(tokenizer, ex.where))
        labels = list(ids)
    else:
        full = _render_at(ex.messages, tokenizer, template, False, ex.where)
        ids, offsets = _tokenize_with_offsets(tokenizer, full)
        if (bos := bos_ids(tokenizer)) and ids[:len(bos)] != bos:  # the template wrote no BOS of its own
            ids, offsets = bos + ids, [(0, 0)] * len(bos) + offsets
        if train_on == "all":
            labels = list(ids)
        else:
            spans = _assistant_spans(ex.messages, tokenizer, template, full, ex.where)
            labels = _labels(ids, offsets, spans[-1:] if train_on == "last" else spans)
    n = len(ids)
    ids, labels = ids[:max_len], labels[:max_len]
    return Encoded(input_ids=ids, labels=labels, where=ex.where, truncated=n > max_len,
                   n_trainable=sum(label != IGNORE for label in labels), n_tokens_before_truncation=n)


def template_special_ids(tokenizer, template: str) -> list[int]:
    """The special (added) tokens a conversation rendered with `template` holds, e.g. <|im_start|> and <|im_end|>."""
    ids, _ = _tokenize_with_offsets(tokenizer, render(_PROBE, tokenizer, template))
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return list(dict.fromkeys(i for i in ids if i in special))


def end_of_turn_ids(tokenizer, template: str) -> list[int]:
    """Stop ids: the special token the mask trains after an assistant's content (its end of turn), and EOS."""
    full = render(_PROBE, tokenizer, template)
    ids, offsets = _tokenize_with_offsets(tokenizer, full)
    spans = _assistant_spans(_PROBE, tokenizer, template, full, "end_of_turn_ids")
    labels = _labels(ids, offsets, spans)
    # special tokens only: a plain-text separator such as "\n\n" would cut answers short
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    out = [ids[k] for k in range(len(ids))
           if labels[k] != IGNORE and offsets[k][0] >= spans[0][1] and ids[k] in special]
    if tokenizer.eos_token_id is not None:
        out.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------- internals

def _assistant_spans(messages: list[dict[str, str]], tokenizer, template: str, full: str,
                     where: str) -> list[tuple[int, int, int]]:
    """(content start, content end, turn end) character offsets in `full` of every assistant turn."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render_at(messages[:i], tokenizer, template, True, where)
        if not full.startswith(prefix):
            raise _inconsistent(tokenizer, template, where, i, "the conversation before it, rendered with the "
                                "generation prompt, is not a prefix of the whole conversation")
        content, a = m["content"], len(prefix)
        gap = len(full) - a - len(full[a:].lstrip())  # a template may write "Assistant: " + content
        found = [(start, c) for start in dict.fromkeys((a, a + gap))
                 for c in (content, content.strip(), content.rstrip(), content.lstrip()) if full.startswith(c, start)]
        if not found:
            raise _inconsistent(tokenizer, template, where, i, "its content does not follow the generation prompt")
        start, shown = found[0]  # train from `a`: the model must also generate any gap before the content
        turn = _render_at(messages[:i + 1], tokenizer, template, False, where)
        b = len(turn) if full.startswith(turn) else _common_prefix_len(full, turn)
        if b < start + len(shown):
            raise _inconsistent(tokenizer, template, where, i, "the conversation up to it, rendered alone, "
                                "differs from the whole conversation inside its content")
        spans.append((a, start + len(shown), b))
    return spans


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int, int]]) -> list[int]:
    """Labels: ids of tokens overlapping a content span and of the first token at/after its end (before the
    turn's end), -100 elsewhere."""
    labels = [IGNORE] * len(ids)
    starts = [s for s, _ in offsets]
    ends = [e for _, e in offsets]
    for cs, ce, b in spans:
        if ce > cs:  # tokens with end > cs and start < ce
            for k in range(bisect_right(ends, cs), bisect_left(starts, ce)):
                labels[k] = ids[k]
        k = bisect_left(starts, ce)
        if k < len(ids) and starts[k] < b:
            labels[k] = ids[k]
    return labels


def _tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{type(tokenizer).__name__} is a slow tokenizer; loss masks need character offsets, "
                         f"which only fast tokenizers give: use a tokenizer directory with tokenizer.json")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def _render_at(messages, tokenizer, template: str, add_generation_prompt: bool, where: str) -> str:
    try:
        return render(messages, tokenizer, template, add_generation_prompt)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _eos_id(tokenizer, where: str) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(f"{where}: a plain-text example ends with EOS, but the tokenizer has no EOS token; "
                        f"use a tokenizer that defines eos_token")
    return tokenizer.eos_token_id


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _inconsistent(tokenizer, template: str, where: str, turn: int, why: str) -> DataError:
    return DataError(f"{where}: {_template_name(tokenizer, template)} does not render prefixes consistently at "
                     f"assistant turn {turn}: {why}; loss masks need a template whose rendering of the first turns "
                     f"is a prefix of the whole conversation (give one with data.chat_template)")


def template_description(tokenizer, template: str, given: str | None) -> str:
    """Which template `chat_template_for(tokenizer, given)` chose, for people: "plain (given)", "ChatML (...)"."""
    if given:
        return f"{given} (given)"
    if template == getattr(tokenizer, "chat_template", None):
        return "the tokenizer's own" + (" (ChatML)" if template == DEFAULT_TEMPLATE else "")
    return ("ChatML (the tokenizer has no template but <|im_start|>/<|im_end|>)" if template == DEFAULT_TEMPLATE
            else "plain (the tokenizer has no template and no ChatML tokens)")


def _template_name(tokenizer, template: str) -> str:
    if template == DEFAULT_TEMPLATE:
        return "the built-in ChatML template"
    if template == PLAIN_TEMPLATE:
        return "the built-in plain template"
    if template == getattr(tokenizer, "chat_template", None):
        return "the tokenizer's chat template"
    return "the chat template given (data.chat_template)"
