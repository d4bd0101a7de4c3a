"""DoRA (Liu et al., arXiv 2402.09353): weight-decomposed LoRA, with HF PEFT's semantics (`use_dora=True`).

Each adapted linear keeps a trainable magnitude vector `m` (one entry per output row) besides LoRA's A and B:

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖        (the norm of each output row, over the inputs: dim 1 of W)

`m` starts at the row norms of `W + s·BA`, i.e. `‖W‖` since B = 0, so a fresh adapter leaves the model unchanged.
As in the paper (§4.3) and PEFT, the norm is detached: it follows ΔW but takes no gradient. The forward is PEFT's
`DoraLinearLayer.forward` term for term: `y = W x + b + (m/‖·‖ − 1)·W x̃ + (m/‖·‖)·s·B A x̃`, where x̃ is the
dropped-out input (x itself when dropout is off or in eval); the bias is never rescaled. Merge writes
`(m/‖W + ΔW‖)·(W + ΔW)` in fp32 and remembers the norm so that `unmerge` restores W.
Files: a PEFT LoRA adapter directory with `use_dora: true` and per module `...lora_magnitude_vector` tensors (no
`.weight` suffix, as PEFT saves them); `PeftModel.from_pretrained` loads it, and tunelab loads PEFT-written DoRA
adapters (`peft_io.load_lora_adapter`). Supported as for LoRA (targets, rsLoRA, rank/alpha patterns, dropout);
not supported: DoRA on embeddings or convolutions, quantised base weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ModelError
from tunelab.methods.lora import LoRA, LoRALinear

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name, used in state dicts and adapter files


class DoRALinear(LoRALinear):
    """A LoRA linear whose adapted weight is re-normalised per output row and rescaled by a trained magnitude."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        w = base_layer.weight
        super().__init__(base_layer, r, alpha, dropout, rslora)
        self.lora_magnitude_vector = nn.Parameter(torch.empty(w.shape[0], device=w.device, dtype=w.dtype))
        self._merged_norm: torch.Tensor | None = None
        self.reset_magnitude()

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """LoRA's init (B = 0), then m = ‖W + s·BA‖ = ‖W‖, so that the layer is unchanged."""
        super().reset_lora_parameters(init)
        if hasattr(self, "lora_magnitude_vector"):
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        self.lora_magnitude_vector.copy_(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·BA‖ per output row in fp32, detached (DoRA treats it as a constant)."""
        w = self.base_layer.weight.detach().float() + self.lora_B.weight.detach().float() @ \
            self.lora_A.weight.detach().float() * self.scaling
        return torch.linalg.norm(w, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            xd = x
            bias = self.base_layer.bias
            base = out if bias is None else out - bias
        else:
            xd = self.lora_dropout(x)
            base = F.linear(xd, self.base_layer.weight)
        scale = (self.lora_magnitude_vector / self.weight_norm()).to(out.dtype)
        return out + (scale - 1) * base + scale * (self.lora_B(self.lora_A(xd)) * self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← (m / ‖W + ΔW‖)·(W + ΔW) in fp32; the norm is kept for `unmerge`."""
        if not self.merged:
            w = self.base_layer.weight
            norm = self.weight_norm()
            factor = (self.lora_magnitude_vector.float() / norm).unsqueeze(1)
            w.copy_(factor * (w.float() + self.delta_weight()))
            self._merged_norm, self.merged = norm, True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W' / (m / ‖W + ΔW‖) − ΔW with the norm saved by `merge` (exact up to fp32 rounding)."""
        if self.merged:
            w = self.base_layer.weight
            factor = (self.lora_magnitude_vector.float() / self._merged_norm).unsqueeze(1)
            w.copy_(w.float() / factor - self.delta_weight())
            self._merged_norm, self.merged = None, False


class DoRA(LoRA):
    """DoRA as a tunelab method: LoRA's targets and options, plus a trainable magnitude per adapted layer."""

    name = "dora"
    mergeable = True

    def new_layer(self, base_layer: nn.Linear, r: int, alpha: float) -> DoRALinear:
        return DoRALinear(base_layer, r, alpha, self.dropout, self.rslora)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """lora_A, lora_B and the magnitude vector of every adapted layer, in model order."""
        return [p for layer in self.layers.values()
                for p in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA's `<module>.lora_A.weight` / `.lora_B.weight` and `<module>.lora_magnitude_vector`."""
        sd = super().state_dict()
        for name, layer in self.layers.items():
            sd[f"{name}.{MAGNITUDE}"] = layer.lora_magnitude_vector.detach()
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """A/B as LoRA does, and one magnitude vector (out_features,) per adapted layer."""
        self._require_model()
        mags = {k.removesuffix("." + MAGNITUDE): v for k, v in sd.items() if k.endswith("." + MAGNITUDE)}
        for name in mags:
            if name not in self.layers:
                raise ModelError(f"adapter tensor {name}.{MAGNITUDE}: {name} is not a DoRA layer of this model "
                                 f"(target_modules {self.target_modules!r}); the weights and the config do not "
                                 f"belong together")
        for name, layer in self.layers.items():
            if name not in mags:
                raise ModelError(f"{name}: the adapter has no {MAGNITUDE} for this DoRA layer; the weights are "
                                 f"incomplete (or a plain LoRA adapter was loaded as DoRA)")
            if tuple(mags[name].shape) != (layer.out_features,):
                raise ModelError(f"{name}: {MAGNITUDE} has shape {tuple(mags[name].shape)} but this model expects "
                                 f"({layer.out_features},); the adapter was trained on another base model")
        super().load_state_dict({k: v for k, v in sd.items() if not k.endswith("." + MAGNITUDE)})
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.lora_magnitude_vector.copy_(mags[name])

    def save(self, out_dir: str | Path, base_model_path: str | None = None, tokenizer=None) -> Path:
        """A HF PEFT LoRA adapter directory with `use_dora: true` and the magnitude vectors."""
        from tunelab.methods.peft_io import save_lora_adapter  # peft_io imports this module

        return save_lora_adapter(self, out_dir, base_model_path, tokenizer=tokenizer, use_dora=True)
