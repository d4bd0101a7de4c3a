"""`tunelab pipeline`: stages in order on the last one's model, the suite after each, reuse, a kill, a failure."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main
from tunelab.data.select import select_records
from tunelab.errors import DataError

TRAIN = {"micro_batch_size": 2, "warmup_steps": 0, "eval_every": 0}


def one_error_line(capsys, argv: list) -> str:
    """Run the CLI: exit 2 with one `error:` line, the last (a stage that ran before it printed its progress)."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    return errors[0]


@pytest.fixture()
def files(tmp_path, corpus_file, chat_file):
    """A small corpus and chat file of the session data (the tests read them as external inputs)."""
    text = tmp_path / "text.jsonl"
    text.write_text("".join(corpus_file.read_text(encoding="utf-8").splitlines(keepends=True)[:40]), encoding="utf-8")
    chats = tmp_path / "chats.jsonl"
    chats.write_text(chat_file.read_text(encoding="utf-8"), encoding="utf-8")
    return text, chats


def recipe(tmp_path, base, text, chats, **extra) -> dict:
    """Domain -> sub-domain on the micro model: continued pretraining, chat LoRA, a LoRA on the 'blue' chats,
    an export of the last adapter; the suite: perplexity, accuracy on all chats, accuracy on the 'blue' ones."""
    sft = {"eval_fraction": 0, "chat_template": "plain", "max_len": 128, "allow_empty": True}
    r = {"name": "p", "out_dir": str(tmp_path / "runs"), "base": str(base),
         "eval": {"precision": "fp32", "tasks": [
             {"type": "perplexity", "name": "text", "path": str(text), "max_length": 32, "stride": 32},
             {"type": "generation", "name": "colours", "path": str(chats), "limit": 6, "max_new_tokens": 2,
              "chat_template": "plain"},
             {"type": "generation", "name": "blue", "path": "stage:blue-test", "max_new_tokens": 2,
              "chat_template": "plain"}]},
         "stages": {
             "blue-data": {"run": "data select", "from": [str(chats)], "contains": ["blue"], "skip": 4},
             "blue-test": {"run": "data select", "from": [str(chats)], "contains": ["blue"], "limit": 4},
             "text": {"run": "pretrain", "target": "text", "data": {"sources": [{"path": str(text)}], "seq_len": 32,
                                                                    "eval_fraction": 0},
                      "train": {"steps": 2, **TRAIN}},
             "chat": {"run": "finetune", "target": "colours", "data": {"train": [str(chats)], **sft},
                      "method": {"r": 2, "alpha": 4}, "train": {"steps": 2, **TRAIN}},
             "blue": {"run": "finetune", "target": "blue", "data": {"train": ["stage:blue-data"], **sft},
                      "method": {"r": 2, "alpha": 4}, "train": {"steps": 2, **TRAIN}},
             "merged": {"run": "export"}}}
    r.update(extra)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False), encoding="utf-8")
    return r


def statuses(tmp_path) -> dict[str, str]:
    report = json.loads((tmp_path / "runs" / "p" / "pipeline_report.json").read_text(encoding="utf-8"))
    return {s["name"]: s["status"] for s in report["stages"]}


