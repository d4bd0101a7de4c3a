"""Packed fine-tuning speed and memory: tunelab padded vs tunelab packed vs TRL's SFTTrainer packed, one run.

    .venv/bin/python benchmarks/sft_packing_speed.py                    # the README's run (CPU, ~8 minutes)
    .venv/bin/python benchmarks/sft_packing_speed.py --turns 0 --max-len 4096 --batch 4 --precision bf16  # a GPU

Data: CPsyCounD dialogues (`../shared/data/cpsycound/cpsycound.jsonl`; the demo world's instructions when it is
absent), read and encoded by tunelab (the model's chat template, loss on the assistant turns, cut at `--max-len`).
`--turns N` cuts each dialogue into examples of N consecutive user/assistant exchanges (0: whole dialogues, which
with SmolLM2's tokenizer run 830-2,360 tokens: too long for two busy CPU cores). Every contender gets the same
`--examples` encoded examples (seeded choice) as token ids and loss masks, so all train the same tokens.

Model: `--model` (default: models/smollm2-135m-instruct, else the micro preset on a random tokenizer is refused),
LoRA r=`--rank`, alpha=`--alpha`, no dropout, on every linear layer but the head, in `--precision`.

Contenders, each alone in a fresh subprocess (so its peak memory is its own), one after another:
- tunelab padded: tunelab's loop (`tunelab.train.loop.train`) over `--batch` examples a micro-batch, padded to the
  longest (`data.packing: false`).
- tunelab packed: the same loop over `--batch` rows of `--max-len` tokens packed by best-fit decreasing, positions
  restarting per example, attention per example (`data.packing: true`).
- TRL packed: `trl.SFTTrainer` with `packing=True` (its best-fit-decreasing packing, which turns on its padding-free
  batches: the `--batch` packed sequences are concatenated into one row, position ids restart per example, the
  attention mask follows them), `per_device_train_batch_size=--batch`, the same LoRA through `peft`, the same
  precision, AdamW, lr, clipping, no gradient checkpointing (SFTConfig turns it on by default; tunelab does not use
  it), the pre-tokenized examples with their `assistant_masks`.

Speed: `--warmup` untimed steps, then `--steps` timed ones; the time of a step runs from the end of the step before
to its own end (data, forward, backward, optimizer step). "trained tokens" are the examples' tokens in the step (no
padding); "loss tokens" the positions that carry a loss. tokens/s = the timed steps' tokens / their time, over all
`--rounds` (each round runs every contender once, the order reversed each round; peak memory: the highest round).
Memory: the process's peak resident set (VmHWM, reset after the warm-up step via /proc/self/clear_refs, glibc's mmap
threshold pinned at 64 KiB so freed tensors leave the resident set) over the timed steps; every child imports
torch, transformers, peft, datasets and trl, so the processes differ only in what they run. CUDA: the allocator's
peak. "step" memory = peak minus the resident size before the timed steps.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from tunelab.data.chat import chat_template_for, encode_example
from tunelab.data.packing import best_fit_decreasing
from tunelab.data.records import Example, read_examples

ROOT = Path(__file__).resolve().parent.parent
CPSYCOUND = ROOT.parent / "shared" / "data" / "cpsycound" / "cpsycound.jsonl"
DEFAULT_MODEL = ROOT / "models" / "smollm2-135m-instruct"
CONTENDERS = ("tunelab-padded", "tunelab-packed", "trl-packed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=None, help="default: CPsyCounD, else the demo instructions")
    p.add_argument("--turns", type=int, default=1, help="exchanges per example (0: whole dialogues)")
    p.add_argument("--examples", type=int, default=48, help="examples every contender gets")
    p.add_argument("--max-len", type=int, default=384)
    p.add_argument("--batch", type=int, default=2, help="examples (padded) or packed rows per micro-batch")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per contender")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the contenders this many times, the order reversed each round (load drift hits all)")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- data ------------------------------------------------------------------------------------------------------------


def split_turns(ex: Example, turns: int) -> list[Example]:
    """The dialogue cut into examples of `turns` consecutive user/assistant exchanges (0: the dialogue itself)."""
    if turns <= 0 or ex.messages is None:
        return [ex]
    msgs = [m for m in ex.messages if m["role"] != "system"]
    pairs = [msgs[i:i + 2] for i in range(0, len(msgs) - 1, 2)
             if msgs[i]["role"] == "user" and msgs[i + 1]["role"] == "assistant"]
    return [Example(messages=[m for pair in pairs[i:i + turns] for m in pair], text=None, where=f"{ex.where}#{i}")
            for i in range(0, len(pairs), turns)]


def load_examples(args) -> tuple[list[dict], str]:
    """`--examples` encoded examples as {"input_ids", "labels"}, and a line saying what they are."""
    from tunelab.models import load_tokenizer

    tok = load_tokenizer(args.model)
    template = chat_template_for(tok)
    path = args.data or (CPSYCOUND if CPSYCOUND.is_file() else None)
    if path is None:
        from tunelab.data.demo import generate_demo_data

        tmp = Path(tempfile.mkdtemp(prefix="sft-bench-"))
        generate_demo_data(tmp / "demo")
        path, name = tmp / "demo" / "instructions" / "train.jsonl", "the demo world's instructions"
    else:
        name = "CPsyCounD dialogues" if path == CPSYCOUND else str(path)
    examples = [e for ex in read_examples(str(path), "auto", "merge") for e in split_turns(ex, args.turns)]
    pick = np.random.default_rng(args.seed).permutation(len(examples))[:args.examples]
    out = []
    for i in pick:
        enc = encode_example(examples[i], tok, template, args.max_len)
        if enc.n_trainable > 1:
            out.append({"input_ids": enc.input_ids, "labels": enc.labels})
    lengths = [len(e["input_ids"]) for e in out]
    cut = "whole dialogues" if args.turns <= 0 else f"{args.turns} exchange(s) per example"
    return out, (f"{name} ({cut}), {len(out)} examples of {min(lengths)}-{max(lengths)} tokens "
                 f"(median {int(np.median(lengths))}), cut at {args.max_len}")


# --- measuring -------------------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Meter:
    """Step end times, tokens per step, and the peak memory from the end of the warm-up on."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.loss_tokens: list[int] = []
        self.losses: list[float] = []
        self.before = 0.0

    def step_done(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.warmup:  # the warm-up is over: optimizer state exists, as in a long run
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
                self.before = torch.cuda.memory_allocated(self.device) / 2**20
            else:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
                self.before = _status_kib("VmRSS") / 1024

    def result(self) -> dict:
        peak = (torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda"
                else _status_kib("VmHWM") / 1024)
        w = self.warmup
        times = [b - a for a, b in zip(self.ends[w - 1:], self.ends[w:])]
        tokens, loss_tokens = sum(self.tokens[w:len(self.ends)]), sum(self.loss_tokens[w:len(self.ends)])
        return {"step_s": times, "tokens": tokens, "loss_tokens": loss_tokens, "time_s": sum(times),
                "tokens_per_s": tokens / sum(times), "loss_tokens_per_s": loss_tokens / sum(times),
                "peak_mb": peak, "step_mb": peak - self.before, "losses": self.losses,
                "tokens_per_step": self.tokens[w:len(self.ends)]}


def _device(args) -> torch.device:
    return torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                        "cpu" if args.device == "auto" else args.device)


