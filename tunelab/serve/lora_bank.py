"""Many LoRA adapters on one copy of the base weights: a slot bank per adapted linear, gathered per batch row.

For a target linear `W` and batch row i served by the adapter in slot k(i):

    y_i = W x_i + b + B_k (A_k x_i)                       (LoRA, rsLoRA: the scaling is folded into B_k)
    y_i = W x_i + b + (g_k − 1)·W x_i + B_k (A_k x_i)     (DoRA: g_k = m_k / ‖W + s·B A‖ per row, folded into B_k)

The bank holds `A: (slots+1, r_max, d_in)` and `Bᵀ: (slots+1, r_max, d_out)`; slot 0 stays all zeros and stands
for the base model, an adapter of rank r < r_max fills `A[k, :r]`, `Bᵀ[k, :r]` and the zero padding adds nothing.
A batch whose rows all use one slot runs two plain matmuls at that slot's own rank. A mixed batch either runs two
dense matmuls over every slot up to its highest one, each row masked to its own slot's columns (few adapters: no
copies, the weights read once), or gathers each row's A and Bᵀ with `index_select` and runs two `bmm`s at the
largest rank among its rows (many adapters; Punica's BGMV semantics in plain torch). The update is added by a
forward hook on each adapted `nn.Linear`: the model stays a plain transformers model, and modules no resident
adapter targets cost nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

DENSE_SLOTS = 16  # a mixed batch whose highest slot is below this runs the masked dense path

@dataclass
class LoraWeights:
    """One adapter ready for the bank: per module path `(A (r, d_in), B (d_out, r) with the scaling folded in,
    g (d_out,) or None)`; `g` is DoRA's magnitude / norm, already folded into B as well."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    rank: int = field(init=False)

    def __post_init__(self) -> None:
        self.rank = max(a.shape[0] for a, _, _ in self.modules.values())


