"""A batched state-vector simulator for QTHA's small quantum circuit, in plain PyTorch (CPU or CUDA).

The circuit on n qubits, for a batch of B inputs: angle encoding RY(x_b,i) on qubit i of |0…0⟩, then L layers,
each applying the rotations of `rotations` (any sequence of "ry", "rz", "rx") with their own angles θ[l, r, i]
to every qubit, then a ring of CNOTs (i → i+1 mod n, in order i = 0…n-1; none for n = 1); the readout is ⟨Z_i⟩
for every qubit, a (B, n) tensor in [-1, 1]. Qubit 0 is the most significant bit of a basis-state index.

Two paths compute the same numbers (tests pin it):
- `expval_gate_by_gate`, the reference: every gate applied in turn to the (B, 2, …, 2) state;
- `expval_fast`, used for training: the encoded state is a product state, built directly as a Kronecker product
  of per-qubit (cos(x/2), sin(x/2)) vectors in O(B·2^n); the trainable layers do not depend on the data, so
  their 2^n × 2^n unitary is built once per call (the gates applied to the identity, differentiable in θ) and
  applied with one matmul; ⟨Z⟩ = |ψ|² @ S with S the (2^n, n) matrix of ±1 signs.
Amplitudes are real while only RY (and CNOT) appear, complex once RZ or RX do.

`qnn_expval` is the entry point. It always computes in fp32 (fp64 when the angles are fp64), with autocast off:
bf16 / fp16 have too few mantissa bits for a state vector. Its modes:
- "exact": exact expectations, exact gradients by autograd through the fast path;
- "parameter-shift": exact expectations, gradients by the two-term shift rule ∂⟨Z⟩/∂φ = (⟨Z⟩(φ+π/2) −
  ⟨Z⟩(φ−π/2)) / 2 for every trainable angle and every encoding angle (all are Pauli rotations), i.e. the
  circuits a quantum computer would run; equal to autograd up to rounding;
- "shots": each expectation is estimated from `shots` measurements sampled from the outcome probabilities with
  a seeded `torch.Generator`. Sampling has no gradient, so the backward is the shift rule with every shifted
  circuit estimated from `shots` measurements too, as on hardware (an unbiased, noisy gradient).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Literal

import torch

from tunelab.errors import ConfigError

ROTATIONS = ("ry", "rz", "rx")
MODES = ("exact", "parameter-shift", "shots")
Mode = Literal["exact", "parameter-shift", "shots"]
SHIFT = math.pi / 2


def check_rotations(rotations) -> tuple[str, ...]:
    """`rotations` as a tuple of gate names; ConfigError for anything but a non-empty sequence of ry/rz/rx."""
    if isinstance(rotations, str) or not rotations or any(r not in ROTATIONS for r in rotations):
        raise ConfigError(f"method.qtha_rotations: {rotations!r} is not a non-empty list of rotations; give some "
                          f"of {', '.join(ROTATIONS)} in the order each layer applies them, e.g. [ry] or [ry, rz]")
    return tuple(rotations)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 when the input is fp64, else fp32 (whatever autocast or the model uses)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def is_complex(rotations: tuple[str, ...]) -> bool:
    """Whether the amplitudes become complex (RZ or RX appear)."""
    return any(r != "ry" for r in rotations)


# --- gates ------------------------------------------------------------------------------------------------------------


def rotation_matrices(kind: str, theta: torch.Tensor) -> torch.Tensor:
    """exp(-iθP/2) for P = Y, Z or X: (...,) angles -> (..., 2, 2); real for RY, complex for RZ and RX."""
    c, s = torch.cos(theta / 2), torch.sin(theta / 2)
    if kind == "ry":
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    zero = torch.zeros_like(c)
    if kind == "rz":  # diag(e^{-iθ/2}, e^{iθ/2})
        return torch.complex(torch.stack([torch.stack([c, zero], -1), torch.stack([zero, c], -1)], -2),
                             torch.stack([torch.stack([-s, zero], -1), torch.stack([zero, s], -1)], -2))
    if kind == "rx":  # [[c, -i s], [-i s, c]]
        return torch.complex(torch.stack([torch.stack([c, zero], -1), torch.stack([zero, c], -1)], -2),
                             torch.stack([torch.stack([zero, -s], -1), torch.stack([-s, zero], -1)], -2))
    raise ConfigError(f"unknown rotation {kind!r}; use one of {', '.join(ROTATIONS)}")


def apply_1q(psi: torch.Tensor, mats: torch.Tensor, q: int) -> torch.Tensor:
    """Apply a one-qubit gate to qubit `q` of `psi` (M, 2, …, 2): one (2, 2) matrix or one per row (M, 2, 2)."""
    dtype = torch.promote_types(psi.dtype, mats.dtype)
    moved, mats = psi.movedim(1 + q, -1).to(dtype), mats.to(dtype)
    if mats.dim() == 2:
        out = moved @ mats.transpose(0, 1)
    else:
        flat = moved.reshape(moved.shape[0], -1, 2)
        out = (flat @ mats.transpose(1, 2)).reshape(moved.shape)
    return out.movedim(-1, 1 + q)


def apply_cnot(psi: torch.Tensor, control: int, target: int) -> torch.Tensor:
    """CNOT on `psi` (M, 2, …, 2): where the control qubit is 1, the target qubit's two amplitudes swap."""
    off, on = psi.select(1 + control, 0), psi.select(1 + control, 1)
    t_axis = 1 + (target if target < control else target - 1)  # the target's axis once the control axis is gone
    return torch.stack([off, on.flip(t_axis)], dim=1 + control)


