import numpy as np
import pytest

from tunelab.data.mixture import mixture_schedule
from tunelab.data.packing import pack_documents
from tunelab.data.text import read_documents
from tunelab.errors import DataError

EOS = 0


def docs_of(lengths, start=1):
    out, nxt = [], start
    for n in lengths:
        out.append(list(range(nxt, nxt + n)))
        nxt += n
    return out


def test_packing_loses_and_duplicates_nothing_and_puts_eos_between_documents():
    docs = docs_of([5, 1, 17, 3, 9, 30, 2])
    packed = pack_documents(docs, seq_len=8, eos_id=EOS)
    flat = packed.blocks.reshape(-1).tolist()
    expected = [t for d in docs for t in d + [EOS]]
    assert packed.n_tokens == len(expected) == 74
    assert packed.blocks.shape == (9, 8)  # 74 // 8 full blocks, no padding
    assert flat == expected[:72]  # order kept; only the 2-token tail that fills no block is dropped
    assert packed.n_dropped == 2
    assert packed.efficiency == pytest.approx(72 / 74)
    content = [t for t in flat if t != EOS]
    assert len(content) == len(set(content))  # no token duplicated
    # every document is followed by exactly one EOS, in the packed output itself
    ends = np.cumsum([len(d) + 1 for d in docs]) - 1
    assert [i for i, t in enumerate(flat) if t == EOS] == [e for e in ends if e < 72]


def test_exact_fit_is_fully_efficient():
    packed = pack_documents(docs_of([3, 3]), seq_len=4, eos_id=EOS)
    assert packed.efficiency == 1.0 and packed.n_dropped == 0


def test_too_little_text_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one block of seq_len=64"):
        pack_documents(docs_of([3]), seq_len=64, eos_id=EOS, where="tiny.txt")


def test_mixture_shares_follow_weights_within_two_percent():
    weights = [0.6, 0.3, 0.1]
    sched = mixture_schedule([50, 7, 1000], weights, n_samples=10_000, seed=3)
    shares = np.array(sched.counts()) / 10_000
    assert np.all(np.abs(shares - weights) < 0.02)
    # each source is walked in shuffled epochs: within an epoch no block repeats
    small = sched.index[sched.source == 1]
    for e in range(len(small) // 7):
        assert sorted(small[e * 7:(e + 1) * 7].tolist()) == list(range(7))
    assert sched.effective_epochs()[1] == pytest.approx(sched.counts()[1] / 7)


def test_mixture_is_deterministic_from_seed_and_prefix_stable():
    a = mixture_schedule([10, 20], [1, 1], 500, seed=1)
    b = mixture_schedule([10, 20], [1, 1], 500, seed=1)
    c = mixture_schedule([10, 20], [1, 1], 500, seed=2)
    longer = mixture_schedule([10, 20], [1, 1], 900, seed=1)
    assert np.array_equal(a.source, b.source) and np.array_equal(a.index, b.index)
    assert not np.array_equal(a.source, c.source)
    assert np.array_equal(longer.source[:500], a.source) and np.array_equal(longer.index[:500], a.index)


def test_read_documents_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "你好"}\n\n{"text": "world"}\n', encoding="utf-8")
    (tmp_path / "c.json").write_text('["x", {"text": "y"}]', encoding="utf-8")
    assert read_documents(tmp_path / "a.txt") == ["first doc\nline two", "second doc"]
    assert read_documents(tmp_path) == ["first doc\nline two", "second doc", "你好", "world", "x", "y"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "key.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"key.jsonl:1: no text under key 'text' \(found: body\)"):
        read_documents(tmp_path / "key.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no documents found"):
        read_documents(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="no such file"):
        read_documents(tmp_path / "missing.txt")


def test_packing_records_where_each_document_starts():
    packed = pack_documents(docs_of([2, 4, 1]), seq_len=3, eos_id=EOS)  # 1 2 0 | 3 4 5 | 6 0 7 | (0 dropped)
    assert packed.blocks.tolist() == [[1, 2, 0], [3, 4, 5], [6, 0, 7]]
    assert packed.starts.tolist() == [[True, False, False], [True, False, False], [False, False, True]]
