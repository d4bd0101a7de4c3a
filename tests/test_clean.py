"""`tunelab data clean` end to end: inputs of every kind, bad inputs as a new user has them, resume, workers, Ray."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from test_clean_filters import EN, ZH

from tunelab.clean import CleanConfig, run_clean
from tunelab.cli import main
from tunelab.errors import DataError

BANNER = "Welcome to the Harbour Times, your daily news"


def docs(n: int, tag: str = "") -> list[dict]:
    """Good documents in both languages, each with the site's banner line, a nav bar and a copyright line."""
    out = []
    for i in range(n):
        body = EN if i % 2 == 0 else ZH
        text = f"Home | News | Sport\n{BANNER}\n{body} ({tag}{i})\n© 2024 Harbour Times"
        out.append({"id": f"{tag}{i}", "text": text})
    return out


def write_jsonl(path: Path, records: list, extra: str = "") -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + extra, encoding="utf-8")
    return path


def read_out(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "data").glob("*.jsonl")) for line in f.open(encoding="utf-8")]


@pytest.fixture()
def corpus(tmp_path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "a.jsonl", docs(8, "a"))
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in docs(6, "b"))
    (d / "c.txt").write_text("\n\n".join(r["text"] for r in docs(4, "c")) + "\n", encoding="utf-8")
    return d


def test_clean_removes_boilerplate_and_keeps_the_text(tmp_path, corpus):
    cfg = CleanConfig.model_validate({"lines": {"repeated_min_docs": 5}})
    r = run_clean([corpus], tmp_path / "out", cfg)
    out = read_out(tmp_path / "out")
    assert r["documents_in"] == 18 and r["documents_out"] == 18 and len(out) == 18
    assert r["removed"]["lines.navigation"]["lines"] == 18
    assert r["removed"]["lines.copyright"]["lines"] == 18
    assert r["removed"]["lines.repeated"]["lines"] == 18  # the banner, in every document of the three shards
    assert out[0] == {"id": "a0", "text": f"{EN} (a0)"}  # the record's other keys are kept
    assert out[1]["text"] == f"{ZH} (a1)"
    assert r["languages"] == {"en": 9, "zh": 9}
    assert [s["output"] for s in r["shards"]] == [f"data/part-0000{i}.jsonl" for i in range(3)]
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "lines.repeated" in html and BANNER in html
    assert json.loads((tmp_path / "out" / "report.json").read_text())["documents_out"] == 18


