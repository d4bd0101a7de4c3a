"""The small interface every fine-tuning method implements; the training loop never knows which one it trains.

A method is created from its recipe section, then `inject(model)` modifies the model in place (adds its
layers, freezes what must stay frozen). The loop optimises `trainable_parameters()` and calls `on_step`.
Afterwards the method saves itself (`save`), or is folded into the base weights (`merge` / `unload`).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import ModelError
from tunelab.io import atomic_dir

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


class Method(ABC):
    """The small interface every fine-tuning method implements; the loop never knows which one it trains."""

    name: str = "method"
    mergeable: bool = False  # whether merge()/unload() can fold the method into plain HF weights

    @abstractmethod
    def inject(self, model: nn.Module) -> None:
        """Modify `model` in place: add the method's layers and freeze what must stay frozen."""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (each one once, even when weights are tied)."""

    def num_parameters(self) -> int:
        """The number of trainable parameters."""
        return sum(p.numel() for p in self.trainable_parameters())

    @abstractmethod
    def merge(self) -> None:
        """Fold the method into the base weights (exact, computed in fp32); ModelError if not mergeable."""

    @abstractmethod
    def unmerge(self) -> None:
        """Undo `merge`; ModelError if not mergeable."""

    @abstractmethod
    def unload(self) -> nn.Module:
        """Merge (if not merged) and return the plain HF model with its original module types."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable / adapter tensors only, keyed by HF module path (e.g. `model.layers.0...`)."""

    @abstractmethod
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load tensors written by `state_dict`; every expected key must be present with its shape."""

    @abstractmethod
    def save(self, out_dir: str | Path, base_model_path: str | None = None, tokenizer=None) -> Path:
        """Write the method's result to `out_dir` atomically and return the directory."""

    def on_step(self, step: int) -> dict[str, Any] | None:
        """Called by the loop after optimizer step `step` (1-based; for two-phase methods); a no-op by default.

        It may return an event for the run's events.jsonl: a dict with its name under "event" and JSON fields
        (e.g. LoRA-Dash's switch and what its SVDs cost). Methods never write events themselves.
        """
        return None


def write_adapter_dir(out_dir: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                      tokenizer=None) -> Path:
    """Write an adapter directory atomically: `adapter_config.json`, `adapter_model.safetensors`[, tokenizer]."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": "pt", **_base_relative(config.get("base_model_name_or_path"), out_dir)}
    base = config.get("base_model_name_or_path")
    with atomic_dir(out_dir, kind="adapter", inputs={"base model": base}) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


BASE_RELATIVE = "tunelab.base_relative"  # weights-file metadata: the base's path relative to the adapter directory


def _base_relative(base: str | None, out_dir: str | Path) -> dict[str, str]:
    """`{BASE_RELATIVE: path}` when `base` is a local directory: the base as seen from the adapter, which still
    finds it when the project moves. adapter_config.json keeps the path as given, as PEFT reads it (an extra key
    there would make PEFT warn about a newer version), so the relative one goes in the weights' metadata."""
    if not base or not Path(base).is_dir():
        return {}
    return {BASE_RELATIVE: os.path.relpath(Path(base).resolve(), Path(out_dir).resolve())}


def recorded_base(adapter_dir: str | Path) -> Path | None:
    """The base directory recorded relative to `adapter_dir` when the adapter was written (None if none)."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            rel = (f.metadata() or {}).get(BASE_RELATIVE)
    except Exception:  # no weights file or not safetensors: the loader reports it when it reads the weights
        return None
    return Path(adapter_dir) / rel if rel else None


def load_adapter_weights(method: Method, adapter_dir: str | Path, cfg: dict[str, Any], modules_hint: str) -> None:
    """Read `adapter_dir`'s weights into `method`, already injected from the config `cfg`.

    The adapted modules must be the config's `modules`. On any error the method is taken out of the model again
    (`method.remove()`), and a ModelError names the file.
    """
    d = Path(adapter_dir)
    path = d / WEIGHTS_NAME
    try:
        modules = list(method.layers)
        if modules != cfg.get("modules", modules):
            raise ModelError(f"{d / CONFIG_NAME}: the adapter was trained on modules {cfg['modules'][:2]}..., "
                             f"{modules_hint} {modules[:2]}...; load it onto its own base model")
        if not path.is_file():
            raise ModelError(f"{d}: no {WEIGHTS_NAME}; the adapter directory is incomplete")
        try:
            tensors = load_file(str(path))
        except Exception as e:  # a loader boundary: truncated or corrupt files
            raise ModelError(f"{path}: cannot read the adapter weights ({str(e).splitlines()[0][:200]})") from None
        try:
            method.load_state_dict(tensors)
        except ModelError as e:
            raise ModelError(f"{path}: {e}") from None
    except ModelError:
        method.remove()
        raise


class WrappedLinear(nn.Module):
    """A module that wraps a frozen `nn.Linear` (`base_layer`); code reading `layer.weight` / `layer.in_features`
    (e.g. to pick a dtype) keeps working."""

    base_layer: nn.Linear

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model` (replacing what is there)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def put_back(model: nn.Module, originals: dict[str, nn.Module], requires_grad: dict[str, bool]) -> nn.Module:
    """Undo an `inject`: each original module back at its path, each parameter's `requires_grad` as recorded
    before (True for a parameter not recorded); returns `model`."""
    for name, module in originals.items():
        set_submodule(model, name, module)
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(n, True))
    return model
