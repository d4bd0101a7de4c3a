"""Data parallelism under `torchrun`: one process per device, each on its share of every micro-batch.

Launched by `torchrun --nproc_per_node N tunelab <stage> ...` (or across machines with torchrun's rendezvous,
see the README), each process reads RANK / WORLD_SIZE / LOCAL_RANK, joins the process group (NCCL for CUDA
tensors and gloo for CPU ones on a GPU machine, gloo on CPU) and trains on its contiguous slice of the rows of
each micro-batch. Every process computes the step's micro-batches from the step number, so all know the global
number of loss tokens; each divides its summed loss by that global count and the gradients are summed (never
averaged) across processes, so the result equals one process training the whole global batch. Two ways
(`train.distributed`):

- `ddp`: every process holds the whole model; the gradients are all-reduced after the accumulation window, as
  DDP does, but explicitly (`sum_gradients`), so the forward may skip the model's own head.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each decoder layer, then on `ShardedLM`, a root module
  holding the model and the chunked loss, so the embeddings, final norm and head are gathered around the loss
  as the layers are around their forward. Parameters, gradients and optimizer state live as DTensor shards; each
  backward reduce-scatters (sums) the gradients. Full checkpoints and the final `method.save` see full tensors
  (`full_state`, `full_optimizer_state`, `full_parameters`), so a checkpoint has the same format either way; a
  resume loads the full tensors before sharding and re-shards the optimizer state (`shard_optimizer_state`).
  Sharded checkpoints (`train.checkpoint_format: sharded`, `sharded.py`) write the DTensor shards as they are.
  The model is loaded in full on each process's CPU, then sharded group by group onto its device. A method
  injects its layers before sharding, so FSDP holds all of its parameters (LoRA-Dash's δ from the start); LoRA-Dash's
  switch gathers each frozen weight whole in turn on every process for its SVD (`lora_dash.py`).

Not here: tensor or pipeline parallelism.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tunelab.errors import ConfigError, ModelError
from tunelab.train.loss import chunked_loss_sum

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - older torch: `train.distributed=fsdp` is refused
    FSDPModule = fully_shard = distribute_tensor = None

    class DTensor:  # type: ignore[no-redef]  # nothing is ever an instance of it
        pass

FSDP_DEVICES = ("cpu", "cuda")  # cpu: tested with 2 gloo processes; cuda: 1 process on NCCL (tests/test_gpu.py)


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
        # CPU tensors (e.g. weights broadcast before FSDP moves its shards to the GPU) need gloo beside NCCL
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
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
    """Sum every parameter's gradient over all processes (in place); FSDP's sharded ones are summed already."""
    if d.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
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


# --- FSDP2 -------------------------------------------------------------------------------------------------------


def uses_fsdp(mode: str, d: Dist) -> bool:
    """Whether this run shards the model: `train.distributed=fsdp` with more than one process."""
    return mode == "fsdp" and d.world_size > 1


def check_fsdp(device: torch.device | str) -> None:
    """ConfigError unless this torch has FSDP2 (`fully_shard`) and the device is one it was written for."""
    device = torch.device(device)
    if fully_shard is None or not dist.is_available():
        raise ConfigError(f"train.distributed=fsdp needs torch >= 2.6 with torch.distributed "
                          f"(torch.distributed.fsdp.fully_shard); this is torch {torch.__version__}: upgrade torch "
                          f"or set train.distributed=ddp")
    if device.type not in FSDP_DEVICES:
        raise ConfigError(f"train.distributed=fsdp: device {device.type!r} is not supported (FSDP runs on "
                          f"{' and '.join(FSDP_DEVICES)}); set train.distributed=ddp")


class ShardedLM(nn.Module):
    """FSDP's root: a causal LM and its chunked loss as one module.

    The chunked loss runs the decoder body and then uses the head's weight directly, never the model's own
    forward; as the forward of this root, it runs after FSDP has gathered the parameters the decoder layers do
    not hold (embeddings, final norm, head), and their gradients are reduce-scattered after the backward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
        return chunked_loss_sum(self.model, batch, dtype)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the classes HF lists in `_no_split_modules`, else the
    longest `nn.ModuleList`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
        layers = list(max(lists, key=len)) if lists else []
    if not layers:
        raise ModelError(f"{type(model).__name__}: found no decoder layers to shard (no _no_split_modules "
                         f"class and no nn.ModuleList); set train.distributed=ddp")
    return layers


def shard_model(model: nn.Module, d: Dist, device: torch.device | str) -> ShardedLM:
    """Apply FSDP2 to `model` in place (each decoder layer, then the `ShardedLM` root) on a 1-D mesh of all
    processes; the shards move to `device`. Gradients are summed across processes, not averaged."""
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device(device)
    check_fsdp(device)
    mesh = init_device_mesh(device.type, (d.world_size,))
    for layer in reversed(decoder_layers(model)):  # inner modules before the ones that hold them
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    root = ShardedLM(model)
    # The root reshards after its forward too, so that parameters are shards whenever no forward runs
    # (evaluation included) and a checkpoint always sees the same kind of tensor.
    fully_shard(root, mesh=mesh, reshard_after_forward=True)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # the loss is already divided by the global token count
            m.set_force_sum_reduction_for_comms(True)
    return root


def _full(t: Any) -> Any:
    """A DTensor gathered into a full CPU tensor (a collective: every process calls it); anything else as is."""
    return t.full_tensor().cpu() if isinstance(t, DTensor) else t


def full_state(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """`tensors` with every sharded (DTensor) value gathered to a full CPU tensor; every process must call it.

    With `keep=False` (the processes that write nothing) each gathered tensor is dropped at once and {} returned.
    """
    out = {}
    for k, v in tensors.items():
        full = _full(v)
        if keep:
            out[k] = full
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """`optimizer.state_dict()` with sharded state gathered: the format one process writes; call on every process
    (`keep=False`: gather, drop, return {})."""
    sd = optimizer.state_dict()
    if not any(isinstance(v, DTensor) for s in sd["state"].values() for v in s.values()):
        return sd if keep else {}
    state = {i: full_state(sd["state"][i], keep) for i in sorted(sd["state"])}
    return {**sd, "state": state} if keep else {}


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict` of a full state: cut each sharded parameter's state like the parameter."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor) or p not in optimizer.state:
                continue
            state = optimizer.state[p]
            for k, v in state.items():
                if k != "step" and isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.shape:
                    # every process loaded the same file: each keeps its own shard, no communication
                    state[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (e.g. clip_grad_norm_'s total norm under FSDP) as a plain tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextmanager
def full_parameters(model: nn.Module, d: Dist, frozen: bool = False) -> Iterator[None]:
    """While the block runs, the first process's model holds full CPU tensors in place of its FSDP shards.

    Gathers the trainable parameters (and the frozen ones too when `frozen`, e.g. to save a whole model), so that
    code that reads the weights (`method.save`) sees what one process would; every process must enter it. Tied
    weights stay tied. A model without shards is left alone.
    """
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    gathered: dict[int, nn.Parameter | None] = {}  # by the shard's id; None on the other processes
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not isinstance(p, DTensor) or not (frozen or p.requires_grad):
                continue
            if id(p) not in gathered:  # a tied weight is gathered once, in the same order on every process
                full = p.full_tensor().cpu()
                gathered[id(p)] = nn.Parameter(full, requires_grad=p.requires_grad) if d.is_main else None
            if d.is_main:
                module.register_parameter(name, gathered[id(p)])
                swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in swapped:
            module.register_parameter(name, p)
