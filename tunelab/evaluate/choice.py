"""Multiple choice, k-shot, in the C-Eval/CMMLU style, scored two ways in one pass.

Data: a directory with a `test/` (`split`) and a `dev/` (`fewshot_split`) folder holding one file per
subject (the subject is the file name without a `_test`/`_dev`/`_val` suffix), or one file (one subject,
no few-shot pool: k must be 0). Files:
- CMMLU/C-Eval CSV: a header row with `Question`, option columns `A`, `B`, ... and `Answer` (any case);
  other columns (CMMLU's unnamed index, C-Eval's `id` and `explanation`) are ignored; quoted cells may hold
  commas, quotes and newlines.
- MMLU CSV: no header; `question, A, B, C, D, answer`.
- JSONL (or a JSON list): `{"question", "choices": [...] or "A".."D", "answer": letter or 0-based index}`.

Prompt ("ceval"): CMMLU's header `以下是关于{subject}的单项选择题，请直接给出正确答案的选项。` (the subject's Chinese
name for CMMLU's subjects, as CMMLU's own code writes it; `subject_names` overrides), then the
first k dev questions as worked examples, then the question; each question is written as
`{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：` and an example ends with its letter and a blank line.
"mmlu": the English header and `Answer:`, with a space before the letter. With `chat_template` the whole
text is one user turn and the answer follows the template's generation prompt.

Scoring, from one forward pass of the prompt plus one of the options' continuations over its KV cache:
- letter (C-Eval's reference code): the next-token distribution after the prompt, restricted to the
  option letters and renormalised; a letter's probability sums every token that decodes to it (`A`, ` A`,
  ...), whatever the tokenizer makes of a letter after `答案：`. Accuracy = argmax is the answer.
- loglikelihood (lm-evaluation-harness `multiple_choice`): the summed log-probability of each option's
  text as the continuation of the prompt; `acc` = argmax of the sum, `acc_norm` = argmax of the sum per
  character of the option (lm-eval's definition), `acc_bytes` per UTF-8 byte. A continuation is tokenized
  together with the end of the prompt and split there, so it gets its natural tokens.
Accuracy per subject, averaged over subjects (macro) and over questions (micro).

Context: a prompt (with the longest continuation) that does not fit the model's context drops few-shot
examples from the front until it fits, and is counted as truncated; one that does not fit even with no
example keeps its last tokens (the question's end and `答案：`) and is counted as cut.
Not supported: chain-of-thought or generative answers, per-subject few-shot counts, `acc_mutual_info`.
"""

from __future__ import annotations

import csv
import inspect
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.data.chat import prompt_for_generation
from tunelab.data.text import bos_ids, with_bos
from tunelab.errors import DataError, ModelError, warn
from tunelab.evaluate.common import Progress, context_length, device_of, read_records, wilson
from tunelab.models import TRAINED_SEQ_LEN, trained_seq_len

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SUFFIXES = (".csv", ".jsonl", ".json")
TAIL_CHARS = 16  # characters of the prompt's end tokenized with a continuation to find its tokens


@dataclass
class Question:
    """One multiple-choice question: its options, the index of the right one, and where it came from."""

    question: str
    options: list[str]
    answer: int
    where: str


@dataclass
class Subject:
    """The test questions of one subject and its few-shot pool."""

    name: str
    test: list[Question]
    dev: list[Question] = field(default_factory=list)


@dataclass(frozen=True)
class Style:
    """How a prompt reads: header, the cue before the answer, the text between the cue and the answer."""

    header: str
    cue: str
    delimiter: str