@functools.lru_cache(maxsize=64)
def _ring_index(n: int, device: torch.device) -> torch.Tensor:
    """Index j -> source basis state of j after the CNOT ring, so that `psi.index_select(1, idx)` applies it."""
    out = torch.arange(2**n)
    for i in range(n if n > 1 else 0):  # CNOT(i -> i+1 mod n) flips the target bit where the control bit is 1
        c_bit, t_bit = 1 << (n - 1 - i), 1 << (n - 1 - (i + 1) % n)
        out = torch.where(out & c_bit != 0, out ^ t_bit, out)
    # `out[k]` is where basis state k goes; the gather needs the inverse map
    return torch.empty_like(out).scatter_(0, out, torch.arange(2**n)).to(device)


@functools.lru_cache(maxsize=64)
def z_signs(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """S (2^n, n): S[k, i] = +1 where bit i of basis state k is 0, -1 where it is 1 (qubit 0 = most significant)."""
    k = torch.arange(2**n).unsqueeze(1)
    bits = (k >> torch.arange(n - 1, -1, -1)) & 1
    return (1 - 2 * bits).to(device=device, dtype=dtype)


# --- the reference path: gate by gate ---------------------------------------------------------------------------------


def expval_gate_by_gate(angles: torch.Tensor, weights: torch.Tensor, rotations=("ry",)) -> torch.Tensor:
    """⟨Z_i⟩ (B, n) of the circuit, every gate applied in turn to the full state (the reference; slow)."""
    rotations = check_rotations(rotations)
    b, n = angles.shape
    dtype = torch.complex128 if angles.dtype == torch.float64 else torch.complex64
    psi = torch.zeros(b, 2**n, dtype=dtype if is_complex(rotations) else angles.dtype, device=angles.device)
    psi[:, 0] = 1
    psi = psi.reshape(b, *([2] * n))
    for q in range(n):
        psi = apply_1q(psi, rotation_matrices("ry", angles[:, q]), q)
    for layer in weights:
        for kind, thetas in zip(rotations, layer):
            for q in range(n):
                psi = apply_1q(psi, rotation_matrices(kind, thetas[q]), q)
        for i in range(n if n > 1 else 0):
            psi = apply_cnot(psi, i, (i + 1) % n)
    probs = psi.real**2 + psi.imag**2 if psi.is_complex() else psi**2
    marginals = [probs.movedim(1 + q, 1).reshape(b, 2, -1).sum(-1) for q in range(n)]
    return torch.stack([m[:, 0] - m[:, 1] for m in marginals], -1)


# --- the fast path ----------------------------------------------------------------------------------------------------


def product_state(angles: torch.Tensor) -> torch.Tensor:
    """RY(x_i) on every qubit of |0…0⟩: the Kronecker product of (cos(x_i/2), sin(x_i/2)), (B, 2^n), real."""
    half = angles / 2
    return _kron_rows(torch.stack([torch.cos(half), torch.sin(half)], -1))


def _kron_rows(vecs: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product of (B, k, 2) vectors -> (B, 2^k); the two halves joined by a batched outer product."""
    if vecs.shape[1] == 1:
        return vecs[:, 0]
    h = vecs.shape[1] // 2
    hi, lo = _kron_rows(vecs[:, :h]), _kron_rows(vecs[:, h:])
    return torch.bmm(hi.unsqueeze(2), lo.unsqueeze(1)).flatten(1)


def layer_rotations(thetas: torch.Tensor, rotations: tuple[str, ...]) -> torch.Tensor:
    """One layer's rotations on each qubit combined into one 2 × 2 matrix per qubit: (R, n) angles -> (n, 2, 2)."""
    mats = None
    for kind, angles in zip(rotations, thetas):
        m = rotation_matrices(kind, angles)
        if mats is not None:  # this rotation acts after the previous ones
            dtype = torch.promote_types(m.dtype, mats.dtype)
            m = m.to(dtype) @ mats.to(dtype)
        mats = m
    return mats


def kron(mats: torch.Tensor) -> torch.Tensor:
    """The Kronecker product of (k, 2, 2) matrices, (2^k, 2^k) (the 1 × 1 identity for k = 0)."""
    out = torch.ones(1, 1, dtype=mats.dtype, device=mats.device)
    for m in mats:
        out = torch.kron(out, m)
    return out


def layers_matrix(weights: torch.Tensor, rotations: tuple[str, ...], n: int) -> torch.Tensor:
    """Uᵀ (2^n, 2^n) of the trainable layers, so that a row-vector state ψ becomes ψ @ Uᵀ; differentiable.

    Built by running the layers on the identity (each row a basis state). A layer's rotations are a Kronecker
    product A ⊗ B over the first and the last n/2 qubits, applied to a state reshaped to a (2^{n/2}, 2^{n/2})
    matrix V as A V Bᵀ: two small batched matmuls instead of n one-qubit gates. The CNOT ring is a fixed
    permutation of the basis states, a gather.
    """
    dim, h = 2**n, n // 2
    ring = _ring_index(n, weights.device)
    psi = None
    for layer in weights:
        mats = layer_rotations(layer, rotations)
        a, b = kron(mats[:h]), kron(mats[h:])
        if psi is None:  # the first layer acts on the identity: the rows of (A ⊗ B)ᵀ
            psi = torch.kron(a, b).transpose(0, 1)
        else:
            psi = (a @ psi.reshape(dim, 2**h, 2 ** (n - h)) @ b.transpose(0, 1)).reshape(dim, dim)
        psi = psi.index_select(1, ring)
    return psi


def probabilities(psi0: torch.Tensor, u_t: torch.Tensor) -> torch.Tensor:
    """Outcome probabilities |ψ0 @ Uᵀ|² (B, 2^n) of a real state ψ0: one real matmul ([Re | Im] when complex)."""
    if u_t.is_complex():
        dim = u_t.shape[0]
        amps = psi0 @ torch.cat([u_t.real, u_t.imag], 1)
        return amps[:, :dim] ** 2 + amps[:, dim:] ** 2
    return (psi0 @ u_t) ** 2


def expval_from_state(psi0: torch.Tensor, u_t: torch.Tensor) -> torch.Tensor:
    """⟨Z_i⟩ (B, n) of ψ0 @ Uᵀ: |ψ|² @ S."""
    probs = probabilities(psi0, u_t)
    return probs @ z_signs(int(math.log2(u_t.shape[0])), probs.dtype, probs.device)


def expval_fast(angles: torch.Tensor, weights: torch.Tensor, rotations=("ry",)) -> torch.Tensor:
    """⟨Z_i⟩ (B, n): product-state encoding, the layers' unitary built once, one matmul (see the module doc)."""
    rotations = check_rotations(rotations)
    return expval_from_state(product_state(angles), layers_matrix(weights, rotations, angles.shape[1]))


# --- finite shots -----------------------------------------------------------------------------------------------------


def sample_expval_z(probs: torch.Tensor, shots: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """⟨Z_i⟩ (B, n) estimated from `shots` measurements per row of `probs` (B, 2^n); no gradient (sampling).

    The estimate is unbiased, with standard deviation sqrt((1 − ⟨Z⟩²) / shots) per entry.
    """
    probs = probs.detach()
    b, dim = probs.shape
    outcomes = torch.multinomial(probs, shots, replacement=True, generator=generator)  # (B, shots)
    counts = torch.zeros(b, dim, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(1, outcomes, torch.ones_like(outcomes, dtype=probs.dtype))
    return counts @ z_signs(int(math.log2(dim)), probs.dtype, probs.device) / shots


def _estimate(psi0: torch.Tensor, u_t: torch.Tensor, shots: int | None, generator) -> torch.Tensor:
    if shots is None:
        return expval_from_state(psi0, u_t)
    return sample_expval_z(probabilities(psi0, u_t), shots, generator)


class ParameterShift(torch.autograd.Function):
    """⟨Z⟩ of the circuit with a backward by the two-term parameter-shift rule (exact or shot-estimated).

    Inputs: angles (B, n), weights (L, R, n), rotations, shots (None: exact expectations), generator.
    Each trainable angle costs two circuits over the whole batch; each encoding angle two more.
    """

    @staticmethod
    def forward(ctx, angles, weights, rotations, shots, generator):
        ctx.save_for_backward(angles, weights)
        ctx.rotations, ctx.shots, ctx.generator = rotations, shots, generator
        return _estimate(product_state(angles), layers_matrix(weights, rotations, angles.shape[1]), shots, generator)

    @staticmethod
    def backward(ctx, grad):
        angles, weights = ctx.saved_tensors
        with torch.autocast(angles.device.type, enabled=False):  # a backward called under autocast stays exact
            return ParameterShift._shifted_gradients(ctx, angles, weights, grad.to(angles.dtype))

    @staticmethod
    def _shifted_gradients(ctx, angles, weights, grad):
        rotations, shots, gen = ctx.rotations, ctx.shots, ctx.generator
        n = angles.shape[1]
        grad_angles = grad_weights = None
        if ctx.needs_input_grad[0]:
            u_t = layers_matrix(weights, rotations, n)
            grad_angles = torch.empty_like(angles)
            for i in range(n):
                plus, minus = angles.clone(), angles.clone()
                plus[:, i] += SHIFT
                minus[:, i] -= SHIFT
                diff = _estimate(product_state(plus), u_t, shots, gen) - _estimate(product_state(minus), u_t,
                                                                                     shots, gen)
                grad_angles[:, i] = (grad * diff).sum(-1) / 2  # sample b's gradient uses its own shifted circuits
        if ctx.needs_input_grad[1]:
            psi0 = product_state(angles)
            grad_weights = torch.empty_like(weights)
            for idx in itertools.product(*map(range, weights.shape)):
                plus, minus = weights.clone(), weights.clone()
                plus[idx] += SHIFT
                minus[idx] -= SHIFT
                diff = (_estimate(psi0, layers_matrix(plus, rotations, n), shots, gen)
                        - _estimate(psi0, layers_matrix(minus, rotations, n), shots, gen))
                grad_weights[idx] = (grad * diff).sum() / 2
        return grad_angles, grad_weights, None, None, None


# --- the entry point --------------------------------------------------------------------------------------------------


def qnn_expval(angles: torch.Tensor, weights: torch.Tensor, rotations=("ry",), mode: Mode = "exact",
               shots: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """⟨Z_i⟩ (B, n) of the circuit for encoding `angles` (B, n) and layer angles `weights` (L, len(rotations), n).

    Computed in fp32 (fp64 for fp64 angles) with autocast off, on the angles' device; returned in that dtype.
    `mode`: "exact", "parameter-shift" or "shots" (needs `shots`; `generator` seeds the sampling).
    """
    rotations = check_rotations(rotations)
    if angles.dim() != 2 or weights.dim() != 3 or weights.shape[1:] != (len(rotations), angles.shape[1]):
        raise ConfigError(f"qnn_expval: angles must be (B, n) and weights (L, {len(rotations)}, n); got "
                          f"{tuple(angles.shape)} and {tuple(weights.shape)}")
    if mode not in MODES:
        raise ConfigError(f"method.qtha_mode: unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "shots" and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise ConfigError(f"method.qtha_shots: shots mode needs an integer number of shots >= 1 (got {shots!r})")
    dtype = compute_dtype(angles)
    with torch.autocast(angles.device.type, enabled=False):
        angles, weights = angles.to(dtype), weights.to(dtype)
        if mode == "exact":
            return expval_fast(angles, weights, rotations)
        return ParameterShift.apply(angles, weights, rotations, shots if mode == "shots" else None, generator)
