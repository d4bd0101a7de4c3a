"""Generation accuracy: answer extraction cases, record formats, strict accuracy bookkeeping."""

import json

import pytest

from tunelab.errors import ConfigError, DataError
from tunelab.evaluate.generation import evaluate_generation, extract, is_correct, read_prompts
from tunelab.models import load_model, load_tokenizer
from tunelab.serve.generate import answer_chats


@pytest.mark.parametrize("reply,reference,mode,pattern,tolerance,expected", [
    (" Paris \n", "Paris", "exact", None, 0, ("Paris", True)),
    ("paris", "Paris", "exact", None, 0, ("paris", False)),  # strict: case matters
    ("Paris, France", "Paris", "exact", None, 0, ("Paris, France", False)),
    ("我认为答案是42。", "42", "regex", r"答案是(\d+)", 0, ("42", True)),
    ("答案是 7", "答案是7", "regex", r"答案是\s*(\d+)", 0, ("7", True)),  # the pattern applies to the reference too
    ("no answer here", "42", "regex", r"答案是(\d+)", 0, (None, False)),
    ("the result: 12 apples", "12", "regex", r"\d+", 0, ("12", True)),  # no group: the whole match
    ("2 + 3 = 5", "5", "numeric", None, 1e-6, ("5", True)),  # the last number in the reply
    ("so it costs 1,234.5 dollars", "#### 1234.5", "numeric", None, 1e-6, ("1234.5", True)),
    ("-7", "-7.0", "numeric", None, 1e-6, ("-7", True)),
    ("3.14", "3.14159", "numeric", None, 1e-6, ("3.14", False)),
    ("3.14", "3.14159", "numeric", None, 0.01, ("3.14", True)),
    ("I don't know", "3", "numeric", None, 1e-6, (None, False)),
    ("1e3", "1000", "numeric", None, 1e-6, ("1e3", True)),
])
def test_extraction_cases(reply, reference, mode, pattern, tolerance, expected):
    assert is_correct(reply, reference, mode, pattern, tolerance) == expected


def test_extraction_errors():
    with pytest.raises(ConfigError, match="needs a pattern"):
        extract("x", "regex")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        extract("x", "regex", "(")


def test_record_formats(tmp_path):
    f = tmp_path / "p.jsonl"
    records = [{"instruction": "Add", "input": "2 and 3", "output": "5", "task": "math"},
               {"question": "Capital of the north?", "answer": "Dunhollow"},
               {"prompt": "Say hi", "answer": "hi", "task": "chat"},
               {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    items = read_prompts(str(f))
    assert items[0].messages == [{"role": "user", "content": "Add\n\n2 and 3"}] and items[0].group == "math"
    assert [it.reference for it in items] == ["5", "Dunhollow", "hi", "Hello"]
    assert items[3].messages[-1] == {"role": "user", "content": "Hi"} and items[3].where == f"{f}:4"
    assert len(read_prompts(str(f), limit=2)) == 2
    f.write_text(json.dumps({"instruction": "no output"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p.jsonl:1: no reference answer"):
        read_prompts(str(f))
    assert read_prompts(str(f), need_reference=False)[0].reference is None
    f.write_text(json.dumps({"text": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p.jsonl:1: expected 'instruction'"):
        read_prompts(str(f))


def test_strict_accuracy_bookkeeping(base_model_dir, tmp_path):
    model, tok = load_model(base_model_dir).eval(), load_tokenizer(base_model_dir)
    prompts = [f"colour of {w}?" for w in ("river", "stone", "lantern", "baker")]
    replies = answer_chats(model, tok, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=4)
    # references: two equal to what the model says, two not; groups a, a, b, b
    refs = [replies[0], "nope", replies[2], "nope"]
    f = tmp_path / "g.jsonl"
    f.write_text("".join(json.dumps({"question": p, "answer": r, "task": g}) + "\n"
                         for p, r, g in zip(prompts, refs, "aabb")), encoding="utf-8")
    r = evaluate_generation(model, tok, read_prompts(str(f)), max_new_tokens=4, batch_size=3)
    assert [s["reply"] for s in r["samples"]] == replies  # batched replies equal the unbatched call
    assert [s["correct"] for s in r["samples"]] == [True, False, True, False]
    assert r["metrics"] == {"accuracy": 0.5, "accuracy/a": 0.5, "accuracy/b": 0.5} and r["examples"] == 4
    with pytest.raises(DataError, match="holds no number"):
        evaluate_generation(model, tok, read_prompts(str(f)), extract_mode="numeric")
