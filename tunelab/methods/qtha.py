"""QTHA, quantum-tensor hybrid adaptation (Kong et al., arXiv 2503.12790): an MPO + small quantum circuit branch.

Each adapted linear layer computes, with W (and its bias) frozen:

    y = W x (+ b) + s · Δ(x)
    z = MPO_down(dropout(x))        ∈ R^n          n = number of qubits
    q = QNN(π · tanh(z); θ)         ∈ [-1, 1]^n    ⟨Z_i⟩ of an n-qubit circuit (`quantum.py`)
    f = a ⊙ z + b ⊙ q                               a, b ∈ R^n learnable, both initialised to 1
    Δ(x) = MPO_up(f)                ∈ R^{d_out}    its last core is zero at init, so Δ ≡ 0: the model is unchanged

What follows the paper's public description (only its abstract is public): a matrix product operator (tensor
network) to reduce parameters, a quantum neural network that adds nonlinear features, the two combined by a
(learned) linear fusion, and fewer trainable parameters than LoRA (the abstract says −76%).
What is OUR reconstruction, not the paper's verified architecture: everything else, namely the number of
qubits (8) and layers (2); angle encoding with RY of π·tanh(z); the ansatz (RY per qubit, optionally RZ / RX,
then a CNOT ring, ⟨Z⟩ readout); the fusion form a ⊙ z + b ⊙ q; the placement as a down-MPO → QNN → up-MPO
branch beside every linear layer ("all-linear" as LoRA by default); the MPO factorisation (3 cores) and its
bond dimension, chosen per module by default as the largest (≤ 64) that keeps the module's branch within
`budget` (24%) of the parameters LoRA r=8 would train on it; small-angle init θ ~ N(0, 0.1²); the MPO init.

Simulator modes (`quantum.py`): "exact" (autograd), "parameter-shift" (the gradients a quantum computer would
measure, exact expectations), "shots" (every expectation estimated from `shots` measurements, gradients by the
shift rule on shot estimates). In shots mode each layer's sampling is seeded from (its seed, its count of
training forwards): the count is part of `state_dict`, so a resumed run draws the same samples; forwards in
eval mode draw from a stream that does not advance, so evaluation is repeatable and leaves training's alone.

NOT mergeable: q is a nonlinear function of x, so Δ is no weight update; `merge`, `unmerge` and `unload` raise
a ModelError, `tunelab export` refuses the adapter, and serving keeps the branch (`tunelab generate/chat`).
Files: tunelab's own adapter directory, `adapter_config.json` (`peft_type: TUNELAB_QTHA`, every setting needed
to rebuild it) and `adapter_model.safetensors` with `<module>.qtha_down.cores.<k>`, `.qtha_up.cores.<k>`,
`.qtha_theta` (L, rotations, n), `.qtha_a`, `.qtha_b` (n,) and, in shots mode, `.qtha_shots_rng` (seed, count).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from tunelab.errors import ConfigError, ModelError
from tunelab.methods.base import (
    CONFIG_NAME,
    Method,
    WrappedLinear,
    load_adapter_weights,
    put_back,
    set_submodule,
    write_adapter_dir,
)
from tunelab.methods.lora import LoRA
from tunelab.methods.quantum import MODES, check_rotations, qnn_expval
from tunelab.methods.tensor_train import TensorTrainLinear, tt_num_parameters

PEFT_TYPE = "TUNELAB_QTHA"
LORA_RANK = 8  # the LoRA the parameter budget is measured against
MAX_BOND = 64  # the automatic bond dimension never exceeds this
MAX_QUBITS = 12  # the layers' matrix has 4^n entries
THETA_STD = 0.1  # small-angle init of the circuit (deep random circuits have vanishing gradients)


def qtha_num_parameters(in_features: int, out_features: int, qubits: int, depth: int, n_rotations: int,
                        cores: int, bond: int) -> int:
    """Trainable parameters of one QTHA branch, from the shapes alone (MPOs + θ + fusion weights a, b)."""
    return (tt_num_parameters(in_features, qubits, cores, bond) + tt_num_parameters(qubits, out_features, cores, bond)
            + depth * n_rotations * qubits + 2 * qubits)


def lora_num_parameters(in_features: int, out_features: int, r: int = LORA_RANK) -> int:
    """Trainable parameters of LoRA rank r on one linear layer."""
    return r * (in_features + out_features)


def auto_bond(in_features: int, out_features: int, qubits: int, depth: int, n_rotations: int, cores: int,
              budget: float) -> int:
    """The largest bond (≤ MAX_BOND) whose branch has at most `budget` × LoRA r=8's parameters; 1 if none does."""
    limit = budget * lora_num_parameters(in_features, out_features)
    best, last = 1, None
    for bond in range(1, MAX_BOND + 1):
        count = qtha_num_parameters(in_features, out_features, qubits, depth, n_rotations, cores, bond)
        if count > limit or count == last:  # over budget, or every bond already at its largest useful rank
            break
        best, last = bond, count
    return best


