"""`tunelab data dedup`: MinHash equal to datasketch's, bands from the threshold, planted duplicates found."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tunelab.clean import DedupConfig, run_dedup
from tunelab.clean.minhash import normal_tokens, optimal_bands, shingles, signatures
from tunelab.cli import main
from tunelab.errors import ConfigError

WORDS = ("river stone lantern baker harbour meadow copper violet orchard tailor falcon willow north south east west "
         "over under bread sailor window quay tide boat mill town evening morning").split()
HANZI = list("山河湖海城村花草鸟鱼红蓝绿金银铜风雨雪月日星云天地人家门")


def en_doc(rng: random.Random, n: int = 80) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def zh_doc(rng: random.Random, n: int = 120) -> str:
    return "".join(rng.choice(HANZI) for _ in range(n))


def near_copy(text: str, zh: bool) -> str:
    """The text with its last token replaced and one token added: a Jaccard of ~0.96 on 5-token shingles."""
    toks = list(text) if zh else text.split()
    toks[-1:] = ["雷", "电"] if zh else ["thunder", "storm"]
    return ("" if zh else " ").join(toks)


def test_signatures_equal_datasketch_minhash():
    datasketch = pytest.importorskip("datasketch")

    rng = random.Random(0)
    docs = [en_doc(rng), zh_doc(rng), "short", "", "今天 天气 很好"]
    sh = [shingles(normal_tokens(d), 5) for d in docs]
    sig = signatures(sh, 128, 1)
    for s, row in zip(sh, sig):
        m = datasketch.MinHash(num_perm=128, seed=1, hashfunc=int)
        m.update_batch(s.tolist())
        assert np.array_equal(m.hashvalues, row)


@pytest.mark.parametrize("threshold, num_perm", [(0.5, 64), (0.7, 112), (0.8, 128), (0.9, 256)])
def test_bands_and_rows_are_datasketchs_choice(threshold, num_perm):
    lsh = pytest.importorskip("datasketch.lsh")
    assert optimal_bands(threshold, num_perm) == lsh._optimal_param(threshold, num_perm, 0.5, 0.5)


def test_normalisation_and_chinese_shingles():
    assert normal_tokens("Hello,  WORLD! 你好，世界。") == ["hello", "world", "你", "好", "世", "界"]
    assert len(shingles(["a", "b", "c"], 5)) == 1 and len(shingles([], 5)) == 1
    four = shingles(list("你好世界啊"), 4)
    assert len(four) == 2 and four[1] == shingles(list("好世界啊"), 4)[0]  # a shingle's hash is its tokens'
    assert shingles(list("ab"), 2)[0] != shingles(list("ba"), 2)[0]  # ... in order


@pytest.fixture()
def planted(tmp_path) -> tuple[list[Path], dict[str, str]]:
    """Two shards of originals, with exact copies (other case and spacing) and near copies planted in the other
    shard; returns the files and {duplicate id: original id}."""
    rng = random.Random(1)
    originals = [{"id": f"o{i}", "text": en_doc(rng) if i % 2 else zh_doc(rng)} for i in range(60)]
    truth: dict[str, str] = {}
    second = [{"id": f"s{i}", "text": en_doc(rng) if i % 2 else zh_doc(rng)} for i in range(20)]
    for i in range(0, 20, 2):
        o = originals[i + 1]  # English
        second.append({"id": f"x{i}", "text": "  " + o["text"].upper().replace(" ", "  ") + " !"})
        truth[f"x{i}"] = o["id"]
    for i in range(20, 40):
        o = originals[i]
        second.append({"id": f"n{i}", "text": near_copy(o["text"], zh=i % 2 == 0)})
        truth[f"n{i}"] = o["id"]
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for f, recs in zip(files, (originals, second)):
        f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return files, truth


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for f in sorted((path / "data").glob("*.jsonl")) for line in f.open()]


def test_planted_duplicates_are_removed_across_shards(tmp_path, planted):
    files, truth = planted
    r = run_dedup(files, tmp_path / "out")
    kept = ids(tmp_path / "out")
    assert set(kept).isdisjoint(truth) and len(kept) == 80  # every original kept, every duplicate removed
    assert r["exact_duplicates"] == 10 and r["near_duplicates"] == 20 and r["clusters"] == 30
    assert (r["bands"], r["rows"]) == (9, 13)
    lines = {f"{files[0]}:{i + 1}": f"o{i}" for i in range(60)}
    clusters = [json.loads(x) for x in (tmp_path / "out" / "clusters.jsonl").read_text().splitlines()]
    assert len(clusters) == 30
    for c in clusters:
        n = int(c["removed"].rsplit(":", 1)[1])
        dup_id = json.loads(files[1].read_text().splitlines()[n - 1])["id"]
        assert lines[c["survivor"]] == truth[dup_id]
        assert c["kind"] == ("exact" if dup_id.startswith("x") else "near")
        assert c["similarity"] >= (1.0 if c["kind"] == "exact" else 0.8)


def test_exact_only_and_near_only(tmp_path, planted):
    files, truth = planted
    r = run_dedup(files, tmp_path / "exact", DedupConfig(near=False))
    assert r["exact_duplicates"] == 10 and r["near_duplicates"] == 0
    r = run_dedup(files, tmp_path / "near", DedupConfig(exact=False, verify=True))
    assert r["documents_out"] == 80  # an exact copy is also a near duplicate of Jaccard 1


def test_a_high_threshold_keeps_edited_copies(tmp_path, planted):
    files, _ = planted
    r = run_dedup(files, tmp_path / "out", DedupConfig(threshold=0.999, num_perm=256, verify=True))
    assert r["exact_duplicates"] == 10 and r["near_duplicates"] == 0


def test_bands_rows_validation(tmp_path, planted):
    files, _ = planted
    with pytest.raises(ConfigError, match="both bands and rows"):
        run_dedup(files, tmp_path / "o", DedupConfig(bands=4))
    with pytest.raises(ConfigError, match="exceeds num_perm"):
        run_dedup(files, tmp_path / "o", DedupConfig(bands=20, rows=10))


def test_cli_workers_and_resume(tmp_path, planted, capsys):
    files, truth = planted
    out = tmp_path / "out"
    assert main(["data", "dedup", *map(str, files), "--out", str(out), "--workers", "2", "threshold=0.8"]) == 0
    kept = ids(out)
    assert set(kept).isdisjoint(truth) and len(kept) == 80
    (out / "work" / "done" / "part-00001.json").unlink()
    r = run_dedup(files, out, DedupConfig(threshold=0.8))
    assert r["summary"]["resumed"] is True and ids(out) == kept


def test_bad_lines_are_skipped_and_kept_documents_line_up(tmp_path):
    rng = random.Random(2)
    a, b = en_doc(rng), en_doc(rng)
    f = tmp_path / "a.jsonl"
    f.write_bytes(b"{broken\n" + json.dumps({"id": 1, "text": a}).encode() + b"\n" + b'{"x": 1}\n'
                  + json.dumps({"id": 2, "text": a}).encode() + b"\n" + json.dumps({"id": 3, "text": b}).encode())
    r = run_dedup([f], tmp_path / "out")
    assert ids(tmp_path / "out") == [1, 3] and r["skipped_lines"] == 2
    clusters = [json.loads(x) for x in (tmp_path / "out" / "clusters.jsonl").read_text().splitlines()]
    assert clusters == [{"removed": f"{f}:4", "survivor": f"{f}:2", "kind": "exact", "similarity": 1.0}]


def test_clusters_name_survivor_and_removed_files_alike(tmp_path, planted, monkeypatch):
    files, _ = planted  # relative inputs: the survivor (in another shard) was named by its absolute path
    monkeypatch.chdir(tmp_path)
    run_dedup(["a.jsonl", "b.jsonl"], "out")
    clusters = [json.loads(x) for x in (tmp_path / "out" / "clusters.jsonl").read_text().splitlines()]
    assert len(clusters) == 30
    assert {c["removed"].rsplit(":", 1)[0] for c in clusters} == {"b.jsonl"}
    assert {c["survivor"].rsplit(":", 1)[0] for c in clusters} == {"a.jsonl"}


def test_dedup_reads_a_clean_output_directory_as_its_shards(tmp_path, planted):
    from tunelab.clean import CleanConfig, run_clean

    files, truth = planted
    cfg = {"quality": {"enabled": False}, "language": {"enabled": False}, "lines": {"enabled": False}}
    run_clean(files, tmp_path / "clean", CleanConfig.model_validate(cfg))
    r = run_dedup([tmp_path / "clean"], tmp_path / "dedup")
    assert r["documents_in"] == 110 and r["skipped_lines"] == 0 and set(ids(tmp_path / "dedup")).isdisjoint(truth)
