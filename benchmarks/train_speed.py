"""Training speed and memory: tunelab LoRA vs `transformers` + `peft` LoRA, same model, data and precision.

    .venv/bin/python benchmarks/train_speed.py                # defaults: a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/train_speed.py --json out.json --masked-fraction 0.5
    .venv/bin/python benchmarks/train_speed.py --model models/smollm2-135m-instruct --seq 256 --precision fp32 bf16

Contenders, built from the same randomly initialised Llama (same seed), or from the same local HF model directory
(`--model`: a real pretrained model, trained on the demo world's English corpus tokenized with its own tokenizer),

with the same LoRA (rank, alpha, every
linear layer except the head; B = 0 and the same A, drawn here from one seeded generator for both), the same
batches in the same order, the same AdamW (`tunelab.train.loop.make_optimizer`), clipping and precision:

- tunelab:  `tunelab.methods.LoRA` + the loop's micro-step maths: `chunked_loss_sum` (decoder body, then the
            head and cross-entropy in chunks over the positions that carry a loss), `(loss / n).backward()`,
            clip, step, `zero_grad(set_to_none=True)`.
- baseline: `peft.get_peft_model` + `model(input_ids=..., labels=...).loss` (transformers' own causal-LM loss over
            the full logits), `loss.backward()`, clip, step, `zero_grad(set_to_none=True)`.

Speed: after warm-up steps, the two contenders alternate one step at a time (a b, b a, a b, ...: the order
flips each round so drift and neighbours' load hit both alike); each step is timed (wall clock and this process's
CPU time). The table gives each contender's median and best step; the ratio column is the median over rounds of
the per-round ratio (robust to load that changes during the run). tokens/s counts every input token
(batch x sequence), whether or not it carries a loss.

Peak memory: each contender is measured alone in a fresh subprocess (so the other contender's model is not in the
figure), after one warm-up step (optimizer state exists, as in a long run), over two steps.
  CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
  CPU:  the kernel's resident-set high-water mark (VmHWM), reset just before the measured steps by writing 5 to
        /proc/self/clear_refs (Linux >= 4.0) after `malloc_trim(0)`; a high-water mark cannot be reset any other
        way in-process, hence the subprocess. glibc's mmap threshold is pinned at 64 KiB in the subprocess
        (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the resident set at once: with glibc's default, moving
        threshold, freed memory lingers and the figure wanders by +-70 MB from run to run. Both children import
        peft, so their processes differ only in what they train. "peak" is the whole process (Python, libraries,
        model, optimizer state, plus what the step allocates); "step" is that peak minus the resident size just
        before the steps, i.e. what a training step adds: activations, logits, gradients.

FLOPs: the last warm-up step of each contender runs under `torch.utils.flop_counter.FlopCounterMode` (matmuls and
attention; attention over the full S x S square as torch counts it, not halved for the causal mask; the CPU
attention kernel is added to its table). "model FLOP/s" divides the baseline's count (the standard computation
of the step) by each contender's median step time; its share is of the machine's matmul peak, measured in this
run as the best rate of a large square matmul in the benchmark's precision (before and after the contenders).

Correctness: both contenders start from the same weights and see the same data, so their per-step losses must
agree to float rounding; the first-step and the largest difference are printed (a benchmark of different maths
would be meaningless).

Precisions: `--precision fp32 bf16` runs both contenders in each precision in one run (four contenders, interleaved
the same way, each with its own memory subprocess), and adds each contender's bf16/fp32 speed and memory ratios and
the per-step losses of fp32 and bf16 side by side (same weights, same batches: how far bf16 autocast moves the loss).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tunelab.config import TrainSection
from tunelab.methods import LoRA
from tunelab.train.loop import autocast_dtype, count_loss_tokens, make_optimizer
from tunelab.train.loss import chunked_loss_sum

CONTENDERS = ("tunelab", "baseline")


def _as_registered(formula):
    """torch's exported sdpa formulas already take tensors; mark them so FlopCounterMode does not wrap them again."""
    def count(*args, **kwargs):
        return formula(*args, **kwargs)
    count._get_raw = True
    return count


