"""torchrun with 2 CPU processes (gloo), replicated (ddp) and sharded (FSDP2): the same losses as one process at
the same global batch, one set of checkpoints in one format, and resume under torchrun (LoRA-Dash's switch
included)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunelab.config import FinetuneConfig, PretrainConfig, validate
from tunelab.errors import ConfigError
from tunelab.train.distributed import check_fsdp
from tunelab.train.events import read_events
from tunelab.train.finetune import run_finetune
from tunelab.train.pretrain import run_pretrain


def recipe(out_dir, base_model_dir, chat_file, **train):
    return {"name": "run", "out_dir": str(out_dir), "seed": 1, "model": {"base": str(base_model_dir)},
            "data": {"train": [str(chat_file)], "eval_fraction": 0.1, "max_len": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"steps": 6, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                      "eval_every": 3, "save_every": 2, "keep_checkpoints": 3, "log_every": 1,
                      "grad_clip": 0.8, **train}}  # clips some steps (grad norms 0.7 to 0.9), not all


def pretrain_recipe(out_dir, corpus_file, tokenizer_dir, **train):
    return {"name": "run", "out_dir": str(out_dir), "seed": 2,
            "model": {"preset": "micro", "tokenizer": str(tokenizer_dir)},  # tied head: embedding = output head
            "data": {"sources": [{"path": str(corpus_file)}], "seq_len": 32},
            "train": {"steps": 4, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1,
                      "eval_every": 2, "save_every": 2, "log_every": 1, **train}}


def torchrun(tmp_path, raw: dict, *flags, stage="finetune", nproc=2):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "tunelab", stage, str(path), *flags], capture_output=True, text=True,
                          timeout=600, env=env)


def step_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "step"}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def crash_after(run_dir: Path, crashed: Path, step: int = 4) -> None:
    """A copy of a 6-step run (checkpoints 2, 4, 6) as if it had died after the checkpoint of `step`."""
    crashed.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-r", str(run_dir), str(crashed)], check=True)
    later = [str(crashed / "checkpoints" / f"step-{s:06d}") for s in range(step + 2, 7, 2)]
    subprocess.run(["rm", "-r", *later, str(crashed / "summary.json")], check=True)
    (crashed / "checkpoints" / "latest").write_text(f"step-{step:06d}\n")


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, base_model_dir, chat_file):
    tmp = tmp_path_factory.mktemp("single")
    return run_finetune(validate(FinetuneConfig, recipe(tmp, base_model_dir, chat_file)), device="cpu")


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_process_run(request, tmp_path_factory, base_model_dir, chat_file):
    tmp = tmp_path_factory.mktemp(request.param)
    proc = torchrun(tmp, recipe(tmp, base_model_dir, chat_file, distributed=request.param))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", proc, request.param


def test_two_processes_match_one_at_the_same_global_batch(one_process_run, two_process_run):
    run_dir, proc, mode = two_process_run
    single_dir = Path(one_process_run["run_dir"])
    want, got = step_losses(single_dir), step_losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-5
    grad_norms = [e["grad_norm"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "step"]
    assert min(grad_norms) < 0.8 < max(grad_norms)  # clipping too is the same over sharded gradients
    start = read_events(run_dir / "events.jsonl")[0]
    assert start["event"] == "start" and start["world_size"] == 2
    shown = " ".join(proc.stderr.split())  # the terminal view wraps lines
    assert "on 2 processes" in shown
    assert ("parameters sharded (FSDP)" in shown) == (mode == "fsdp")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_after"]["eval_loss"] == pytest.approx(one_process_run["eval_after"]["eval_loss"], abs=1e-5)
    # the adapter is written from full tensors (FSDP gathers its shards first): the one-process adapter
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert max_diff(adapter, load_file(single_dir / "adapter" / "adapter_model.safetensors")) <= 1e-5


def test_checkpoints_are_written_once_in_the_one_process_format(one_process_run, two_process_run):
    run_dir, _, _ = two_process_run
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-000002", "step-000004", "step-000006"]
    last = run_dir / "checkpoints" / "step-000006"
    assert {p.name for p in last.iterdir()} == {"trainable.safetensors", "optimizer.pt", "rng-rank0.pt",
                                                "rng-rank1.pt", "state.json"}
    single = Path(one_process_run["run_dir"]) / "checkpoints" / "step-000006"
    assert max_diff(load_file(last / "trainable.safetensors"), load_file(single / "trainable.safetensors")) <= 1e-5
    got, want = (torch.load(d / "optimizer.pt", weights_only=False) for d in (last, single))
    assert got["param_groups"] == want["param_groups"] and got["state"].keys() == want["state"].keys()
    for i, state in want["state"].items():  # full (unsharded) plain tensors, as one process writes them
        assert {k: type(v) for k, v in got["state"][i].items()} == {k: type(v) for k, v in state.items()}
        assert max_diff(got["state"][i], state) <= 1e-5
    # one process writes the events: each step is logged once
    steps = [e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "step"]
    assert steps == list(range(1, 7))


def test_resume_under_torchrun_continues_the_run(tmp_path, base_model_dir, chat_file, two_process_run):
    run_dir, _, mode = two_process_run
    want = step_losses(run_dir)
    crashed = tmp_path / "run"
    crash_after(run_dir, crashed)
    proc = torchrun(tmp_path, recipe(tmp_path, base_model_dir, chat_file, distributed=mode), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = step_losses(crashed)
    assert max(abs(got[s] - want[s]) for s in (5, 6)) <= 1e-6
    assert [e["step"] for e in read_events(crashed / "events.jsonl") if e["event"] == "resume"] == [4]
    adapter = "adapter/adapter_model.safetensors"
    assert max_diff(load_file(crashed / adapter), load_file(run_dir / adapter)) <= 1e-6


@pytest.mark.parametrize("two_process_run", ["ddp"], indirect=True)
def test_a_replicated_run_resumes_sharded(tmp_path, base_model_dir, chat_file, two_process_run):
    """The checkpoint format does not depend on train.distributed: a ddp run continues under FSDP."""
    run_dir, _, _ = two_process_run
    want = step_losses(run_dir)
    crashed = tmp_path / "run"
    crash_after(run_dir, crashed)
    proc = torchrun(tmp_path, recipe(tmp_path, base_model_dir, chat_file, distributed="fsdp"), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = step_losses(crashed)
    assert max(abs(got[s] - want[s]) for s in (5, 6)) <= 1e-5


def test_fsdp_pretraining_of_a_tied_model_matches_one_process(tmp_path, corpus_file, tokenizer_dir):
    """Every weight trains, sharded, including the embedding the head shares; the saved model is whole."""
    single = run_pretrain(validate(PretrainConfig, pretrain_recipe(tmp_path / "one", corpus_file, tokenizer_dir)),
                          device="cpu")
    proc = torchrun(tmp_path, pretrain_recipe(tmp_path / "two", corpus_file, tokenizer_dir, distributed="fsdp"),
                    stage="pretrain")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = step_losses(Path(single["run_dir"])), step_losses(tmp_path / "two" / "run")
    assert sorted(got) == [1, 2, 3, 4]
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-5
    model = load_file(tmp_path / "two" / "run" / "model" / "model.safetensors")
    assert max_diff(model, load_file(Path(single["model_dir"]) / "model.safetensors")) <= 1e-5
    trainable = load_file(tmp_path / "two" / "run" / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert "model.embed_tokens.weight" in trainable and "lm_head.weight" not in trainable  # tied: saved once


def test_fsdp_refuses_unsupported_devices():
    with pytest.raises(ConfigError, match=r"device 'meta' is not supported .* train\.distributed=ddp"):
        check_fsdp("meta")
    check_fsdp("cpu")


# --- LoRA-Dash under FSDP: its switch gathers each frozen weight for the SVD ---------------------------------------


def dash_recipe(out_dir, base_model_dir, chat_file, **train):
    """`recipe` with LoRA-Dash switching after step 3 of 6: checkpoint 2 comes before the switch, 4 and 6 after."""
    raw = recipe(out_dir, base_model_dir, chat_file, **train)
    raw["method"].update(name="lora-dash", dash_steps=3, dash_directions=3)
    return raw


@pytest.fixture(scope="module")
def dash_runs(tmp_path_factory, base_model_dir, chat_file):
    """(one process, two FSDP processes) run directories of the same LoRA-Dash recipe."""
    one = run_finetune(validate(FinetuneConfig, dash_recipe(tmp_path_factory.mktemp("dash-one"), base_model_dir,
                                                            chat_file)), device="cpu")
    tmp = tmp_path_factory.mktemp("dash-fsdp")
    proc = torchrun(tmp, dash_recipe(tmp, base_model_dir, chat_file, distributed="fsdp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(one["run_dir"]), tmp / "run"


def test_fsdp_lora_dash_matches_one_process_across_the_switch(dash_runs):
    single_dir, run_dir = dash_runs
    want, got = step_losses(single_dir), step_losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    # steps 5 and 6 train δ along the directions: a process that chose others would move the summed loss
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-5
    switches = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "lora_dash_switch"]
    assert [(e["step"], e["layers"], e["directions"]) for e in switches] == [(3, 14, 42)]  # logged once
    # every checkpoint, before and after the switch, is the one-process file: A, B, U_s, Vh_s, δ, switch step
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (single_dir / "checkpoints").iterdir())
    assert names == ["latest", "step-000002", "step-000004", "step-000006"]
    for name in names[1:]:
        sd = load_file(run_dir / "checkpoints" / name / "trainable.safetensors")
        assert max_diff(sd, load_file(single_dir / "checkpoints" / name / "trainable.safetensors")) <= 1e-5
        assert sd["lora_dash.switch_step"].tolist() == [0 if name == "step-000002" else 3]
    assert max(v.abs().max().item() for k, v in sd.items() if k.endswith("dash_delta")) > 1e-4  # δ trained
    got_opt, want_opt = (torch.load(d / "checkpoints" / "step-000006" / "optimizer.pt", weights_only=False)
                         for d in (run_dir, single_dir))
    assert got_opt["state"].keys() == want_opt["state"].keys()  # δ's moments included, gathered
    assert max(max_diff(got_opt["state"][i], s) for i, s in want_opt["state"].items()) <= 1e-5
    adapter = "adapter/adapter_model.safetensors"  # the rank-(r+s) PEFT LoRA
    assert max_diff(load_file(run_dir / adapter), load_file(single_dir / adapter)) <= 1e-5


@pytest.mark.parametrize("crash_step", [2, 4])
def test_fsdp_lora_dash_resumes_before_and_after_the_switch(tmp_path, base_model_dir, chat_file, dash_runs,
                                                             crash_step):
    """From step 2 the resumed run makes the switch itself; from step 4 it restores the chosen directions."""
    _, run_dir = dash_runs
    want = step_losses(run_dir)
    crashed = tmp_path / "run"
    crash_after(run_dir, crashed, crash_step)
    proc = torchrun(tmp_path, dash_recipe(tmp_path, base_model_dir, chat_file, distributed="fsdp"), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_events(crashed / "events.jsonl")
    resumed = events[max(i for i, e in enumerate(events) if e["event"] == "resume"):]  # what the resume wrote
    assert resumed[0]["step"] == crash_step
    assert [e["step"] for e in resumed if e["event"] == "lora_dash_switch"] == ([3] if crash_step < 3 else [])
    got = {e["step"]: e["loss"] for e in resumed if e["event"] == "step"}
    assert sorted(got) == list(range(crash_step + 1, 7))
    assert max(abs(got[s] - want[s]) for s in got) <= 1e-6
    adapter = "adapter/adapter_model.safetensors"
    assert max_diff(load_file(crashed / adapter), load_file(run_dir / adapter)) <= 1e-6