def _shot_seed(seed: int, calls: int, training: bool) -> int:
    """A 63-bit seed for one sampling call from (layer seed, training-forward count, train/eval)."""
    digest = hashlib.blake2b(f"{seed}:{calls}:{'train' if training else 'eval'}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class QTHALinear(WrappedLinear):
    """A frozen `nn.Linear` (`base_layer`) plus s · MPO_up(a ⊙ z + b ⊙ QNN(π tanh z)) with z = MPO_down(x)."""

    def __init__(self, base_layer: nn.Linear, qubits: int = 8, depth: int = 2, rotations=("ry",), cores: int = 3,
                 bond: int = 4, scale: float = 1.0, dropout: float = 0.0, mode: str = "exact", shots: int = 1000,
                 shot_seed: int = 0):
        super().__init__()
        w = base_layer.weight
        if not w.is_floating_point():
            raise ModelError(f"cannot add QTHA to a linear layer with {w.dtype} weights (quantised?); "
                             f"load the model in fp32 or bf16")
        self.base_layer = base_layer
        self.rotations, self.mode, self.shots, self.scale = check_rotations(rotations), mode, shots, float(scale)
        self.qtha_down = TensorTrainLinear(base_layer.in_features, qubits, cores, bond, device=w.device, dtype=w.dtype)
        self.qtha_up = TensorTrainLinear(qubits, base_layer.out_features, cores, bond, zero_last=True,
                                         device=w.device, dtype=w.dtype)
        self.qtha_theta = nn.Parameter(torch.empty(depth, len(self.rotations), qubits, device=w.device,
                                                   dtype=torch.float32))  # the circuit always runs in fp32
        self.qtha_a = nn.Parameter(torch.ones(qubits, device=w.device, dtype=w.dtype))
        self.qtha_b = nn.Parameter(torch.ones(qubits, device=w.device, dtype=w.dtype))
        self.qtha_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shot_seed, self.shot_calls = shot_seed, 0
        self.reset_qtha_parameters()

    @torch.no_grad()
    def reset_qtha_parameters(self) -> None:
        """MPOs as `TensorTrainLinear` (the up-projection's last core zero), θ ~ N(0, 0.1²), a = b = 1."""
        self.qtha_down.reset_parameters()
        self.qtha_up.reset_parameters()
        nn.init.normal_(self.qtha_theta, std=THETA_STD)
        nn.init.ones_(self.qtha_a)
        nn.init.ones_(self.qtha_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        z = self.qtha_down(self.qtha_dropout(x))
        q = self.circuit(math.pi * torch.tanh(z))
        f = self.qtha_a * z + self.qtha_b * q.to(z.dtype)
        return out + (self.qtha_up(f) * self.scale).to(out.dtype)

    def circuit(self, angles: torch.Tensor) -> torch.Tensor:
        """⟨Z⟩ (…, n) of the circuit for encoding angles (…, n), in fp32 (profiler region "qtha.circuit")."""
        generator = None
        if self.mode == "shots":
            if self.training:
                self.shot_calls += 1
            generator = torch.Generator(device=angles.device)
            generator.manual_seed(_shot_seed(self.shot_seed, self.shot_calls, self.training))
        with record_function("qtha.circuit"):
            flat = angles.reshape(-1, angles.shape[-1])
            q = qnn_expval(flat, self.qtha_theta, self.rotations, self.mode, self.shots, generator)
        return q.reshape(angles.shape)

    def extra_repr(self) -> str:
        return (f"qubits={self.qtha_theta.shape[2]}, depth={self.qtha_theta.shape[0]}, "
                f"rotations={list(self.rotations)}, bond={max(self.qtha_down.bonds)}, scale={self.scale:g}, "
                f"mode={self.mode}" + (f", shots={self.shots}" if self.mode == "shots" else ""))


class QTHA(Method):
    """QTHA as a tunelab method: choose target linears as LoRA does, wrap them in `QTHALinear`, train the branch."""

    name = "qtha"
    mergeable = False

    def __init__(self, qubits: int = 8, depth: int = 2, bond: int | None = None, budget: float = 0.24,
                 cores: int = 3, rotations=("ry",), scale: float = 1.0, dropout: float = 0.0,
                 target_modules: list[str] | str = "all-linear", mode: str = "exact", shots: int = 1000):
        def whole(value, lo: int, hi: int | None = None) -> bool:
            return not isinstance(value, bool) and isinstance(value, int) and lo <= value <= (hi or value)

        if not whole(qubits, 1, MAX_QUBITS):
            raise ConfigError(f"method.qtha_qubits: must be an integer from 1 to {MAX_QUBITS} (got {qubits!r}); the "
                              f"simulated circuit costs 4^n per module")
        for key, value in (("qtha_depth", depth), ("qtha_cores", cores), ("qtha_shots", shots)):
            if not whole(value, 1):
                raise ConfigError(f"method.{key}: must be an integer >= 1 (got {value!r})")
        if bond is not None and not whole(bond, 1):
            raise ConfigError(f"method.qtha_bond: must be an integer >= 1, or null to choose it per module from "
                              f"method.qtha_budget (got {bond!r})")
        for key, value in (("qtha_budget", budget), ("qtha_scale", scale)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"method.{key}: must be a number > 0 (got {value!r})")
        if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            raise ConfigError(f"method.dropout: must be in [0, 1) (got {dropout!r})")
        if mode not in MODES:
            raise ConfigError(f"method.qtha_mode: unknown mode {mode!r}; use one of {', '.join(MODES)}")
        self.targeting = LoRA(target_modules=target_modules)  # validates target_modules; selects as LoRA does
        self.qubits, self.depth, self.bond, self.budget, self.cores = qubits, depth, bond, float(budget), cores
        self.rotations = check_rotations(rotations)
        self.scale, self.dropout, self.mode, self.shots = float(scale), float(dropout), mode, shots
        self.target_modules = self.targeting.target_modules
        self.model: nn.Module | None = None
        self.layers: dict[str, QTHALinear] = {}  # HF module path -> its QTHA wrapper, in model order
        self._requires_grad: dict[str, bool] = {}

    def bond_for(self, in_features: int, out_features: int) -> int:
        """The bond dimension of a module's MPOs: `bond`, or the budget's choice when it is None."""
        if self.bond is not None:
            return self.bond
        return auto_bond(in_features, out_features, self.qubits, self.depth, len(self.rotations), self.cores,
                         self.budget)

    def select(self, model: nn.Module) -> list[str]:
        """Paths of the linear layers `target_modules` selects (LoRA's rules: names, a regex or all-linear)."""
        if any(isinstance(m, QTHALinear) for m in model.modules()):
            raise ModelError("the model already has QTHA layers; load the base model again before adding QTHA")
        try:
            return self.targeting.select(model)
        except ModelError as e:
            raise ModelError(f"method qtha (targets chosen as for LoRA): {e}") from None

    def inject(self, model: nn.Module) -> None:
        """Freeze `model` and replace each selected `nn.Linear` by a `QTHALinear` (in place)."""
        if self.model is not None:
            raise ModelError("this QTHA is already injected into a model; build a new method for another model")
        names = self.select(model)
        # shots mode: one draw from the global RNG (seeded by the run) gives every layer its own sampling seed
        base_seed = int(torch.randint(0, 2**31, ())) if self.mode == "shots" else 0
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        for index, name in enumerate(names):
            base = model.get_submodule(name)
            layer = QTHALinear(base, self.qubits, self.depth, self.rotations, self.cores,
                               self.bond_for(base.in_features, base.out_features), self.scale, self.dropout,
                               self.mode, self.shots, shot_seed=base_seed + index)
            set_submodule(model, name, layer)
            self.layers[name] = layer
        self.model = model

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every layer's MPO cores, θ, a and b, in model order."""
        return [p for layer in self.layers.values() for n, p in layer.named_parameters()
                if not n.startswith("base_layer.")]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`<module>.qtha_*` tensors of every adapted layer; in shots mode also `.qtha_shots_rng` (seed, count)."""
        sd = {}
        for name, layer in self.layers.items():
            for pname, p in layer.named_parameters():
                if not pname.startswith("base_layer."):
                    sd[f"{name}.{pname}"] = p.detach()
            if self.mode == "shots":
                sd[f"{name}.qtha_shots_rng"] = torch.tensor([layer.shot_seed, layer.shot_calls], dtype=torch.int64)
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy tensors written by `state_dict` in; unknown, missing or wrongly shaped ones are ModelErrors."""
        self._require_model()
        expected = self.state_dict()
        for key in sorted(sd):
            if key not in expected:
                raise ModelError(f"adapter tensor {key}: not a QTHA tensor of the adapted layers ({len(self.layers)} "
                                 f"modules of {type(self.model).__name__}, mode {self.mode}); it was saved for another "
                                 f"model or other QTHA settings")
            if tuple(sd[key].shape) != tuple(expected[key].shape):
                raise ModelError(f"adapter tensor {key}: shape {tuple(sd[key].shape)}, this model expects "
                                 f"{tuple(expected[key].shape)}; it was saved for another model or other qubits, "
                                 f"depth, cores or bond")
        if missing := [k for k in expected if k not in sd]:
            raise ModelError(f"adapter tensor {missing[0]} is missing ({len(missing)} of {len(expected)}); the "
                             f"weights are incomplete")
        params = {f"{name}.{pname}": p for name, layer in self.layers.items()
                  for pname, p in layer.named_parameters() if not pname.startswith("base_layer.")}
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(sd[key])
        if self.mode == "shots":
            for name, layer in self.layers.items():
                layer.shot_seed, layer.shot_calls = (int(v) for v in sd[f"{name}.qtha_shots_rng"])

    def merge(self) -> None:
        raise ModelError("a QTHA adapter cannot be merged into the base weights (its quantum branch is a nonlinear "
                         "function of the input, not a weight update); serve it with its base model "
                         "(tunelab generate/chat <adapter dir>)")

    def unmerge(self) -> None:
        self.merge()

    def unload(self) -> nn.Module:
        self.merge()  # raises
        return self._require_model()

    def remove(self) -> nn.Module:
        """Take the QTHA layers out (the model is the base again) and return it."""
        model = put_back(self._require_model(), {n: layer.base_layer for n, layer in self.layers.items()},
                         self._requires_grad)
        self.model, self.layers = None, {}
        return model

    def settings(self) -> dict[str, Any]:
        """The hyperparameters that rebuild this method (adapter_config.json keys)."""
        return {"qubits": self.qubits, "depth": self.depth, "bond": self.bond, "budget": self.budget,
                "cores": self.cores, "rotations": list(self.rotations), "scale": self.scale, "dropout": self.dropout,
                "target_modules": self.target_modules, "mode": self.mode, "shots": self.shots}

    def save(self, out_dir: str | Path, base_model_path: str | None = None, tokenizer=None) -> Path:
        """Write tunelab's QTHA adapter directory (config, safetensors[, tokenizer]) atomically."""
        self._require_model()
        config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_path,
                  **self.settings(), "modules": list(self.layers),
                  "bonds": {name: max(layer.qtha_down.bonds) for name, layer in self.layers.items()},
                  "trainable_parameters": self.num_parameters(), "inference_mode": True}
        return write_adapter_dir(out_dir, config, self.state_dict(), tokenizer)

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise ModelError("this QTHA is not injected into a model (call inject(model) first)")
        return self.model


def load_adapter_dir(model: nn.Module, adapter_dir: str | Path, cfg: dict[str, Any]) -> QTHA:
    """Inject the QTHA adapter saved in `adapter_dir` (config already read as `cfg`) into `model`, with its weights."""
    d = Path(adapter_dir)
    where = d / CONFIG_NAME
    keys = ("qubits", "depth", "bond", "budget", "cores", "rotations", "scale", "dropout", "target_modules", "mode",
            "shots")
    if missing := [k for k in keys if k not in cfg]:
        raise ModelError(f"{where}: a QTHA adapter config needs {', '.join(missing)}; write the adapter again")
    try:
        method = QTHA(**{k: cfg[k] for k in keys})
        method.inject(model)
    except (ConfigError, ModelError) as e:
        raise ModelError(f"{where}: {e}") from None
    load_adapter_weights(method, d, cfg, "this model's targets are")
    return method
