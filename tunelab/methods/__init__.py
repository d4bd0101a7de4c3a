"""Fine-tuning methods: one file per method, all behind the small `Method` interface (`base.py`).

Implemented: `lora` (LoRA / rsLoRA on linear layers, `lora.py`) and `full` (every weight, `full.py`); LoRA
adapters are written and read in the HF PEFT format (`peft_io.py`). This package never imports `tunelab.train`
or `tunelab.cli`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.base import Method
from tunelab.methods.full import Full
from tunelab.methods.lora import LoRA, LoRALinear
from tunelab.methods.peft_io import is_adapter_dir, load_lora_adapter, read_adapter_config, save_lora_adapter

if TYPE_CHECKING:
    from tunelab.config import MethodSection

__all__ = ["Full", "LoRA", "LoRALinear", "Method", "build_method", "is_adapter_dir", "load_adapter",
           "load_lora_adapter", "read_adapter_config", "save_lora_adapter"]


def build_method(cfg: MethodSection) -> Method:
    """The method a recipe's `method:` section describes (not yet injected into a model)."""
    if cfg.name == "lora":
        return LoRA(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora,
                    target_modules=cfg.target_modules, init=cfg.init)
    if cfg.name == "full":
        return Full(freeze_embeddings=cfg.freeze_embeddings)
    raise ConfigError(f"method.name: unknown method {cfg.name!r}; choose lora or full")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> Method:
    """Inject the adapter saved in `adapter_dir` (PEFT format) into `model` with its weights; return the method."""
    return load_lora_adapter(model, adapter_dir)
