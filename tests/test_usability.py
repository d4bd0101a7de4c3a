"""What a user asked for: `tunelab runs`, the resume hint on Ctrl-C, data lint's assumptions and prediction, the
tokenizer trainer's report, weight file permissions, CMMLU's Chinese subject names, the report's legend and
confidence intervals."""

import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap

import pytest
import yaml

from tunelab.cli import main
from tunelab.evaluate.choice import evaluate_choice, read_choice_dir
from tunelab.evaluate.common import wilson
from tunelab.evaluate.report import render_html
from tunelab.models import load_model, load_tokenizer, save_model
from tunelab.runs import list_runs

# Runs the CLI in a subprocess whose n-th checkpoint weight write raises KeyboardInterrupt (Ctrl-C mid-save) or
# whose n-th step raises RuntimeError (a failure: `lr_at` runs once a step), as tests/test_resume.py does with SIGKILL.
STOPPER = textwrap.dedent("""
    import sys
    import tunelab.train.loop as loop, tunelab.train.checkpoint as ckpt
    kind, n = sys.argv[1], int(sys.argv[2])
    count = [0]
    def stop(original, exc):
        def wrapper(*args, **kwargs):
            count[0] += 1
            if count[0] == n:
                raise exc
            return original(*args, **kwargs)
        return wrapper
    if kind == "ctrl-c":
        ckpt.save_file = stop(ckpt.save_file, KeyboardInterrupt())
    else:
        loop.lr_at = stop(loop.lr_at, RuntimeError("the GPU fell off"))
    from tunelab.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def pretrain_recipe(tmp_path, corpus_file, tokenizer_dir, name):
    return {"name": name, "out_dir": str(tmp_path / "runs"),
            "model": {"preset": "micro", "tokenizer": str(tokenizer_dir)},
            "data": {"sources": [{"path": str(corpus_file)}], "seq_len": 32},
            "train": {"steps": 8, "micro_batch_size": 2, "eval_every": 0, "save_every": 3, "log_every": 4}}


def test_runs_lists_status_and_the_resume_command_printed_on_ctrl_c(tmp_path, corpus_file, tokenizer_dir):
    for name in ("done", "stopped", "broken"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(pretrain_recipe(tmp_path, corpus_file, tokenizer_dir,
                                                                               name)), encoding="utf-8")
    assert main(["pretrain", str(tmp_path / "done.yaml")]) == 0
    # Ctrl-C while the second checkpoint (step 6) is written: step 3 is the last complete one
    args = ["pretrain", str(tmp_path / "stopped.yaml"), "train.log_every=2"]
    proc = subprocess.run([sys.executable, "-c", STOPPER, "ctrl-c", "2", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 130, proc.stderr
    command = shlex.join(["tunelab", *args, "--resume"])
    assert f"step-000003 is the last checkpoint; resume with: {command}" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", STOPPER, "fail", "5", "pretrain", str(tmp_path / "broken.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    runs = {os.path.basename(r["run_dir"]): r for r in list_runs(tmp_path / "runs")}
    assert runs["done"]["status"] == "finished" and "resume" not in runs["done"]
    assert runs["stopped"]["status"] == "interrupted" and runs["stopped"]["checkpoint_step"] == 3
    assert runs["stopped"]["resume"] == command and runs["stopped"]["step"] == 6 and runs["stopped"]["steps"] == 8
    assert runs["broken"]["status"] == "failed" and "the GPU fell off" in runs["broken"]["error"]
    assert runs["broken"]["checkpoint_step"] == 3  # step 3 saved, failed in step 5
    # the printed command resumes the run
    proc = subprocess.run([sys.executable, "-m", "tunelab", *shlex.split(command)[1:]], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {r["status"] for r in list_runs(tmp_path / "runs") if r["run_dir"].endswith("stopped")} == {"finished"}


def test_runs_cli_prints_a_table(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert main(["runs", str(tmp_path / "runs")]) == 0
    assert "no pretrain or finetune runs" in capsys.readouterr().out
    assert main(["runs", str(tmp_path / "nowhere")]) == 2


def test_data_lint_says_what_it_assumed_and_predicts_where_finetune_stops(chat_file, base_model_dir, capsys):
    assert main(["data", "lint", str(chat_file), "--tokenizer", str(base_model_dir), "--max-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "assumed (finetune's data.* keys): max_len 8, chat_template the tokenizer's own (ChatML)" in out
    assert "prediction: `tunelab finetune` with data.max_len=8 stops on these" in out
    assert "unless data.allow_empty=true" in out
    assert main(["data", "lint", str(chat_file), "--tokenizer", str(base_model_dir), "--chat-template", "plain"]) == 0
    out = capsys.readouterr().out
    assert "max_len 1024 (finetune's default), chat_template plain (given)" in out
    assert "with data.max_len=1024 data.chat_template=plain finds a trainable token in every example" in out


def test_tokenizer_trainer_says_which_files_it_read(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("river stone\n\nlantern baker\n\nharbour", encoding="utf-8")
    (corpus / "b.jsonl").write_text(json.dumps({"text": "copper violet"}) + "\n", encoding="utf-8")
    assert main(["tokenizer", "train", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    out = capsys.readouterr().out
    assert f"read {corpus / 'a.txt'}: 3 documents" in out and f"read {corpus / 'b.jsonl'}: 1 documents" in out
    assert "training on 4 documents in all" in out


def test_weight_files_get_the_same_permissions_as_every_other_file(tmp_path, base_model_dir, corpus_file,
                                                                    tokenizer_dir):
    umask = os.umask(0)
    os.umask(umask)
    want = 0o666 & ~umask
    save_model(load_model(base_model_dir), load_tokenizer(base_model_dir), tmp_path / "model")
    recipe = pretrain_recipe(tmp_path, corpus_file, tokenizer_dir, "perm")
    (tmp_path / "perm.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert main(["pretrain", str(tmp_path / "perm.yaml"), "train.steps=3"]) == 0
    files = list((tmp_path / "model").iterdir()) + list((tmp_path / "runs" / "perm").rglob("*"))
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files if f.is_file()}
    assert {"model.safetensors", "trainable.safetensors", "config.json"} <= set(modes)
    assert {m for m in modes.values()} == {want}, modes


def test_cmmlu_subjects_get_their_chinese_names_in_the_header(tmp_path, base_model_dir):
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
        for subject in ("agronomy", "my_topic"):
            (tmp_path / split / f"{subject}.csv").write_text(
                ",Question,A,B,C,D,Answer\n0,river?,red,blue,green,white,A\n", encoding="utf-8")
    model, tok = load_model(base_model_dir).eval(), load_tokenizer(base_model_dir)
    subjects = [s for s in read_choice_dir(tmp_path, k=1)]
    prompts = {}
    for s in subjects:
        prompts[s.name] = evaluate_choice(model, tok, [s], k=1)["example_prompt"]
    assert prompts["agronomy"].startswith("以下是关于农学的单项选择题")
    assert prompts["my_topic"].startswith("以下是关于my topic的单项选择题")
    named = evaluate_choice(model, tok, subjects[:1], k=1, subject_names={"agronomy": "农业"})
    assert named["example_prompt"].startswith("以下是关于农业的单项选择题")
    assert "农学" not in evaluate_choice(model, tok, subjects[:1], k=1, style="mmlu")["example_prompt"]
    r = evaluate_choice(model, tok, subjects, k=1)
    assert r["subjects"]["agronomy"]["ci95"]["ll_acc"] == wilson(round(r["subjects"]["agronomy"]["ll_acc"]), 1)
    assert r["ci95"]["ll_acc_micro"] == wilson(round(r["metrics"]["ll_acc_micro"] * 2), 2)


def test_wilson_interval_and_the_report_shows_intervals_and_a_legend():
    assert wilson(13, 20) == pytest.approx([0.4329, 0.8188], abs=1e-4)  # statsmodels' proportion_confint wilson
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0 and wilson(0, 0) is None
    results = {"name": "r", "tasks": [{"name": "gen", "type": "generation"}, {"name": "ppl", "type": "perplexity"}],
               "models": [{"label": "base", "base": "b", "tasks": {
                   "gen": {"metrics": {"accuracy": 0.65}, "ci95": {"accuracy": wilson(13, 20)}, "samples": []},
                   "ppl": {"metrics": {"ppl": 2.0}, "files": []}}}]}
    html = render_html(results)
    assert "65.0%" in html and "[43.3–81.9]" in html
    assert "<h2>Metrics</h2>" in html and "<code>accuracy</code>" in html and "<code>ppl</code>" in html
    assert "<code>ll_acc</code>" not in html  # only the metrics the report shows
