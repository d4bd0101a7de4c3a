"""LoRA-Dash (Si et al., ICLR 2025, arXiv 2409.01035): LoRA, then extra training along task-specific directions.

Two phases, switched by the global optimizer step (never by counting forward calls, so evaluation, gradient
accumulation and activation recomputation do not move it):

- pre-launch, optimizer steps 1..t (`dash_steps`, default 100): plain LoRA, `y = W x + γ·B A x̃` (γ = α/r or
  α/√r, x̃ = dropout(x)), bit for bit what `LoRA` computes with the same seed;
- the switch, once, right after optimizer step t (`on_step(t)`), for every adapted layer: the SVD of the frozen
  W in fp32, `W = U diag(σ) Vᴴ`; the change rate of each direction `c_i = |u_iᵀ ΔW v_i| / max(σ_i, σ_floor)` with
  ΔW = γ·BA and `σ_floor = σ_max · max(d_out, d_in) · eps(fp32)` (directions in W's numerical null space would
  otherwise get huge rates); the top-s (`dash_directions`, default 8; at most min(d_out, d_in)) are kept as frozen
  buffers U_s (d_out×s) and Vh_s (s×d_in). The seconds and layers it took come back from `on_step` as an event
  for the run's events.jsonl;
- dash, steps t+1..: A, B and δ ∈ Rˢ train together, `y = W x + γ·B A x̃ + ((x̃ Vh_sᵀ) ⊙ δ) U_sᵀ`, i.e.
  `+ x̃ (U_s diag(δ) Vh_s)ᵀ` without forming the d_out×d_in matrix (no γ on the dash term, as in the official code).

δ exists from `inject` on as a zero trainable parameter, so the optimizer built before training holds it. Before
the switch the dash term is not computed, δ gets no gradient (None), and AdamW skips it (no update, no weight
decay, no state): it is still exactly 0 at the switch, and no parameter is ever added to a live optimizer.
Under FSDP2 (`train.distributed=fsdp`) the model is sharded after `inject`, so FSDP holds δ as a shard like A and B,
and U_s, Vh_s are buffers each process keeps whole; at the switch every process gathers W, A and B of one layer at
a time (`DTensor.full_tensor()`, a collective, in the same layer order everywhere) and runs the same SVD on the same
inputs, so all choose the same directions.
`state_dict()` carries the switch step (`lora_dash.switch_step`, 0 = not yet), U_s, Vh_s and δ of every layer, so a
checkpoint taken on either side of the switch resumes to the uninterrupted run.
Merge adds `γ·BA + U_s diag(δ) Vh_s` (fp32). `save` writes a plain HF PEFT LoRA of rank r+s (lossless):
`A' = [A; Vh_s]`, `B' = [γ·B | U_s diag(δ)]` with `lora_alpha = r' = r+s` (PEFT scaling exactly 1, no rsLoRA);
before the switch it writes the plain rank-r LoRA. Loading that adapter gives a plain LoRA (for inference); a run
resumes from its checkpoints, not from the exported adapter. Targets, rank / alpha patterns, dropout and init are
LoRA's (`lora.py`).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:  # torch >= 2.5; FSDP2 (`train.distributed=fsdp`) needs it
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - nothing is ever a DTensor then
    DTensor = ()  # type: ignore[assignment,misc]  # isinstance(t, ()) is False

from tunelab.errors import ConfigError, ModelError
from tunelab.methods.lora import LoRA, LoRALinear

SWITCH_KEY = "lora_dash.switch_step"  # state_dict entry: the optimizer step the switch happened after (0: not yet)
DASH_KEYS = ("dash_U", "dash_Vh", "dash_delta")


class LoRADashLinear(LoRALinear):
    """A LoRA linear plus a rank-s update `U_s diag(δ) Vh_s` along directions of W chosen once (`find_directions`)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 directions: int = 8):
        super().__init__(base_layer, r, alpha, dropout, rslora)
        w = base_layer.weight
        d_out, d_in = w.shape
        self.s = min(directions, d_out, d_in)
        kw = dict(device=w.device, dtype=w.dtype)
        self.register_buffer("dash_U", torch.zeros(d_out, self.s, **kw), persistent=False)
        self.register_buffer("dash_Vh", torch.zeros(self.s, d_in, **kw), persistent=False)
        self.dash_delta = nn.Parameter(torch.zeros(self.s, **kw))
        self.dashing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        xd = self.lora_dropout(x)
        out = out + self.lora_B(self.lora_A(xd)) * self.scaling
        if self.dashing:
            out = out + F.linear(F.linear(xd, self.dash_Vh) * self.dash_delta, self.dash_U)
        return out

    def dash_weight(self) -> torch.Tensor:
        """U_s diag(δ) Vh_s in fp32 (zero before the switch)."""
        return (self.dash_U.float() * self.dash_delta.float()) @ self.dash_Vh.float()

    def delta_weight(self) -> torch.Tensor:
        """γ·BA + U_s diag(δ) Vh_s in fp32."""
        dw = super().delta_weight()
        return dw + self.dash_weight() if self.dashing else dw

    @torch.no_grad()
    def change_rates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, Vh, c) of the frozen W in fp32, with c_i = |u_iᵀ ΔW v_i| / max(σ_i, σ_floor) and ΔW = γ·BA.

        Under FSDP2 W, A and B are shards: each is gathered whole here (`_whole`), so every process must call it,
        layer by layer in the same order; identical inputs give every process the same directions.
        """
        w = _whole(self.base_layer.weight).float()
        u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
        a, b = _whole(self.lora_A.weight).float(), _whole(self.lora_B.weight).float()
        d_sigma = ((u.T @ b) * (a @ vh.T).T).sum(dim=1) * self.scaling  # diag(Uᵀ ΔW Vhᵀ), never forming ΔW
        floor = max(float(sigma.max()) * max(w.shape) * torch.finfo(torch.float32).eps,
                    torch.finfo(torch.float32).tiny) if sigma.numel() else 1.0
        return u, vh, d_sigma.abs() / sigma.clamp_min(floor)

    @torch.no_grad()
    def find_directions(self) -> torch.Tensor:
        """The switch for this layer: keep the top-s directions by change rate as U_s, Vh_s; δ = 0. Returns them."""
        if self.merged:
            raise ModelError("cannot choose LoRA-Dash directions while the adapter is merged; unmerge() first")
        u, vh, rates = self.change_rates()
        idx = torch.topk(rates, self.s).indices
        self.dash_U.copy_(u[:, idx])
        self.dash_Vh.copy_(vh[idx])
        self.dash_delta.zero_()
        self.dashing = True
        return idx

    def extra_repr(self) -> str:
        return super().extra_repr() + f", directions={self.s}, dashing={self.dashing}"


class LoRADash(LoRA):
    """LoRA-Dash as a tunelab method: LoRA for `dash_steps` optimizer steps, then LoRA + s trained directions."""

    name = "lora-dash"
    mergeable = True

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, rslora: bool = False,
                 target_modules: list[str] | str = "all-linear", init: str = "kaiming",
                 rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                 exclude_modules: list[str] | str | None = None, dash_steps: int = 100, dash_directions: int = 8):
        for key, value in (("dash_steps", dash_steps), ("dash_directions", dash_directions)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"method.{key}: must be an integer >= 1 (got {value!r})")
        super().__init__(r, alpha, dropout, rslora, target_modules, init, rank_pattern, alpha_pattern,
                         exclude_modules)
        self.dash_steps, self.dash_directions = dash_steps, dash_directions
        self.switch_step = 0  # the optimizer step after which the directions were chosen; 0: pre-launch

    def new_layer(self, base_layer: nn.Linear, r: int, alpha: float) -> LoRADashLinear:
        return LoRADashLinear(base_layer, r, alpha, self.dropout, self.rslora, self.dash_directions)

    @property
    def dashing(self) -> bool:
        return self.switch_step > 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        """lora_A, lora_B and δ of every adapted layer, in model order (δ from the start: see the module doc)."""
        return [p for layer in self.layers.values()
                for p in (layer.lora_A.weight, layer.lora_B.weight, layer.dash_delta)]

    # --- the switch ----------------------------------------------------------------------------------------------

    def on_step(self, step: int) -> dict[str, Any] | None:
        """After optimizer step `dash_steps`: choose every layer's directions; returns the switch's event."""
        if self.dashing or step < self.dash_steps:
            return None
        return self.switch(step)

    def switch(self, step: int) -> dict[str, Any]:
        """Choose the directions of every adapted layer now (fp32 SVDs) and start the dash phase."""
        self._require_model()
        if self.dashing:
            raise ModelError(f"LoRA-Dash already chose its directions after step {self.switch_step}")
        t0 = time.perf_counter()
        for layer in self.layers.values():
            layer.find_directions()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.switch_step = step
        shapes = Counter(f"{layer.out_features}x{layer.in_features}" for layer in self.layers.values())
        return {"event": "lora_dash_switch", "step": step, "layers": len(self.layers),
                "directions": sum(layer.s for layer in self.layers.values()),
                "svd_s": round(time.perf_counter() - t0, 4), "weight_shapes": dict(shapes)}

    # --- state -----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA's A/B, plus `<module>.dash_U` / `.dash_Vh` / `.dash_delta` and `lora_dash.switch_step`."""
        sd = super().state_dict()
        for name, layer in self.layers.items():
            for key in DASH_KEYS:
                sd[f"{name}.{key}"] = getattr(layer, key).detach()
        sd[SWITCH_KEY] = torch.tensor([self.switch_step], dtype=torch.int64)
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Restore A/B, the directions, δ and the phase (as the checkpoint had them)."""
        self._require_model()
        if SWITCH_KEY not in sd:
            raise ModelError(f"no {SWITCH_KEY} tensor: these weights were not saved by LoRA-Dash's state_dict() "
                             f"(an exported adapter is a plain LoRA; resume from the run's checkpoints)")
        switch = sd[SWITCH_KEY]
        if switch.numel() != 1 or switch.is_floating_point() or int(switch.reshape(-1)[0]) < 0:
            raise ModelError(f"{SWITCH_KEY}: expected one non-negative integer, found {switch.tolist()!r}")
        dash, rest = {}, {}
        for key, value in sd.items():
            if key == SWITCH_KEY:
                continue
            if key.rpartition(".")[2] in DASH_KEYS:
                dash[key] = value
            else:
                rest[key] = value
        for name, layer in self.layers.items():
            for key in DASH_KEYS:
                full = f"{name}.{key}"
                if full not in dash:
                    raise ModelError(f"{name}: no {key} tensor; the LoRA-Dash state is incomplete")
                want = tuple(getattr(layer, key).shape)
                if tuple(dash[full].shape) != want:
                    raise ModelError(f"{name}: {key} has shape {tuple(dash[full].shape)} but this model expects "
                                     f"{want} (dash_directions={self.dash_directions}); it was saved from another "
                                     f"model or with another method.dash_directions")
        if extra := sorted(set(dash) - {f"{n}.{k}" for n in self.layers for k in DASH_KEYS}):
            raise ModelError(f"tensor {extra[0]}: not a LoRA-Dash layer of this model")
        super().load_state_dict(rest)
        step = int(switch.reshape(-1)[0])
        with torch.no_grad():
            for name, layer in self.layers.items():
                for key in DASH_KEYS:
                    getattr(layer, key).copy_(dash[f"{name}.{key}"])
                layer.dashing = step > 0
        self.switch_step = step

    # --- export --------------------------------------------------------------------------------------------------

    def peft_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, adapter_config values) of the equivalent plain LoRA of rank r+s per layer (see the module doc)."""
        self._require_model()
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        for name, layer in self.layers.items():
            a, b = layer.lora_A.weight.float(), layer.lora_B.weight.float() * layer.scaling
            a = torch.cat([a, layer.dash_Vh.float()], dim=0)
            b = torch.cat([b, layer.dash_U.float() * layer.dash_delta.float()], dim=1)
            tensors[f"{name}.lora_A.weight"] = a.to(layer.lora_A.weight.dtype)
            tensors[f"{name}.lora_B.weight"] = b.to(layer.lora_B.weight.dtype)
            ranks[name] = layer.r + layer.s
        default = self.r + self.dash_directions
        rank_pattern = {_exact(n): r for n, r in ranks.items() if r != default}
        config = {"r": default, "lora_alpha": default, "use_rslora": False, "rank_pattern": rank_pattern,
                  "alpha_pattern": dict(rank_pattern)}  # alpha = r everywhere: scaling 1
        return tensors, config

    def save(self, out_dir: str | Path, base_model_path: str | None = None, tokenizer=None) -> Path:
        """A plain HF PEFT LoRA adapter: rank r+s after the switch (lossless), the rank-r LoRA before it."""
        from tunelab.methods.peft_io import save_lora_adapter  # peft_io imports lora.py

        if not self.dashing:
            return save_lora_adapter(self, out_dir, base_model_path, tokenizer=tokenizer,
                                     tensors=super().state_dict())
        tensors, config = self.peft_tensors()
        return save_lora_adapter(self, out_dir, base_model_path, tokenizer=tokenizer, tensors=tensors, **config)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or, for an FSDP2 shard (a DTensor), the full tensor: a collective every process must call."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _exact(name: str) -> str:
    """A rank_pattern key that matches module `name` only (PEFT matches `(.*\\.)?(key)$`)."""
    return re.escape(name)
