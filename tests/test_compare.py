"""`tunelab compare`: one harness, several methods, one table; failures isolated; finished methods reused."""

import contextlib
import csv
import io
import json
import re
from html.parser import HTMLParser

import pytest
import yaml
from test_cli import assert_clean_error, tunelab

from tunelab.cli import main
from tunelab.compare import run_compare
from tunelab.config import CompareConfig, load_config, validate
from tunelab.errors import DataError, ModelError

STEPS = 6
OK = ["lora-r4", "lora-r8", "adapter"]


def recipe(tmp, base_model_dir, chat_file, **extra):
    qa = tmp / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"colour of {w}?", "answer": c, "task": t}) + "\n" for w, c, t in [
        ("river", "red", "a"), ("stone", "blue", "a"), ("lantern", "green", "b"), ("baker", "red", "b")]))
    raw = {"name": "cmp", "out_dir": str(tmp / "runs"), "model": {"base": str(base_model_dir)},
           "data": {"train": [str(chat_file)], "max_len": 64, "eval_fraction": 0.1},
           "train": {"steps": STEPS, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 0,
                     "eval_batches": 2, "log_every": 100},
           "eval": {"path": str(qa), "max_new_tokens": 3},
           "methods": [{"label": "lora-r4", "name": "lora", "r": 4, "dropout": 0.0},
                       {"label": "lora-r8", "name": "lora", "r": 8, "dropout": 0.0},
                       {"label": "adapter", "name": "adapter", "adapter_prompt_len": 4, "train": {"lr": 1e-2}},
                       {"label": "bad-target", "name": "lora", "target_modules": ["nope"]},
                       {"label": "bad-name", "name": "nope"},
                       {"label": "bad-budget", "name": "lora", "train": {"steps": 3}}],
           **extra}
    path = tmp / "compare.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, base_model_dir, chat_file):
    """`tunelab compare recipe.yaml`, in this process (the methods still run in their own processes)."""
    tmp = tmp_path_factory.mktemp("compare")
    path = recipe(tmp, base_model_dir, chat_file)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["compare", str(path)])
    return tmp, path, tmp / "runs" / "cmp", code, stdout.getvalue()


