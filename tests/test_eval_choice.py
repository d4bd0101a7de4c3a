"""Multiple choice: file layouts, prompts, truncation, and both scores against values computed by hand."""

import json
import math
from pathlib import Path

import pytest
import torch

from tunelab.errors import DataError
from tunelab.evaluate.choice import (
    STYLES,
    Question,
    Subject,
    build_prompt,
    continuation_ids,
    evaluate_choice,
    fit_prompt,
    format_question,
    letter_logprobs,
    letter_token_ids,
    option_predictions,
    read_choice_dir,
    read_choice_file,
    score_batch,
)
from tunelab.models import load_model, load_tokenizer

CMMLU = Path(__file__).resolve().parents[1].parent / "shared/data/cmmlu"
HEADER = ",Question,A,B,C,D,Answer\n"


@pytest.fixture(scope="module")
def micro(base_model_dir):
    return load_model(base_model_dir).eval(), load_tokenizer(base_model_dir)


def write_dataset(root: Path, n_test: int = 4) -> Path:
    """A CMMLU-layout dataset with two subjects (dev: 3 questions, test: n_test)."""
    for split, n in (("dev", 3), ("test", n_test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject in ("colours", "rivers"):
            rows = [f'{i},"Which {subject} word {i}, please?",river,stone,山河,falcon,{"ABCD"[i % 4]}\n'
                    for i in range(n)]
            (root / split / f"{subject}.csv").write_text(HEADER + "".join(rows), encoding="utf-8")
    return root


# --- reading ----------------------------------------------------------------------------------------------


def test_cmmlu_csv_quoting_index_column_and_bom(tmp_path):
    f = tmp_path / "law.csv"
    f.write_text('\ufeff' + HEADER + '0,"A question, with a comma",a,b,c,d,B\n'
                 '1,"He said ""yes""\nand left.","x, y",b,"c ""q""",d,d\n'
                 '\n'
                 '2,plain,1,2,3,4, C \n', encoding="utf-8")
    qs = read_choice_file(f)
    assert [q.question for q in qs] == ["A question, with a comma", 'He said "yes"\nand left.', "plain"]
    assert qs[1].options == ["x, y", "b", 'c "q"', "d"] and [q.answer for q in qs] == [1, 3, 2]
    assert [q.where for q in qs] == [f"{f}:2", f"{f}:3", f"{f}:6"]  # the line where each record starts
    f.write_text(HEADER + "0,q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"law.csv:2: answer 'E' is not one of the 4 options"):
        read_choice_file(f)
    f.write_text(HEADER + "0,q,a,b,c,B\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"law.csv:2: expected 7 columns, got 6"):
        read_choice_file(f)


def test_mmlu_csv_ceval_columns_and_jsonl(tmp_path):
    mmlu = tmp_path / "algebra_test.csv"
    mmlu.write_text('"Find x, if 2x = 4",1,2,3,4,B\nWhat is 1+1?,2,3,4,5,A\n', encoding="utf-8")
    qs = read_choice_file(mmlu)
    assert qs[0].question == "Find x, if 2x = 4" and qs[0].options == ["1", "2", "3", "4"] and qs[0].answer == 1
    ceval = tmp_path / "ceval.csv"
    ceval.write_text("id,question,A,B,C,D,answer,explanation\n0,q?,a,b,c,d,D,because\n", encoding="utf-8")
    assert read_choice_file(ceval)[0].answer == 3
    js = tmp_path / "q.jsonl"
    js.write_text(json.dumps({"question": "q1", "choices": ["x", "y", "z"], "answer": 2}) + "\n"
                  + json.dumps({"question": "q2", "A": "a", "B": "b", "answer": "b"}) + "\n", encoding="utf-8")
    qs = read_choice_file(js)
    assert [(q.options, q.answer) for q in qs] == [(["x", "y", "z"], 2), (["a", "b"], 1)]


def test_dataset_directory_subjects_and_errors(tmp_path):
    root = write_dataset(tmp_path / "ds")
    subjects = read_choice_dir(root, k=2)
    assert [s.name for s in subjects] == ["colours", "rivers"]
    assert len(subjects[0].dev) == 2 and len(subjects[0].test) == 4
    assert [s.name for s in read_choice_dir(root, subjects=["rivers"], limit=1, k=0)] == ["rivers"]
    with pytest.raises(DataError, match="no subject 'river'"):
        read_choice_dir(root, subjects=["river"])
    with pytest.raises(DataError, match="no 'val/' folder"):
        read_choice_dir(root, split="val")
    with pytest.raises(DataError, match="single file has no few-shot pool"):
        read_choice_dir(root / "test" / "rivers.csv", k=5)
    mmlu = tmp_path / "mmlu"  # MMLU names: <subject>_dev.csv, <subject>_test.csv
    for split in ("dev", "test"):
        (mmlu / split).mkdir(parents=True)
        (mmlu / split / f"anatomy_{split}.csv").write_text("q,a,b,c,d,A\n", encoding="utf-8")
    assert [s.name for s in read_choice_dir(mmlu, k=5)] == ["anatomy"]


@pytest.mark.skipif(not CMMLU.is_dir(), reason="needs ../shared/data/cmmlu")
def test_real_cmmlu_files():
    subjects = read_choice_dir(CMMLU, k=5)
    assert len(subjects) == 67
    assert all(len(s.dev) == 5 and s.test for s in subjects)
    assert sum(len(s.test) for s in subjects) == 11582
    assert all(len(q.options) == 4 and 0 <= q.answer < 4 for s in subjects for q in s.test + s.dev)
    agronomy = next(s for s in subjects if s.name == "agronomy")
    first = agronomy.test[0]
    assert first.question.startswith("在农业生产中被当作极其重要的劳动对象") and first.options[1] == "土地"
    assert first.answer == 1 and first.where.endswith("agronomy.csv:2")
    quoted = [q for s in subjects for q in s.test if "\n" in q.question or "," in q.question]
    assert quoted  # cells with commas or newlines, read whole through the CSV quoting


# --- prompts and truncation -------------------------------------------------------------------------------


def test_ceval_prompt_format():
    q = Question("1+1=?", ["1", "2", "3", "4"], 1, "x")
    shot = Question("2+2=?", ["4", "5", "6", "7"], 0, "y")
    text = build_prompt("数学", [shot], q, STYLES["ceval"])
    assert text == ("以下是关于数学的单项选择题，请直接给出正确答案的选项。\n\n"
                    "2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案：A\n\n"
                    "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")
    assert format_question(q, STYLES["mmlu"], True).endswith("\nAnswer: B\n\n")


def test_truncation_drops_examples_from_the_front_and_keeps_the_question(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    style = STYLES["ceval"]
    shots = [Question(f"example {i} " + "river stone lantern " * 6, ["a", "b", "c", "d"], 0, "dev") for i in range(3)]
    q = Question("the question " + "falcon willow " * 5, ["a", "b", "c", "d"], 2, "test")
    full = tok(build_prompt("s", shots, q, style), add_special_tokens=False)["input_ids"]
    one = tok(build_prompt("s", shots[2:], q, style), add_special_tokens=False)["input_ids"]
    ids, kept, cut = fit_prompt(tok, "s", shots, q, style, budget=len(one) + 2)
    assert (kept, cut) == (1, False) and ids == one and len(ids) < len(full)
    text = tok.decode(ids)
    assert text.endswith(format_question(q, style)) and "example 2" in text and "example 0" not in text
    for estimate in (0, 3):  # a wrong estimate still gives the exact answer
        assert fit_prompt(tok, "s", shots, q, style, len(one) + 2, estimate=estimate)[:2] == (one, 1)
    ids, kept, cut = fit_prompt(tok, "s", shots, q, style, budget=10)  # not even the question fits
    assert cut and kept == 0 and len(ids) == 10 and tok.decode(ids).endswith("答案：")


def test_truncation_is_counted(micro, tmp_path):
    model, tok = micro
    subjects = read_choice_dir(write_dataset(tmp_path / "ds", n_test=3), k=3)
    full = evaluate_choice(model, tok, subjects, k=3)
    assert (full["truncated"], full["cut"], full["mean_shots"]) == (0, 0, 3)
    short = evaluate_choice(model, tok, subjects, k=3, max_length=260)  # 2 of 3 examples fit
    assert (short["truncated"], short["cut"], short["mean_shots"]) == (6, 0, 2)
    cut = evaluate_choice(model, tok, subjects, k=3, max_length=100)  # not even the question fits
    assert (cut["truncated"], cut["cut"], cut["mean_shots"]) == (6, 6, 0)
    assert short["questions"] == 6 and short["questions_per_s"] > 0


# --- scoring ----------------------------------------------------------------------------------------------


def test_letter_probabilities_by_hand():
    # p(token) ∝ 1, 2, 1, 3, 1, 4; A = token 1, B = token 3, C = token 5, D = tokens 0 and 2 (two spellings)
    logprobs = torch.log_softmax(torch.log(torch.tensor([[1.0, 2, 1, 3, 1, 4]])), dim=-1)
    probs = letter_logprobs(logprobs, [[1], [3], [5], [0, 2]]).exp()[0]
    assert probs.tolist() == pytest.approx([2 / 11, 3 / 11, 4 / 11, 2 / 11])


def test_option_choices_by_hand():
    lls = [-4.0, -3.0, -6.0, -5.0]
    options = ["甲乙", "c", "defgh", "ij"]  # 2, 1, 5, 2 characters; 6, 1, 5, 2 bytes
    # per character: -2, -3, -1.2, -2.5; per byte: -0.67, -3, -1.2, -2.5
    assert option_predictions(lls, options) == {"acc": 1, "acc_norm": 2, "acc_bytes": 0}


def test_letter_tokens_follow_the_answer_cue(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    ids = letter_token_ids(tok, 4)
    assert all(tok.decode([i]).strip() == "ABCD"[n] for n, group in enumerate(ids) for i in group)
    after_cue = tok("答案：B", add_special_tokens=False)["input_ids"][-1]
    after_space = tok("Answer: B", add_special_tokens=False)["input_ids"][-1]
    assert after_cue in ids[1] and after_space in ids[1]
    assert continuation_ids(tok, "答案：", "山河") == tok("答案：山河", add_special_tokens=False)["input_ids"][
        len(tok("答案：", add_special_tokens=False)["input_ids"]):]


def test_batched_cached_scores_equal_direct_computation(micro):
    model, tok = micro
    contexts = [tok(t, add_special_tokens=False)["input_ids"] for t in
                ("river stone lantern\n答案：", "copper\n答案：", "violet orchard tailor falcon willow 山河\n答案：")]
    options = [["river", "stone"], ["山河湖", "a", "falcon willow"], ["x", "yy", "zzz", "花草鸟鱼"]]
    conts = [[continuation_ids(tok, "答案：", o) for o in opts] for opts in options]
    letters = letter_token_ids(tok, 4)
    lp, lls = score_batch(model, contexts, conts, letters, pad_id=tok.pad_token_id)
    with torch.no_grad():
        for r, (ctx, cs) in enumerate(zip(contexts, conts)):
            last = torch.log_softmax(model(torch.tensor([ctx])).logits[0, -1], dim=-1)
            mass = torch.stack([torch.logsumexp(last[ids], 0) for ids in letters])
            assert lp[r].tolist() == pytest.approx(torch.log_softmax(mass, 0).tolist(), abs=1e-5)
            for c, got in zip(cs, lls[r]):
                logp = torch.log_softmax(model(torch.tensor([ctx + c])).logits[0], dim=-1)
                want = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(c))
                assert got == pytest.approx(want, abs=1e-4)


def test_accuracy_is_the_share_of_argmax_hits(micro, tmp_path):
    model, tok = micro
    subjects = read_choice_dir(write_dataset(tmp_path / "ds"), k=2)
    r = evaluate_choice(model, tok, subjects, k=2, batch_size=3)
    assert set(r["subjects"]) == {"colours", "rivers"} and r["questions"] == 8
    for name in ("letter_acc", "ll_acc", "ll_acc_norm"):
        macro = sum(s[name] for s in r["subjects"].values()) / 2
        assert r["metrics"][name] == pytest.approx(macro)
        assert all(s[name] * 4 == round(s[name] * 4) for s in r["subjects"].values())
    assert r["example_prompt"].startswith("以下是关于colours的单项选择题")
    chat = evaluate_choice(model, tok, [Subject("s", subjects[0].test, [])], k=0,
                           template="{% for m in messages %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n"
                                    "{% endfor %}<|im_start|>assistant\n")
    assert chat["example_prompt"].startswith("<|im_start|>user\n以下是关于s") and not math.isnan(
        chat["metrics"]["letter_acc"])
