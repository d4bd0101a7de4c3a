"""Lint: lengths, truncation, examples with nothing to train, duplicates and train/eval overlap; real data."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunelab.data.chat import Encoded, chat_template_for, encode_example
from tunelab.data.lint import format_lint, lint_examples
from tunelab.data.records import Example, read_examples

CPSYCOUND = Path(__file__).resolve().parents[1].parent / "shared/data/cpsycound/cpsycound.jsonl"


def ex(where: str, *turns: str) -> Example:
    roles = ["user", "assistant"] * len(turns)
    return Example(messages=[{"role": r, "content": c} for r, c in zip(roles, turns)], text=None, where=where)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_duplicates_overlap_and_empty(tok):
    template = chat_template_for(tok)
    train = [ex("t:1", "river", "stone"), ex("t:2", "meadow", "copper"), ex("t:3", "river ", " stone"),
             ex("t:4", "river", "stone"), ex("t:5", "willow " * 60, "ok"), Example(None, "baker", "t:6")]
    evals = [ex("e:1", "meadow", "copper"), ex("e:2", "falcon", "violet")]
    enc = [encode_example(e, tok, template, max_len=48) for e in train]
    eval_enc = [encode_example(e, tok, template, max_len=48) for e in evals]
    report = lint_examples(enc, eval_enc, train, evals)
    assert report["n_examples"] == 6 and report["eval"]["n_examples"] == 2
    # t:3 differs only in whitespace, t:4 is exact
    assert report["duplicates"] == {"count": 2, "examples": [["t:1", "t:3"], ["t:1", "t:4"]]}
    assert report["train_eval_overlap"] == {"count": 1, "examples": [["e:1", "t:2"]]}
    assert report["no_trainable"] == {"count": 1, "examples": ["t:5"]}
    assert report["eval"]["no_trainable"]["count"] == 0
    assert report["n_truncated"] == 1 and report["share_truncated"] == round(1 / 6, 4)
    assert report["trainable_tokens"] == sum(e.n_trainable for e in enc)
    assert report["tokens"]["max"] == enc[4].n_tokens_before_truncation > 48
    lines = format_lint(report)
    assert any("duplicates: 2" in line and "t:1 = t:3" in line for line in lines)
    assert any("no trainable token: 1" in line and "t:5" in line for line in lines)
    assert any("1 also in the training data" in line for line in lines)
    # without the examples: identity is the encoded tokens, so the whitespace variant is no longer a duplicate
    by_ids = lint_examples(enc, eval_enc)
    assert by_ids["duplicates"] == {"count": 1, "examples": [["t:1", "t:4"]]}
    assert by_ids["train_eval_overlap"]["count"] == 1


def test_percentiles_nearest_rank():
    enc = [Encoded([1] * n, [1] * n, f"t:{n}", False, n, n) for n in range(1, 101)]
    report = lint_examples(enc)
    assert report["tokens"] == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert report["duplicates"]["count"] == 0 and "eval" not in report
    assert len(format_lint(report)) == 1


def test_cpsycound_lints(tok):
    if not CPSYCOUND.is_file():
        pytest.skip(f"{CPSYCOUND} absent")
    examples = read_examples(CPSYCOUND)
    assert len(examples) == 3084
    subset = examples[::15]  # ~200 dialogues keep the test fast; loading all of them is tested above
    template = chat_template_for(tok)
    enc = [encode_example(e, tok, template, max_len=4096) for e in subset]
    report = lint_examples(enc, None, subset)
    assert report["n_examples"] == len(subset) and report["no_trainable"]["count"] == 0
    assert report["duplicates"]["count"] == 0
    assert 0 < report["tokens"]["p50"] <= report["tokens"]["p90"] <= report["tokens"]["max"]
    # every assistant turn is trained: its content and one <|im_end|> each
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    whole = [(e, x) for e, x in zip(enc, subset) if not e.truncated][:40]
    assert len(whole) == 40
    for e, x in whole:
        n_assistant = sum(m["role"] == "assistant" for m in x.messages)
        assert sum(lab == im_end for lab in e.labels) == n_assistant
        assert tok.decode([i for i, lab in zip(e.input_ids, e.labels) if lab != -100]) == "".join(
            m["content"] + "<|im_end|>" for m in x.messages if m["role"] == "assistant")
    assert format_lint(report)[0].startswith(f"data: {len(subset)} training examples")
