"""SFT records: format detection, file types, errors that name file:line, the same-role policy, real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data.records import detect_format, read_examples
from tunelab.errors import DataError

CPSYCOUND = Path(__file__).resolve().parents[1].parent / "shared/data/cpsycound/cpsycound.jsonl"


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def user(c: str) -> dict:
    return {"role": "user", "content": c}


def bot(c: str) -> dict:
    return {"role": "assistant", "content": c}


def test_alpaca_with_and_without_input(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate", "input": "山河", "output": "rivers", "id": 7},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Be kind", "output": "ok", "system": "You are kind."},
    ])
    ex = read_examples(f)
    assert [e.where for e in ex] == [f"{f}:1", f"{f}:2", f"{f}:3"]
    assert ex[0].messages == [user("Translate\n\n山河"), bot("rivers")] and ex[0].text is None
    assert ex[1].messages == [user("Say hi"), bot("hi")]
    assert ex[2].messages == [{"role": "system", "content": "You are kind."}, user("Be kind"), bot("ok")]


def test_messages_sharegpt_and_text(tmp_path):
    msgs = jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "system", "content": "s"}, user("q"), bot("a")],
                                          "task": "x"}])
    assert read_examples(msgs)[0].messages == [{"role": "system", "content": "s"}, user("q"), bot("a")]
    share = jsonl(tmp_path / "s.jsonl", [{"id": "1", "system": "s", "conversations": [
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "q2"}, {"from": "chatgpt", "value": "a2"}]}])
    assert read_examples(share)[0].messages == [{"role": "system", "content": "s"}, user("q1"), bot("a1"),
                                                user("q2"), bot("a2")]
    text = jsonl(tmp_path / "t.jsonl", [{"text": "river stone"}])
    ex = read_examples(text)[0]
    assert ex.text == "river stone" and ex.messages is None
    where = "x.jsonl:4"
    assert [detect_format(r, where) for r in ({"messages": [], "text": "t"}, {"conversations": []},
                                              {"instruction": "i", "output": "o", "text": "t"}, {"text": "t"})] \
        == ["messages", "sharegpt", "alpaca", "text"]
    with pytest.raises(DataError, match=r"x.jsonl:4: cannot tell .*\(instruction, answer\)"):
        detect_format({"instruction": "i", "answer": "o"}, where)


def test_json_list_directory_and_glob(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "b.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]), encoding="utf-8")
    jsonl(d / "a.jsonl", [{"instruction": "i", "output": "o"}])
    (d / "notes.txt").write_text("ignored", encoding="utf-8")
    ex = read_examples(d)
    assert [e.where for e in ex] == [f"{d / 'a.jsonl'}:1", f"{d / 'b.json'}[0]", f"{d / 'b.json'}[1]"]
    assert [e.text for e in read_examples(str(d / "*.json"))] == ["one", "two"]
    with pytest.raises(DataError, match="unsupported file type .txt"):
        read_examples(d / "notes.txt")


def test_csv_quoted_cells_and_json_cell(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text('instruction,input,output\n'
                 '"Join, please","line one\nline two","done, ""quoted"""\n'
                 'Second,,yes\n', encoding="utf-8")
    ex = read_examples(f)
    assert ex[0].messages == [user("Join, please\n\nline one\nline two"), bot('done, "quoted"')]
    assert [e.where for e in ex] == [f"{f}:2", f"{f}:4"]  # the first row spans lines 2-3
    m = tmp_path / "m.csv"
    cell = json.dumps([user("你好, 山河"), bot("a")], ensure_ascii=False).replace('"', '""')
    m.write_text(f'id,messages\n7,"{cell}"\n8,"[not json"\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{m}:3: invalid JSON .* in column 'messages'"):
        read_examples(m)
    m.write_text(f'id,messages\n7,"{cell}"\n', encoding="utf-8")
    assert read_examples(m)[0].messages == [user("你好, 山河"), bot("a")]


def test_explicit_format_overrides_detection(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o", "text": "plain"}])
    assert read_examples(f)[0].messages == [user("i"), bot("o")]
    assert read_examples(f, fmt="text")[0].text == "plain"
    with pytest.raises(DataError, match=rf"{f}:1: a sharegpt record needs 'conversations' "
                                        r"\(found keys: instruction, output, text\)"):
        read_examples(f, fmt="sharegpt")


def test_mixed_formats_in_one_file(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [{"text": "t"}, {"messages": [user("q"), bot("a")]}])
    with pytest.raises(DataError, match=rf"{f}:2: a messages record in a file of text records"):
        read_examples(f)


def test_malformed_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": "broken}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{f}:3: invalid JSON"):
        read_examples(f)


@pytest.mark.parametrize("record, message", [
    ({"messages": [user("q"), {"role": "robot", "content": "a"}]}, r":1: messages\[1\] has unknown role 'robot'"),
    ({"messages": [user("q"), {"role": "tool", "content": "a"}]}, r":1: messages\[1\] .*tool and function turns "
                                                                    r"are not supported"),
    ({"conversations": [{"from": "bot", "value": "a"}]}, r":1: conversations\[0\] is from unknown 'bot'"),
    ({"messages": [user("q"), {"role": "assistant", "content": ["a"]}]}, r":1: messages\[1\].content must be a "
                                                                           r"string, got list"),
    ({"messages": []}, r":1: 'messages' is empty"),
    ({"instruction": "i", "output": 3}, r":1: 'output' must be a string, got int"),
    ({"messages": [user("q"), {"role": "system", "content": "s"}, bot("a")]},
     r":1: turn 1 is a system turn after turn 0"),
    ({"system": "s", "messages": [{"role": "system", "content": "t"}, user("q")]},
     r":1: both a top-level 'system' and a system turn"),
])
def test_bad_records_name_the_line(tmp_path, record, message):
    f = jsonl(tmp_path / "a.jsonl", [record])
    with pytest.raises(DataError, match=message):
        read_examples(f)


def test_empty_file_and_missing_path(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="e.jsonl: empty file"):
        read_examples(tmp_path / "e.jsonl")
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "nope.jsonl")