def test_domain_then_subdomain_report_reuse_and_changes(tmp_path, base_model_dir, files, capsys):
    text, chats = files
    recipe(tmp_path, base_model_dir, text, chats)
    argv = ["pipeline", str(tmp_path / "pipeline.yaml")]
    assert main(argv) == 0, capsys.readouterr().err
    out = tmp_path / "runs" / "p"
    report = json.loads((out / "pipeline_report.json").read_text(encoding="utf-8"))
    assert report["status"] == "finished" and set(statuses(tmp_path).values()) == {"ran"}
    assert [r["label"] for r in report["rows"]] == ["base", "text", "chat", "blue"]
    # each stage starts from the one before: the LoRA adapter of chat was merged (and checked) for blue
    assert json.loads((out / "blue" / "config.json").read_text())["model"]["base"] == str(out / "chat" / "merged")
    assert json.loads((out / "chat" / "merged" / "tunelab_export.json").read_text())["max_abs_logit_diff"] <= 1e-3
    assert json.loads((out / "text" / "config.json").read_text())["model"]["base"] == str(base_model_dir)
    assert (out / "merged" / "model" / "config.json").is_file()  # the export stage merged blue's adapter
    for e in report["metrics"]:  # every delta is the difference of the values it sits between
        v = e["values"]
        assert e["delta_prev"][1:] == pytest.approx([b - a for a, b in zip(v, v[1:])])
        assert e["delta_first"][1:] == pytest.approx([b - v[0] for b in v[1:]])
    ppl = next(e for e in report["metrics"] if e["task"] == "text" and e["metric"] == "ppl")
    assert ppl["values"][1] < ppl["values"][0]  # continued pretraining on the text lowers its perplexity
    changes = {c["stage"]: c for c in report["changes"]}
    assert [(g["task"], g["metric"]) for g in changes["blue"]["gain"]] == [("blue", "accuracy")]
    assert [(f["task"], f["metric"]) for f in changes["blue"]["forgetting"]] == [("text", "ppl"),
                                                                                ("colours", "accuracy")]
    assert changes["text"]["gain"][0]["better_than_previous"] is True and changes["text"]["previous"] == "base"
    html = (out / "pipeline_report.html").read_text(encoding="utf-8")
    assert "Gain on each stage" in html and "forgetting" in html
    summary_time = (out / "chat" / "summary.json").stat().st_mtime_ns

    assert main(argv) == 0  # unchanged: every stage reused, nothing retrained
    assert set(statuses(tmp_path).values()) == {"reused"}
    assert (out / "chat" / "summary.json").stat().st_mtime_ns == summary_time

    assert main(argv + ["stages.chat.train.steps=3"]) == 0  # a changed stage reruns with every stage after it
    s = statuses(tmp_path)
    assert s == {"blue-data": "reused", "blue-test": "reused", "text": "reused", "chat": "ran", "blue": "ran",
                 "merged": "ran"}
    assert json.loads((out / "chat" / "summary.json").read_text())["steps"] == 3

    assert main(argv + ["stages.chat.train.steps=3", "eval.tasks.1.limit=4"]) == 0  # a new suite: re-evaluated only
    s = statuses(tmp_path)
    assert s["text"] == s["chat"] == s["blue"] == "reevaluated" and s["merged"] == "reused"
    capsys.readouterr()


def bad(tmp_path, base, stages: dict, **extra) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "b", "out_dir": str(tmp_path / "runs"), "base": str(base),
                                    "stages": stages, **extra}, sort_keys=False), encoding="utf-8")
    return path


FT = {"run": "finetune", "data": {"train": ["x.jsonl"]}}


@pytest.mark.parametrize("stages, fragments", [
    ({"a": {**FT, "model": "nope"}, "b": {**FT, "model": "stage:ghost"}}, ["stages.b", "'ghost'", "does not exist"]),
    ({"a": {**FT, "model": "b"}, "b": dict(FT)}, ["stages.a", "'b'", "comes later"]),
    ({"a": {**FT, "model": "b"}, "b": {**FT, "model": "a"}}, ["stages.a", "cycle", "a -> b -> a"]),
    ({"a": {**FT, "model": "a"}}, ["stages.a", "itself"]),
    ({"a": {"run": "distill"}}, ["stages.a.run", "unknown command 'distill'", "finetune"]),
    ({"a": {"run": "data self-instruct", "seed_tasks": "s.jsonl", "num": 2, "out": "x.jsonl"}},
     ["stages.a.out", "set by the pipeline"]),
    ({"a": {**FT, "method": {"name": "adapter"}}, "b": dict(FT)}, ["stages.b", "cannot be merged"]),
    ({"a": {**FT, "train": {"stpes": 3}}}, ["stages.a", "train.stpes", "did you mean"]),
    ({"a": {**FT, "target": "x"}}, ["stages.a.target", "no eval: suite"]),
    ({"a": {**FT, "base": "m"}}, ["stages.a.base", "top level", "model: m"]),
])
def test_graph_and_settings_errors_are_one_line_before_anything_runs(tmp_path, base_model_dir, capsys, stages,
                                                                      fragments):
    line = one_error_line(capsys, ["pipeline", bad(tmp_path, base_model_dir, stages)])
    for f in fragments:
        assert f in line, line
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was written