# torch's FLOP counter knows the CUDA attention kernels only; the CPU flash kernel does the same work.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _as_registered(sdpa_flop),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _as_registered(sdpa_backward_flop)}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The benchmark model's shape and batch (shared with qtha_speed.py)."""
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1, help="micro-batch size")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--tie", action="store_true", help="tie the head to the input embeddings")
    p.add_argument("--masked-fraction", type=float, default=0.0,
                   help="share of each sequence (a prompt prefix) whose labels are -100; 0: every position trains")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--model", type=Path, default=None,
                   help="a local HF model directory to train instead of the random Llama (its shape arguments "
                        "are then ignored); batches are the demo world's English text in its own tokenizer")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=["auto"], nargs="+",
                   help="one or more (e.g. fp32 bf16: both in one run); auto: what tunelab's `precision: auto` "
                        "picks (tunelab.train.loop.autocast_dtype)")
    p.add_argument("--chunk-size", type=int, default=None, help="tunelab loss chunk (positions); default: auto")
    p.add_argument("--steps", type=int, default=20, help="measured steps per contender")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first (>= 1)")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the benchmark, profile 2 steps of each contender and print the N costliest ops")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--memory-child", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the two contenders ----------------------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    model: torch.nn.Module
    step: Callable[[dict[str, torch.Tensor]], float]  # one optimizer step on one micro-batch; returns the mean loss
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    flops: int = 0
    precision: str = "fp32"


def build_model(args, device: torch.device) -> torch.nn.Module:
    if getattr(args, "model", None) is not None:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).train()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq),
                         tie_word_embeddings=args.tie)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).to(device).train()


def same_lora_a(a_weights: dict[str, torch.Tensor], seed: int) -> None:
    """Give every LoRA A (keyed by adapted module path) the same kaiming-uniform draw in both contenders."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(a_weights):
            w = a_weights[name]
            bound = 1 / math.sqrt(w.shape[1])
            w.copy_(torch.empty(w.shape).uniform_(-bound, bound, generator=g))


def train_cfg() -> TrainSection:
    return TrainSection(lr=1e-3, weight_decay=0.0, grad_clip=1.0)


def build_tunelab(args, device: torch.device, dtype: torch.dtype | None) -> Contender:
    model = build_model(args, device)
    method = LoRA(r=args.rank, alpha=args.alpha, dropout=0.0, target_modules="all-linear")
    method.inject(model)
    same_lora_a({name: layer.lora_A.weight for name, layer in method.layers.items()}, args.seed + 1)
    params = method.trainable_parameters()
    cfg = train_cfg()
    optimizer = make_optimizer(params, cfg)

    def step(batch):
        n = max(count_loss_tokens(batch), 1)
        loss = chunked_loss_sum(model, batch, dtype, chunk_size=args.chunk_size)
        (loss / n).backward()
        value = loss.item() / n
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    return Contender("tunelab", model, step)


def build_baseline(args, device: torch.device, dtype: torch.dtype | None) -> Contender:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(args, device), LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear"))
    prefix, suffix = "base_model.model.", ".lora_A.default.weight"
    same_lora_a({n[len(prefix):-len(suffix)]: p for n, p in model.named_parameters() if n.endswith(suffix)},
                args.seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = train_cfg()
    optimizer = make_optimizer(params, cfg)

    def step(batch):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        value = loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    return Contender("baseline", model, step)


BUILDERS = {"tunelab": build_tunelab, "baseline": build_baseline}


def real_text_ids(args) -> torch.Tensor | None:
    """The demo world's English corpus in `--model`'s own tokenizer, as one row of ids (None: no --model)."""
    if getattr(args, "model", None) is None:
        return None
    import tempfile

    from transformers import AutoTokenizer

    from tunelab.data.demo import generate_demo_data

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo_data(Path(tmp) / "demo", seed=args.seed, scale=0.2)
        lines = (Path(tmp) / "demo" / "pretrain" / "world_en.jsonl").read_text().splitlines()
    ids: list[int] = []
    for line in lines:
        ids += tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def make_batches(args, device: torch.device, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """`n` micro-batches: random ids over the vocabulary, or with `--model` consecutive windows of real text (one
    fresh window per step: warm-up plus measured steps, so the losses follow a real training run)."""
    g = torch.Generator().manual_seed(args.seed + 2)
    text = real_text_ids(args)
    if text is not None:
        n = max(n, args.warmup + getattr(args, "steps", 0))
        need = n * args.batch * args.seq
        if len(text) < need:
            raise SystemExit(f"the demo corpus has {len(text):,} tokens, fewer than the {need:,} the batches need")
    batches = []
    for i in range(n):
        if text is not None:
            per = args.batch * args.seq
            ids = text[i * per:(i + 1) * per].view(args.batch, args.seq)
        else:
            ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        labels = ids.clone()
        labels[:, : int(args.masked_fraction * args.seq)] = -100
        batches.append({"input_ids": ids.to(device), "labels": labels.to(device)})
    return batches


# --- measurements ----------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(c: Contender, batch, device: torch.device) -> None:
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    c.losses.append(c.step(batch))
    sync(device)
    c.wall.append(time.perf_counter() - w0)
    c.cpu.append(time.process_time() - c0)


def matmul_peak(device: torch.device, dtype: torch.dtype | None, reps: int = 5) -> float:
    """Best FLOP/s of a large square matmul in the benchmark's precision (fp32 on CPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    best = math.inf
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_child(args) -> dict:
    """Run in a fresh process: one contender, one warm-up step, then the peak over two steps."""
    import peft  # noqa: F401 - loaded by both contenders, so the process sizes differ only by what they train

    device, dtype = setup(args)
    c = BUILDERS[args.memory_child](args, device, dtype)
    batches = make_batches(args, device)
    c.step(batches[0])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for b in batches[1:3]:
            c.step(b)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": peak / 2**20, "step_mb": (peak - before) / 2**20, "what": "torch.cuda.max_memory_allocated"}
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status_kib("VmRSS")
    for b in batches[1:3]:
        c.step(b)
    peak = _status_kib("VmHWM")
    return {"peak_mb": peak / 1024, "step_mb": (peak - before) / 1024, "what": "process peak RSS (VmHWM)"}


