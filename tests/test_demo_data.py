"""The demo world generator: deterministic, consistent across languages, and in the formats readers expect."""

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tunelab.data.demo import (
    PERSON_KINDS,
    TOWN_KINDS,
    World,
    fact_completion_pairs,
    generate_demo_data,
    load_world,
    sample_prompts,
)
from tunelab.errors import DataError, TunelabError
from tunelab.outputs import MARKER

SUBJECTS = {"world_people": "zh", "world_towns": "zh", "world_english": "en"}
SCALE = 0.1


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    """One generated demo directory (seed 0, small scale) shared by the read-only tests."""
    out = tmp_path_factory.mktemp("demo") / "data"
    return out, generate_demo_data(out, seed=0, scale=SCALE)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _subject(world: World, text: str, lang: str):
    """The one person or town whose name (in `lang`) occurs in `text`."""
    found = [e for e in (*world.people, *world.towns) if e.name.text(lang) in text]
    assert len(found) == 1, (text, found)
    return found[0]


def _kind_of(world: World, value: str, lang: str, kinds) -> str:
    """The one attribute whose valid values include `value`."""
    found = [k for k in kinds if value in {v.text(lang) for v in world.values(k)}]
    assert len(found) == 1, (value, found)
    return found[0]


def _true_value(world: World, entity, kind: str, lang: str) -> str:
    facts = world.person_facts(entity) if kind in PERSON_KINDS else world.town_facts(entity)
    return next(f.value.text(lang) for f in facts if f.kind == kind)


def test_same_seed_gives_identical_bytes_and_other_seed_another_world(tmp_path, demo):
    again = generate_demo_data(tmp_path / "again", seed=0, scale=SCALE)
    assert again == demo[1]
    assert _files(tmp_path / "again") == _files(demo[0])
    generate_demo_data(tmp_path / "other", seed=1, scale=SCALE)
    for name in ("pretrain/world_en.jsonl", "pretrain/world_zh.jsonl"):
        assert (tmp_path / "other" / name).read_bytes() != (demo[0] / name).read_bytes()
    assert load_world(0) == load_world(0)
    assert load_world(1).people != load_world(0).people


def test_world_names_are_distinct_and_every_town_has_residents():
    world = load_world(3)
    for lang in ("en", "zh"):
        names = [t.text(lang) for t in (*(e.name for e in (*world.people, *world.towns)), *world.rivers)]
        assert len(names) == len(set(names))
    assert {p.town for p in world.people} == {t.name for t in world.towns}
    assert all(re.fullmatch(r"[A-Z][a-z]{3} [A-Z][a-z]+", p.name.en) for p in world.people)
    assert all(len(p.name.zh) == 3 for p in world.people)


def test_manifest_counts_match_the_files(demo):
    out, manifest = demo
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert manifest["seed"] == 0 and manifest["scale"] == SCALE
    listed = {f["path"] for f in manifest["files"]}
    assert listed | {"manifest.json", MARKER} == set(_files(out))  # and the marker of tunelab's own output
    for entry in manifest["files"]:
        text = (out / entry["path"]).read_text(encoding="utf-8")
        header = 1 if entry["path"].endswith(".csv") else 0
        assert entry["records"] == len(text.splitlines()) - header
        assert entry["chars"] == len(text) and entry["bytes"] == len(text.encode("utf-8"))


def test_pretrain_documents_are_short_json_texts(demo):
    for lang in ("en", "zh"):
        docs = _jsonl(demo[0] / f"pretrain/world_{lang}.jsonl")
        assert docs and all(set(d) == {"text"} for d in docs)
        ends = r"[.]" if lang == "en" else "。"
        counts = [len(re.findall(ends, d["text"])) for d in docs]
        assert min(counts) >= 2 and max(counts) <= 8
    raw = (demo[0] / "pretrain/world_zh.jsonl").read_text(encoding="utf-8")
    assert "\\u" not in raw  # ensure_ascii=False keeps Chinese readable


def test_choice_csv_layout_and_answers_are_true_facts(demo):
    world = load_world(0)
    for subject, lang in SUBJECTS.items():
        asked: dict[str, set] = {}
        for split in ("dev", "test"):
            path = demo[0] / "choice" / split / f"{subject}.csv"
            raw = path.read_bytes()
            assert raw.startswith(b",Question,A,B,C,D,Answer\n") and b"\r" not in raw
            with path.open(newline="", encoding="utf-8") as f:
                header, *rows = list(csv.reader(f))
            assert header == ["", "Question", "A", "B", "C", "D", "Answer"]
            assert len(rows) == 5 if split == "dev" else len(rows) >= 10
            assert [int(r[0]) for r in rows] == list(range(len(rows)))
            letters = Counter(r[6] for r in rows)
            assert set(letters) <= set("ABCD") and max(letters.values()) - min(letters.values()) <= 1
            if split == "test":  # positions are shuffled, not handed out in order
                assert [r[6] for r in rows] != sorted(r[6] for r in rows)
            asked[split] = set()
            for _, question, *options, answer in rows:
                assert len(set(options)) == 4
                entity = _subject(world, question, lang)
                correct = options["ABCD".index(answer)]
                kind = _kind_of(world, correct, lang, PERSON_KINDS + TOWN_KINDS)
                assert all(_kind_of(world, o, lang, [kind]) == kind for o in options)
                assert correct == _true_value(world, entity, kind, lang), question
                asked[split].add((entity.name, kind))
        assert not asked["dev"] & asked["test"]  # 5-shot examples never give away a test fact