def test_a_missing_input_is_named_before_anything_runs(tmp_path, base_model_dir, capsys):
    stages = {"a": {"run": "data select", "from": [str(tmp_path / "here.jsonl")]}, "b": {**FT, "data": {
        "train": [str(tmp_path / "missing.jsonl")]}}}
    (tmp_path / "here.jsonl").write_text('{"a": 1}\n')
    line = one_error_line(capsys, ["pipeline", bad(tmp_path, base_model_dir, stages)])
    assert "stages.b" in line and "missing.jsonl does not exist" in line
    assert not (tmp_path / "runs" / "b" / "a").exists()


def test_a_stage_that_fails_halfway_stops_with_one_line_and_keeps_the_finished_ones(tmp_path, base_model_dir,
                                                                                     chat_file, capsys):
    users_only = tmp_path / "questions.jsonl"  # no assistant turn: nothing to train on
    users_only.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                                  for i in range(4)))
    sft = {"eval_fraction": 0, "chat_template": "plain", "max_len": 128, "allow_empty": True}
    stages = {"chat": {"run": "finetune", "data": {"train": [str(chat_file)], **sft}, "method": {"r": 2},
                       "train": {"steps": 1, **TRAIN}},
              "more": {"run": "finetune", "data": {"train": [str(users_only)], **sft}, "train": {"steps": 1, **TRAIN}}}
    line = one_error_line(capsys, ["pipeline", bad(tmp_path, base_model_dir, stages)])
    assert "stages.more (finetune) failed" in line and "trainable token" in line
    assert "(chat) are finished and kept" in line and "finished stages are reused" in line
    out = tmp_path / "runs" / "b"
    assert (out / "chat" / "adapter" / "adapter_config.json").is_file() and (out / "chat" / "merged").is_dir()
    report = json.loads((out / "pipeline_report.json").read_text(encoding="utf-8"))
    assert report["status"] == "failed" and [s["status"] for s in report["stages"]] == ["ran", "failed"]