# CMMLU's Chinese subject names (its name_en2zh table), used in the ceval-style header by default
CMMLU_NAMES = {
    "agronomy": "农学", "anatomy": "解剖学", "ancient_chinese": "古汉语", "arts": "艺术学", "astronomy": "天文学",
    "business_ethics": "商业伦理", "chinese_civil_service_exam": "中国公务员考试",
    "chinese_driving_rule": "中国驾驶规则", "chinese_food_culture": "中国饮食文化",
    "chinese_foreign_policy": "中国外交政策", "chinese_history": "中国历史", "chinese_literature": "中国文学",
    "chinese_teacher_qualification": "中国教师资格", "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学", "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学", "college_law": "大学法律", "college_mathematics": "大学数学",
    "college_medical_statistics": "大学医学统计", "college_medicine": "大学医学", "computer_science": "计算机科学",
    "computer_security": "计算机安全", "conceptual_physics": "概念物理学",
    "construction_project_management": "建设工程管理", "economics": "经济学", "education": "教育学",
    "electrical_engineering": "电气工程", "elementary_chinese": "小学语文", "elementary_commonsense": "小学常识",
    "elementary_information_and_technology": "小学信息技术", "elementary_mathematics": "初等数学",
    "ethnology": "民族学", "food_science": "食品科学", "genetics": "遗传学", "global_facts": "全球事实",
    "high_school_biology": "高中生物", "high_school_chemistry": "高中化学", "high_school_geography": "高中地理",
    "high_school_mathematics": "高中数学", "high_school_physics": "高中物理学", "high_school_politics": "高中政治",
    "human_sexuality": "人类性行为", "international_law": "国际法学", "journalism": "新闻学",
    "jurisprudence": "法理学", "legal_and_moral_basis": "法律与道德基础", "logical": "逻辑学",
    "machine_learning": "机器学习", "management": "管理学", "marketing": "市场营销",
    "marxist_theory": "马克思主义理论", "modern_chinese": "现代汉语", "nutrition": "营养学", "philosophy": "哲学",
    "professional_accounting": "专业会计", "professional_law": "专业法学", "professional_medicine": "专业医学",
    "professional_psychology": "专业心理学", "public_relations": "公共关系", "security_study": "安全研究",
    "sociology": "社会学", "sports_science": "体育学", "traditional_chinese_medicine": "中医中药",
    "virology": "病毒学", "world_history": "世界历史", "world_religions": "世界宗教",
}


