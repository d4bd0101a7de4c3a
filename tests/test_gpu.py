"""On a CUDA GPU (skipped where there is none, as in CI): every method trains in bf16 and its result generates on
the GPU; fp32 on the GPU matches the CPU; resume is exact; torchrun runs on NCCL, replicated and sharded; the
evaluation suite runs there.

`TUNELAB_TEST_DEVICE=cpu pytest tests/test_gpu.py` runs the same checks on the CPU (fp32, gloo): a dry run of
this file for a machine without a GPU.
"""

import json
import math
import os

import pytest
import torch
from test_distributed import crash_after, step_losses, torchrun  # torchrun: NCCL on a GPU, gloo on the CPU

from tunelab.cli import main
from tunelab.config import FinetuneConfig, validate
from tunelab.serve.generate import complete, load_tuned
from tunelab.train.finetune import run_finetune

DEVICE = os.environ.get("TUNELAB_TEST_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA device")

METHODS = {  # method section and learning rate (the rates the bake-off uses for the slow learners)
    "lora": ({"r": 4, "alpha": 8}, 3e-3),
    "dora": ({"r": 4, "alpha": 8}, 3e-3),
    "lora-dash": ({"r": 4, "alpha": 8, "dash_steps": 3, "dash_directions": 2}, 3e-3),
    "adapter": ({}, 6e-2),
    "qtha": ({}, 1e-2),
    "full": ({}, 1e-3),
}


def recipe(out_dir, base_model_dir, chat_file, method="lora", precision="auto", lr=3e-3, **train):
    section, _ = METHODS[method]
    return {"name": "run", "out_dir": str(out_dir), "seed": 1, "model": {"base": str(base_model_dir)},
            "data": {"train": [str(chat_file)], "eval_fraction": 0.1, "max_len": 64},
            "method": {"name": method, "dropout": 0.0, **section} if method in ("lora", "dora", "lora-dash")
            else {"name": method, **section},
            "train": {"steps": 6, "micro_batch_size": 4, "grad_accum": 2, "lr": lr, "warmup_steps": 1,
                      "eval_every": 3, "save_every": 2, "keep_checkpoints": 3, "log_every": 1,
                      "grad_clip": 1.0, "precision": precision, **train}}


def finetune(raw: dict) -> dict:
    return run_finetune(validate(FinetuneConfig, raw), device=DEVICE)


def diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) for k in a)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, base_model_dir, chat_file):
    tmp = tmp_path_factory.mktemp("fp32")
    finetune(recipe(tmp, base_model_dir, chat_file, precision="fp32"))
    return tmp / "run"


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_in_bf16_and_its_result_generates(tmp_path, base_model_dir, chat_file, method):
    summary = finetune(recipe(tmp_path, base_model_dir, chat_file, method, lr=METHODS[method][1], steps=8))
    config = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    losses = list(step_losses(tmp_path / "run").values())
    print(method, "losses", [round(x, 4) for x in losses], "eval", summary["eval_before"], summary["eval_after"],
          "peak MB", summary["peak_memory_mb"], "config precision", config.get("train", {}).get("precision"))
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    model, tokenizer, _ = load_tuned(summary["output_dir"], precision="auto")
    p = next(model.parameters())
    if ON_GPU:
        assert p.device.type == "cuda" and p.dtype == torch.bfloat16
    replies = complete(model, tokenizer, ["colour of river?", "colour of stone?"], max_new_tokens=4)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_fp32_matches_the_cpu(tmp_path, base_model_dir, chat_file, fp32_run):
    run_finetune(validate(FinetuneConfig, recipe(tmp_path, base_model_dir, chat_file, precision="fp32")),
                 device="cpu")
    d = diff(step_losses(fp32_run), step_losses(tmp_path / "run"))
    print("fp32 GPU vs CPU: largest per-step loss difference", d)
    assert d <= 1e-4


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_reproduces_the_run(tmp_path, base_model_dir, chat_file, fp32_run, precision):
    if precision == "fp32":
        full = fp32_run
    else:
        finetune(recipe(tmp_path / "full", base_model_dir, chat_file, precision=precision))
        full = tmp_path / "full" / "run"
    crash_after(full, tmp_path / "crashed" / "run")
    finetune(recipe(tmp_path / "crashed", base_model_dir, chat_file, precision=precision, resume=True))
    d = diff(step_losses(full), step_losses(tmp_path / "crashed" / "run"))
    print(precision, "resume: largest per-step loss difference", d)
    assert d <= 1e-6


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_matches_one_process_and_resumes(tmp_path, base_model_dir, chat_file, fp32_run, mode):
    proc = torchrun(tmp_path, recipe(tmp_path, base_model_dir, chat_file, precision="fp32", distributed=mode),
                    nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = diff(step_losses(fp32_run), step_losses(tmp_path / "run"))
    print(mode, "fp32, torchrun vs one process: largest per-step loss difference", d)
    assert d <= 1e-5
    bf16 = tmp_path / "bf16"
    proc = torchrun(bf16, recipe(bf16, base_model_dir, chat_file, distributed=mode), nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    crash_after(bf16 / "run", tmp_path / "crashed" / "run")
    proc = torchrun(tmp_path / "crashed", recipe(tmp_path / "crashed", base_model_dir, chat_file, distributed=mode),
                    "--resume", nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = diff(step_losses(bf16 / "run"), step_losses(tmp_path / "crashed" / "run"))
    print(mode, "auto precision, torchrun resume: largest per-step loss difference", d)
    assert d <= 1e-6


def test_the_evaluation_suite_runs_on_the_gpu(tmp_path, base_model_dir, fp32_run):
    text = tmp_path / "text.txt"
    text.write_text("river stone lantern baker\n\n山河湖海城村花草\n\ncopper violet orchard.\n", encoding="utf-8")
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"instruction": f"colour of {w}?", "output": "red"}) + "\n"
                           for w in ("river", "stone")), encoding="utf-8")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""
name: gpu
out_dir: {tmp_path}
tasks:
  - {{type: perplexity, path: {text}, max_length: 16}}
  - {{type: generation, name: gen, path: {gen}, max_new_tokens: 3}}
""", encoding="utf-8")
    assert main(["eval", str(suite), "--models", f"base={base_model_dir},tuned={fp32_run / 'adapter'}"]) == 0
    results = json.loads((tmp_path / "gpu" / "results.json").read_text(encoding="utf-8"))
    assert results["device"] == ("cuda bfloat16" if ON_GPU else "cpu float32")
    assert all(math.isfinite(e["tasks"]["perplexity"]["metrics"]["ppl"]) for e in results["models"])
