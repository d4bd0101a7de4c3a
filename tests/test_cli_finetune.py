"""The fine-tuning commands as a user meets them: finetune → export → generate/chat, data lint, wrong input."""

import json
import subprocess
import sys

import pytest
from test_cli import assert_clean_error, tunelab


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, base_model_dir, chat_file):
    tmp = tmp_path_factory.mktemp("cli")
    proc = tunelab("finetune", f"model.base={base_model_dir}", f"data.train=[{chat_file}]", f"out_dir={tmp}",
                   "name=ft", "train.steps=40", "train.lr=3e-3", "train.micro_batch_size=8", "data.max_len=64",
                   "train.eval_every=0", "method.r=4")
    assert proc.returncode == 0, proc.stderr
    return tmp, proc


def test_finetune_prints_lint_and_trainable_share_then_a_summary(cli_run):
    tmp, proc = cli_run
    assert "trainable" in proc.stderr and "examples" in proc.stderr
    assert "fine-tuning summary" in proc.stdout and "eval loss" in proc.stdout
    assert (tmp / "ft/adapter/adapter_config.json").is_file()


def test_export_then_generate_and_chat(cli_run):
    tmp, _ = cli_run
    proc = tunelab("export", tmp / "ft/adapter", "--out", tmp / "merged")
    assert proc.returncode == 0, proc.stderr
    assert "equivalence check" in proc.stdout and "passed" in proc.stdout
    assert "(bound " in proc.stdout  # the bound it passed (was only the relative tolerance, below the diff)
    # the merged model and base + adapter answer the same (greedy), and the answer is what was trained
    answers = []
    for model in (tmp / "merged", tmp / "ft/adapter"):
        proc = tunelab("generate", model, "--chat", "colour of river?", "--max-tokens", "4")
        assert proc.returncode == 0, proc.stderr
        answers.append(proc.stdout.strip())
    assert answers[0] == answers[1]
    proc = tunelab("generate", tmp / "merged", "colour of", "--max-tokens", "3")  # raw completion
    assert proc.returncode == 0 and proc.stdout.startswith("colour of"), proc.stderr
    chat = subprocess.run(
        [sys.executable, "-m", "tunelab", "chat", str(tmp / "ft/adapter"), "--temperature", "0",
         "--max-tokens", "4"], input="colour of river?\n/reset\ncolour of stone?\n", capture_output=True, text=True,
        timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("assistant> ") == 2


def test_data_lint_reports_lengths_duplicates_and_overlap(tmp_path, tokenizer_dir, chat_file):
    proc = tunelab("data", "lint", chat_file, "--tokenizer", tokenizer_dir, "--eval", chat_file,
                   "--json", tmp_path / "lint.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "lint.json").read_text())
    assert report["n_examples"] == 120
    assert report["train_eval_overlap"]["count"] > 0  # the same file twice: everything overlaps


@pytest.mark.parametrize("override, fragments", [
    ("method.r=0", ["method.r"]),
    ("method.alpha=-1", ["method.alpha"]),
    ("method.target_modules=[q_proj,qkv]", ["qkv", "q_proj"]),
])
def test_bad_method_settings_are_clear_errors(tmp_path, base_model_dir, chat_file, override, fragments):
    proc = tunelab("finetune", f"model.base={base_model_dir}", f"data.train=[{chat_file}]", f"out_dir={tmp_path}",
                   "train.steps=1", override)
    assert_clean_error(proc, *fragments)


def test_malformed_data_line_names_the_file_and_line(tmp_path, base_model_dir, chat_file):
    bad = tmp_path / "bad.jsonl"
    lines = chat_file.read_text().splitlines()[:5]
    lines[3] = lines[3][:-3]
    bad.write_text("\n".join(lines) + "\n")
    proc = tunelab("finetune", f"model.base={base_model_dir}", f"data.train=[{bad}]", f"out_dir={tmp_path}")
    assert_clean_error(proc, "bad.jsonl:4")


def test_finetune_without_a_base_model_says_what_to_give(tmp_path, chat_file):
    proc = tunelab("finetune", f"data.train=[{chat_file}]", f"out_dir={tmp_path}")
    assert_clean_error(proc, "model")