def measure_memory(args, name: str, precision: str) -> dict:
    argv, skip = [], False
    for a in args.argv:  # drop --json X, --profile N and --precision P [P ...]: the child gets one precision
        if a.startswith("--"):
            drop = a.split("=")[0] in ("--json", "--profile", "--precision")
            skip = drop and "=" not in a  # the values that follow belong to the dropped flag
            if drop:
                continue
        elif skip:
            continue
        argv.append(a)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = subprocess.run([sys.executable, __file__, *argv, "--precision", precision, "--memory-child", name],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess for {name} ({precision}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def setup(args, precision: str | None = None) -> tuple[torch.device, torch.dtype | None]:
    """Threads, device and the autocast dtype of `precision` (default: the first of --precision), as tunelab's
    loop resolves it (`auto` included)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if precision is None:
        precision = args.precision if isinstance(args.precision, str) else args.precision[0]
    return device, autocast_dtype(precision, device)


def precision_name(dtype: torch.dtype | None) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


# --- the run ---------------------------------------------------------------------------------------------------------


def describe_model(args, model: torch.nn.Module) -> str:
    """One line: the benchmark's model and batch."""
    if args.model is not None:
        c = model.config
        shape = (f"{args.model} ({c.model_type}, hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
                 f"{c.num_attention_heads}/{c.num_key_value_heads} heads, intermediate {c.intermediate_size}, vocab "
                 f"{c.vocab_size}{', tied head' if c.tie_word_embeddings else ''}; "
                 f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), demo-world English text")
    else:
        shape = (f"Llama hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, intermediate "
                 f"{args.intermediate}, vocab {args.vocab}{' (tied)' if args.tie else ''}, random ids")
    return (f"{shape}; batch {args.batch} x seq {args.seq}, {args.masked_fraction:.0%} of positions without loss; "
            f"LoRA r={args.rank} alpha={args.alpha:g} on every linear but the head")


def run(args) -> dict:
    device, _ = setup(args)
    dtypes: dict[str, torch.dtype | None] = {}
    for p in args.precision:  # as tunelab resolves each ("auto" included), each resolved precision once
        dtype = setup(args, p)[1]
        dtypes.setdefault(precision_name(dtype), dtype)
    names = list(dtypes)
    print(f"torch {torch.__version__}, {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, {' and '.join(n.replace('bf16', 'bf16 autocast') for n in names)}")
    load_before = os.getloadavg()[0]  # other jobs on the machine: the speed figures depend on them
    peaks = {n: matmul_peak(device, dtypes[n]) for n in names}
    contenders = []
    for n in names:
        for name in CONTENDERS:
            contenders.append(BUILDERS[name](args, device, dtypes[n]))
            contenders[-1].precision = n
    print(describe_model(args, contenders[0].model))
    n_lora = [sum(p.numel() for p in c.model.parameters() if p.requires_grad) for c in contenders]
    if len(set(n_lora)) != 1:
        raise SystemExit(f"the contenders train different parameter counts: {n_lora}")
    batches = make_batches(args, device)
    tokens = args.batch * args.seq
    for i in range(args.warmup):
        for c in contenders:
            batch = batches[i % len(batches)]
            if i == args.warmup - 1:  # the last warm-up step (after tunelab's one-off model check)
                with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
                    c.losses.append(c.step(batch))
                c.flops = counter.get_total_flops()
            else:
                c.losses.append(c.step(batch))
    for r in range(args.steps):
        for c in (contenders if r % 2 == 0 else contenders[::-1]):
            timed_step(c, batches[(args.warmup + r) % len(batches)], device)
        print(f"\r  measured step {r + 1}/{args.steps}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    peaks = {n: max(peaks[n], matmul_peak(device, dtypes[n])) for n in names}

    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
              if k not in ("json", "memory_child", "argv")}
    res: dict = {"config": config, "device": str(device), "precisions": names, "threads": torch.get_num_threads(),
                 "model": describe_model(args, contenders[0].model), "lora_parameters": n_lora[0],
                 "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "by_precision": {}}
    by = {(c.name, c.precision): c for c in contenders}
    for n in names:
        tl, hf = by["tunelab", n], by["baseline", n]
        model_flops = hf.flops
        out = res["by_precision"][n] = {"matmul_peak_tflops": peaks[n] / 1e12,
                                        "model_gflop_per_step": model_flops / 1e9}
        for c in (tl, hf):
            wall, cpu = statistics.median(c.wall), statistics.median(c.cpu)
            out[c.name] = {"tokens_per_s": tokens / wall, "tokens_per_s_best": tokens / min(c.wall), "step_s": wall,
                           "cpu_s_per_step": cpu, "step_s_all": c.wall, "executed_gflop_per_step": c.flops / 1e9,
                           "model_tflops": model_flops / wall / 1e12, "mfu": model_flops / wall / peaks[n],
                           "first_loss": c.losses[0], "losses": c.losses}
        out["loss_diff_first_step"] = abs(tl.losses[0] - hf.losses[0])
        out["loss_diff_max"] = max(abs(a - b) for a, b in zip(tl.losses, hf.losses))
        # Each round ran one step of each back to back: the median of the per-round ratios resists load that
        # changes during the run better than a ratio of medians.
        out["ratios"] = {
            "tokens_per_s": statistics.median(b / a for a, b in zip(tl.wall, hf.wall)),
            "tokens_per_s_best": min(hf.wall) / min(tl.wall),
            "cpu_s_per_step": statistics.median(a / b for a, b in zip(tl.cpu, hf.cpu))}
    if {"fp32", "bf16"} <= set(names):  # bf16 autocast against fp32, per contender, from the same rounds
        res["bf16_over_fp32"] = {}
        for name in CONTENDERS:
            f, b = by[name, "fp32"], by[name, "bf16"]
            diffs = [abs(x - y) for x, y in zip(f.losses, b.losses)]
            res["bf16_over_fp32"][name] = {
                "tokens_per_s": statistics.median(x / y for x, y in zip(f.wall, b.wall)),
                "cpu_s_per_step": statistics.median(y / x for x, y in zip(f.cpu, b.cpu)),
                "loss_diff_max": max(diffs), "loss_rel_diff_max": max(d / abs(x) for d, x in zip(diffs, f.losses)),
                "losses_finite": all(math.isfinite(x) for x in b.losses + f.losses)}
    del contenders, by, tl, hf, c
    gc.collect()
    if not args.no_memory:
        for n in names:
            out = res["by_precision"][n]
            for name in CONTENDERS:
                out[name]["memory"] = measure_memory(args, name, n)
            for key in ("peak_mb", "step_mb"):
                out["ratios"][key] = out["tunelab"]["memory"][key] / out["baseline"]["memory"][key]
        for name in res.get("bf16_over_fp32", {}):
            for key in ("peak_mb", "step_mb"):
                res["bf16_over_fp32"][name][key] = (res["by_precision"]["bf16"][name]["memory"][key] /
                                                    res["by_precision"]["fp32"][name]["memory"][key])
    report(res)
    if args.profile:
        for n in names:
            profile(args, device, dtypes[n], batches)
    return res


def report(res: dict) -> None:
    for n, out in res["by_precision"].items():
        report_precision(n, out)
    print("  tokens/s ratio: median over rounds of the per-round ratio (best step: ratio of the best steps)")
    print("* model work = the baseline's counted GFLOP per step, divided by each contender's median step time, over "
          "a large square matmul's rate measured now in the same precision")
    print(f"{res['lora_parameters']:,} LoRA parameters in each contender; 1-minute load average "
          f"{res['load_average_1min'][0]:.2f} before the speed runs, {res['load_average_1min'][1]:.2f} after, on "
          f"{os.cpu_count()} CPUs")
    if "bf16_over_fp32" in res:
        bf = res["bf16_over_fp32"]
        print(f"\n{'bf16 autocast / fp32':28}{'tunelab':>14}{'baseline':>14}")
        rows = [("tokens/s (per-round median)", "tokens_per_s"), ("CPU s per step", "cpu_s_per_step")]
        if "peak_mb" in bf["tunelab"]:
            rows += [("peak memory", "peak_mb"), ("step memory", "step_mb")]
        for label, key in rows:
            print(f"{label:28}{bf['tunelab'][key]:>13.2f}x{bf['baseline'][key]:>13.2f}x")
        for name in CONTENDERS:
            print(f"per-step loss, {name}: bf16 vs fp32 largest |diff| {bf[name]['loss_diff_max']:.4f} "
                  f"({bf[name]['loss_rel_diff_max']:.2%} of the fp32 loss); "
                  f"{'all finite' if bf[name]['losses_finite'] else 'NOT ALL FINITE'}")
        f, b = res["by_precision"]["fp32"], res["by_precision"]["bf16"]
        print(f"{'step':>6}{'tunelab fp32':>15}{'tunelab bf16':>15}{'baseline fp32':>15}{'baseline bf16':>15}")
        for i, row in enumerate(zip(f["tunelab"]["losses"], b["tunelab"]["losses"], f["baseline"]["losses"],
                                    b["baseline"]["losses"])):
            print(f"{i + 1:>6}" + "".join(f"{x:>15.4f}" for x in row))


def report_precision(name: str, res: dict) -> None:
    tl, hf, ratio = res["tunelab"], res["baseline"], res["ratios"]
    rows = [("tokens/s (median)", "tokens_per_s", "{:,.0f}", "tokens_per_s"),
            ("tokens/s (best step)", "tokens_per_s_best", "{:,.0f}", "tokens_per_s_best"),
            ("step time s (median)", "step_s", "{:.3f}", None),
            ("CPU s per step (median)", "cpu_s_per_step", "{:.3f}", "cpu_s_per_step"),
            ("executed GFLOP per step", "executed_gflop_per_step", "{:.1f}", None),
            ("model TFLOP/s *", "model_tflops", "{:.3f}", None),
            ("share of matmul peak *", "mfu", "{:.1%}", None),
            ("first-step loss", "first_loss", "{:.6f}", None)]
    print(f"\n{name + (' autocast' if name == 'bf16' else ''):28}{'tunelab':>14}{'baseline':>14}"
          f"{'tunelab/baseline':>18}")
    for label, key, fmt, rkey in rows:
        r = f"{ratio[rkey]:.2f}x" if rkey else ""
        print(f"{label:28}{fmt.format(tl[key]):>14}{fmt.format(hf[key]):>14}{r:>18}")
    if "memory" in tl:
        for label, key in (("peak memory MB", "peak_mb"), ("step memory MB (peak-before)", "step_mb")):
            print(f"{label:28}{tl['memory'][key]:>14,.0f}{hf['memory'][key]:>14,.0f}{ratio[key]:>17.2f}x")
        print(f"  memory: {tl['memory']['what']}, each contender alone in a fresh process")
    print(f"  model work {res['model_gflop_per_step']:.1f} GFLOP per step; matmul peak measured now: "
          f"{res['matmul_peak_tflops']:.3f} TFLOP/s")
    print(f"  loss agreement: first step |tunelab - baseline| = {res['loss_diff_first_step']:.2e}, "
          f"largest over all steps {res['loss_diff_max']:.2e}")


def profile(args, device: torch.device, dtype: torch.dtype | None, batches, rows: int | None = None) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in CONTENDERS:
        c = BUILDERS[name](args, device, dtype)
        c.step(batches[0])
        with torch_profile(activities=activities) as prof:
            for b in batches[1:3]:
                c.step(b)
        print(f"\n--- profile: {name}, 2 steps ---")
        print(prof.key_averages().table(sort_by=sort, row_limit=rows or args.profile))
        del c
        gc.collect()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes on peft's calls
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return
    res = run(args)
    if args.json:
        from tunelab.io import atomic_write_json

        atomic_write_json(args.json, res)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
