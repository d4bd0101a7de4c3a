import json
import math

import numpy as np
import pytest
from conftest import make_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.config import PretrainConfig, load_config
from tunelab.train.events import read_events
from tunelab.train.pretrain import block_loss, prepare_data, run_pretrain


def micro_config(tmp_path, corpus_file, tokenizer_dir, *extra):
    second = corpus_file.with_name("second.jsonl")  # a second source with different documents
    second.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in make_corpus(200, seed=9)),
                      encoding="utf-8")
    return load_config(PretrainConfig, None, [
        "model.preset=micro", f"model.tokenizer={tokenizer_dir}", f"out_dir={tmp_path}", "name=run",
        f"data.sources=[{{path: '{corpus_file}', weight: 3}}, {{path: '{second}', weight: 1}}]",
        "data.seq_len=64", "train.steps=40", "train.micro_batch_size=4", "train.lr=3e-3",
        "train.warmup_steps=4", "train.eval_every=20", "train.log_every=10", *extra])


def test_micro_pretraining_learns_and_saves_a_plain_hf_model(tmp_path, corpus_file, tokenizer_dir):
    summary = run_pretrain(micro_config(tmp_path, corpus_file, tokenizer_dir))
    run = tmp_path / "run"
    events = read_events(run / "events.jsonl")
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 40 and [e["step"] for e in steps] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eta_s", "peak_memory_mb"} <= set(steps[0])
    first, last = np.mean([e["loss"] for e in steps[:5]]), np.mean([e["loss"] for e in steps[-5:]])
    assert last < first - 1.0  # the loss falls clearly
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"] - 1.0
    assert summary["eval_after"]["eval_ppl"] == pytest.approx(math.exp(summary["eval_after"]["eval_loss"]))
    # both sources were drawn with their weights (3:1) and the report says how often each was seen
    shares = [s["share"] for s in summary["sources"]]
    assert shares[0] > shares[1] and sum(shares) == pytest.approx(1.0)
    assert all(0.9 < s["packing_efficiency"] <= 1.0 for s in summary["sources"])
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 40

    # the saved directory, loaded by plain transformers, is the trained model: same held-out loss
    cfg = micro_config(tmp_path, corpus_file, tokenizer_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(run / "model")
    data = prepare_data(cfg, AutoTokenizer.from_pretrained(run / "model"))
    again = block_loss(reloaded, data.eval_blocks, cfg.train.micro_batch_size, cfg.train.eval_batches)
    assert again["eval_loss"] == pytest.approx(summary["eval_after"]["eval_loss"], abs=1e-5)


def test_same_seed_same_numbers_and_continue_from_saved_model(tmp_path, corpus_file, tokenizer_dir):
    run_pretrain(micro_config(tmp_path / "a", corpus_file, tokenizer_dir, "train.steps=6"))
    b = run_pretrain(micro_config(tmp_path / "b", corpus_file, tokenizer_dir, "train.steps=6"))
    la = [e["loss"] for e in read_events(tmp_path / "a/run/events.jsonl") if e["event"] == "step"]
    lb = [e["loss"] for e in read_events(tmp_path / "b/run/events.jsonl") if e["event"] == "step"]
    assert la == lb
    # a new run in the same directory that fails during training leaves no stale summary or model
    from tunelab.errors import TunelabError
    with pytest.raises(TunelabError, match="not finite"):
        run_pretrain(micro_config(tmp_path / "a", corpus_file, tokenizer_dir, "train.steps=3", "train.lr=1e30",
                                  "train.warmup_steps=0", "train.grad_clip=0"))
    assert not (tmp_path / "a/run/summary.json").exists() and not (tmp_path / "a/run/model").exists()
    cont = load_config(PretrainConfig, None, [
        f"model.base={b['model_dir']}", f"out_dir={tmp_path / 'c'}", "name=run",
        f"data.sources=[{{path: '{corpus_file}'}}]", "data.seq_len=64", "train.steps=2",
        "train.micro_batch_size=4", "train.lr=1e-4", "train.warmup_steps=0"])
    c = run_pretrain(cont)
    # continuing starts where the earlier run ended, not from a fresh initialisation
    assert c["eval_before"]["eval_loss"] < b["eval_before"]["eval_loss"] - 0.5
