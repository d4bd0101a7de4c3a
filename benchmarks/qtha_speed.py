"""Training speed: QTHA (MPO + simulated 8-qubit circuit) vs LoRA r=8, same model, data, loop maths and precision.

    .venv/bin/python benchmarks/qtha_speed.py --threads 1          # defaults: about two minutes on one CPU core
    .venv/bin/python benchmarks/qtha_speed.py --qubits 10 --rotations ry rz --json out.json

Contenders, built from the same randomly initialised Llama (`train_speed.build_model`: hidden 512, 4 layers, vocab
32000 by default, same seed) with the adapter on every linear layer but the head, and trained with tunelab's
micro-step maths (`chunked_loss_sum`, `(loss / n).backward()`, clip, AdamW step, `zero_grad`):

- qtha: `tunelab.methods.QTHA` with its defaults (8 qubits, 2 layers, RY + CNOT ring, 3 MPO cores, the bond chosen
        per module within 24% of LoRA r=8's parameters), exact simulation with autograd unless --mode says otherwise;
- lora: `tunelab.methods.LoRA` r=8, alpha=16.

Both adapters are exact no-ops at init, so the first-step losses must agree (printed). Speed: after warm-up steps
the two alternate one step at a time, the order flipping each round (`train_speed.timed_step`); tokens/s is the
median over steps, the ratio the median of the per-round ratios QTHA/LoRA (robust to load that drifts).

Share of the circuit simulation: forward hooks record the encoding angles π·tanh(z) every QTHA layer fed to its
circuit in one training step; the circuit (`quantum.qnn_expval`, forward and backward, all layers, the same angles,
weights and mode) is then replayed alone, timed over a few repetitions (best), and divided by QTHA's median step
time. Replaying in isolation times exactly the simulator's work, which the profiler cannot attribute in the
backward pass (a `record_function` region covers the forward only); the layers also mark their forward circuit
with the profiler region "qtha.circuit" for anyone profiling a run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import Contender, add_model_args, build_model, make_batches, setup, sync, timed_step, train_cfg  # noqa: E402

from tunelab.methods import QTHA, LoRA, Method  # noqa: E402
from tunelab.methods.qtha import QTHALinear  # noqa: E402
from tunelab.methods.quantum import qnn_expval  # noqa: E402
from tunelab.train.loop import count_loss_tokens, make_optimizer  # noqa: E402
from tunelab.train.loss import chunked_loss_sum  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--qubits", type=int, default=8)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--rotations", nargs="+", default=["ry"], choices=["ry", "rz", "rx"])
    p.add_argument("--bond", type=int, default=None, help="QTHA bond dimension; default: per module, by budget")
    p.add_argument("--mode", choices=["exact", "parameter-shift", "shots"], default="exact")
    p.add_argument("--shots", type=int, default=1000)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: what tunelab's `precision: auto` picks (bf16 autocast on a CUDA GPU that supports "
                        "it or a CPU with AMX, fp32 otherwise)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per contender")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first (>= 1)")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    args.tie, args.masked_fraction = False, 0.0  # what train_speed's model and batch builders read
    return args


def build(name: str, method: Method, args, device: torch.device, dtype: torch.dtype | None) -> Contender:
    """A contender: the shared random model with `method` injected, and one optimizer step per call."""
    model = build_model(args, device)
    method.inject(model)
    params = method.trainable_parameters()
    cfg = train_cfg()
    optimizer = make_optimizer(params, cfg)

    def step(batch):
        n = max(count_loss_tokens(batch), 1)
        loss = chunked_loss_sum(model, batch, dtype)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item() / n

    contender = Contender(name, model, step)
    contender.method = method
    return contender


def circuit_time(qtha: Contender, batch, device: torch.device, reps: int = 3) -> tuple[float, int]:
    """(best seconds, layers): the circuits of one step (forward + backward, every layer) replayed alone."""
    layers = [m for m in qtha.model.modules() if isinstance(m, QTHALinear)]
    angles: dict[QTHALinear, torch.Tensor] = {}
    hooks = [layer.qtha_down.register_forward_hook(
        lambda mod, inp, out, layer=layer: angles.__setitem__(layer, (math.pi * torch.tanh(out)).detach()))
        for layer in layers]
    try:
        qtha.step(batch)
    finally:
        for h in hooks:
            h.remove()
    best = math.inf
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for layer in layers:
            a = angles[layer].reshape(-1, angles[layer].shape[-1]).requires_grad_()
            theta = layer.qtha_theta.detach().requires_grad_()
            q = qnn_expval(a, theta, layer.rotations, layer.mode, layer.shots,
                           torch.Generator(device=a.device).manual_seed(0) if layer.mode == "shots" else None)
            q.backward(torch.ones_like(q))
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, len(layers)


def run(args) -> dict:
    device, dtype = setup(args)
    precision = "bf16 autocast" if dtype == torch.bfloat16 else "fp32"
    print(f"torch {torch.__version__}, {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, {precision}")
    print(f"Llama hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, intermediate "
          f"{args.intermediate}, vocab {args.vocab}; batch {args.batch} x seq {args.seq}; adapters on every linear "
          f"but the head")
    qtha = build("qtha", QTHA(qubits=args.qubits, depth=args.depth, rotations=args.rotations, bond=args.bond,
                              mode=args.mode, shots=args.shots), args, device, dtype)
    lora = build("lora", LoRA(r=args.rank, alpha=2.0 * args.rank, dropout=0.0), args, device, dtype)
    contenders = [qtha, lora]
    batches = make_batches(args, device)
    for i in range(args.warmup):
        for c in contenders:
            c.losses.append(c.step(batches[i % len(batches)]))
    for r in range(args.steps):
        for c in (contenders if r % 2 == 0 else contenders[::-1]):
            timed_step(c, batches[(args.warmup + r) % len(batches)], device)
        print(f"\r  measured step {r + 1}/{args.steps}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    sim_s, n_layers = circuit_time(qtha, batches[0], device)

    tokens = args.batch * args.seq
    res: dict = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "device": str(device),
                 "precision": precision, "threads": torch.get_num_threads()}
    for c in contenders:
        res[c.name] = {"tokens_per_s": tokens / statistics.median(c.wall), "step_s": statistics.median(c.wall),
                       "step_s_all": c.wall, "trainable_parameters": c.method.num_parameters(),
                       "first_loss": c.losses[0]}
    res["ratio_tokens_per_s"] = statistics.median(b / a for a, b in zip(qtha.wall, lora.wall))
    res["ratio_parameters"] = res["qtha"]["trainable_parameters"] / res["lora"]["trainable_parameters"]
    res["circuit_s_per_step"] = sim_s
    res["circuit_share_of_qtha_step"] = sim_s / res["qtha"]["step_s"]
    res["qtha_layers"] = n_layers
    res["first_loss_diff"] = abs(qtha.losses[0] - lora.losses[0])
    report(res)
    return res


def report(res: dict) -> None:
    q, lo = res["qtha"], res["lora"]
    print(f"\n{'':30}{'qtha':>14}{'lora':>14}{'qtha/lora':>12}")
    print(f"{'tokens/s (median step)':30}{q['tokens_per_s']:>14,.0f}{lo['tokens_per_s']:>14,.0f}"
          f"{res['ratio_tokens_per_s']:>11.2f}x")
    print(f"{'step time s (median)':30}{q['step_s']:>14.3f}{lo['step_s']:>14.3f}")
    print(f"{'trainable parameters':30}{q['trainable_parameters']:>14,}{lo['trainable_parameters']:>14,}"
          f"{res['ratio_parameters']:>11.2f}x")
    print(f"{'first-step loss':30}{q['first_loss']:>14.6f}{lo['first_loss']:>14.6f}")
    print(f"  tokens/s ratio: median over rounds of the per-round ratio; first-step losses differ by "
          f"{res['first_loss_diff']:.1e} (both adapters start as exact no-ops)")
    print(f"  circuit simulation: {res['circuit_s_per_step'] * 1e3:.1f} ms per step (forward + backward of "
          f"{res['qtha_layers']} circuits, replayed alone) = {res['circuit_share_of_qtha_step']:.1%} of QTHA's "
          f"median step")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1")
    res = run(args)
    if args.json:
        from tunelab.io import atomic_write_json

        atomic_write_json(args.json, res)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
