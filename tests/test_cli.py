"""The command line as a new user meets it, wrong input included: one clear line and exit code 2."""

import subprocess
import sys

import pytest
import yaml


def tunelab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tunelab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def write_recipe(tmp_path, corpus_file, tokenizer_dir, **train):
    recipe = {"name": "cli", "out_dir": str(tmp_path / "runs"),
              "model": {"preset": "micro", "tokenizer": str(tokenizer_dir)},
              "data": {"sources": [{"path": str(corpus_file)}], "seq_len": 32},
              "train": {"steps": 3, "micro_batch_size": 2, "warmup_steps": 1, **train}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_pretrain_from_the_command_line_with_overrides(tmp_path, corpus_file, tokenizer_dir):
    recipe = write_recipe(tmp_path, corpus_file, tokenizer_dir)
    proc = tunelab("pretrain", recipe, "train.steps=4", "name=ok")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs/ok/model/model.safetensors").is_file()
    assert "eval perplexity" in proc.stdout and "step 4/4" in proc.stderr


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: micro\n  tokenizer: [x\n")
    assert_clean_error(tunelab("pretrain", bad), "bad.yaml:", "malformed YAML")


def test_unknown_key_with_suggestion(tmp_path, corpus_file, tokenizer_dir):
    recipe = write_recipe(tmp_path, corpus_file, tokenizer_dir)
    assert_clean_error(tunelab("pretrain", recipe, "train.lerning_rate=1e-3"),
                       "unknown key 'train.lerning_rate'", "did you mean 'train.lr'")


@pytest.mark.parametrize("content, expected", [(None, "no such file"), ("", "no documents found")])
def test_missing_or_empty_data_file(tmp_path, tokenizer_dir, content, expected):
    data = tmp_path / "data.txt"
    if content is not None:
        data.write_text(content)
    recipe = write_recipe(tmp_path, data, tokenizer_dir)
    assert_clean_error(tunelab("pretrain", recipe), "data.txt", expected)
    assert not (tmp_path / "runs/cli/model").exists()


def test_seq_len_beyond_max_positions(tmp_path, corpus_file, tokenizer_dir):
    recipe = write_recipe(tmp_path, corpus_file, tokenizer_dir)
    assert_clean_error(tunelab("pretrain", recipe, "data.seq_len=4096"), "data.seq_len=4096",
                       "maximum positions (512")


def test_unwritable_output_directory(tmp_path, corpus_file, tokenizer_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    recipe = write_recipe(tmp_path, corpus_file, tokenizer_dir)
    assert_clean_error(tunelab("pretrain", recipe, f"out_dir={blocker}"), "cannot write", "a_file")


def test_model_reference_must_be_local(tmp_path, corpus_file, tokenizer_dir):
    recipe = write_recipe(tmp_path, corpus_file, tokenizer_dir)
    assert_clean_error(tunelab("pretrain", recipe, "model.preset=null", "model.tokenizer=null",
                               "model.base=Qwen/Qwen2-0.5B"), "works from local directories")


def test_debug_shows_the_traceback(tmp_path):
    proc = tunelab("--debug", "pretrain", tmp_path / "missing.yaml")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_tokenizer_train_command(tmp_path, corpus_file):
    proc = tunelab("tokenizer", "train", corpus_file, "--out", tmp_path / "tok", "--vocab-size", "300")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tok/tokenizer.json").is_file()
    assert_clean_error(tunelab("tokenizer", "train", tmp_path / "nope.txt", "--out", tmp_path / "t2"), "nope.txt")
    assert not (tmp_path / "t2").exists()


def test_tokenizer_output_errors(tmp_path, corpus_file):
    (tmp_path / "afile").write_text("")
    assert_clean_error(tunelab("tokenizer", "train", corpus_file, "--out", tmp_path / "afile" / "tok"), "cannot write")
    assert_clean_error(tunelab("tokenizer", "train", corpus_file, "--out", ".", cwd=tmp_path), "current directory")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert_clean_error(tunelab("tokenizer", "train", corpus_file, "--out", tmp_path / "mine"), "refusing to replace")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert_clean_error(tunelab("tokenizer", "train", corpus_file, "--out", tmp_path / "t", "--min-frequency", "-1"),
                       "min_frequency=-1")
