"""Sharded (torch.distributed.checkpoint) and asynchronous checkpoints: the same losses and exact resume as full
ones, a SIGKILL during a background write leaves the last complete checkpoint, every process writes its own
shards, a checkpoint of 2 processes resumes on 1 and one of 1 on 2 with the data where it was, and
`tunelab checkpoint export` turns one into the directories transformers and PEFT load."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunelab.cli import main
from tunelab.config import FinetuneConfig, PretrainConfig, validate
from tunelab.errors import ConfigError
from tunelab.train.events import read_events
from tunelab.train.finetune import run_finetune
from tunelab.train.pretrain import run_pretrain

# Runs a stage in a subprocess that SIGKILLs itself in the middle of the n-th async save's background write: the
# writer thread waits until the training loop has run 3 more forward passes (the loop goes on while it writes),
# writes one item, and kills the process.
KILLER = textwrap.dedent("""
    import os, signal, sys, threading, time
    import tunelab.train.loop as loop
    import torch.distributed.checkpoint.filesystem as fs
    n = int(sys.argv[1])
    forwards, writes = [0], [0]
    original_forward, original_write = loop.forward_loss_sum, fs._FileSystemWriter.write_data
    original_item = fs._write_item
    def forward(*args, **kwargs):
        forwards[0] += 1
        return original_forward(*args, **kwargs)
    def write_data(self, plan, planner):
        writes[0] += 1
        if writes[0] == n:
            assert threading.current_thread() is not threading.main_thread()
            seen, t0 = forwards[0], time.time()
            while forwards[0] < seen + 3 and time.time() - t0 < 30:
                time.sleep(0.01)
            def item(*args, **kwargs):
                out = original_item(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
                return out
            fs._write_item = item
        return original_write(self, plan, planner)
    loop.forward_loss_sum = forward
    fs._FileSystemWriter.write_data = write_data
    from tunelab.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def recipe(out_dir, base_model_dir, chat_file, dropout=0.0, **train):
    return {"name": "run", "out_dir": str(out_dir), "seed": 1, "model": {"base": str(base_model_dir)},
            "data": {"train": [str(chat_file)], "eval_fraction": 0.1, "max_len": 64, "chat_template": "plain"},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": dropout},
            "train": {"steps": 6, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                      "eval_every": 0, "save_every": 2, "keep_checkpoints": 3, "log_every": 1,
                      "checkpoint_format": "sharded", **train}}


def write_recipe(tmp_path, raw: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def torchrun(tmp_path, raw: dict, *flags, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "tunelab", "finetune", str(write_recipe(tmp_path, raw)), *flags],
                          capture_output=True, text=True, timeout=600, env=env)


def step_events(run_dir: Path) -> dict[int, dict]:
    """Step events by step; a step replayed after a resume keeps its last record."""
    return {e["step"]: e for e in read_events(run_dir / "events.jsonl") if e["event"] == "step"}


def step_losses(run_dir: Path) -> dict[int, float]:
    return {s: e["loss"] for s, e in step_events(run_dir).items()}


def resumed_at(run_dir: Path) -> list[int]:
    return [e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "resume"]


def crash_after(run_dir: Path, crashed: Path, step: int) -> None:
    """A copy of a 6-step run (checkpoints 2, 4, 6) as if it had died after the checkpoint of `step`."""
    shutil.copytree(run_dir, crashed)
    for s in range(step + 2, 7, 2):
        shutil.rmtree(crashed / "checkpoints" / f"step-{s:06d}")
    (crashed / "summary.json").unlink()
    (crashed / "checkpoints" / "latest").write_text(f"step-{step:06d}\n")


def shard_files(checkpoint: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (checkpoint / "dcp").glob("*.distcp")}


def error_line(capsys) -> str:
    """The one `error:` line the CLI printed (warnings aside), with no traceback."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory, base_model_dir, chat_file):
    """One process, sync sharded checkpoints at steps 2, 4, 6 (no dropout: comparable with 2 processes)."""
    tmp = tmp_path_factory.mktemp("single")
    run_finetune(validate(FinetuneConfig, recipe(tmp, base_model_dir, chat_file)), device="cpu")
    return tmp / "run"


def test_sharded_checkpoints_hold_dcp_shards_and_the_run_state(single, chat_file):
    ckpts = single / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002", "step-000004", "step-000006"]
    last = ckpts / "step-000006"
    assert {p.name for p in last.iterdir()} == {"dcp", "rng-rank0.pt", "state.json"}
    assert {p.name for p in (last / "dcp").iterdir()} == {".metadata", "__0_0.distcp"}
    state = json.loads((last / "state.json").read_text())
    assert state["format"] == "sharded" and state["world_size"] == 1 and len(state["losses"]) == 6
    assert state["data_position"]["examples_seen"] == 48
    # the adapter written at the end is the checkpoint's, exported: PEFT's file, the same tensors
    from tunelab.train.checkpoint_export import export_checkpoint

    report = export_checkpoint(single, single.parent / "exported")
    assert report["kind"] == "adapter" and report["step"] == 6 and report["format"] == "sharded"
    name = "adapter_model.safetensors"
    assert max_diff(load_file(single.parent / "exported" / name), load_file(single / "adapter" / name)) == 0.0


def test_sharded_resume_is_exact_and_refuses_a_changed_recipe(tmp_path, single, base_model_dir, chat_file, capsys):
    want = step_losses(single)
    crashed = tmp_path / "run"
    crash_after(single, crashed, 2)
    raw = recipe(tmp_path, base_model_dir, chat_file, resume=True)
    path = write_recipe(tmp_path, raw)
    # an incompatible recipe: one line, exit 2; forced, the shapes do not fit: one line, exit 2
    for extra, fragment in ((["method.r=8"], "method.r: 4 -> 8"),
                            (["method.r=8", "--force-resume"], "does not fit this model and method")):
        assert main(["finetune", str(path), *extra]) == 2
        assert fragment in error_line(capsys)
    # async and format are free to change on resume: the checkpoint is read as it was written
    raw["train"]["checkpoint"] = "async"
    run_finetune(validate(FinetuneConfig, raw), device="cpu")
    got = step_losses(crashed)
    assert resumed_at(crashed) == [2]
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6
    adapter = "adapter/adapter_model.safetensors"
    assert max_diff(load_file(crashed / adapter), load_file(single / adapter)) <= 1e-6


def test_async_save_killed_in_its_background_write_resumes_from_the_last_complete_one(tmp_path, base_model_dir,
                                                                                       chat_file):
    # dropout: the random states resume too; LoRA-Dash switching after step 3: the checkpoint of step 2 holds no
    # optimizer state for its directions, and the resumed run must give them none either
    raw = recipe(tmp_path / "ref", base_model_dir, chat_file, dropout=0.1)
    raw["method"].update(name="lora-dash", dash_steps=3, dash_directions=2)
    reference = run_finetune(validate(FinetuneConfig, raw), device="cpu")
    want = step_losses(Path(reference["run_dir"]))
    raw = {**raw, "out_dir": str(tmp_path), "train": {**raw["train"], "checkpoint": "async"}}
    path = write_recipe(tmp_path, raw)
    proc = subprocess.run([sys.executable, "-c", KILLER, "2", "finetune", str(path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # killed while writing the checkpoint of step 4
    run_dir = tmp_path / "run"
    assert step_events(run_dir).keys() >= {5}  # the loop trained on while the checkpoint was being written
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")] == [".step-000004.tmp"]
    run_finetune(validate(FinetuneConfig, {**raw, "train": {**raw["train"], "resume": True}}), device="cpu")
    assert resumed_at(run_dir) == [2]
    got = step_losses(run_dir)
    assert sorted(got) == list(range(1, 7)) and max(abs(got[s] - want[s]) for s in want) <= 1e-6
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000004",
                                                                          "step-000006"]


def test_async_needs_sharded():
    with pytest.raises(ConfigError, match="checkpoint_format=sharded"):
        validate(FinetuneConfig, {"model": {"base": "m"}, "data": {"train": ["x"]}, "train": {"checkpoint": "async"}})


# --- another number of processes: 2 -> 1 and 1 -> 2 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_fsdp(tmp_path_factory, base_model_dir, chat_file):
    """2 FSDP processes under torchrun, async sharded checkpoints at steps 2, 4, 6."""
    tmp = tmp_path_factory.mktemp("fsdp")
    proc = torchrun(tmp, recipe(tmp, base_model_dir, chat_file, distributed="fsdp", checkpoint="async"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def test_two_processes_write_their_own_shards_and_resume_on_one(tmp_path, two_fsdp, single, base_model_dir,
                                                                 chat_file):
    want = step_events(single)
    got = step_events(two_fsdp)
    assert max(abs(got[s]["loss"] - want[s]["loss"]) for s in want) <= 1e-5
    for step in (2, 4, 6):
        files = shard_files(two_fsdp / "checkpoints" / f"step-{step:06d}")
        assert files.keys() == {"__0_0.distcp", "__1_0.distcp"} and min(files.values()) > 10_000  # each its half
    crashed = tmp_path / "run"
    crash_after(two_fsdp, crashed, 4)
    run_finetune(validate(FinetuneConfig, recipe(tmp_path, base_model_dir, chat_file, resume=True)), device="cpu")
    assert resumed_at(crashed) == [4]
    resumed = step_events(crashed)
    # the same examples in steps 5 and 6 (their loss tokens), and the same losses up to the summation order
    assert [resumed[s]["tokens"] for s in (5, 6)] == [want[s]["tokens"] for s in (5, 6)]
    assert max(abs(resumed[s]["loss"] - want[s]["loss"]) for s in (5, 6)) <= 1e-5
    adapter = "adapter/adapter_model.safetensors"
    assert max_diff(load_file(crashed / adapter), load_file(single / adapter)) <= 1e-5


def test_one_process_checkpoint_resumes_on_two(tmp_path, single, base_model_dir, chat_file):
    want = step_events(single)
    crashed = tmp_path / "run"
    crash_after(single, crashed, 2)
    proc = torchrun(tmp_path, recipe(tmp_path, base_model_dir, chat_file, distributed="fsdp", checkpoint="async"),
                    "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed_at(crashed) == [2]
    got = step_events(crashed)
    assert [got[s]["tokens"] for s in range(3, 7)] == [want[s]["tokens"] for s in range(3, 7)]
    assert max(abs(got[s]["loss"] - want[s]["loss"]) for s in range(3, 7)) <= 1e-5
    # the whole tensors one process wrote were cut into FSDP's shards; its later checkpoints are sharded again
    files = shard_files(crashed / "checkpoints" / "step-000006")
    assert files.keys() == {"__0_0.distcp", "__1_0.distcp"} and min(files.values()) > 10_000
    assert json.loads((crashed / "checkpoints" / "step-000006" / "state.json").read_text())["world_size"] == 2


# --- export and bad inputs -------------------------------------------------------------------------------------------


def test_export_of_a_pretraining_checkpoint_is_a_model_transformers_loads(tmp_path, corpus_file, tokenizer_dir,
                                                                          capsys):
    from transformers import AutoModelForCausalLM

    raw = {"name": "run", "out_dir": str(tmp_path), "model": {"preset": "micro", "tokenizer": str(tokenizer_dir)},
           "data": {"sources": [{"path": str(corpus_file)}], "seq_len": 32},
           "train": {"steps": 2, "micro_batch_size": 2, "warmup_steps": 0, "eval_every": 0, "save_every": 0,
                     "checkpoint_format": "sharded", "checkpoint": "async"}}
    run_pretrain(validate(PretrainConfig, raw), device="cpu")
    out = tmp_path / "exported"
    assert main(["checkpoint", "export", str(tmp_path / "run" / "checkpoints" / "step-000002"), "--out", str(out)]) == 0
    assert "-> model" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(out)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "run/model/config.json").read_text())
    assert max_diff(exported.state_dict(), trained.state_dict()) == 0.0


def test_export_and_resume_refuse_what_is_not_a_checkpoint(tmp_path, single, base_model_dir, chat_file, capsys):
    def refused(argv, fragment):
        assert main([str(a) for a in argv]) == 2
        assert fragment in error_line(capsys)

    refused(["checkpoint", "export", base_model_dir, "--out", tmp_path / "x"], "not a tunelab checkpoint")
    broken = tmp_path / "broken"
    shutil.copytree(single / "checkpoints" / "step-000002", broken)
    (broken / "dcp" / ".metadata").write_bytes(b"not a pickle")
    refused(["checkpoint", "export", broken, "--out", tmp_path / "x"], "cannot read dcp/.metadata")
    refused(["checkpoint", "export", single, "--out", single / "checkpoints"], "refusing to write")
    # a checkpoint directory from another run (another seed and data) put in this run: refused, named
    other = tmp_path / "run"
    shutil.copytree(single, other)
    path = write_recipe(tmp_path, recipe(tmp_path, base_model_dir, tmp_path / "other.jsonl", resume=True))
    (tmp_path / "other.jsonl").write_text(chat_file.read_text().replace("red", "pink"))
    refused(["finetune", path, "seed=5"], "seed: 1 -> 5")
    assert not (tmp_path / "x").exists()