def run_tunelab(args, examples: list[dict], packed: bool) -> dict:
    from tunelab.config import FinetuneTrain, MethodSection
    from tunelab.data.chat import Encoded
    from tunelab.methods import build_method
    from tunelab.models import load_model
    from tunelab.train.events import EventLog, LiveView
    from tunelab.train.finetune import sample_order, step_batches_fn
    from tunelab.train.loop import count_loss_tokens, train

    device = _device(args)
    enc = [Encoded(e["input_ids"], e["labels"], f"x{i}", False, 1, len(e["input_ids"])) for i, e in enumerate(examples)]
    rows = best_fit_decreasing([len(e.input_ids) for e in enc], args.max_len) if packed else None
    model = load_model(args.model)
    torch.manual_seed(args.seed)
    method = build_method(MethodSection(name="lora", r=args.rank, alpha=args.alpha, dropout=0.0))
    method.inject(model)
    model.to(device)
    steps = args.warmup + args.steps
    cfg = FinetuneTrain(steps=steps, micro_batch_size=args.batch, grad_accum=1, lr=args.lr, warmup_steps=0,
                        min_lr_ratio=1.0, weight_decay=0.0, grad_clip=1.0, precision=args.precision, eval_every=0,
                        log_every=10**6)
    meter = Meter(device, args.warmup)
    pad = 0
    inner = step_batches_fn(enc, args.batch, 1, args.seed, pad, rows)
    lengths = ([len(e.input_ids) for e in enc] if rows is None else
               [sum(len(enc[j].input_ids) for j in r) for r in rows])
    n = len(lengths)

    def step_batches(step: int):
        batches = inner(step)
        lo = step * args.batch
        meter.tokens.append(sum(lengths[sample_order(n, k // n, args.seed)[k % n]] for k in range(lo, lo + args.batch)))
        meter.loss_tokens.append(sum(count_loss_tokens(b) for b in batches))
        return batches

    with EventLog(os.devnull) as events:
        result = train(model, method.trainable_parameters(), step_batches, cfg, events,
                       view=LiveView(steps, 10**6, quiet=True), on_step=lambda step: meter.step_done())
    meter.losses = result.losses
    return {**meter.result(), "units": n, "unit": "rows" if packed else "examples",
            "fill": sum(lengths) / (n * args.max_len) if packed else None}


def run_trl(args, examples: list[dict]) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunelab.models import load_tokenizer

    device = _device(args)
    meter = Meter(device, args.warmup)
    tok = load_tokenizer(args.model)
    data = Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples],
                              "assistant_masks": [[int(x != -100) for x in e["labels"]] for e in examples]})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    out = Path(tempfile.mkdtemp(prefix="trl-bench-"))
    config = SFTConfig(
        output_dir=str(out), max_length=args.max_len, packing=True, packing_strategy="bfd",
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.warmup + args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, gradient_checkpointing=False,
        bf16=args.precision == "bf16", fp16=False, use_cpu=device.type == "cpu", seed=args.seed,
        logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0)
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")

    class Timing(TrainerCallback):
        def on_step_end(self, *_, **__):
            meter.step_done()

    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=[Timing()])
    base = trainer.model.get_base_model()

    def count(_module, _args, kwargs):
        if base.training:
            meter.tokens.append(int(kwargs["input_ids"].numel()))  # padding-free: one row, no padding
            meter.loss_tokens.append(int((kwargs["labels"][:, 1:] != -100).sum()))

    handle = base.register_forward_pre_hook(count, with_kwargs=True)
    losses = []

    class Losses(TrainerCallback):
        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer.add_callback(Losses())
    trainer.train()
    handle.remove()
    meter.losses = losses
    return {**meter.result(), "units": len(trainer.train_dataset), "unit": "rows",
            "fill": sum(len(e["input_ids"]) for e in examples) / (len(trainer.train_dataset) * args.max_len)}