def test_instruction_answers_are_verifiable(demo):
    world = load_world(0)
    records = {s: _jsonl(demo[0] / f"instructions/{s}.jsonl") for s in ("train", "test")}
    assert len(records["train"]) >= 60 and len(records["test"]) >= 30
    string_ops = [(("Reverse", "倒过来"), lambda w: w[::-1]), (("capital", "大写"), str.upper),
                  (("How many letters", "几个字母"), lambda w: str(len(w))),
                  (("first letter", "第一个字母"), lambda w: w[0]), (("last letter", "最后一个字母"), lambda w: w[-1])]
    for split, rows in records.items():
        assert {r["task"] for r in rows} == {"fact", "arithmetic", "string"}, split
        for r in rows:
            assert set(r) == {"instruction", "input", "output", "task", "lang"} and r["input"] == ""
            assert r["lang"] in ("en", "zh") and r["output"]
            if r["task"] == "arithmetic":
                a, op, b = re.search(r"(\d+) ([-+×]) (\d+)", r["instruction"]).groups()
                assert r["output"] == str(eval(f"{a} {op.replace('×', '*')} {b}"))
            elif r["task"] == "string":
                word = re.search(r'["“]([a-z]+)["”]', r["instruction"]).group(1)
                [answer] = [f for keys, f in string_ops if any(k in r["instruction"] for k in keys)]
                assert r["output"] == answer(word)
            else:
                entity = _subject(world, r["instruction"], r["lang"])
                kinds = PERSON_KINDS if entity in world.people else TOWN_KINDS
                kind = _kind_of(world, r["output"], r["lang"], kinds)
                assert r["output"] == _true_value(world, entity, kind, r["lang"])
    keys = {s: [(r["instruction"], r["input"]) for r in rows] for s, rows in records.items()}
    assert len(set(keys["train"])) == len(keys["train"]) and len(set(keys["test"])) == len(keys["test"])
    assert not set(keys["train"]) & set(keys["test"])


def test_corpora_state_the_same_true_facts_in_both_languages(demo):
    world = load_world(0)
    kinds = ("town", "profession", "colour", "pet")
    for lang in ("en", "zh"):
        docs = [d["text"] for d in _jsonl(demo[0] / f"pretrain/world_{lang}.jsonl")]
        split = r"(?<=\.) " if lang == "en" else r"(?<=。)"
        for sentence in (s for d in docs for s in re.split(split, d) if s):
            for p in (p for p in world.people if p.name.text(lang) in sentence):
                for kind in kinds:
                    for value in world.values(kind):
                        word = value.text(lang)
                        said = re.search(rf"\b{word}\b", sentence) if lang == "en" else word in sentence
                        if said:
                            assert word == _true_value(world, p, kind, lang), sentence
        for p in world.people:  # every person's profession is stated somewhere, in each language
            assert any(p.name.text(lang) in d and p.profession.text(lang) in d for d in docs), p.name


def test_probe_prompts_are_continued_by_the_fact_in_the_corpus(demo):
    pairs = fact_completion_pairs(0)
    assert len(pairs) == 2 * len(load_world(0).facts())
    assert sample_prompts(0, n=4) == [p for p, _ in pairs[:4]]
    assert [bool(re.search(r"[\u4e00-\u9fff]", p)) for p in sample_prompts(0, n=4)] == [False, True] * 2
    text = {lang: (demo[0] / f"pretrain/world_{lang}.jsonl").read_text(encoding="utf-8")
            for lang in ("en", "zh")}
    seen = 0
    for prompt, expected in pairs:
        lang = "zh" if re.search(r"[\u4e00-\u9fff]", prompt) else "en"
        follow = expected if lang == "zh" else " " + expected
        for m in re.finditer(re.escape(prompt), text[lang]):
            assert text[lang][m.end():].startswith(follow), (prompt, expected)
            seen += 1
    assert seen >= len(pairs)  # the probe wordings are frequent enough to be learned


def test_size_scales_linearly(tmp_path, demo):
    big = generate_demo_data(tmp_path / "big", seed=0, scale=2 * SCALE)
    sizes = {name: {f["path"]: f for f in manifest["files"]}
             for name, manifest in (("small", demo[1]), ("big", big))}
    for path in ("pretrain/world_en.jsonl", "pretrain/world_zh.jsonl", "instructions/train.jsonl"):
        ratio = sizes["big"][path]["bytes"] / sizes["small"][path]["bytes"]
        assert 1.9 < ratio < 2.1, (path, ratio)
    assert sizes["small"]["pretrain/world_en.jsonl"]["bytes"] > 1_200_000 * SCALE


def test_regenerating_replaces_the_directory_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "data"
    generate_demo_data(out, seed=0, scale=0.02)
    (out / "stale.txt").write_text("old")
    generate_demo_data(out, seed=0, scale=0.02)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), 1000.0, "1"])
def test_bad_scale_raises_data_error(tmp_path, scale):
    with pytest.raises(DataError, match="scale"):
        generate_demo_data(tmp_path / "data", scale=scale)
    assert not (tmp_path / "data").exists()


def test_unwritable_output_raises_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError, match="not a directory"):
        generate_demo_data(blocker, scale=0.02)
    with pytest.raises(TunelabError, match="writable"):
        generate_demo_data(blocker / "data", scale=0.02)
