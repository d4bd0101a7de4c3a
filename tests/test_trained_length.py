"""The sequence length a model was trained on travels with it: perplexity defaults to it, longer prompts warn."""

import json
from pathlib import Path

import pytest

from tunelab.config import FinetuneConfig, PretrainConfig, load_config, validate
from tunelab.evaluate.choice import evaluate_choice, read_choice_dir
from tunelab.evaluate.perplexity import evaluate_perplexity
from tunelab.models import TRAINED_SEQ_LEN, load_model, load_tokenizer, trained_seq_len
from tunelab.serve.generate import complete
from tunelab.train.finetune import run_finetune
from tunelab.train.pretrain import run_pretrain

TEXT = ["river stone lantern baker harbour meadow copper violet orchard tailor falcon willow " * 20]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus_file, tokenizer_dir):
    """A micro model (512 positions) pretrained on 32-token blocks."""
    out = tmp_path_factory.mktemp("pt")
    cfg = load_config(PretrainConfig, None, [
        "model.preset=micro", f"model.tokenizer={tokenizer_dir}", f"out_dir={out}", "name=run",
        f"data.sources=[{{path: '{corpus_file}'}}]", "data.seq_len=32", "train.steps=2",
        "train.micro_batch_size=2", "train.eval_every=0"])
    return run_pretrain(cfg, device="cpu")["model_dir"]


def test_pretraining_records_its_seq_len_and_perplexity_defaults_to_it(pretrained, base_model_dir, capsys):
    assert json.loads((Path(pretrained) / "config.json").read_text())[TRAINED_SEQ_LEN] == 32
    model, tok = load_model(pretrained).eval(), load_tokenizer(pretrained)
    assert trained_seq_len(model) == 32 and model.config.max_position_embeddings == 512
    r = evaluate_perplexity(model, tok, {"a.txt": TEXT})
    assert r["max_length"] == 32 and r["stride"] == 16 and r["window_from"] == "trained length"
    assert "warning" not in capsys.readouterr().err
    r = evaluate_perplexity(model, tok, {"a.txt": TEXT}, max_length=128)
    assert r["max_length"] == 128
    assert "warning: perplexity windows of 128 tokens, beyond the 32 positions" in capsys.readouterr().err
    # a model tunelab did not train (no record) keeps its whole context, with no warning
    untrained = load_model(base_model_dir)
    assert trained_seq_len(untrained) is None
    assert evaluate_perplexity(untrained, tok, {"a.txt": TEXT})["max_length"] == 512
    assert "warning" not in capsys.readouterr().err


def test_prompts_past_the_trained_positions_warn(pretrained, tmp_path, capsys):
    model, tok = load_model(pretrained).eval(), load_tokenizer(pretrained)
    complete(model, tok, ["river stone", "river " * 40], max_new_tokens=2)
    assert "1 of 2 prompt(s) with their replies ran past the 32 positions" in capsys.readouterr().err
    complete(model, tok, ["river stone"], max_new_tokens=2)
    assert "warning" not in capsys.readouterr().err
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "colours.csv").write_text(
            ",Question,A,B,C,D,Answer\n" + "".join(f"{i},river stone lantern baker {i}?,red,blue,green,white,A\n"
                                                   for i in range(6)), encoding="utf-8")
    r = evaluate_choice(model, tok, read_choice_dir(tmp_path), k=5)
    assert r["past_trained"] == 6
    assert "6 of 6 multiple-choice prompts run past the 32 positions" in capsys.readouterr().err


def test_full_finetuning_keeps_the_longer_record(pretrained, tmp_path, chat_file):
    cfg = validate(FinetuneConfig, {"name": "ft", "out_dir": str(tmp_path), "model": {"base": pretrained},
                                    "data": {"train": [str(chat_file)], "max_len": 64, "chat_template": "plain"},
                                    "method": {"name": "full"}, "train": {"steps": 1, "micro_batch_size": 2}})
    summary = run_finetune(cfg, device="cpu")
    longest = min(64, json.loads((Path(summary["run_dir"]) / "lint.json").read_text())["tokens"]["max"])
    assert longest > 32  # chats of up to three turns are longer than the pretraining blocks
    assert trained_seq_len(load_model(summary["output_dir"])) == longest
