"""Training you can trust: a run killed at any moment (mid-step or mid-save) resumes to the same losses."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from tunelab.config import FinetuneConfig, PretrainConfig, validate
from tunelab.errors import TunelabError
from tunelab.train.checkpoint import latest_checkpoint
from tunelab.train.events import read_events
from tunelab.train.finetune import run_finetune
from tunelab.train.pretrain import run_pretrain

# Runs a stage in a subprocess that SIGKILLs itself at a chosen moment: after the n-th forward pass
# (mid-step, mid-accumulation) or right after writing the weights of the n-th checkpoint (mid-save).
KILLER = textwrap.dedent("""
    import os, signal, sys
    import tunelab.train.loop as loop, tunelab.train.checkpoint as ckpt
    kind, n = sys.argv[1], int(sys.argv[2])
    count = [0]
    def counted(original):
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapper
    if kind == "forward":
        loop.forward_loss_sum = counted(loop.forward_loss_sum)
    else:
        ckpt.save_file = counted(ckpt.save_file)
    from tunelab.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def finetune_recipe(tmp_path, base_model_dir, chat_file, method="lora", **train):
    return {"name": "run", "out_dir": str(tmp_path), "seed": 3, "model": {"base": str(base_model_dir)},
            "data": {"train": [str(chat_file)], "eval_fraction": 0.1, "max_len": 64},
            "method": {"name": method, "r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG must resume too
            "train": {"steps": 10, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                      "eval_every": 0, "save_every": 3, "log_every": 5, **train}}


def pretrain_recipe(tmp_path, corpus_file, tokenizer_dir, **train):
    return {"name": "run", "out_dir": str(tmp_path), "model": {"preset": "micro", "tokenizer": str(tokenizer_dir)},
            "data": {"sources": [{"path": str(corpus_file)}], "seq_len": 32},
            "train": {"steps": 10, "micro_batch_size": 2, "grad_accum": 2, "warmup_steps": 2, "eval_every": 0,
                      "save_every": 3, "log_every": 5, **train}}


def step_losses(run_dir: Path) -> dict[int, float]:
    """Per-step losses of a run's events; a step replayed after a resume keeps its last value."""
    return {e["step"]: e["loss"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "step"}


def kill_then_resume(tmp_path, recipe: dict, stage: str, kind: str, n: int) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", KILLER, kind, str(n), stage, str(path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # it really died by SIGKILL
    run_dir = tmp_path / "run"
    assert not (run_dir / "summary.json").exists()
    proc = subprocess.run([sys.executable, "-m", "tunelab", stage, str(path), "--resume"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stderr
    return run_dir


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_killed_mid_step_resumes_to_the_uninterrupted_losses(tmp_path, base_model_dir, chat_file, method):
    reference = run_finetune(validate(FinetuneConfig, finetune_recipe(tmp_path / "ref", base_model_dir, chat_file,
                                                                      method)), device="cpu")
    want = step_losses(Path(reference["run_dir"]))
    # 3 evaluation passes (12 held-out chats), then 2 forward passes a step: the 18th is the first of step 8,
    # after the checkpoint of step 6
    run_dir = kill_then_resume(tmp_path / "crash", finetune_recipe(tmp_path / "crash", base_model_dir, chat_file,
                                                                   method), "finetune", "forward", 18)
    got = step_losses(run_dir)
    assert sorted(got) == list(range(1, 11))
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6
    resumed = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert [e["step"] for e in resumed] == [6]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == 6 and summary["train_loss_last"] == pytest.approx(want[10], abs=1e-6)


def test_pretrain_killed_mid_save_resumes_from_the_last_complete_checkpoint(tmp_path, corpus_file, tokenizer_dir):
    reference = run_pretrain(validate(PretrainConfig, pretrain_recipe(tmp_path / "ref", corpus_file, tokenizer_dir)),
                             device="cpu")
    want = step_losses(Path(reference["run_dir"]))
    # killed right after writing the weights of the 2nd checkpoint (step 6): step 3 is the last complete one
    run_dir = kill_then_resume(tmp_path / "crash", pretrain_recipe(tmp_path / "crash", corpus_file, tokenizer_dir),
                               "pretrain", "save", 2)
    resumed = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert [e["step"] for e in resumed] == [3]
    got = step_losses(run_dir)
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6
    assert not list((run_dir / "checkpoints").glob(".step-*"))  # the half-written save was cleaned up


def test_checkpoints_hold_the_adapter_only_and_keep_the_last_k(tmp_path, base_model_dir, chat_file):
    recipe = finetune_recipe(tmp_path, base_model_dir, chat_file, save_every=2, keep_checkpoints=2)
    run_finetune(validate(FinetuneConfig, recipe), device="cpu")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000008", "step-000010"]
    assert latest_checkpoint(tmp_path / "run") == ckpts / "step-000010"
    latest = ckpts / "step-000010"
    assert {p.name for p in latest.iterdir()} == {"trainable.safetensors", "optimizer.pt", "rng-rank0.pt",
                                                  "state.json"}
    with safe_open(latest / "trainable.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)  # no frozen base weight
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == 10 and len(state["losses"]) == 10
    assert set(state["versions"]) >= {"torch", "transformers", "tunelab"}
    assert list(state["data"]) == [str(chat_file)] and len(state["data"][str(chat_file)]) == 64
    assert state["data_position"] == {"step": 10, "examples_seen": 80, "epoch": 0, "offset": 80,
                                      "order": "numpy default_rng([seed=3, epoch]).permutation(108)"}


def test_resume_refuses_a_changed_recipe_or_data_unless_forced(tmp_path, base_model_dir, chat_file):
    data = tmp_path / "chats.jsonl"
    data.write_text(chat_file.read_text())
    recipe = finetune_recipe(tmp_path, base_model_dir, data, steps=4, save_every=2)
    run_finetune(validate(FinetuneConfig, recipe), device="cpu")
    changed = finetune_recipe(tmp_path, base_model_dir, data, steps=6, save_every=2, lr=1e-3, resume=True)
    with pytest.raises(TunelabError, match=r"train\.lr: 0\.003 -> 0\.001.*train\.steps: 4 -> 6"):
        run_finetune(validate(FinetuneConfig, changed), device="cpu")
    data.write_text(chat_file.read_text().replace("red", "pink"))
    same = finetune_recipe(tmp_path, base_model_dir, data, steps=4, save_every=2, resume=True)
    with pytest.raises(TunelabError, match=r"data file .*chats\.jsonl changed"):
        run_finetune(validate(FinetuneConfig, same), device="cpu")
    forced = finetune_recipe(tmp_path, base_model_dir, data, steps=6, save_every=2, lr=1e-3, resume=True,
                             resume_force=True)
    assert run_finetune(validate(FinetuneConfig, forced), device="cpu")["resumed_from_step"] == 4


def test_resume_without_a_checkpoint_is_a_clear_error_and_auto_starts_fresh(tmp_path, base_model_dir, chat_file):
    with pytest.raises(TunelabError, match="no complete checkpoint"):
        run_finetune(validate(FinetuneConfig, finetune_recipe(tmp_path, base_model_dir, chat_file, steps=2,
                                                              resume=True)), device="cpu")
    auto = run_finetune(validate(FinetuneConfig, finetune_recipe(tmp_path, base_model_dir, chat_file, steps=2,
                                                                 resume="auto")), device="cpu")
    assert auto["resumed_from_step"] is None


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_resuming_a_finished_run_keeps_its_final_eval_wall_time_and_peak_memory(tmp_path, stage, corpus_file,
                                                                                 tokenizer_dir, base_model_dir,
                                                                                 chat_file):
    if stage == "pretrain":
        kind, run = PretrainConfig, run_pretrain
        recipe = pretrain_recipe(tmp_path, corpus_file, tokenizer_dir, steps=4, save_every=0)
        recipe["data"]["eval_fraction"] = 0.1
    else:
        kind, run = FinetuneConfig, run_finetune
        recipe = finetune_recipe(tmp_path, base_model_dir, chat_file, steps=4, save_every=0)
    first = run(validate(kind, recipe), device="cpu")
    assert first["eval_after"] and first["total_wall_s"] > 0
    # the run that wrote the checkpoint ran long and high (another process): the resume must count it
    state_file = latest_checkpoint(tmp_path / "run") / "state.json"
    state = json.loads(state_file.read_text())
    assert state["evals"][-1]["step"] == 4
    state.update(total_wall_s=1000.0, peak_memory_mb=1e6)
    state_file.write_text(json.dumps(state))
    again = run(validate(kind, {**recipe, "train": {**recipe["train"], "resume": True}}), device="cpu")
    assert again["resumed_from_step"] == 4
    assert again["eval_after"] == first["eval_after"]  # carried over from the checkpoint
    assert again["train_wall_s"] == first["train_wall_s"]
    assert 1000.0 <= again["total_wall_s"] < 1000.0 + 120
    assert again["peak_memory_mb"] == 1e6
    assert "step 4" in again["resume_note"]
    # a checkpoint without the evaluations (written before they were recorded): the final eval runs again
    del state["evals"]
    state_file.write_text(json.dumps(state))
    third = run(validate(kind, {**recipe, "train": {**recipe["train"], "resume": True}}), device="cpu")
    assert third["eval_after"]["eval_loss"] == pytest.approx(first["eval_after"]["eval_loss"], rel=1e-6)
