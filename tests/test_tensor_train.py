"""Tensor-train (MPO) linear maps: the core-by-core contraction equals the dense matrix, balanced factorisation with
padding for lopsided dimensions, parameter counts from shapes, zero-initialised last core."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.methods.tensor_train import TensorTrainLinear, balanced_factors, tt_bonds, tt_dims, tt_num_parameters


@pytest.mark.parametrize("d,n,want", [(4096, 3, [16, 16, 16]), (896, 3, [14, 8, 8]), (8, 3, [2, 2, 2]),
                                      (2, 3, [2, 1, 1]), (1, 2, [1, 1]), (11008, 3, [43, 16, 16]),
                                      (3584, 3, [16, 16, 14]), (128, 3, [8, 4, 4]), (12, 2, [4, 3]), (7, 1, [7])])
def test_balanced_factors(d, n, want):
    assert balanced_factors(d, n) == want


def test_factorisation_pads_dimensions_with_a_large_prime_factor():
    # common hidden / intermediate sizes split as they are
    for d in (4096, 3584, 896, 11008, 18944, 128, 4864, 512, 64):
        padded, factors = tt_dims(d, 3)
        assert padded == d and math.prod(factors) == d
    # a lopsided split (largest factor above twice the cube root) is padded to the nearest even split
    assert tt_dims(344, 3) == (350, [10, 5, 7])  # 344 = 43·8
    assert tt_dims(1376, 3) == (1377, [17, 9, 9])  # 1376 = 43·32
    assert tt_dims(4099, 3)[0] == 4104  # a prime
    for d in range(1, 400):
        padded, factors = tt_dims(d, 3)
        assert padded >= d and math.prod(factors) == padded and factors[0] == max(factors)
        assert max(factors) <= 2 * padded ** (1 / 3) + 1e-9 and padded - d <= max(8, d // 10)
        assert factors[1:] == sorted(factors[1:])  # largest first, then ascending: small factors in the middle
    with pytest.raises(ConfigError, match="integers >= 1"):
        tt_dims(0, 3)


@pytest.mark.parametrize("d_in,d_out,cores,bond", [(64, 8, 3, 2), (8, 64, 3, 3), (344, 8, 3, 4), (8, 1376, 2, 5),
                                                   (30, 7, 4, 3), (5, 5, 1, 2), (512, 512, 3, 6), (96, 40, 2, 64)])
def test_contraction_equals_the_dense_matrix(d_in, d_out, cores, bond):
    torch.manual_seed(0)
    mpo = TensorTrainLinear(d_in, d_out, cores, bond, dtype=torch.float64)
    w = mpo.dense()
    assert w.shape == (d_out, d_in)
    x = torch.randn(2, 3, d_in, dtype=torch.float64)
    for y in (mpo.contract(x), mpo(x)):  # core by core, and what forward picks (dense when a side is <= 64)
        assert y.shape == (2, 3, d_out)
        assert (y - x @ w.T).abs().max() <= 1e-12 * (1 + w.abs().max())
    assert mpo.num_parameters() == tt_num_parameters(d_in, d_out, cores, bond)
    assert mpo.num_parameters() == sum(mpo.bonds[k] * i * o * mpo.bonds[k + 1]
                                       for k, (i, o) in enumerate(zip(mpo.in_factors, mpo.out_factors)))


def test_dense_entries_follow_the_mpo_formula():
    """W[(o1 o2 o3), (i1 i2 i3)] = G1[0, i1, o1, :] G2[:, i2, o2, :] G3[:, i3, o3, 0]."""
    torch.manual_seed(1)
    mpo = TensorTrainLinear(24, 12, 3, 3, dtype=torch.float64).requires_grad_(False)
    w = mpo.dense()
    (i1, i2, i3), (o1, o2, o3) = mpo.in_factors, mpo.out_factors
    g1, g2, g3 = mpo.cores
    for a, b, c, p, q, r in [(0, 0, 0, 0, 0, 0), (i1 - 1, 1, i3 - 1, o1 - 1, 0, o3 - 1), (1, i2 - 1, 0, 0, o2 - 1, 1)]:
        want = g1[0, a, p] @ g2[:, b, q] @ g3[:, c, r, 0]
        assert w[(p * o2 + q) * o3 + r, (a * i2 + b) * i3 + c] == pytest.approx(float(want), abs=1e-14)


def test_bonds_are_capped_by_the_rank_a_cut_allows():
    assert tt_bonds([4, 4, 4], [2, 2, 2], 64) == [1, 8, 8, 1]
    assert tt_bonds([8, 8], [1, 1], 3) == [1, 3, 1]
    assert TensorTrainLinear(5, 5, 1, 9).bonds == [1, 1]


def test_zero_last_core_gives_zero_map_with_a_gradient_and_the_init_scale():
    torch.manual_seed(0)
    mpo = TensorTrainLinear(64, 512, 3, 6, zero_last=True)
    x = torch.randn(16, 64)
    y = mpo(x)
    assert torch.equal(y, torch.zeros_like(y))
    (mpo(x) * torch.randn(16, 512)).sum().backward()
    assert mpo.cores[-1].grad.abs().sum() > 0
    assert all(c.grad.abs().sum() == 0 for c in mpo.cores[:-1])  # W = 0 through the last core
    # without zero_last, W's entries have about LoRA A's variance 1 / (3 d_in)
    torch.manual_seed(0)
    with torch.no_grad():
        var = torch.stack([TensorTrainLinear(512, 64, 3, 6).dense().var() for _ in range(8)]).mean()
    assert 0.5 < var * 3 * 512 < 2


def test_bad_bond_is_a_config_error():
    with pytest.raises(ConfigError, match="qtha_bond"):
        TensorTrainLinear(8, 8, 3, 0)