class _ModuleBank:
    """The stacked A and Bᵀ (and DoRA g) slots of one adapted linear, and the hook that adds a batch's updates."""

    def __init__(self, bank: LoraBank, linear: nn.Linear, slots: int, r_max: int):
        self.bank, self.linear = bank, linear
        w = linear.weight
        kw = dict(device=w.device, dtype=w.dtype)
        self.A = torch.zeros(slots + 1, r_max, linear.in_features, **kw)
        self.B = torch.zeros(slots + 1, r_max, linear.out_features, **kw)  # B transposed: rank rows
        self.g: torch.Tensor | None = None  # (slots+1, d_out) DoRA factors, 1 where a slot is not DoRA
        self.rank = [0] * (slots + 1)  # this module's rank in each slot (0: the slot's adapter leaves it alone)
        self.handle = linear.register_forward_hook(self._hook)

    def grow(self, r_max: int) -> None:
        pad = r_max - self.A.shape[1]
        if pad > 0:
            self.A = torch.cat([self.A, self.A.new_zeros(self.A.shape[0], pad, self.A.shape[2])], 1)
            self.B = torch.cat([self.B, self.B.new_zeros(self.B.shape[0], pad, self.B.shape[2])], 1)

    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, g: torch.Tensor | None) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.rank[slot] = 0 if a is None else a.shape[0]
        if a is not None:
            self.A[slot, :a.shape[0]].copy_(a)
            self.B[slot, :a.shape[0]].copy_(b.T)
        if g is not None and self.g is None:
            self.g = torch.ones(self.A.shape[0], self.B.shape[2], device=self.A.device, dtype=self.A.dtype)
        if self.g is not None:
            self.g[slot] = 1 if g is None else g.to(self.g.dtype)

    def _hook(self, module: nn.Linear, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
        bank = self.bank
        x = inputs[0]
        if bank.single is not None:
            k = bank.single
            r = self.rank[k]
            if r == 0:
                return None
            if self.g is not None:
                out = out + (self.g[k] - 1) * _without_bias(out, module)
            return out + (x @ self.A[k, :r].T) @ self.B[k, :r]
        if not any(self.rank[k] for k in bank.distinct):
            return None
        if self.g is not None:
            out = out + (self.g[bank.index] - 1).unsqueeze(1) * _without_bias(out, module)
        if bank.dense:  # every resident slot up to the batch's highest, masked to each row's own
            n = bank.width
            h = x.reshape(-1, x.shape[-1]) @ self.A.view(-1, self.A.shape[-1])[:n].T
            h = h * bank.token_mask(x.shape[1])
            return out + (h @ self.B.view(-1, self.B.shape[-1])[:n]).view(out.shape)
        r = bank.r_eff
        a = self.A[:, :r].index_select(0, bank.index)
        return out + torch.bmm(torch.bmm(x, a.transpose(1, 2)), self.B[:, :r].index_select(0, bank.index))


def _without_bias(out: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    return out if module.bias is None else out - module.bias


class LoraBank:
    """`slots` adapter slots on `model` (slot 0 is the base model), least recently used first out.

    The engine thread owns it: `acquire(key, load)` makes an adapter resident (calling `load()` for its
    `LoraWeights` when it is not) and pins it while a row uses it; `release` unpins; `set_rows(slots)` says which
    slot each row of the next forward uses.
    """

    def __init__(self, model: nn.Module, slots: int):
        if slots < 1:
            raise ValueError("a LoRA bank needs at least one slot")
        self.model, self.slots = model, slots
        self.modules: dict[str, _ModuleBank] = {}
        self.r_max = 0
        self.resident: OrderedDict[object, int] = OrderedDict()  # adapter key -> slot, least recently used first
        self.refs = [0] * (slots + 1)  # rows of the running batch that use each slot
        self.rank = [0] * (slots + 1)
        self.orphans: set[int] = set()  # slots of unloaded adapters that running rows still use
        self.distinct: set[int] = set()
        self.single: int | None = 0  # the slot every row uses, or None for a mixed batch
        self.index = torch.zeros(0, dtype=torch.long)
        self.r_eff, self.dense, self.width = 0, False, 0
        self._mask, self._masks = None, {}

    # --- residency -----------------------------------------------------------------------------------------------

    def acquire(self, key: object, load) -> int | None:
        """The slot of adapter `key`, pinned once more; loads it (`load()` -> LoraWeights) into the least recently
        used unpinned slot when it is not resident. None when every slot is pinned by running rows."""
        if key in self.resident:
            slot = self.resident[key]
            self.resident.move_to_end(key)
        else:
            slot = self._free_slot()
            if slot is None:
                return None
            self._write(slot, load())
            self.resident[key] = slot
        self.refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if slot:
            self.refs[slot] -= 1

    def evict(self, key: object) -> None:
        """Forget adapter `key` (unloaded): its slot is reused once no row holds it."""
        slot = self.resident.pop(key, None)
        if slot is not None:
            self.orphans.add(slot)

    def _free_slot(self) -> int | None:
        used = set(self.resident.values())
        for slot in range(1, self.slots + 1):
            if slot not in used and (slot not in self.orphans or self.refs[slot] == 0):
                self.orphans.discard(slot)
                return slot
        for key, slot in self.resident.items():  # least recently used first
            if self.refs[slot] == 0:
                del self.resident[key]
                return slot
        return None

    def _write(self, slot: int, weights: LoraWeights) -> None:
        if weights.rank > self.r_max:
            self.r_max = weights.rank
            for mb in self.modules.values():
                mb.grow(self.r_max)
        for name in weights.modules:
            if name not in self.modules:
                self.modules[name] = _ModuleBank(self, self.model.get_submodule(name), self.slots, self.r_max)
        for name, mb in self.modules.items():
            a, b, g = weights.modules.get(name, (None, None, None))
            mb.write(slot, a, b, g)
        self.rank[slot] = weights.rank

    # --- per forward ---------------------------------------------------------------------------------------------

    def set_rows(self, slots: list[int]) -> None:
        """The slot each batch row of the next forward uses.

        A batch of one slot runs at that slot's rank. A mixed batch whose highest slot is below `DENSE_SLOTS`
        multiplies every slot up to it and masks each row to its own (two plain matmuls, no copies); past that, it
        gathers each row's A and B (`index_select`, then `bmm`), which moves less when many adapters share a batch.
        """
        distinct = self.distinct = set(slots)
        if len(distinct) == 1:
            self.single = slots[0]
            return
        self.single = None
        device = next(iter(self.modules.values())).A.device if self.modules else "cpu"
        self.index = torch.tensor(slots, dtype=torch.long, device=device)
        self.r_eff = max(self.rank[s] for s in distinct)
        top = max(distinct) + 1
        self.dense = top <= DENSE_SLOTS
        self.width = top * self.r_max
        self._masks = {}
        if self.dense:
            mask = torch.zeros(len(slots), top, self.r_max, device=device,
                               dtype=next(iter(self.modules.values())).A.dtype)
            mask[torch.arange(len(slots), device=device), self.index] = 1
            self._mask = mask.view(len(slots), -1)

    def token_mask(self, tokens: int) -> torch.Tensor:
        """The dense path's (rows x tokens, width) mask: 1 on the columns of each row's own slot."""
        if tokens not in self._masks:
            self._masks[tokens] = self._mask.repeat_interleave(tokens, 0)
        return self._masks[tokens]

    def remove(self) -> None:
        """Take every hook out of the model (it is a plain model again)."""
        for mb in self.modules.values():
            mb.handle.remove()
        self.modules.clear()
