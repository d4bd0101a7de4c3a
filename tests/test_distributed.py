"""torchrun with 2 CPU processes (gloo): the same losses as one process at the same global batch, one set of
checkpoints, and resume under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.config import FinetuneConfig, validate
from tunelab.train.events import read_events
from tunelab.train.finetune import run_finetune


def recipe(out_dir, base_model_dir, chat_file, **train):
    return {"name": "run", "out_dir": str(out_dir), "seed": 1, "model": {"base": str(base_model_dir)},
            "data": {"train": [str(chat_file)], "eval_fraction": 0.1, "max_len": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"steps": 6, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                      "eval_every": 3, "save_every": 2, "keep_checkpoints": 3, "log_every": 1, **train}}


def torchrun(tmp_path, raw: dict, *flags):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tunelab", "finetune", str(path), *flags], capture_output=True, text=True,
                          timeout=600, env=env)


def step_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "step"}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, base_model_dir, chat_file):
    tmp = tmp_path_factory.mktemp("ddp")
    proc = torchrun(tmp, recipe(tmp, base_model_dir, chat_file))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", proc


def test_two_processes_match_one_at_the_same_global_batch(tmp_path, base_model_dir, chat_file, two_process_run):
    run_dir, proc = two_process_run
    single = run_finetune(validate(FinetuneConfig, recipe(tmp_path, base_model_dir, chat_file)), device="cpu")
    want, got = step_losses(Path(single["run_dir"])), step_losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-5
    start = read_events(run_dir / "events.jsonl")[0]
    assert start["event"] == "start" and start["world_size"] == 2
    assert "on 2 processes" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_after"]["eval_loss"] == pytest.approx(single["eval_after"]["eval_loss"], abs=1e-5)


def test_checkpoints_are_written_once_with_each_process_random_state(two_process_run):
    run_dir, _ = two_process_run
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-000002", "step-000004", "step-000006"]
    files = {p.name for p in (run_dir / "checkpoints" / "step-000006").iterdir()}
    assert files == {"trainable.safetensors", "optimizer.pt", "rng-rank0.pt", "rng-rank1.pt", "state.json"}
    # one process writes the events: each step is logged once
    steps = [e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "step"]
    assert steps == list(range(1, 7))


def test_resume_under_torchrun_continues_the_run(tmp_path, base_model_dir, chat_file, two_process_run):
    run_dir, _ = two_process_run
    want = step_losses(run_dir)
    crashed = tmp_path / "run"  # a copy of the run as if it had died after the checkpoint of step 4
    subprocess.run(["cp", "-r", str(run_dir), str(crashed)], check=True)
    subprocess.run(["rm", "-r", str(crashed / "checkpoints" / "step-000006"), str(crashed / "summary.json")],
                   check=True)
    (crashed / "checkpoints" / "latest").write_text("step-000004\n")
    proc = torchrun(tmp_path, recipe(tmp_path, base_model_dir, chat_file), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = step_losses(crashed)
    assert max(abs(got[s] - want[s]) for s in (5, 6)) <= 1e-6
    assert [e["step"] for e in read_events(crashed / "events.jsonl") if e["event"] == "resume"] == [4]
