"""The small interface every fine-tuning method implements; the training loop never knows which one it trains.

A method is created from its recipe section, then `inject(model)` modifies the model in place (adds its
layers, freezes what must stay frozen). The loop optimises `trainable_parameters()` and calls `on_step`.
Afterwards the method saves itself (`save`), or is folded into the base weights (`merge` / `unload`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn


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
