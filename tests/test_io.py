import os

import pytest

from tunelab.errors import TunelabError
from tunelab.io import atomic_dir, atomic_write_json
from tunelab.outputs import MARKER, check_run_dir


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target, kind="test output") as tmp:
        (tmp / "a.txt").write_text("v1")
        assert not target.exists()  # nothing under the final name while writing
    assert (target / "a.txt").read_text() == "v1"

    with pytest.raises(RuntimeError), atomic_dir(target, kind="test output") as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "v1"  # the old complete directory survives
    assert os.listdir(tmp_path) == ["model"]  # no temporary leftovers

    with atomic_dir(target, kind="test output") as tmp:
        (tmp / "b.txt").write_text("v2")
    assert sorted(os.listdir(target)) == [MARKER, "b.txt"] and os.listdir(tmp_path) == ["model"]
    with pytest.raises(TunelabError, match="is a tunelab test output, not a model"), atomic_dir(target, "model"):
        pass  # the same directory is not replaced by an output of another kind


def test_atomic_dir_refuses_to_replace_what_it_did_not_write(tmp_path, monkeypatch):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("precious")
    (tmp_path / "notes" / "config.json").write_text("{}")  # looks like a model dir: not enough
    with pytest.raises(TunelabError, match="was not written by tunelab"), atomic_dir(tmp_path / "notes", "model"):
        pass
    monkeypatch.chdir(tmp_path / "notes")
    for target in (".", ".."):
        with pytest.raises(TunelabError, match="current directory"), atomic_dir(target, "model"):
            pass
    assert (tmp_path / "notes" / "mine.txt").read_text() == "precious"


def test_atomic_json_and_writable_checks(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"中": 1})
    assert (tmp_path / "x.json").read_text(encoding="utf-8") == '{\n  "中": 1\n}\n'
    assert os.listdir(tmp_path) == ["x.json"]
    (tmp_path / "file").write_text("")
    with pytest.raises(TunelabError, match="cannot write"):
        check_run_dir(tmp_path / "file" / "run", "test run", [], {})