# The pipeline in a subprocess that SIGKILLs itself in the n-th training forward pass (across stages).
KILLER = textwrap.dedent("""
    import os, signal, sys
    import tunelab.train.loop as loop
    count = [0]
    original = loop.forward_loss_sum
    def killing(*args, **kwargs):
        count[0] += 1
        if count[0] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    loop.forward_loss_sum = killing
    from tunelab.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_a_killed_pipeline_continues_where_it_stopped(tmp_path, base_model_dir, files):
    text, chats = files
    sft = {"eval_fraction": 0, "chat_template": "plain", "max_len": 128, "allow_empty": True}
    path = bad(tmp_path, base_model_dir, {
        "text": {"run": "pretrain", "data": {"sources": [{"path": str(text)}], "seq_len": 32, "eval_fraction": 0},
                 "train": {"steps": 2, **TRAIN}},
        "chat": {"run": "finetune", "data": {"train": [str(chats)], **sft}, "method": {"r": 2},
                 "train": {"steps": 4, "save_every": 1, **TRAIN}}})
    proc = subprocess.run([sys.executable, "-c", KILLER, "5", "pipeline", str(path)], capture_output=True, text=True,
                          timeout=300)  # forward passes 1-2: stage text; 3-6: stage chat, killed in its 3rd step
    assert proc.returncode == -9, proc.stderr
    out = tmp_path / "runs" / "b"
    assert (out / "text" / "summary.json").is_file() and not (out / "chat" / "summary.json").exists()
    finished = (out / "text" / "summary.json").stat().st_mtime_ns
    proc = subprocess.run([sys.executable, "-m", "tunelab", "pipeline", str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert "text (pretrain): reused" in log and "chat (finetune): continuing" in log
    assert "resuming from" in log and "step 2 of 4" in log
    assert (out / "text" / "summary.json").stat().st_mtime_ns == finished
    assert json.loads((out / "chat" / "summary.json").read_text())["resumed_from_step"] == 2


def test_select_records_where_contains_exclude_skip_limit_text(tmp_path):
    src = tmp_path / "r.jsonl"
    rows = [{"task": "fact", "q": "Ashford river?", "a": "Sela"}, {"task": "fact", "q": "Elmford?", "a": "x"},
            {"task": "math", "q": "Ashford 1+1", "a": "2"}, {"task": "fact", "q": "Ashford product?", "a": "tea"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.jsonl"
    r = select_records([src], out, where={"task": "fact"}, contains=["Ashford"])
    assert r["selected"] == 2 and [json.loads(x) for x in out.read_text().splitlines()] == [rows[0], rows[3]]
    select_records([src], out, contains=["Ashford"], exclude=["tea"], skip=1, limit=1, text=True)
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"text": "math\nAshford 1+1\n2"}]
    with pytest.raises(DataError, match="no record is selected"):
        select_records([src], out, where={"task": ["poetry"]})


@pytest.mark.parametrize("name", ["pipeline_domain.yaml", "pipeline_cpsycound.yaml"])
def test_the_example_recipes_plan(name):
    from tunelab.config import load_config
    from tunelab.pipeline import PipelineConfig, plan_pipeline

    path = Path(__file__).resolve().parent.parent / "examples" / name
    plan = plan_pipeline(load_config(PipelineConfig, path), str(path))
    training = [s for s in plan.stages if s.kind.trains]
    assert len(training) >= 2 and all(s.targets for s in training)
    assert [s.model_stage for s in training[1:]] == [s.name for s in training[:-1]]  # each on the one before
    assert all(s.needs_merge for s in training[:-1] if s.run == "finetune")


def test_clean_dedup_and_vocab_extend_stages_feed_the_next_ones(tmp_path, base_model_dir, corpus_file):
    from tunelab.config import PretrainConfig
    from tunelab.pipeline import PipelineConfig, run_pipeline

    text = tmp_path / "text.jsonl"
    lines = corpus_file.read_text(encoding="utf-8").splitlines(keepends=True)[:60]
    text.write_text("".join(lines + lines[:10]), encoding="utf-8")  # 10 exact duplicates
    cfg = PipelineConfig(name="p", out_dir=str(tmp_path / "runs"), base=str(base_model_dir), stages={
        "clean": {"run": "data clean", "from": [str(text)], "quality": {"enabled": False},
                  "language": {"enabled": False}},
        "dedup": {"run": "data dedup", "from": ["stage:clean"], "near": False},
        "vocab": {"run": "vocab extend", "corpus": ["stage:dedup"], "add": 8, "held_out": 0},
        "text": {"run": "pretrain", "data": {"sources": [{"path": "stage:dedup"}], "seq_len": 32, "eval_fraction": 0},
                 "train": {"steps": 1, **TRAIN}}})
    report = run_pipeline(cfg, log=lambda line: None)
    assert [s["status"] for s in report["stages"]] == ["ran"] * 4
    out = tmp_path / "runs" / "p"
    kept = sum(1 for f in (out / "dedup" / "data").glob("*.jsonl") for _ in f.open(encoding="utf-8"))
    assert kept <= 60  # the planted exact duplicates are gone
    pcfg = PretrainConfig.model_validate(json.loads((out / "text" / "config.json").read_text()))
    assert pcfg.model.base == str(out / "vocab" / "model")  # pretraining continues the extended model
    vocab = json.loads((out / "vocab" / "model" / "vocab_report.json").read_text())
    assert vocab["vocab_size_after"] > vocab["vocab_size_before"]


def test_self_instruct_stage_generates_with_the_previous_stages_model(tmp_path, base_model_dir):
    from tunelab.pipeline import PipelineConfig, run_pipeline

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"s{i}", "name": f"t{i}", "instruction": f"Name a colour number {i}.",
                                         "instances": [{"input": "", "output": "red"}], "is_classification": False})
                             + "\n" for i in range(4)))
    cfg = PipelineConfig(name="p", out_dir=str(tmp_path / "runs"), base=str(base_model_dir), stages={
        "gen": {"run": "data self-instruct", "seed_tasks": str(seeds), "num": 2, "max_rounds": 1,
                "prompts_per_round": 1, "max_tokens": 16, "prompt_seed_tasks": 2, "prompt_generated_tasks": 0}})
    report = run_pipeline(cfg, log=lambda line: None)
    out = tmp_path / "runs" / "p" / "gen"
    assert report["stages"][0]["status"] == "ran" and (out / "tasks.jsonl").is_file()
    si = json.loads((out / "tasks.report.json").read_text())
    assert si["rounds"] == si["requests"] == 1 and si["status"] == "stopped: max_rounds"  # the base model asked once
    assert json.loads((tmp_path / "runs" / "p" / "state.json").read_text())["stages"]["gen"]["summary"]["path"] \
        == str(out / "tasks.jsonl")
