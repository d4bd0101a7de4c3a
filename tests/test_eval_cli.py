"""`tunelab eval`: a suite on a base model and base + adapter, the before/after report, one-line errors."""

import json
import re
from pathlib import Path

import pytest
from conftest import random_lora_adapter

from tunelab.cli import main
from tunelab.config import EvalConfig
from tunelab.evaluate import load_eval_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter_dir(base_model_dir, tmp_path_factory):
    """A LoRA adapter on the micro base with random B (so base + adapter differs from the base)."""
    return random_lora_adapter(base_model_dir, tmp_path_factory.mktemp("adapter") / "adapter", r=4, seed=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    for split, n in (("dev", 2), ("test", 3)):
        (root / "choice" / split).mkdir(parents=True)
        rows = "".join(f'{i},"colour of river {i}?",red,blue,"green, dark",violet,{"ABCD"[i]}\n' for i in range(n))
        (root / "choice" / split / "colours.csv").write_text(",Question,A,B,C,D,Answer\n" + rows, encoding="utf-8")
    (root / "text.txt").write_text("river stone lantern baker\n\n山河湖海城村花草\n\ncopper violet orchard.\n",
                                   encoding="utf-8")
    (root / "gen.jsonl").write_text("".join(json.dumps({"instruction": f"colour of {w}?", "output": "red",
                                                        "task": t}) + "\n"
                                            for w, t in (("river", "a"), ("stone", "b"))), encoding="utf-8")
    return root


def test_suite_on_base_and_adapter_writes_the_before_after_report(tmp_path, base_model_dir, adapter_dir, data, capsys):
    recipe = tmp_path / "suite.yaml"
    recipe.write_text(f"""
name: ba
out_dir: {tmp_path}
tasks:
  - {{type: perplexity, path: {data / 'text.txt'}, max_length: 16}}
  - {{type: choice, path: {data / 'choice'}, k: 2}}
  - {{type: generation, name: gen, path: {data / 'gen.jsonl'}, max_new_tokens: 3}}
  - {{type: judge, path: {data / 'gen.jsonl'}, judge: {base_model_dir}, judge_max_tokens: 3, max_new_tokens: 3}}
""", encoding="utf-8")
    code = main(["eval", str(recipe), "--models", f"base={base_model_dir},tuned={adapter_dir}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy per subject" in out and "average over subjects" in out and "questions/s" in out
    run = tmp_path / "ba"
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    base, tuned = results["models"]
    assert (base["label"], tuned["label"]) == ("base", "tuned") and tuned["adapter"] == str(adapter_dir)
    assert base["base"] == tuned["base"] == str(base_model_dir)
    assert [t["name"] for t in results["tasks"]] == ["perplexity", "choice", "gen", "judge"]
    assert base["tasks"]["perplexity"]["metrics"]["ppl"] != tuned["tasks"]["perplexity"]["metrics"]["ppl"]
    rows = {(r["task"], r["metric"]): r for r in results["comparison"]}
    ppl = rows[("perplexity", "ppl")]
    assert ppl["deltas"][0] is None and ppl["deltas"][1] == pytest.approx(ppl["values"][1] - ppl["values"][0])
    assert ppl["lower_is_better"] and not rows[("choice", "ll_acc")]["lower_is_better"]
    assert rows[("gen", "accuracy/a")]["values"][0] in (0.0, 1.0)
    judge = tuned["tasks"]["judge"]["metrics"]
    assert judge["wins"] + judge["ties"] + judge["losses"] + judge["unparseable"] == 2
    assert base["tasks"]["judge"]["baseline"] and len(base["tasks"]["judge"]["answers"]) == 2
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["task"] * 8 + ["judge", "done"]
    page = (run / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "colours" in page and "Δ vs base" in page
    assert not re.search(r"<script|<link|src=|https?://", page)  # self-contained, nothing to fetch


def test_example_recipe_validates():
    cfg = load_eval_config(str(ROOT / "examples" / "eval_cmmlu.yaml"), models="m")
    assert isinstance(cfg, EvalConfig) and cfg.tasks[0].type == "choice" and cfg.tasks[0].k == 5


@pytest.mark.parametrize("task,overrides,message", [
    ("choice:{data}/choice", ["tasks.0.k=-1"], "tasks.0.k: Input should be greater than or equal to 0"),
    ("quiz:{data}/choice", [], "tasks.0: unknown type 'quiz'; set type to one of perplexity, choice"),
    ("choice", [], "--task 'choice': expected type:path"),
    ("choice:{data}/missing", [], "missing: no such file or directory"),
    ("choice:{data}/choice", ["tasks.0.kk=1"], "unknown key 'tasks.0.kk' (did you mean 'tasks.0.k'?)"),
    ("generation:{data}/gen.jsonl", ["tasks.0.extract=numeric"], "holds no number"),
])
def test_cli_errors_are_one_line(task, overrides, message, data, base_model_dir, tmp_path, capsys):
    argv = ["eval", "--models", str(base_model_dir), "--task", task.format(data=data), f"out_dir={tmp_path}"]
    assert main(argv + overrides) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_cli_needs_models_and_tasks(data, tmp_path, capsys):
    assert main(["eval", "--task", f"choice:{data}/choice"]) == 2
    assert "no models to evaluate" in capsys.readouterr().err
    assert main(["eval", "--models", str(tmp_path / "nope")]) == 2
    assert "no tasks" in capsys.readouterr().err
    assert main(["eval", "--models", str(tmp_path / "nope"), "--task", f"choice:{data}/choice",
                 f"out_dir={tmp_path}"]) == 2
    assert "is not a local directory" in capsys.readouterr().err
