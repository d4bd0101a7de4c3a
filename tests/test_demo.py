import json

from tunelab.cli import main


def test_demo_runs_end_to_end_at_small_scale(tmp_path, capsys):
    code = main(["demo", f"out_dir={tmp_path}", "name=d", "data_scale=0.05", "preset=micro", "seq_len=64",
                 "samples=3", "sample_tokens=4", "train.steps=12", "train.micro_batch_size=4",
                 "train.eval_every=6", "train.eval_batches=2", "finetune.steps=6", "finetune.micro_batch_size=4",
                 "finetune.eval_every=0", "answer_tokens=4"])
    assert code == 0
    run = tmp_path / "d"
    summary = json.loads((run / "summary.json").read_text())
    pre = summary["pretrain"]
    assert pre["eval_after"]["eval_ppl"] < pre["eval_before"]["eval_ppl"]
    assert [s["path"].rsplit("/", 1)[-1] for s in pre["sources"]] == ["world_en.jsonl", "world_zh.jsonl"]
    assert len(summary["samples"]) == 3 and all({"prompt", "expected", "before", "after"} <= set(s)
                                                for s in summary["samples"])
    for d in ("data/pretrain", "data/instructions", "data/choice/dev", "tokenizer", "pretrain/model",
              "finetune/adapter"):
        assert (run / d).is_dir(), d
    acc = summary["task_accuracy"]
    n_tests = len((run / "data/instructions/test.jsonl").read_text().splitlines())
    assert acc["examples"] == n_tests and set(acc["after"]["per_task"]) == {"fact", "string", "arithmetic"}
    assert 0 <= acc["before"]["accuracy"] <= 1 and summary["finetune"]["method"] == "lora"
    assert {a["task"] for a in summary["answers"]} == {"fact", "string", "arithmetic"}
    out = capsys.readouterr().out
    assert "eval perplexity" in out and "sample completions" in out and "strict accuracy" in out
    # the before/after report: base vs base + adapter on one suite
    assert (run / "eval/report.html").is_file() and (run / "eval/recipe.yaml").is_file()
    results = json.loads((run / "eval/results.json").read_text())
    assert [m["label"] for m in results["models"]] == ["base", "tuned"] and results["models"][1]["adapter"]
    assert {r["task"] for r in summary["eval"]["comparison"]} == {"world_text", "world_choice", "instructions"}
    tuned_gen = results["models"][1]["tasks"]["instructions"]["metrics"]
    assert tuned_gen["accuracy"] == acc["after"]["accuracy"] and "delta vs base" in out