def test_filters_switch_off_in_the_recipe_and_unknown_keys_are_errors(tmp_path, corpus, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lines:\n  enabled: false\nlanguage:\n  languages: [zh]\n", encoding="utf-8")
    assert main(["data", "clean", str(corpus / "a.jsonl"), "--out", str(tmp_path / "o"), str(recipe)]) == 0
    out = read_out(tmp_path / "o")
    assert len(out) == 4 and all(BANNER in r["text"] and "Home | News" in r["text"] for r in out)
    assert main(["data", "clean", str(corpus), "--out", str(tmp_path / "o2"), "quality.min_wrds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'quality.min_wrds'" in err and "min_words" in err


def test_bad_inputs_are_skipped_counted_and_named(tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    good = docs(2)
    (d / "a.jsonl").write_bytes(
        (json.dumps(good[0]) + "\n").encode() + b'{"text": "caf\xe9 broken bytes"}\n' + b"{not json\n"
        + b'{"body": "no text key"}\n' + b'["a list"]\n' + (json.dumps(good[1], ensure_ascii=False) + "\n").encode())
    (d / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    payload = gzip.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in docs(40, "g")).encode())
    (d / "cut.jsonl.gz").write_bytes(payload[:len(payload) // 2])
    assert main(["data", "clean", str(d), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().out
    for fragment in (f"{d / 'a.jsonl'}:2: not UTF-8", f"{d / 'a.jsonl'}:3: invalid JSON",
                     f"{d / 'a.jsonl'}:4: no key 'text'", f"{d / 'a.jsonl'}:5: expected a JSON object",
                     f"{d / 'empty.jsonl'}: no documents", "cut.jsonl.gz:", "gzip stream cut short"):
        assert fragment in err.replace("\n", " ") or fragment in err, (fragment, err)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["problems"] == {"invalid utf-8": 1, "invalid json": 1, "missing text": 1, "not an object": 1,
                                  "empty file": 1, "truncated gzip": 1}
    assert report["skipped_lines"] == 6
    assert 2 < report["documents_in"] < 42  # the two good lines of a.jsonl and the lines before the cut


@pytest.mark.parametrize("content, fragment", [
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "a.jsonl:2: not UTF-8"),
    (b'{"text": "ok"}\n{"text": oops}\n', "a.jsonl:2: invalid JSON"),
    (b'{"content": "ok"}\n', "a.jsonl:1: no key 'text'"),
    (b'{"text": 12}\n', "a.jsonl:1: 'text' holds a int ('12'), not a string"),  # was "a int 'text' holding a"
    (b'{"text": null}\n', "a.jsonl:1: 'text' holds null, not a string"),
    (b"", "a.jsonl: no documents"),
])
def test_on_error_stop_gives_one_line_naming_file_and_line(tmp_path, capsys, content, fragment):
    (tmp_path / "a.jsonl").write_bytes(content)
    assert main(["data", "clean", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), "--on-error",
                 "stop"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and fragment in err, err
    assert not list((tmp_path / "out" / "data").glob("*.jsonl"))


@pytest.mark.parametrize("action", ["clean", "dedup"])
def test_a_wrong_text_key_on_every_line_is_an_error_not_an_empty_corpus(tmp_path, capsys, action):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": r["text"]}) + "\n" for r in docs(3)),
                                      encoding="utf-8")
    assert main(["data", action, str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no document was read (" in err and "most: missing text" in err and "--text-key" in err, err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["problems"]["missing text"] == 3
    assert main(["data", action, str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), "--text-key",
                 "body"]) == 0  # the fix the message names


def test_unwritable_output_directory_is_one_line(tmp_path, corpus, capsys):
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    assert main(["data", "clean", str(corpus), "--out", str(tmp_path / "a-file" / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot write this cleaned data here" in err and "a-file" in err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        assert main(["data", "clean", str(corpus), "--out", str(locked / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "cannot write" in err and str(locked) in err
    finally:
        locked.chmod(0o700)


def test_parquet_input_and_text_key(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = docs(4)
    table = pa.table({"id": [r["id"] for r in rows], "body": [r["text"] for r in rows]})
    pq.write_table(table, tmp_path / "p.parquet")
    cfg = CleanConfig.model_validate({"text_key": "body", "lines": {"repeated_min_docs": 4}})
    r = run_clean([tmp_path / "p.parquet"], tmp_path / "out", cfg)
    assert r["documents_out"] == 4 and read_out(tmp_path / "out")[0] == {"id": "0", "body": f"{EN} (0)"}
    with pytest.raises(DataError, match=r"p.parquet: no column 'text'"):
        run_clean([tmp_path / "p.parquet"], tmp_path / "out2", on_error="stop")


def test_resume_redoes_only_unfinished_shards_and_temp_files_never_look_complete(tmp_path, corpus):
    out = tmp_path / "out"
    first = run_clean([corpus], out)
    assert first["summary"]["resumed"] is False
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.jsonl")}
    texts = read_out(out)
    # as a run killed while writing shard 1: its stats gone, a half-written temporary file beside it
    (out / "work" / "done" / "part-00001.json").unlink()
    (out / "data" / "part-00001.jsonl").unlink()
    (out / "data" / ".part-00001.jsonl.tmp-999").write_text('{"text": "half', encoding="utf-8")
    second = run_clean([corpus], out)
    assert second["summary"]["resumed"] is True
    after = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.jsonl")}
    assert after["part-00000.jsonl"] == before["part-00000.jsonl"]
    assert after["part-00002.jsonl"] == before["part-00002.jsonl"]
    assert second["documents_out"] == first["documents_out"]
    assert read_out(out) == texts
    # a changed recipe starts over
    third = run_clean([corpus], out, CleanConfig.model_validate({"lines": {"enabled": False}}))
    assert third["summary"]["resumed"] is False and "lines.navigation" not in third["removed"]


def test_workers_give_the_same_output_as_one_process(tmp_path, corpus):
    run_clean([corpus], tmp_path / "one")
    run_clean([corpus], tmp_path / "two", workers=2)
    assert read_out(tmp_path / "one") == read_out(tmp_path / "two")


def test_ray_engine_in_local_mode(tmp_path, corpus):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")  # one local Ray
    try:
        r = run_clean([corpus], tmp_path / "ray", engine="ray", workers=2)
        bad = write_jsonl(tmp_path / "bad.jsonl", docs(1), extra="{oops\n")
        with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):  # a worker's error, as the user's
            run_clean([bad], tmp_path / "ray-bad", engine="ray", on_error="stop")
    finally:
        ray.shutdown()
    run_clean([corpus], tmp_path / "local")
    assert r["documents_out"] == 18 and read_out(tmp_path / "ray") == read_out(tmp_path / "local")


def test_pretrain_reads_the_cleaned_directory(tmp_path, corpus):
    from tunelab.data.text import read_documents

    run_clean([corpus], tmp_path / "out")
    texts = read_documents(tmp_path / "out")
    assert len(texts) == 18 and texts[0] == f"{EN} (a0)"


def test_example_recipe_validates_and_options_may_come_first(tmp_path, corpus, monkeypatch):
    from tunelab.config import load_config

    root = Path(__file__).resolve().parent.parent
    assert load_config(CleanConfig, root / "examples" / "clean_web.yaml").pii.enabled
    out = tmp_path / "out"
    assert main(["data", "clean", "--out", str(out), "--on-error", "stop", str(corpus / "a.jsonl"),
                 str(root / "examples" / "clean_web.yaml"), "lines.repeated_min_docs=5"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["pii"]["enabled"] and report["removed"]["lines.repeated"]["lines"] == 8