def test_parquet_needs_pyarrow(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "a.parquet").write_bytes(b"PAR1")
        with pytest.raises(DataError, match="pip install pyarrow"):
            read_examples(tmp_path / "a.parquet")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"messages": [user("q"), bot("a")]}]), tmp_path / "a.parquet")
    ex = read_examples(tmp_path / "a.parquet")
    assert ex[0].messages == [user("q"), bot("a")] and ex[0].where.endswith("a.parquet[0]")


def test_same_role_merge_and_error(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [
        {"messages": [user("q"), bot("a")]},
        {"messages": [user("q1"), user("q2"), bot("a1"), bot("a2"), user("q3")]},
    ])
    merged = read_examples(f)[1].messages
    assert merged == [user("q1\nq2"), bot("a1\na2"), user("q3")]
    with pytest.raises(DataError, match=rf"{f}:2: turn 1 is a second consecutive user turn"):
        read_examples(f, same_role="error")


def test_cpsycound_loads_merged():
    if not CPSYCOUND.is_file():
        pytest.skip(f"{CPSYCOUND} absent")
    raw = [json.loads(line)["messages"] for line in CPSYCOUND.read_text(encoding="utf-8").splitlines()]
    ex = read_examples(CPSYCOUND)
    assert len(ex) == len(raw) == 3084
    assert all(e.where == f"{CPSYCOUND}:{i}" for i, e in enumerate(ex, 1))
    for e in ex:
        roles = [m["role"] for m in e.messages]
        assert "assistant" in roles and roles[0] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))
    assert sum(len(e.messages) < len(r) for e, r in zip(ex, raw)) == 341
    # merged text keeps every character: contents joined with "\n"
    assert all("".join(m["content"] for m in r) == "".join(m["content"] for m in e.messages).replace("\n", "")
               for e, r in zip(ex, raw) if "\n" not in "".join(m["content"] for m in r))
    with pytest.raises(DataError, match=rf"{CPSYCOUND}:\d+: turn \d+ is a second consecutive"):
        read_examples(CPSYCOUND, same_role="error")