def child(args) -> dict:
    import datasets  # noqa: F401 - every child loads the same libraries
    import peft  # noqa: F401
    import trl  # noqa: F401

    examples, _ = load_examples(args)
    if args.child == "trl-packed":
        return run_trl(args, examples)
    return run_tunelab(args, examples, packed=args.child == "tunelab-packed")


def run_child(args, name: str) -> dict:
    argv = [a for a in args.argv]
    drop = {"--json", "--contenders", "--rounds"}
    clean, skip = [], False
    for a in argv:
        if a.startswith("--"):
            skip = a.split("=")[0] in drop and "=" not in a
            if a.split("=")[0] in drop:
                continue
        elif skip:
            continue
        clean.append(a)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": str(64 * 1024),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, *clean, "--child", name], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args, res: dict, what: str) -> None:
    device = _device(args)
    print(f"\n{what}\n{args.model.name}, LoRA r={args.rank} alpha={args.alpha:g} on every linear but the head, "
          f"{args.precision}, {device}, {torch.get_num_threads()} threads; micro-batch {args.batch} "
          f"(examples or rows of {args.max_len}), {args.warmup} warm-up + {args.steps} timed steps each, "
          f"{args.rounds} round(s)")
    names = list(res["contenders"])
    head = f"{'':32}" + "".join(f"{n:>16}" for n in names)
    print(head)
    rows = [("trained tokens/s", "tokens_per_s", "{:,.1f}"), ("loss tokens/s", "loss_tokens_per_s", "{:,.1f}"),
            ("s per step (median)", "median_step_s", "{:.2f}"), ("trained tokens per step", "mean_tokens", "{:,.0f}"),
            ("peak memory MB", "peak_mb", "{:,.0f}"), ("step memory MB (peak-before)", "step_mb", "{:,.0f}"),
            ("units per epoch", "units", "{}"), ("row fill (packed)", "fill", "{}")]
    for label, key, fmt in rows:
        cells = []
        for n in names:
            v = res["contenders"][n].get(key)
            cells.append("-" if v is None else (f"{v:.1%}" if key == "fill" else fmt.format(v)))
        print(f"{label:32}" + "".join(f"{c:>16}" for c in cells))
    if "tunelab-packed" in names:
        ref = res["contenders"]["tunelab-packed"]
        for n in names:
            if n != "tunelab-packed":
                c = res["contenders"][n]
                print(f"tunelab packed / {n}: trained tokens/s {ref['tokens_per_s'] / c['tokens_per_s']:.2f}x, "
                      f"peak memory {ref['peak_mb'] / c['peak_mb']:.2f}x, step memory "
                      f"{ref['step_mb'] / max(c['step_mb'], 1e-9):.2f}x")
    print(f"1-minute load average {res['load'][0]:.2f} before, {res['load'][1]:.2f} after, on {os.cpu_count()} CPUs")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    if not args.model.is_dir():
        raise SystemExit(f"{args.model}: no such model directory (give --model, a local HF model directory)")
    _, what = load_examples(args)
    print(what, flush=True)
    load0 = os.getloadavg()[0]
    res = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "argv"},
           "data": what, "contenders": {}}
    runs: dict[str, list[dict]] = {name: [] for name in args.contenders}
    for k in range(args.rounds):
        for name in (args.contenders if k % 2 == 0 else args.contenders[::-1]):
            t0 = time.perf_counter()
            r = run_child(args, name)
            runs[name].append(r)
            print(f"  round {k + 1}, {name}: {r['tokens_per_s']:,.1f} trained tokens/s, peak {r['peak_mb']:,.0f} MB "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for name, rs in runs.items():
        r = {"rounds": rs, **{k: sum(x[k] for x in rs) for k in ("tokens", "loss_tokens", "time_s")},
             "step_s": [t for x in rs for t in x["step_s"]], "peak_mb": max(x["peak_mb"] for x in rs),
             "step_mb": max(x["step_mb"] for x in rs), "units": rs[0]["units"], "fill": rs[0]["fill"]}
        r["tokens_per_s"], r["loss_tokens_per_s"] = r["tokens"] / r["time_s"], r["loss_tokens"] / r["time_s"]
        r["median_step_s"] = statistics.median(r["step_s"])
        r["mean_tokens"] = r["tokens"] / len(r["step_s"])
        res["contenders"][name] = r
    res["load"] = [load0, os.getloadavg()[0]]
    report(args, res, what)
    if args.json:
        from tunelab.io import atomic_write_json

        atomic_write_json(args.json, res)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