class Tables(HTMLParser):
    """The rows of table#results (label, cells, classes) and the SVG series/points of the report."""

    def __init__(self):
        super().__init__()
        self.rows, self.series, self.points, self.header = [], [], [], []
        self.in_results = self.in_cell = False
        self.row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "results":
            self.in_results = True
        elif self.in_results and tag == "tr":
            self.row = {"label": a.get("data-label"), "class": a.get("class"), "cells": [], "best": []}
        elif self.in_results and tag in ("td", "th"):
            self.in_cell = True
            self.cell, self.cell_best = "", "best" in (a.get("class") or "")
        elif tag == "polyline" and a.get("class") == "series":
            self.series.append(a["data-label"])
        elif tag == "circle" and a.get("class") == "point":
            self.points.append(a["data-label"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.in_cell:
            self.in_cell = False
            self.row["cells"].append(self.cell.strip())
            self.row["best"].append(self.cell_best)
        elif tag == "tr" and self.row is not None:
            (self.rows if self.row["label"] else self.header).append(self.row)
            self.row = None
        elif tag == "table":
            self.in_results = False

    def handle_data(self, data):
        if self.in_cell:
            self.cell += data


def parse_report(path):
    t = Tables()
    t.feed(path.read_text(encoding="utf-8"))
    return t


def test_compare_writes_one_row_per_method_and_isolates_failures(first_run):
    tmp, _, out, code, stdout = first_run
    assert code == 1, stdout  # some methods failed: the comparison finished, and the exit code says so
    for n, label in enumerate(OK + ["bad-target", "bad-name", "bad-budget"], 1):
        assert f"[{n}/6] {label}:" in stdout
    assert "Winner by held-out accuracy" in stdout and "3 of 6 method(s) failed" in stdout

    results = json.loads((out / "results.json").read_text())
    rows = {r["label"]: r for r in results["methods"]}
    assert list(rows) == OK + ["bad-target", "bad-name", "bad-budget"]
    assert [r["status"] for r in rows.values()] == ["ok"] * 3 + ["failed"] * 3
    assert results["failed"] == ["bad-target", "bad-name", "bad-budget"] and results["reused"] == []
    assert "nope" in rows["bad-target"]["error"] and "q_proj" in rows["bad-target"]["error"]
    assert "name" in rows["bad-name"]["error"] and "full" in rows["bad-name"]["error"]  # lists the valid names
    assert "same budget" in rows["bad-budget"]["error"]
    # LoRA's parameters grow linearly with r; the adapter's lr override is recorded
    assert rows["lora-r8"]["trainable_parameters"] == 2 * rows["lora-r4"]["trainable_parameters"]
    assert rows["adapter"]["lr"] == 1e-2 and rows["adapter"]["train_overrides"] == {"lr": 1e-2}
    for label in OK:
        r = rows[label]
        events = [json.loads(line) for line in (out / "runs" / label / "events.jsonl").read_text().splitlines()]
        losses = [e["loss"] for e in events if e["event"] == "step"]
        assert r["losses"] == losses and len(losses) == STEPS
        assert r["final_train_loss"] == pytest.approx(losses[-1])  # 10% of 6 steps: the last step
        assert 0 <= r["accuracy"] <= 1 and set(r["accuracy_per_group"]) == {"a", "b"}
        assert r["eval_loss"] < r["eval_loss_before"] or label == "adapter"
        assert r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0
        assert (out / "runs" / label / "compare.json").is_file()
    assert rows["lora-r4"]["tokens_per_s_ratio"] == 1.0  # the baseline: the first method
    # the winner: the best accuracy, ties broken by eval loss
    best = min((rows[x] for x in OK), key=lambda r: (-r["accuracy"], r["eval_loss"]))
    assert results["winner"]["label"] == best["label"] and results["winner"]["by"] == "accuracy"

    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == list(rows) and table[3]["status"] == "failed"
    assert float(table[1]["eval_loss"]) == pytest.approx(rows["lora-r8"]["eval_loss"])

    report = parse_report(out / "report.html")
    assert [r["label"] for r in report.rows] == list(rows)
    assert [r["class"] for r in report.rows] == [None] * 3 + ["failed"] * 3
    assert "nope" in report.rows[3]["cells"][-1]
    assert report.series == OK and report.points == OK  # one loss curve and one point per finished method
    head = report.header[0]["cells"]
    col = next(i for i, h in enumerate(head) if h.startswith("eval loss"))
    marked = [r["label"] for r in report.rows if r["best"][col]]
    assert marked == [min((rows[x] for x in OK), key=lambda r: r["eval_loss"])["label"]]
    html = (out / "report.html").read_text()
    assert "<script" not in html and not re.search(r"(src|href)=['\"]?(http|//)", html)
    assert f"Winner by held-out accuracy: {best['label']}" in html


def test_rerun_reuses_finished_methods_and_a_changed_entry_reruns_alone(first_run):
    tmp, path, out, _, _ = first_run
    runs = out / "runs"

    def stamps():
        return {x: (runs / x / "events.jsonl").stat().st_mtime_ns for x in OK}

    before, first = stamps(), json.loads((out / "results.json").read_text())
    cfg = load_config(CompareConfig, path)
    results = run_compare(cfg, only=OK, log=lambda line: None)
    assert results["reused"] == OK and stamps() == before  # nothing retrained
    assert [r["eval_loss"] for r in results["methods"]] == [r["eval_loss"] for r in first["methods"][:3]]

    # the eval section changed: accuracy is measured again, training is not repeated
    cfg = load_config(CompareConfig, path, ["eval.max_new_tokens=2"])
    results = run_compare(cfg, only=["lora-r4"], log=lambda line: None)
    assert results["methods"][0]["reevaluated"] and stamps() == before

    # one entry changed: only that one trains again
    lines = []
    cfg = load_config(CompareConfig, path, ["methods.1.r=16"])
    results = run_compare(cfg, only=OK, log=lines.append)
    rows = {r["label"]: r for r in results["methods"]}
    assert results["reused"] == ["lora-r4", "adapter"]
    after = stamps()
    assert after["lora-r4"] == before["lora-r4"] and after["adapter"] == before["adapter"]
    assert after["lora-r8"] != before["lora-r8"]
    assert rows["lora-r8"]["trainable_parameters"] == 4 * rows["lora-r4"]["trainable_parameters"]
    assert any(line.startswith("[2/3] lora-r8: training lora") and "r=16" in line for line in lines)
    assert any(line.startswith("[3/3] adapter: reused") for line in lines)


def test_general_section_measures_forgetting_against_the_base(first_run, base_model_dir, tmp_path):
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.data.chat import chat_template_for, encode_example
    from tunelab.data.records import read_examples
    from tunelab.models import load_tokenizer

    _, path, out, _, _ = first_run
    general = tmp_path / "seed_tasks.jsonl"  # Self-Instruct seed-task records, outside the tuned colour task
    general.write_text("".join(json.dumps({"id": i, "instruction": f"Name a word like {w}.", "instances": [
        {"input": "", "output": f"{w} and {v}"}]}) + "\n" for i, (w, v) in enumerate(
        [("river", "stone"), ("lantern", "baker"), ("meadow", "copper"), ("falcon", "willow")])))
    events = {x: (out / "runs" / x / "events.jsonl").stat().st_mtime_ns for x in ("lora-r4", "adapter")}
    cfg = load_config(CompareConfig, path, [f"general.path=[{general}]"])
    results = run_compare(cfg, only=["lora-r4", "adapter"], log=lambda line: None)  # (lora-r8 changed above)
    rows = results["methods"]
    assert all(r["reevaluated"] for r in rows)  # a new general: section re-measures, it does not retrain
    assert {x: (out / "runs" / x / "events.jsonl").stat().st_mtime_ns for x in events} == events
    g0 = results["general_loss_before"]
    assert results["general"]["examples"] == 4 and results["accuracy_before"] is not None
    for r in rows:
        assert math.isfinite(r["general_loss"]) and r["general_loss_delta"] == pytest.approx(r["general_loss"] - g0)

    # the base's general loss, by hand: transformers' own shifted cross-entropy on the answer tokens
    tok = load_tokenizer(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    total = count = 0
    for ex in read_examples(general):
        e = encode_example(ex, tok, chat_template_for(tok, None), 64)
        n = sum(x != -100 for x in e.labels[1:])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
        total, count = total + float(loss) * n, count + n
    assert g0 == pytest.approx(total / count, rel=1e-4)

    stamp = (out / "base-eval" / "compare.json").stat().st_mtime_ns  # unchanged base and sections: reused
    run_compare(cfg, only=["lora-r4"], log=lambda line: None)
    assert (out / "base-eval" / "compare.json").stat().st_mtime_ns == stamp
    assert "general loss" in (out / "report.html").read_text(encoding="utf-8")


def test_missing_base_model_says_how_to_make_it(tmp_path, chat_file):
    path = recipe(tmp_path, tmp_path / "runs/demo/pretrain/model", chat_file)
    with pytest.raises(ModelError, match="tunelab demo"):
        run_compare(load_config(CompareConfig, path), log=lambda line: None)
    assert not (tmp_path / "runs/cmp/results.json").exists()


@pytest.mark.parametrize("change, fragments", [
    ({"methods": None}, ["missing required key 'methods'"]),
    ({"methods": [{"label": "a", "name": "lora"}, {"label": "a", "name": "full"}]}, ["'a' is also the label"]),
    ({"methods": [{"name": "lora"}]}, ["methods.0.label"]),
    ({"baseline": "nope"}, ["baseline", "lora-r4"]),
])
def test_bad_recipe_is_a_clean_error(tmp_path, base_model_dir, chat_file, change, fragments):
    path = recipe(tmp_path, base_model_dir, chat_file)
    raw = yaml.safe_load(path.read_text())
    raw.update(change)
    if change.get("methods", 0) is None:
        del raw["methods"]
    path.write_text(yaml.safe_dump(raw))
    assert_clean_error(tunelab("compare", path), "compare.yaml", *fragments)


def test_missing_files_are_clean_errors(tmp_path, base_model_dir, chat_file):
    assert_clean_error(tunelab("compare", tmp_path / "nowhere.yaml"), "nowhere.yaml", "not found")
    path = recipe(tmp_path, base_model_dir, chat_file)
    for override, name in ((f"data.train=[{tmp_path / 'missing.jsonl'}]", "missing.jsonl"),
                           (f"eval.path={tmp_path / 'no_qa.jsonl'}", "no_qa.jsonl")):
        with pytest.raises(DataError, match=name):  # before anything trains (the CLI prints it and exits 2)
            run_compare(load_config(CompareConfig, path, [override]), log=lambda line: None)
    assert not (tmp_path / "runs/cmp/runs").exists()
    # a data problem only the tokenizer finds (nothing left to train on) is every method's: the comparison stops
    with pytest.raises(DataError, match="no trainable token.*comparison stops at lora-r4"):
        run_compare(load_config(CompareConfig, path, ["data.max_len=8"]), log=lambda line: None)
    assert not (tmp_path / "runs/cmp/results.json").exists()


def test_pretrain_section_makes_the_base_once_from_the_training_part(tmp_path, chat_file):
    small = {"micro_batch_size": 4, "warmup_steps": 1, "eval_every": 0, "log_every": 100}
    raw = {"name": "pt", "out_dir": str(tmp_path),
           "pretrain": {"preset": "micro", "vocab_size": 400, "seq_len": 32, "train": {"steps": 3, **small}},
           "data": {"train": [str(chat_file)], "max_len": 64, "eval_fraction": 0.1, "chat_template": "plain"},
           "train": {"steps": 2, **small}, "methods": [{"label": "lora", "name": "lora", "r": 2}]}
    cfg = validate(CompareConfig, raw)
    results = run_compare(cfg, log=lambda line: None)
    base = tmp_path / "pt/base/pretrain/model"
    assert results["base"] == str(base) and results["methods"][0]["status"] == "ok"
    # the base saw the 108 training dialogues only: the 12 held out for the eval loss are not in its text
    assert len((tmp_path / "pt/base/text.jsonl").read_text().splitlines()) == 108
    assert results["pretrain"]["held_out_examples"] == 12 and results["methods"][0]["eval_tokens"] > 0
    adapter = json.loads((tmp_path / "pt/runs/lora/adapter/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base.resolve())
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    lines = []
    results = run_compare(cfg, log=lines.append)
    assert lines[0].startswith("[base] reused") and results["reused"] == ["lora"]
    assert (base / "model.safetensors").stat().st_mtime_ns == stamp


def test_sigterm_stops_the_running_method_too(tmp_path, base_model_dir, chat_file):
    import signal
    import subprocess
    import sys
    import time

    path = recipe(tmp_path, base_model_dir, chat_file)
    cmd = [sys.executable, "-m", "tunelab", "compare", str(path), "--only", "lora-r4", "train.steps=100000",
           "name=long"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events = tmp_path / "runs" / "long" / "runs" / "lora-r4" / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (events.is_file() and events.read_text().count('"step"') >= 3):
        time.sleep(0.5)
    assert events.is_file(), "the method never started"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(3)  # an orphaned child would still be training and logging steps
    size = events.stat().st_size
    time.sleep(4)
    assert events.stat().st_size == size
