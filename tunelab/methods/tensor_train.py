"""Tensor-train (matrix product operator, MPO) linear maps: a (d_out × d_in) matrix stored as a chain of small cores.

W[(o_1…o_N), (i_1…i_N)] = Σ_bonds Π_k G_k[D_{k-1}, i_k, o_k, D_k], with cores G_k ∈ R^{D_{k-1} × i_k × o_k × D_k},
D_0 = D_N = 1, d_in = Π i_k, d_out = Π o_k (index 1 the most significant). It has Σ_k D_{k-1} i_k o_k D_k
parameters instead of d_in · d_out. `TensorTrainLinear` applies it to x (…, d_in) core by core and never builds W,
except when one side is small (≤ `DENSE_SIDE`, as the qubit side of QTHA's projections): W is then no larger than
a rank-64 LoRA factor, and multiplying it out (`dense()`, differentiable) for one matmul is faster than a chain of
small batched matmuls (QTHA's training step: 0.6× → 0.76× LoRA's speed in benchmarks/qtha_speed.py).

Factorisation: each dimension is split into N factors with the smallest possible largest factor (`balanced_factors`,
factors may be 1: 8 into 3 is 2·2·2, 896 is 14·8·8, 11008 is 43·16·16). When a large prime factor makes that
split lopsided (the largest factor above twice the N-th root), the dimension is padded up to the nearest number
that splits evenly: the input with zeros, the output truncated (344 → 350 = 7·10·5, 1376 → 1377 = 17·9·9, a
prime 4099 → 4104). The first core takes the largest factor and the others follow in ascending order, so the
middle cores (D² parameters each) get the small ones. A bond never exceeds the largest rank its cut allows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError

LOPSIDED = 2.0  # a split is lopsided when its largest factor exceeds this multiple of the N-th root
DENSE_SIDE = 64  # a map with a side this small is applied as one dense matmul (see the module doc)


def balanced_factors(d: int, n: int) -> list[int]:
    """`n` factors of `d` (product exactly d, 1s allowed) with the smallest largest factor, in descending order."""
    best: list[int] | None = None

    def search(rest: int, k: int, lo: int, acc: list[int]) -> None:
        nonlocal best
        if k == 1:
            cand = acc + [rest]
            if rest >= lo and (best is None or (cand[-1], -cand[0]) < (best[-1], -best[0])):
                best = cand
            return
        f = lo
        while f**k <= rest:
            if rest % f == 0:
                search(rest // f, k - 1, f, acc + [f])
            f += 1

    search(d, n, 1, [])
    return sorted(best, reverse=True)


def tt_dims(d: int, n: int) -> tuple[int, list[int]]:
    """(padded dimension, its factors in core order): `d` itself unless its balanced split is lopsided."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1 or isinstance(n, bool) or not isinstance(n, int) \
            or n < 1:
        raise ConfigError(f"tensor train: dimension {d!r} and number of cores {n!r} must be integers >= 1")
    padded = d
    while True:
        factors = balanced_factors(padded, n)
        if factors[0] <= LOPSIDED * padded ** (1 / n) + 1e-9:
            return padded, [factors[0], *sorted(factors[1:])]
        padded += 1


def tt_bonds(in_factors: list[int], out_factors: list[int], bond: int) -> list[int]:
    """Bond dimensions D_0…D_N: `bond` inside, 1 at the ends, each capped by the rank its cut allows."""
    sizes = [i * o for i, o in zip(in_factors, out_factors)]
    return [1] + [min(bond, math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))] + [1]


def tt_num_parameters(in_features: int, out_features: int, cores: int, bond: int) -> int:
    """Parameters of `TensorTrainLinear(in_features, out_features, cores, bond)`, from the shapes alone."""
    (_, i_f), (_, o_f) = tt_dims(in_features, cores), tt_dims(out_features, cores)
    d = tt_bonds(i_f, o_f, bond)
    return sum(d[k] * i_f[k] * o_f[k] * d[k + 1] for k in range(cores))


