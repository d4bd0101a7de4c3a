"""Checkpoint stall: how long the training loop is blocked per checkpoint, sync full vs sync sharded vs async sharded.

    .venv/bin/python benchmarks/checkpoint_stall.py                # small preset, 1 and 2 gloo processes
    .venv/bin/python benchmarks/checkpoint_stall.py --preset tiny  # about 8M parameters: under a minute

On two shared CPU cores one training step of the small preset (2 x 32 tokens, AdamW over 100M parameters) took
about 10 s, so the default run (2 launches x 19 steps, plus the saves) needs 10 minutes or more there; `--steps 4
--every 2 --seq 8` shortens it.
    .venv/bin/python benchmarks/checkpoint_stall.py --procs 1 --json out.json

Full fine-tuning of the `small` preset (Llama, hidden 768, 12 layers; a 32000-token vocabulary: about 100M
parameters, every one trained, so a checkpoint holds the weights and AdamW's two moments: about 1.2 GB) in
tunelab's own loop (`tunelab.train.loop.train`) with tunelab's `Checkpointer` (`tunelab.train.checkpoint`), on 1
process and under torchrun on 2 gloo processes (ddp). The three ways, in one process each, in turn (same model,
same steps), a checkpoint every `--every` steps:

- sync full (the baseline): every process gathers the full tensors, the first one writes trainable.safetensors and
  optimizer.pt, every other one waits (what tunelab did before sharded checkpoints);
- sync sharded: every process writes its DCP shards (`torch.distributed.checkpoint.save`);
- async sharded: every process copies its state to CPU memory and DCP writes it in a background thread
  (`async_save`); at most one save in flight, so a save still writing when the next is due blocks the loop.

Blocked: the time the loop spends in the checkpoint call at a save step (for async: the random states, state.json,
the hand-over to DCP and any wait for the previous save), the median over the saves, plus for async the time the
next optimizer step waited for the copy to CPU memory (which runs beside the next forward and backward passes),
per save; `wait at end` the time the last async save took to finish after the loop (a run's end waits for it).
`run wall` is the loop's time for all steps, saves included: the background work competes with training for the
CPU, which the blocked time does not show. Bytes: what each process wrote into the last checkpoint (rank 0 also
writes state.json and DCP's .metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = [("full", "sync"), ("sharded", "sync"), ("sharded", "async")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="numbers of processes to measure")
    p.add_argument("--preset", default="small", choices=["micro", "tiny", "small"])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--every", type=int, default=3, help="a checkpoint every N steps")
    p.add_argument("--batch", type=int, default=2, help="global micro-batch rows (split across the processes)")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: results file of one launch
    return p.parse_args(argv)


# --- one launch (1 process, or each process under torchrun) ----------------------------------------------------


def rank_bytes(checkpoint: Path, rank: int) -> int:
    """Bytes process `rank` wrote into `checkpoint`."""
    own = [checkpoint / f"rng-rank{rank}.pt", checkpoint / "dcp" / f"__{rank}_0.distcp"]
    if rank == 0:
        own += [checkpoint / n for n in ("state.json", "trainable.safetensors", "optimizer.pt", "dcp/.metadata")]
    return sum(p.stat().st_size for p in own if p.is_file())


def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tunelab.config import TrainSection
    from tunelab.methods import Full
    from tunelab.models import PRESETS
    from tunelab.train.checkpoint import Checkpointer
    from tunelab.train.distributed import cleanup, init_distributed
    from tunelab.train.events import EventLog, LiveView
    from tunelab.train.loop import train

    dist = init_distributed()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, tie_word_embeddings=True, **PRESETS[args.preset])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    method = Full()
    method.inject(model)
    n_params = sum(p.numel() for p in method.trainable_parameters())
    cfg = TrainSection(steps=args.steps, micro_batch_size=args.batch, lr=1e-4, warmup_steps=0, eval_every=0,
                       log_every=10**6, precision="fp32")
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen) for _ in range(args.steps)]

    def step_batches(step):
        return [{"input_ids": batches[step], "labels": batches[step]}]

    with EventLog(os.devnull) as events:  # warm-up: the first steps of a process are slow
        train(model, method.trainable_parameters(), step_batches, cfg.model_copy(update={"steps": 1}), events, None,
              LiveView(1, 10**6, quiet=True), None, None, None, dist)
    root = Path(args.dir)
    results = []
    for fmt, mode in MODES:
        run_dir = root / f"{fmt}-{mode}"
        saver = Checkpointer(run_dir, args.every, 1, {}, {}, dist.rank, dist.world_size, fmt=fmt, mode=mode,
                             method=method)
        blocked: list[float] = []

        def checkpoint(step, optimizer, result, saver=saver, blocked=blocked):
            t0 = time.perf_counter()
            saver.poll()
            if step % args.every == 0:
                saver.save(step, method.state_dict(), optimizer, result.losses, result.tokens, result.wall_s)
                blocked.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        with EventLog(os.devnull) as events:
            train(model, method.trainable_parameters(), step_batches, cfg, events, None,
                  LiveView(args.steps, 10**6, quiet=True), checkpoint, None, None, dist)
        loop_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        saver.close()
        drain_s = time.perf_counter() - t1
        if dist.world_size > 1:
            torch.distributed.barrier()
        last = run_dir / "checkpoints" / f"step-{args.steps // args.every * args.every:06d}"
        sizes = [torch.tensor([rank_bytes(last, dist.rank)], dtype=torch.float64)]
        if dist.world_size > 1:
            sizes = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.world_size)]
            torch.distributed.all_gather(sizes, torch.tensor([rank_bytes(last, dist.rank)], dtype=torch.float64))
        # async: the copy to memory runs beside the next step's forward and backward; the optimizer step waits for
        # it if need be, and that wait is the loop's too
        staging_wait = saver.writer.staging_wait_s if saver.writer is not None else 0.0
        results.append({"processes": dist.world_size, "format": fmt, "mode": mode, "parameters": n_params,
                        "save_call_s": blocked, "staging_wait_total_s": staging_wait,
                        "blocked_median_s": statistics.median(blocked) + staging_wait / len(blocked),
                        "wait_at_end_s": drain_s, "run_wall_s": loop_s,
                        "bytes_per_process": [int(s.item()) for s in sizes]})
        if dist.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
            Path(args.worker).write_text(json.dumps(results))  # after each way: a run cut short keeps what it has
            print(f"{dist.world_size}p {mode} {fmt}: save calls {', '.join(f'{t:.3f}' for t in blocked)} s, "
                  f"staging wait {staging_wait:.3f} s in all, run wall {loop_s:.1f} s", flush=True)
    cleanup(dist)


# --- the driver --------------------------------------------------------------------------------------------------


def launch(args: argparse.Namespace, procs: int, root: Path) -> list[dict]:
    out = root / f"results-{procs}.json"
    flags = ["--worker", str(out), "--dir", str(root), "--preset", args.preset, "--vocab", str(args.vocab),
             "--steps", str(args.steps), "--every", str(args.every), "--batch", str(args.batch), "--seq", str(args.seq)]
    script = str(Path(__file__).resolve())
    if procs == 1:
        cmd = [sys.executable, script, *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), script,
               *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // procs))}
    proc = subprocess.run(cmd, env=env)
    rows = json.loads(out.read_text()) if out.is_file() else []
    if proc.returncode != 0:
        print(f"the {procs}-process launch failed (exit {proc.returncode}); {len(rows)} of {len(MODES)} ways measured",
              file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| processes | checkpoint | blocked per checkpoint (median) | vs sync full | wait at end | run wall "
             "| bytes written per process |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["processes"] == r["processes"] and b["format"] == "full")
        ratio = r["blocked_median_s"] / base["blocked_median_s"]
        mb = " / ".join(f"{b / 2**20:,.0f} MiB" for b in r["bytes_per_process"])
        lines.append(f"| {r['processes']} | {r['mode']} {r['format']} | {r['blocked_median_s']:.2f} s | {ratio:.3f}x "
                     f"| {r['wait_at_end_s']:.2f} s | {r['run_wall_s']:.1f} s | {mb} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="checkpoint-stall-"))
    rows = []
    try:
        for procs in args.procs:
            rows += launch(args, procs, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{rows[0]['parameters'] / 1e6:.1f}M trainable parameters ({args.preset} preset, vocab {args.vocab}), "
          f"{args.steps} steps of {args.batch}x{args.seq} tokens, a checkpoint every {args.every} steps; blocked "
          f"save calls (s): " + "; ".join(f"{r['processes']}p {r['mode']} {r['format']}: "
                                         + ", ".join(f"{t:.3f}" for t in r["save_call_s"])
                                         + f" (+{r['staging_wait_total_s']:.3f} staging wait)" for r in rows))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
