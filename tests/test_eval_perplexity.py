"""Perplexity: the batched sliding window equals HF's loop computed directly, with and without stride."""

import json
import math

import pytest
import torch

from tunelab.errors import ConfigError, DataError
from tunelab.evaluate.perplexity import evaluate_perplexity, perplexity, token_stream, window_spans
from tunelab.models import load_model, load_tokenizer

TEXTS = ["river stone lantern baker harbour meadow copper violet orchard tailor falcon willow river stone " * 3,
         "山河湖海城村花草鸟鱼红蓝绿金银铜" * 2, "copper violet orchard tailor falcon willow."]


@pytest.fixture(scope="module")
def micro(base_model_dir):
    return load_model(base_model_dir).eval(), load_tokenizer(base_model_dir)


def hf_loop(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The recipe of HF's perplexity guide (and reference/pipeline.md §5.1), one window at a time.

    One change: the guide counts `valid labels - 1` tokens per window, but when windows overlap the label the
    model's shift drops is already -100, so the mean loss covers all `trg_len` labels; counting the labels
    after the shift scores every token exactly once (the guide's count is one short per overlapping window).
    """
    enc = torch.tensor([ids])
    seq_len, nll_sum, n_tok, prev_end = enc.size(1), 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        window = enc[:, begin:end]
        target = window.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=target).loss
        n_valid = (target[:, 1:] != -100).sum().item()  # the labels left after the model's internal shift
        nll_sum += loss.item() * n_valid
        n_tok += n_valid
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tok


def test_one_window_equals_the_full_sequence_loss(micro):
    model, tok = micro
    ids = token_stream(tok, TEXTS)
    assert ids.count(tok.eos_token_id) == 2  # documents joined with EOS between them
    r = perplexity(model, tok, TEXTS, max_length=len(ids), stride=len(ids))
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert r["windows"] == 1 and r["tokens"] == len(ids) - 1
    assert r["nll"] == pytest.approx(loss, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert r["bytes"] == n_bytes
    assert r["bits_per_byte"] == pytest.approx(loss * (len(ids) - 1) / math.log(2) / n_bytes, rel=1e-5)


@pytest.mark.parametrize("max_length,stride,batch", [(32, 16, 4), (32, 32, 3), (30, 7, 2), (16, 1, 64)])
def test_sliding_window_matches_hf_loop(micro, max_length, stride, batch):
    model, tok = micro
    ids = token_stream(tok, TEXTS)
    assert len(ids) > 2 * max_length  # several windows
    r = perplexity(model, tok, TEXTS, max_length=max_length, stride=stride, batch_size=batch)
    nll, n = hf_loop(model, ids, max_length, stride)
    assert r["tokens"] == n
    assert r["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_window_spans_score_every_token_once_with_overlap():
    spans = window_spans(100, 40, 15)
    scored = [p for _, e, first in spans for p in range(first, e)]
    assert scored == list(range(1, 100))  # overlap is context only; token 0 has no context
    assert all(e - b <= 40 for b, e, _ in spans)
    disjoint = window_spans(100, 40, 40)  # HF: the first token of each window is not scored
    assert [p for _, e, first in disjoint for p in range(first, e)] == [p for p in range(1, 100) if p not in (40, 80)]
    with pytest.raises(ConfigError, match="stride"):
        window_spans(100, 40, 41)


def test_per_file_and_total(micro, tmp_path):
    model, tok = micro
    files = {"a.jsonl": TEXTS[:2], "b.jsonl": TEXTS[2:]}
    r = evaluate_perplexity(model, tok, files, max_length=32)
    assert r["stride"] == 16 and [f["path"] for f in r["files"]] == list(files)
    nll = sum(f["nll_sum"] for f in r["files"])
    assert r["tokens"] == sum(f["tokens"] for f in r["files"])
    assert r["metrics"]["ppl"] == pytest.approx(math.exp(nll / r["tokens"]))
    with pytest.raises(DataError, match="shorter than two tokens"):
        perplexity(model, tok, ["a"][:0] + [""], max_length=32)


def test_text_files_and_cli_errors(tmp_path, base_model_dir, capsys):
    from tunelab.cli import main

    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    code = main(["eval", "--models", str(base_model_dir), "--task", f"perplexity:{tmp_path / 't.jsonl'}",
                 "tasks.0.max_length=32", f"out_dir={tmp_path}", "name=ppl"])
    assert code == 0
    results = json.loads((tmp_path / "ppl" / "results.json").read_text())
    assert results["models"][0]["tasks"]["perplexity"]["files"][0]["documents"] == 3
    code = main(["eval", "--models", str(base_model_dir), "--task", f"perplexity:{tmp_path / 'nope.jsonl'}",
                 f"out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "nope.jsonl" in err and err.count("\n") == 1
    code = main(["eval", "--models", str(base_model_dir), "--task", f"perplexity:{tmp_path / 't.jsonl'}",
                 "tasks.0.max_length=9999", f"out_dir={tmp_path}"])
    assert code == 2 and "exceeds the model's 512 positions" in capsys.readouterr().err