class TensorTrainLinear(nn.Module):
    """y = W x with W an MPO of `cores` cores and bond dimension `bond` (no bias); see the module doc.

    Init: Gaussian cores scaled so W's entries have variance 1 / (3 d_in), as LoRA's kaiming-uniform A;
    `zero_last` zeroes the last core (W = 0, while the gradient w.r.t. that core is not zero).
    """

    def __init__(self, in_features: int, out_features: int, cores: int = 3, bond: int = 4, zero_last: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if isinstance(bond, bool) or not isinstance(bond, int) or bond < 1:
            raise ConfigError(f"method.qtha_bond: the bond dimension must be an integer >= 1 (got {bond!r})")
        self.in_features, self.out_features, self.zero_last = in_features, out_features, zero_last
        self.in_padded, self.in_factors = tt_dims(in_features, cores)
        self.out_padded, self.out_factors = tt_dims(out_features, cores)
        self.bonds = tt_bonds(self.in_factors, self.out_factors, bond)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.bonds[k], i, o, self.bonds[k + 1], device=device, dtype=dtype))
            for k, (i, o) in enumerate(zip(self.in_factors, self.out_factors)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Gaussian cores with Var(W_ij) = 1 / (3 d_in); the last core zero when `zero_last`."""
        n = len(self.cores)
        std = (1 / (3 * self.in_features) / math.prod(self.bonds[1:-1])) ** (1 / (2 * n))
        for core in self.cores:
            nn.init.normal_(core, std=std)
        if self.zero_last:
            nn.init.zeros_(self.cores[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W x: one matmul with `dense()` when a side is small (≤ DENSE_SIDE), else `contract(x)`."""
        if min(self.in_features, self.out_features) <= DENSE_SIDE:
            return F.linear(x, self.dense())
        return self.contract(x)

    def contract(self, x: torch.Tensor) -> torch.Tensor:
        """W x, contracting the cores one by one from the last, on features-major activations (rows last).

        The state is t (inputs left, bond, outputs done, rows): each core is one batched matmul of its
        (D_{k-1}·o_k, i_k·D_k) matrix with t viewed as (inputs left / i_k, i_k·D_k, outputs done · rows), whose
        result already has the next step's layout, so no activation is permuted between cores.
        """
        lead = x.shape[:-1]
        if self.in_padded != self.in_features:
            x = F.pad(x, (0, self.in_padded - self.in_features))
        rows = x.numel() // self.in_padded
        t = x.reshape(rows, self.in_padded).T  # (inputs, rows): rows become the contiguous axis below
        left, rest = self.in_padded, rows
        for core in reversed(self.cores):
            d0, i, o, d1 = core.shape
            left //= i
            mat = core.permute(0, 2, 1, 3).reshape(d0 * o, i * d1)
            t = torch.bmm(mat.expand(left, -1, -1), t.reshape(left, i * d1, rest))  # (left, d0·o, rest)
            rest *= o
        y = t.reshape(self.out_padded, rows).T.reshape(*lead, self.out_padded)
        return y[..., : self.out_features] if self.out_padded != self.out_features else y

    def dense(self) -> torch.Tensor:
        """W (d_out, d_in) multiplied out from the cores (for tests and inspection; O(d_in · d_out) memory)."""
        w = self.cores[0].reshape(self.in_factors[0], self.out_factors[0], self.bonds[1])  # (inputs, outputs, bond)
        for core in self.cores[1:]:
            w = torch.einsum("IOd,dioe->IiOoe", w, core)
            w = w.reshape(w.shape[0] * w.shape[1], w.shape[2] * w.shape[3], w.shape[4])
        return w.reshape(self.in_padded, self.out_padded).T[: self.out_features, : self.in_features]

    def num_parameters(self) -> int:
        return sum(c.numel() for c in self.cores)

    def extra_repr(self) -> str:
        pad = (f", padded {self.in_padded}->{self.out_padded}"
               if (self.in_padded, self.out_padded) != (self.in_features, self.out_features) else "")
        return (f"{self.in_features}->{self.out_features}, in {self.in_factors}, out {self.out_factors}, "
                f"bonds {self.bonds}{pad}")
