"""The QTHA circuit simulator: both paths against a dense Kronecker-product reference, exact gradients (autograd and
the parameter-shift rule), shot estimates that converge as 1/√shots, and fp32 computation under bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.methods.quantum import (
    expval_fast,
    expval_gate_by_gate,
    probabilities,
    product_state,
    qnn_expval,
    sample_expval_z,
)

C128 = torch.complex128
I2 = torch.eye(2, dtype=C128)
X = torch.tensor([[0, 1], [1, 0]], dtype=C128)
Z = torch.tensor([[1, 0], [0, -1]], dtype=C128)
P0, P1 = torch.diag(torch.tensor([1, 0], dtype=C128)), torch.diag(torch.tensor([0, 1], dtype=C128))


def on_qubit(gate: torch.Tensor, q: int, n: int) -> torch.Tensor:
    """The full 2^n matrix of a one-qubit gate on qubit q (qubit 0 = the leftmost Kronecker factor)."""
    out = torch.ones(1, 1, dtype=C128)
    for k in range(n):
        out = torch.kron(out, gate if k == q else I2)
    return out


def cnot(c: int, t: int, n: int) -> torch.Tensor:
    """|0⟩⟨0|_c ⊗ 1 + |1⟩⟨1|_c ⊗ X_t as a full matrix."""
    off, on = torch.ones(1, 1, dtype=C128), torch.ones(1, 1, dtype=C128)
    for k in range(n):
        off = torch.kron(off, P0 if k == c else I2)
        on = torch.kron(on, P1 if k == c else X if k == t else I2)
    return off + on


def rotation(kind: str, theta: float) -> torch.Tensor:
    """exp(-iθP/2) written out from the textbook definitions."""
    c, s = math.cos(theta / 2), math.sin(theta / 2)
    return {"ry": torch.tensor([[c, -s], [s, c]], dtype=C128),
            "rz": torch.tensor([[complex(c, -s), 0], [0, complex(c, s)]], dtype=C128),
            "rx": torch.tensor([[c, -1j * s], [-1j * s, c]], dtype=C128)}[kind]


def dense_reference(angles: torch.Tensor, weights: torch.Tensor, rotations) -> torch.Tensor:
    """⟨Z_i⟩ per sample: every gate a full 2^n matrix, the state a complex vector, ⟨ψ|Z_i|ψ⟩."""
    b, n = angles.shape
    out = torch.empty(b, n, dtype=torch.float64)
    for row in range(b):
        psi = torch.zeros(2**n, dtype=C128)
        psi[0] = 1
        for q in range(n):
            psi = on_qubit(rotation("ry", float(angles[row, q])), q, n) @ psi
        for layer in weights:
            for kind, thetas in zip(rotations, layer):
                for q in range(n):
                    psi = on_qubit(rotation(kind, float(thetas[q])), q, n) @ psi
            for i in range(n if n > 1 else 0):
                psi = cnot(i, (i + 1) % n, n) @ psi
        for q in range(n):
            out[row, q] = (psi.conj() @ on_qubit(Z, q, n) @ psi).real
    return out


def random_circuit(n: int, seed: int, batch: int = 3, depth: int = 2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rotations = [["ry", "rz", "rx"][i] for i in torch.randint(0, 3, (int(torch.randint(1, 4, (1,), generator=g)),),
                                                                generator=g)]
    angles = (torch.rand(batch, n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    weights = (torch.rand(depth, len(rotations), n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    return angles.to(dtype), weights.to(dtype), tuple(rotations)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_both_paths_equal_a_dense_kronecker_reference(n):
    for seed in range(3):
        angles, weights, rotations = random_circuit(n, seed=100 * n + seed)
        want = dense_reference(angles, weights, rotations)
        assert (expval_gate_by_gate(angles, weights, rotations) - want).abs().max() <= 1e-10
        assert (expval_fast(angles, weights, rotations) - want).abs().max() <= 1e-10


def test_two_qubit_ring_has_the_analytic_expectations():
    """With θ = 0 only CNOT(0→1), CNOT(1→0) act: Z_0 → Z_1 and Z_1 → Z_0 Z_1 on the encoded product state."""
    a = torch.tensor([[0.3, 1.1], [2.0, -0.7]], dtype=torch.float64)
    got = qnn_expval(a, torch.zeros(1, 1, 2, dtype=torch.float64))
    want = torch.stack([torch.cos(a[:, 1]), torch.cos(a[:, 0]) * torch.cos(a[:, 1])], -1)
    assert (got - want).abs().max() <= 1e-14
    # one qubit, one RY layer: ⟨Z⟩ = cos(x + θ)
    x, theta = torch.tensor([[0.4]], dtype=torch.float64), torch.tensor([[[0.9]]], dtype=torch.float64)
    assert qnn_expval(x, theta).item() == pytest.approx(math.cos(1.3), abs=1e-14)


def test_fast_path_equals_gate_by_gate_at_eight_qubits_and_the_state_is_normalised():
    angles, weights, rotations = random_circuit(8, seed=3, batch=5, depth=3)
    assert (expval_fast(angles, weights, rotations) - expval_gate_by_gate(angles, weights, rotations)).abs().max() \
        <= 1e-12
    psi0 = product_state(angles)
    assert (psi0.pow(2).sum(-1) - 1).abs().max() <= 1e-12
    from tunelab.methods.quantum import layers_matrix
    probs = probabilities(psi0, layers_matrix(weights, rotations, 8))
    assert (probs.sum(-1) - 1).abs().max() <= 1e-12  # the layers are unitary


@pytest.mark.parametrize("mode", ["exact", "parameter-shift"])
def test_gradcheck_in_fp64(mode):
    angles, weights, _ = random_circuit(3, seed=11, batch=2)
    angles.requires_grad_(), weights.requires_grad_()
    for rotations in (("ry",), ("ry", "rz", "rx")):
        w = weights[:, :1].expand(-1, len(rotations), -1).clone().detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda a, t, r=rotations: qnn_expval(a, t, r, mode), (angles, w))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 5e-6)])
def test_parameter_shift_gradients_equal_autograd(dtype, tol):
    for n, seed in ((4, 0), (5, 1)):
        angles, weights, rotations = random_circuit(n, seed=seed, batch=6, dtype=dtype)
        grad_out = torch.randn(6, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        grads = {}
        for mode in ("exact", "parameter-shift"):
            a, w = angles.clone().requires_grad_(), weights.clone().requires_grad_()
            out = qnn_expval(a, w, rotations, mode)
            out.backward(grad_out)
            grads[mode] = (out.detach(), a.grad, w.grad)
        for exact, shifted in zip(grads["exact"], grads["parameter-shift"]):
            assert (exact - shifted).abs().max() <= tol


def test_shot_estimates_converge_as_one_over_root_shots_and_are_seeded():
    angles, weights, rotations = random_circuit(4, seed=5, batch=64)
    exact = qnn_expval(angles, weights, rotations)

    def estimate(shots, seed):
        return qnn_expval(angles, weights, rotations, "shots", shots, torch.Generator().manual_seed(seed))

    errors = {s: estimate(s, 0) - exact for s in (1_000, 100_000)}
    rms = {s: float(e.pow(2).mean().sqrt()) for s, e in errors.items()}
    assert 4 < rms[1_000] / rms[100_000] < 25  # 1/√shots: a factor of 10 expected
    assert rms[100_000] <= 0.004  # the standard deviation is sqrt((1 - ⟨Z⟩²) / shots) <= 0.0032
    assert (errors[100_000].abs() <= 5 * ((1 - exact**2) / 100_000).sqrt() + 1e-12).all()  # every entry within 5σ
    assert torch.equal(estimate(500, 3), estimate(500, 3))
    assert not torch.equal(estimate(500, 3), estimate(500, 4))
    # sampling carries no gradient; shots mode's backward is the shift rule on shot estimates
    probs = probabilities(product_state(angles), torch.eye(16, dtype=torch.float64)).requires_grad_()
    assert not sample_expval_z(probs, 10, torch.Generator().manual_seed(0)).requires_grad
    a, w = angles[:4].clone().requires_grad_(), weights.clone().requires_grad_()
    qnn_expval(a, w, rotations, "shots", 50_000, torch.Generator().manual_seed(0)).sum().backward()
    a2, w2 = angles[:4].clone().requires_grad_(), weights.clone().requires_grad_()
    qnn_expval(a2, w2, rotations).sum().backward()
    assert (a.grad - a2.grad).abs().max() <= 0.05 and (w.grad - w2.grad).abs().max() <= 0.05


def test_computes_in_fp32_under_bf16_autocast_and_in_fp64_for_fp64_inputs():
    angles, weights, rotations = random_circuit(5, seed=9, batch=4)
    want = qnn_expval(angles, weights, rotations)
    assert want.dtype == torch.float64
    for mode in ("exact", "parameter-shift"):
        a = angles.to(torch.bfloat16).requires_grad_()
        w = weights.float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = qnn_expval(a, w, rotations, mode)
            got.sum().backward()
        assert got.dtype == torch.float32 and a.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
        # the same result as fp32 inputs rounded to bf16, to fp32 accuracy (no bf16 arithmetic inside)
        ref = qnn_expval(angles.to(torch.bfloat16).double(), weights.float().double(), rotations)
        assert (got.double() - ref).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    angles, weights, rotations = random_circuit(6, seed=2, batch=8)
    for mode in ("exact", "parameter-shift"):
        a, w = angles.cuda().requires_grad_(), weights.cuda().requires_grad_()
        out = qnn_expval(a, w, rotations, mode)
        out.sum().backward()
        a_cpu, w_cpu = angles.clone().requires_grad_(), weights.clone().requires_grad_()
        qnn_expval(a_cpu, w_cpu, rotations).sum().backward()
        assert out.device.type == "cuda"
        assert (out.cpu() - qnn_expval(angles, weights, rotations)).abs().max() <= 1e-10
        assert (a.grad.cpu() - a_cpu.grad).abs().max() <= 1e-10 and (w.grad.cpu() - w_cpu.grad).abs().max() <= 1e-10
    est = qnn_expval(angles.cuda(), weights.cuda(), rotations, "shots", 100_000,
                     torch.Generator(device="cuda").manual_seed(0))
    assert (est.cpu() - qnn_expval(angles, weights, rotations)).abs().max() <= 0.02


def test_bad_settings_name_the_key():
    a, w = torch.zeros(2, 3), torch.zeros(1, 1, 3)
    with pytest.raises(ConfigError, match="qtha_rotations.*ry, rz, rx"):
        qnn_expval(a, w, ("ry", "cz"))
    with pytest.raises(ConfigError, match="qtha_mode"):
        qnn_expval(a, w, mode="adjoint")
    with pytest.raises(ConfigError, match="qtha_shots"):
        qnn_expval(a, w, mode="shots")
    with pytest.raises(ConfigError, match=r"weights \(L, 1, n\)"):
        qnn_expval(a, torch.zeros(1, 1, 4))
