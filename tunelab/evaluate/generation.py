"""Generation accuracy: batched greedy replies, answer extraction, strict accuracy (as for math sets).

Records (.jsonl, or a .json list), one prompt and its reference each:
- Alpaca `{"instruction", "input"?, "output"}` (the user turn is instruction, a blank line, input);
- `{"question" | "prompt", "answer"}` (GSM8K's `answer` with `#### 42` works with numeric extraction);
- `{"messages": [...]}`: the last assistant turn is the reference, the turns before it the prompt.
A record's `group_by` key (default `task`), when present, gives per-group accuracy.

Prompts are chat turns rendered with a chat template ("auto": the tokenizer's own) or, with no template,
the raw text of the user turn completed as is. Replies are greedy, batched with left padding and the KV
cache (`tunelab.serve.generate`), and stop at EOS or the template's end of turn.

Extraction, applied to the reply (and to the reference, where it finds something there):
- exact: the stripped reply must equal the stripped reference;
- regex: the first group (or the whole match) of the first match of `pattern`;
- numeric: the last number in the text (commas in numbers ignored), equal within `tolerance`.
A reply with nothing to extract is wrong and counted as `no_answer`. Not supported: sampling several
answers (pass@k, majority voting), answers inside LaTeX `\\boxed{}` (use a regex).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from tunelab.data.chat import chat_template_for
from tunelab.errors import ConfigError, DataError
from tunelab.evaluate.common import read_records, wilson
from tunelab.serve.generate import answer_chats, complete

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


@dataclass
class Item:
    """A prompt (chat turns), its reference answer, its group and where it came from."""

    messages: list[dict[str, str]]
    reference: str | None
    group: str | None
    where: str


def read_prompts(path: str, group_by: str = "task", need_reference: bool = True,
                 limit: int | None = None) -> list[Item]:
    """The prompts (and references) of a .jsonl/.json file in any of the formats the module docstring lists."""
    return [_item(r, where, group_by, need_reference) for r, where in read_records(path)[:limit]]


def _item(r: dict, where: str, group_by: str, need_reference: bool) -> Item:
    group = str(r[group_by]) if r.get(group_by) is not None else None
    if isinstance(r.get("messages"), list):
        turns = [m for m in r["messages"] if isinstance(m, dict)]
        if turns and turns[-1].get("role") == "assistant":
            return Item(turns[:-1], str(turns[-1].get("content", "")), group, where)
        reference, messages = None, turns
    elif isinstance(r.get("instruction"), str):
        text = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        messages, reference = [{"role": "user", "content": text}], r.get("output")
    elif isinstance(r.get("question", r.get("prompt")), str):
        messages = [{"role": "user", "content": r.get("question", r.get("prompt"))}]
        reference = r.get("answer", r.get("output"))
    else:
        raise DataError(f"{where}: expected 'instruction'/'output', 'question'/'answer', 'prompt'/'answer' or "
                        f"'messages' (found: {', '.join(r)})")
    if reference is None and need_reference:
        raise DataError(f"{where}: no reference answer ('output', 'answer' or a last assistant turn)")
    return Item(messages, None if reference is None else str(reference), group, where)


def extract(text: str, mode: str, pattern: str | None = None) -> str | None:
    """The answer in `text` under an extraction mode, or None when there is none."""
    if mode == "exact":
        return text.strip()
    if mode == "regex":
        if not pattern:
            raise ConfigError("extract: regex needs a pattern, e.g. pattern: '答案是(\\S+)'")
        try:
            m = re.search(pattern, text)
        except re.error as e:
            raise ConfigError(f"pattern {pattern!r} is not a valid regular expression ({e})") from None
        if m is None:
            return None
        return (m.group(1) if m.groups() else m.group(0)).strip()
    if mode == "numeric":
        numbers = NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else None
    raise ConfigError(f"extract: unknown mode {mode!r}; use exact, regex or numeric")


def is_correct(reply: str, reference: str, mode: str, pattern: str | None = None,
               tolerance: float = 1e-6) -> tuple[str | None, bool]:
    """(what was extracted from the reply, whether it matches the reference) under strict accuracy."""
    got = extract(reply, mode, pattern)
    want = extract(reference, mode, pattern)
    if mode == "regex" and want is None:
        want = reference.strip()  # references usually hold the bare answer
    if got is None or want is None:
        return got, False
    if mode == "numeric":
        return got, abs(float(got) - float(want)) <= tolerance
    return got, got == want


def generate_replies(model, tokenizer, items: list[Item], template: str | None = "auto", max_new_tokens: int = 64,
                     batch_size: int = 32) -> list[str]:
    """Greedy replies: chat turns through a template, or (template None) the user text completed raw."""
    if template is None:
        prompts = ["\n\n".join(m["content"] for m in it.messages) for it in items]
        return [r.strip() for r in complete(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size)]
    tmpl = chat_template_for(tokenizer, None if template == "auto" else template)
    return answer_chats(model, tokenizer, [it.messages for it in items], tmpl, max_new_tokens=max_new_tokens,
                        batch_size=batch_size)


def evaluate_generation(model, tokenizer, items: list[Item], extract_mode: str = "exact", pattern: str | None = None,
                        tolerance: float = 1e-6, template: str | None = "auto", max_new_tokens: int = 64,
                        batch_size: int = 32) -> dict:
    """Strict accuracy overall and per group, the number of replies with no answer, and every reply."""
    if extract_mode == "numeric":
        for it in items:
            if extract(it.reference or "", "numeric") is None:
                raise DataError(f"{it.where}: numeric extraction, but the reference {it.reference!r} holds no number")
    started = time.time()
    replies = generate_replies(model, tokenizer, items, template, max_new_tokens, batch_size)
    samples = []
    for it, reply in zip(items, replies):
        got, ok = is_correct(reply, it.reference or "", extract_mode, pattern, tolerance)
        samples.append({"prompt": it.messages[-1]["content"] if it.messages else "", "reference": it.reference,
                        "reply": reply, "extracted": got, "correct": ok, "group": it.group})
    metrics = {"accuracy": sum(s["correct"] for s in samples) / len(samples)}
    groups = sorted({s["group"] for s in samples if s["group"] is not None})
    per_group = {g: sum(s["correct"] for s in samples if s["group"] == g) / sum(s["group"] == g for s in samples)
                 for g in groups}
    metrics.update({f"accuracy/{g}": v for g, v in per_group.items()})
    ci95 = {"accuracy": wilson(sum(s["correct"] for s in samples), len(samples))}
    ci95.update({f"accuracy/{g}": wilson(sum(s["correct"] for s in samples if s["group"] == g),
                                         sum(s["group"] == g for s in samples)) for g in groups})
    wall = time.time() - started
    return {"metrics": metrics, "ci95": ci95, "examples": len(samples), "per_group": per_group,
            "no_answer": sum(s["extracted"] is None for s in samples), "extract": extract_mode,
            "wall_s": round(wall, 2), "samples": samples}
