"""Data parallelism under `torchrun`: one process per device, each on its share of every micro-batch.

Launched by `torchrun --nproc_per_node N tunelab <stage> ...` (or across machines with torchrun's rendezvous,
see the README), each process reads RANK / WORLD_SIZE / LOCAL_RANK, joins the process group (NCCL on CUDA,
gloo on CPU) and trains the same model on its contiguous slice of the rows of each micro-batch. Every process
computes the step's micro-batches from the step number, so all know the global number of loss tokens; each
divides its summed loss by that global count, and the gradients are summed across processes (an all-reduce
after the accumulation window, as DDP does, but explicitly, so the forward may skip the model's own head).
The result equals one process training the whole global batch. Not here: FSDP (sharded parameters) and
tensor parallelism; a model must fit on each device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tunelab.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among `world_size` processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def shard_rows(batch: dict[str, torch.Tensor], d: Dist) -> dict[str, torch.Tensor]:
    """This process's contiguous slice of a micro-batch's rows."""
    if d.world_size == 1:
        return batch
    rows = batch["input_ids"].shape[0]
    if rows % d.world_size:
        raise ConfigError(f"train.micro_batch_size={rows} is not divisible by the {d.world_size} processes; "
                          f"make it a multiple of the number of processes (the global micro-batch is split)")
    n = rows // d.world_size
    return {k: v[d.rank * n:(d.rank + 1) * n] for k, v in batch.items()}


def sum_across(value: float | torch.Tensor, d: Dist) -> float:
    """The sum of a number over all processes."""
    if d.world_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def sum_gradients(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Sum every parameter's gradient over all processes (in place)."""
    if d.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_parameters(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Make every process start from rank 0's trainable weights."""
    if d.world_size > 1:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def cleanup(d: Dist) -> None:
    if d.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
