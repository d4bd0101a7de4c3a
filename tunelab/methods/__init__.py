"""Fine-tuning methods: one file per method, all behind the small `Method` interface (`base.py`).

Implemented: `lora` (LoRA / rsLoRA on linear layers, `lora.py`), `full` (every weight, `full.py`), `lora-dash`
(LoRA, then trained task-specific directions, `lora_dash.py`), `dora` (magnitude and direction, `dora.py`) and
`adapter` (LLaMA-Adapter's gated adaption prompts, `adapter.py`), `tokens` (embedding rows only, `tokens.py`)
and `qtha` (an MPO + simulated quantum circuit branch, `qtha.py` with `tensor_train.py` and `quantum.py`). LoRA,
DoRA and LoRA-Dash adapters are written in the HF PEFT format (`peft_io.py`; LoRA-Dash as the equivalent
rank-(r+s) LoRA), trainable tokens as PEFT TRAINABLE_TOKENS; LLaMA-Adapter and QTHA have their own formats.
This package never imports `tunelab.train` or `tunelab.cli`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.adapter import PEFT_TYPE as ADAPTION_PROMPT_TYPE
from tunelab.methods.adapter import Adapter, AdaptionPromptAttention, load_adapter_dir
from tunelab.methods.base import Method
from tunelab.methods.dora import DoRA, DoRALinear
from tunelab.methods.full import Full
from tunelab.methods.lora import LoRA, LoRALinear
from tunelab.methods.lora_dash import LoRADash, LoRADashLinear
from tunelab.methods.peft_io import is_adapter_dir, load_lora_adapter, read_adapter_config, save_lora_adapter
from tunelab.methods.qtha import PEFT_TYPE as QTHA_TYPE
from tunelab.methods.qtha import QTHA, QTHALinear
from tunelab.methods.qtha import load_adapter_dir as load_qtha_dir
from tunelab.methods.tokens import PEFT_TYPE as TOKENS_TYPE
from tunelab.methods.tokens import TrainableTokens, load_tokens_dir

if TYPE_CHECKING:
    from tunelab.config import MethodSection

__all__ = ["Adapter", "AdaptionPromptAttention", "DoRA", "DoRALinear", "Full", "LoRA", "LoRADash", "LoRADashLinear",
           "LoRALinear", "Method", "QTHA", "QTHALinear", "TrainableTokens", "build_method", "is_adapter_dir",
           "load_adapter", "load_lora_adapter", "read_adapter_config", "save_lora_adapter"]


def build_method(cfg: MethodSection) -> Method:
    """The method a recipe's `method:` section describes (not yet injected into a model)."""
    if cfg.train_embeddings != "none" and cfg.name not in ("lora", "tokens"):
        raise ConfigError(f"method.train_embeddings={cfg.train_embeddings} applies to methods lora and tokens only "
                          f"(full fine-tuning trains the whole embedding already); remove it or use one of those")
    if cfg.name == "tokens":
        return TrainableTokens("new" if cfg.train_embeddings == "none" else cfg.train_embeddings)
    if cfg.name == "lora":
        return LoRA(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora,
                    target_modules=cfg.target_modules, init=cfg.init, train_embeddings=cfg.train_embeddings)
    if cfg.name == "full":
        return Full(freeze_embeddings=cfg.freeze_embeddings)
    if cfg.name == "lora-dash":
        return LoRADash(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora,
                        target_modules=cfg.target_modules, init=cfg.init, dash_steps=cfg.dash_steps,
                        dash_directions=cfg.dash_directions)
    if cfg.name == "dora":
        return DoRA(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora,
                    target_modules=cfg.target_modules, init=cfg.init)
    if cfg.name == "adapter":
        return Adapter(prompt_len=cfg.adapter_prompt_len, layers=cfg.adapter_layers)
    if cfg.name == "qtha":
        return QTHA(qubits=cfg.qtha_qubits, depth=cfg.qtha_depth, bond=cfg.qtha_bond, budget=cfg.qtha_budget,
                    cores=cfg.qtha_cores, rotations=cfg.qtha_rotations, scale=cfg.qtha_scale, dropout=cfg.dropout,
                    target_modules=cfg.target_modules, mode=cfg.qtha_mode, shots=cfg.qtha_shots)
    raise ConfigError(f"method.name: unknown method {cfg.name!r}; choose lora, full, lora-dash, dora, adapter or qtha")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> Method:
    """Inject the adapter saved in `adapter_dir` into `model` with its weights; return the method.

    PEFT LoRA / DoRA adapters (LoRA-Dash exports are plain LoRA) and tunelab's LLaMA-Adapter and QTHA directories.
    """
    cfg = read_adapter_config(adapter_dir)
    if cfg.get("peft_type") == ADAPTION_PROMPT_TYPE:
        return load_adapter_dir(model, adapter_dir, cfg)
    if cfg.get("peft_type") == QTHA_TYPE:
        return load_qtha_dir(model, adapter_dir, cfg)
    if cfg.get("peft_type") == TOKENS_TYPE:
        return load_tokens_dir(model, adapter_dir, cfg)
    return load_lora_adapter(model, adapter_dir)