STYLES = {
    "ceval": Style("以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "答案：", ""),
    "mmlu": Style("The following are multiple choice questions (with answers) about {subject}.\n\n", "Answer:", " "),
}

# ---------------------------------------------------------------------------------------------------------
# reading


def read_choice_file(path: str | Path) -> list[Question]:
    """The questions of one .csv (CMMLU/C-Eval with a header, or MMLU without) or .jsonl/.json file."""
    p = Path(path)
    if p.suffix not in SUFFIXES:
        raise DataError(f"{p}: a choice file is .csv (CMMLU/C-Eval/MMLU layout), .jsonl or .json")
    if p.suffix == ".csv":
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text (byte {e.start}); convert the file to UTF-8") from None
        questions = _csv_questions(p, text)
    else:
        questions = [_json_question(r, where) for r, where in read_records(p)]
    if not questions:
        raise DataError(f"{p}: no questions")
    return questions


def _csv_questions(p: Path, text: str) -> list[Question]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, line = [], 1
    for row in reader:
        rows.append((row, line))
        line = reader.line_num + 1
    rows = [(r, n) for r, n in rows if any(c.strip() for c in r)]
    if not rows:
        return []
    first = [c.strip() for c in rows[0][0]]
    lower = [c.lower() for c in first]
    if "question" in lower and "answer" in lower:  # CMMLU / C-Eval: columns by name
        q_col, a_col = lower.index("question"), lower.index("answer")
        opt_cols = [first.index(letter) for letter in LETTERS if letter in first]
        if len(opt_cols) < 2 or [first[i] for i in opt_cols] != list(LETTERS[:len(opt_cols)]):
            raise DataError(f"{p}:1: the header needs option columns A, B, ... (got {', '.join(first)})")
        body, width = rows[1:], len(first)
    else:  # MMLU: question, options..., answer
        width = len(first)
        if width < 4:
            raise DataError(f"{p}:{rows[0][1]}: expected a header (,Question,A,B,C,D,Answer) or the MMLU "
                            f"layout question,A,B,C,D,answer; got {width} columns")
        q_col, a_col, opt_cols, body = 0, width - 1, list(range(1, width - 1)), rows
    questions = []
    for row, n in body:
        if len(row) != width:
            raise DataError(f"{p}:{n}: expected {width} columns, got {len(row)}; check the quoting of that row")
        options = [row[i].strip() for i in opt_cols]
        questions.append(Question(row[q_col].strip(), options, _answer_index(row[a_col], len(options), f"{p}:{n}"),
                                  f"{p}:{n}"))
    return questions


def _json_question(r: dict, where: str) -> Question:
    if not isinstance(r.get("question"), str):
        raise DataError(f"{where}: no 'question' string (keys: {', '.join(r)})")
    if isinstance(r.get("choices"), list):
        options = [str(c).strip() for c in r["choices"]]
    else:
        options = [str(r[letter]).strip() for letter in LETTERS if letter in r]
    if len(options) < 2:
        raise DataError(f"{where}: needs 'choices' (a list) or option keys 'A', 'B', ...; found {len(options)}")
    if "answer" not in r:
        raise DataError(f"{where}: no 'answer' (a letter or a 0-based index)")
    return Question(r["question"].strip(), options, _answer_index(r["answer"], len(options), where), where)


def _answer_index(value: object, n: int, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    else:
        letter = str(value).strip().upper()
        index = LETTERS.index(letter) if len(letter) == 1 and letter in LETTERS else -1
    if not 0 <= index < n:
        raise DataError(f"{where}: answer {value!r} is not one of the {n} options ({', '.join(LETTERS[:n])})")
    return index


def read_choice_dir(path: str | Path, split: str = "test", fewshot_split: str = "dev", k: int = 5,
                    subjects: list[str] | None = None, limit: int | None = None) -> list[Subject]:
    """Every subject of a dataset directory (or one file), with its few-shot pool when k > 0."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory; a choice dataset is a directory with {split}/ and "
                        f"{fewshot_split}/ folders of one .csv/.jsonl file per subject (the CMMLU layout), or one file")
    if p.is_file():
        if k:
            raise DataError(f"{p}: a single file has no few-shot pool; set k=0 or point path at a directory "
                            f"with {split}/ and {fewshot_split}/ folders")
        return [Subject(_subject_name(p, split), read_choice_file(p)[:limit])]
    if not (p / split).is_dir():
        raise DataError(f"{p}: no '{split}/' folder; a choice dataset is a directory with {split}/ and "
                        f"{fewshot_split}/ folders of one .csv/.jsonl file per subject (the CMMLU layout), or one file")
    tests = _subject_files(p / split)
    if not tests:
        raise DataError(f"{p / split}: no .csv, .jsonl or .json files")
    chosen = list(tests)
    if subjects:
        unknown = [s for s in subjects if s not in tests]
        if unknown:
            raise DataError(f"{p / split}: no subject {', '.join(map(repr, unknown))}; subjects are file names "
                            f"without suffix, e.g. {', '.join(list(tests)[:3])}")
        chosen = list(subjects)
    devs = _subject_files(p / fewshot_split) if k else {}
    if k and not (p / fewshot_split).is_dir():
        raise DataError(f"{p}: no '{fewshot_split}/' folder for the {k}-shot examples; set k=0 or fewshot_split")
    out = []
    for name in chosen:
        if k and name not in devs:
            raise DataError(f"{p / fewshot_split}: no file for subject '{name}' (few-shot examples); set k=0")
        out.append(Subject(name, read_choice_file(tests[name])[:limit],
                           read_choice_file(devs[name])[:k] if k else []))
    return out


def _subject_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {_subject_name(f, folder.name): f for f in sorted(folder.iterdir()) if f.suffix in SUFFIXES}


def _subject_name(f: Path, split: str) -> str:
    return f.stem.removesuffix(f"_{split}")


# ---------------------------------------------------------------------------------------------------------
# prompts


def format_question(q: Question, style: Style, with_answer: bool = False) -> str:
    """The question, its lettered options and the answer cue (and, for an example, its answer)."""
    text = q.question + "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(q.options)) + "\n" + style.cue
    return text + style.delimiter + LETTERS[q.answer] + "\n\n" if with_answer else text


def build_prompt(subject: str, shots: list[Question], q: Question, style: Style) -> str:
    """Header, worked examples, then the question ending in the answer cue."""
    return (style.header.format(subject=subject) + "".join(format_question(s, style, True) for s in shots)
            + format_question(q, style))


def fit_prompt(tokenizer, subject: str, shots: list[Question], q: Question, style: Style, budget: int,
               wrap: Callable[[str], str] | None = None, estimate: int | None = None) -> tuple[list[int], int, bool]:
    """(prompt ids, examples kept, cut): drop examples from the front until the prompt fits `budget` tokens.

    `estimate` (examples that probably fit) saves tokenizations; the exact count is always checked. The prompt
    starts with the tokenizer's BOS when its rule adds one (once: a chat template may have written it), kept when
    the prompt is cut.
    """
    bos = bos_ids(tokenizer)

    def ids_for(n: int) -> list[int]:
        text = build_prompt(subject, shots[len(shots) - n:] if n else [], q, style)
        return with_bos(tokenizer(wrap(text) if wrap else text, add_special_tokens=False)["input_ids"], bos)

    n = len(shots) if estimate is None else min(estimate, len(shots))
    ids = ids_for(n)
    while len(ids) > budget and n > 0:
        n -= 1
        ids = ids_for(n)
    while len(ids) <= budget and n < len(shots):  # the estimate may be an example short
        more = ids_for(n + 1)
        if len(more) > budget:
            break
        n, ids = n + 1, more
    if len(ids) > budget:
        head = bos if budget > len(bos) else []
        return head + ids[len(ids) - budget + len(head):], 0, True
    return ids, n, False


def estimate_shots(fixed: int, shot_lengths: list[int], budget: int) -> int:
    """How many of the last examples fit beside `fixed` tokens (header and question), each counted alone."""
    n, used = 0, fixed
    for length in reversed(shot_lengths):
        used += length
        if used > budget:
            break
        n += 1
    return n


def continuation_ids(tokenizer, prompt_tail: str, continuation: str) -> list[int]:
    """The tokens of `continuation` as they follow the prompt (tokenized with the prompt's end, then split)."""
    tail = tokenizer(prompt_tail, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt_tail + continuation, add_special_tokens=False)["input_ids"]
    if whole[:len(tail)] == tail and len(whole) > len(tail):
        return whole[len(tail):]
    return tokenizer(continuation, add_special_tokens=False)["input_ids"]


def letter_token_ids(tokenizer, n: int) -> list[list[int]]:
    """For each of the first n letters, the ids of the tokens that decode to it (e.g. `A` and ` A`)."""
    out = []
    for letter in LETTERS[:n]:
        ids = set()
        for text in (letter, " " + letter, "：" + letter, ":" + letter, "\n" + letter):
            enc = tokenizer(text, add_special_tokens=False)["input_ids"]
            if enc and tokenizer.decode(enc[-1:]).strip() == letter:
                ids.add(enc[-1])
        if not ids:
            raise ModelError(f"the tokenizer has no token for the letter {letter!r}; letter scoring needs one")
        out.append(sorted(ids))
    return out


# ---------------------------------------------------------------------------------------------------------
# scoring


def letter_logprobs(last_logprobs: torch.Tensor, letter_ids: list[list[int]]) -> torch.Tensor:
    """[batch, letters]: log-probabilities of the letters renormalised among themselves.

    `last_logprobs` is the log-softmax of the next-token logits over the whole vocabulary; a letter's mass
    is the sum over the tokens that spell it.
    """
    mass = torch.stack([torch.logsumexp(last_logprobs[:, ids], dim=-1) for ids in letter_ids], dim=-1)
    return torch.log_softmax(mass, dim=-1)


def option_predictions(lls: list[float], options: list[str]) -> dict[str, int]:
    """lm-eval's choices from summed log-likelihoods: raw, per character (acc_norm), per UTF-8 byte."""
    def argmax(values: list[float]) -> int:
        return max(range(len(values)), key=values.__getitem__)

    return {"acc": argmax(lls),
            "acc_norm": argmax([ll / max(1, len(o)) for ll, o in zip(lls, options)]),
            "acc_bytes": argmax([ll / max(1, len(o.encode("utf-8"))) for ll, o in zip(lls, options)])}


@torch.no_grad()
def score_batch(model, contexts: list[list[int]], continuations: list[list[list[int]]], letter_ids: list[list[int]],
                pad_id: int = 0) -> tuple[torch.Tensor, list[list[float]]]:
    """Letter log-probs [batch, letters] and each option's summed log-likelihood, for left-padded prompts.

    One forward pass over the prompts (keeping only the last logits and the KV cache), then one over every
    option's continuation (all but its last token), reusing each prompt's cache.
    """
    device = device_of(model)
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for r, c in enumerate(contexts):
        ids[r, width - len(c):] = torch.tensor(c)
        mask[r, width - len(c):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    last = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    letters = letter_logprobs(last, letter_ids)

    n = max(len(c) for c in continuations)  # rows per question; a question with fewer options gets empty rows
    rows = [(q, conts[j] if j < len(conts) else []) for q, conts in enumerate(continuations) for j in range(n)]
    lls = [float(last[q, opt[0]]) if opt else 0.0 for q, opt in rows]
    rest = max(len(opt) for _, opt in rows) - 1
    if rest > 0:
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # renamed in transformers 5.x
        cache.batch_repeat_interleave(n)  # each prompt's cache once per option (index_select is slow on CPU)
        inp = torch.full((len(rows), rest), pad_id, dtype=torch.long)
        inp_mask = torch.zeros((len(rows), rest), dtype=torch.long)
        for r, (_, opt) in enumerate(rows):
            inp[r, :max(0, len(opt) - 1)] = torch.tensor(opt[:-1], dtype=torch.long)
            inp_mask[r, :max(0, len(opt) - 1)] = 1
        index = torch.arange(len(continuations), device=device).repeat_interleave(n)
        att = torch.cat([mask[index], inp_mask.to(device)], dim=-1)
        pos = mask.sum(-1)[index][:, None] + torch.arange(rest, device=device)[None, :]
        logits = model(input_ids=inp.to(device), attention_mask=att, position_ids=pos, use_cache=False,
                       **{_cache_argument(model): cache}).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for r, (_, opt) in enumerate(rows):
            if len(opt) > 1:
                targets = torch.tensor(opt[1:], device=device)
                lls[r] += float(logp[r, torch.arange(len(opt) - 1, device=device), targets].sum())
    grouped = [lls[q * n:q * n + len(conts)] for q, conts in enumerate(continuations)]
    return letters.cpu(), grouped


def _cache_argument(model) -> str:
    """`cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


# ---------------------------------------------------------------------------------------------------------
# the task


@dataclass
class _Item:
    subject: int
    question: Question
    ids: list[int]
    continuations: list[list[int]]
    shots: int
    cut: bool


def evaluate_choice(model, tokenizer, subjects: list[Subject], k: int = 5, style: str = "ceval",
                    template: str | None = None, max_length: int | None = None, batch_size: int = 8,
                    subject_names: dict[str, str] | None = None, progress: Progress | None = None) -> dict:
    """Per-subject and averaged accuracy in both scoring modes, truncation counts and questions per second."""
    started = time.time()
    st = STYLES[style]
    names = {**(CMMLU_NAMES if style == "ceval" else {}), **(subject_names or {})}
    context = context_length(model, max_length)

    def wrap(text: str) -> str:
        return prompt_for_generation([{"role": "user", "content": text}], tokenizer, template)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    n_letters = max(len(q.options) for s in subjects for q in s.test)
    letter_ids = letter_token_ids(tokenizer, n_letters)
    items, example = [], None
    for si, s in enumerate(subjects):
        display = names.get(s.name, s.name.replace("_", " "))
        shots = s.dev[:k]
        header, shot_lengths = n_tokens(st.header.format(subject=display)), [
            n_tokens(format_question(x, st, True)) for x in shots]
        for q in s.test:
            end = format_question(q, st)
            tail = (wrap(end) if template else end)[-TAIL_CHARS:]
            conts = [continuation_ids(tokenizer, tail, st.delimiter + o) or [tokenizer.eos_token_id]
                     for o in q.options]
            budget = context - max(len(c) for c in conts) + 1
            if budget < 1:
                raise DataError(f"{q.where}: an option is longer than the context ({context} tokens)")
            guess = estimate_shots(header + n_tokens(end), shot_lengths, budget)
            ids, used, cut = fit_prompt(tokenizer, display, shots, q, st, budget, wrap if template else None, guess)
            items.append(_Item(si, q, ids, conts, used, cut))
            if example is None:
                example = tokenizer.decode(ids)
    order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))  # similar lengths share a batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    letter_pred, ll_pred = [None] * len(items), [None] * len(items)
    for b in range(0, len(order), batch_size):
        batch = [items[i] for i in order[b:b + batch_size]]
        letters, lls = score_batch(model, [it.ids for it in batch], [it.continuations for it in batch], letter_ids, pad)
        for j, it in enumerate(batch):
            n = len(it.question.options)
            letter_pred[order[b + j]] = int(letters[j, :n].argmax())
            ll_pred[order[b + j]] = option_predictions(lls[j], it.question.options)
        if progress:
            progress(min(b + batch_size, len(order)), len(order))
    wall = time.time() - started
    trained = trained_seq_len(model)
    past = sum(len(it.ids) + max(map(len, it.continuations)) - 1 > trained for it in items) if trained else 0
    if past:
        warn(f"{past} of {len(items)} multiple-choice prompts run past the {trained} positions the model was "
             f"trained on (config.json {TRAINED_SEQ_LEN}; context {context}): set max_length: {trained} (fewer "
             f"examples) to keep them within")
    return {**_summarise(subjects, items, letter_pred, ll_pred, k, context, wall, example), "past_trained": past}


def _summarise(subjects: list[Subject], items: list[_Item], letter_pred: list, ll_pred: list, k: int,
               context: int, wall: float, example: str | None) -> dict:
    keys = ("letter", "acc", "acc_norm", "acc_bytes")
    per_subject: dict[str, dict] = {}
    for si, s in enumerate(subjects):
        idx = [i for i, it in enumerate(items) if it.subject == si]
        if not idx:
            continue
        hits = {key: sum((letter_pred[i] if key == "letter" else ll_pred[i][key]) == items[i].question.answer
                         for i in idx) for key in keys}
        per_subject[s.name] = {"questions": len(idx), "letter_acc": hits["letter"] / len(idx),
                               "ll_acc": hits["acc"] / len(idx), "ll_acc_norm": hits["acc_norm"] / len(idx),
                               "ll_acc_bytes": hits["acc_bytes"] / len(idx), "_hits": hits,
                               "ci95": {name: wilson(hits[key], len(idx)) for key, name in
                                        zip(keys, ("letter_acc", "ll_acc", "ll_acc_norm"))}}
    total = sum(v["questions"] for v in per_subject.values())
    averages = {}
    for key, name in zip(keys, ("letter_acc", "ll_acc", "ll_acc_norm", "ll_acc_bytes")):
        averages[name] = sum(v[name] for v in per_subject.values()) / len(per_subject)  # macro: mean of subjects
        averages[f"{name}_micro"] = sum(v["_hits"][key] for v in per_subject.values()) / total
    ci95 = {f"{name}_micro": wilson(sum(v["_hits"][key] for v in per_subject.values()), total)
            for key, name in zip(keys, ("letter_acc", "ll_acc", "ll_acc_norm"))}
    for v in per_subject.values():
        del v["_hits"]
    metrics = {k: v for k, v in averages.items() if "bytes" not in k}
    return {"metrics": metrics, "ci95": ci95, "ll_acc_bytes": averages["ll_acc_bytes"],
            "ll_acc_bytes_micro": averages["ll_acc_bytes_micro"], "subjects": per_subject, "questions": total,
            "k": max((min(k, len(s.dev)) for s in subjects), default=0), "k_requested": k,  # k: the most used
            "context": context,
            "truncated": sum(it.shots < min(k, len(subjects[it.subject].dev)) for it in items),
            "cut": sum(it.cut for it in items), "mean_shots": sum(it.shots for it in items) / max(1, len(items)),
            "wall_s": round(wall, 2), "questions_per_s": round(total / wall, 2) if wall else None,
            "example_prompt": example}
