"""Trainable tokens: only embedding rows train, the rest of the model stays frozen (Chinese-LLaMA's stage 1).

`method.name: tokens` trains the rows `method.train_embeddings` names (`new`, the default here: the tokens
`tunelab vocab extend --model` added; or `all`) in the input embedding and the output head (a tied head shares
them; `token_rows.py`). Saved as a PEFT `TRAINABLE_TOKENS` adapter (`token_indices`, `target_modules`, and
`<module>.trainable_tokens_delta` holding the rows' values), which `PeftModel.from_pretrained` loads; merging
writes the rows into the weights. Stage 2 (LoRA and the rows together) is `method.name: lora` with
`train_embeddings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.errors import ModelError
from tunelab.methods.base import CONFIG_NAME, Method, write_adapter_dir
from tunelab.methods.token_rows import TokenRows, token_range

PEFT_TYPE = "TRAINABLE_TOKENS"
PREFIX = "base_model.model."


class TrainableTokens(Method):
    """Embedding (and head) rows [first, end) train; every other weight is frozen."""

    name = "tokens"
    mergeable = True

    def __init__(self, train_embeddings: str = "new", token_rows: tuple[int, int] | None = None):
        self.train_embeddings, self.token_rows = train_embeddings, token_rows
        self.rows: TokenRows | None = None
        self.model: nn.Module | None = None
        self._requires_grad: dict[str, bool] = {}

    def inject(self, model: nn.Module) -> None:
        span = self.token_rows or token_range(model, self.train_embeddings)
        if span is None:
            raise ModelError("method tokens trains embedding rows: set method.train_embeddings to new or all")
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        self.rows = TokenRows(*span)
        self.rows.inject(model)
        self.model = model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._rows().parameters()

    def merge(self) -> None:
        """A no-op: the wrapped modules already compute with the rows; `unload` writes them into the weights."""

    def unmerge(self) -> None:
        """A no-op (see `merge`)."""

    def unload(self) -> nn.Module:
        """Write the rows into the embedding (and head) weights, put the plain modules back, return the model."""
        model = self.model
        self._rows().unload(model)
        for n, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, True))
        self.model, self.rows = None, None
        return model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._rows().state_dict(PEFT_TYPE)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self._rows().load_state_dict(sd, PEFT_TYPE)

    def peft_config(self, base_model_path: str | None) -> dict[str, Any]:
        rows = self._rows()
        names = list(rows.wrapped)
        return {"peft_type": PEFT_TYPE, "task_type": None, "base_model_name_or_path": base_model_path,
                "revision": None, "token_indices": list(range(rows.first, rows.end)),
                "target_modules": names[0] if rows.tied else names, "init_weights": True, "inference_mode": True}

    def save(self, out_dir: str | Path, base_model_path: str | None = None, tokenizer=None) -> Path:
        tensors = {PREFIX + k: v for k, v in self.state_dict().items()}
        return write_adapter_dir(out_dir, self.peft_config(base_model_path), tensors, tokenizer)

    def _rows(self) -> TokenRows:
        if self.rows is None or self.model is None:
            raise ModelError("this trainable-tokens method is not injected into a model (call inject(model) first)")
        return self.rows


def load_tokens_dir(model: nn.Module, adapter_dir: str | Path, cfg: dict[str, Any]) -> TrainableTokens:
    """Inject the trainable tokens a PEFT TRAINABLE_TOKENS adapter directory holds, with their values."""
    from tunelab.methods.peft_io import _read_weights, _token_rows

    d = Path(adapter_dir)
    span = _token_rows(cfg.get("token_indices"), d / CONFIG_NAME)
    if span is None:
        raise ModelError(f"{d / CONFIG_NAME}: a TRAINABLE_TOKENS adapter without token_indices")
    method = TrainableTokens(token_rows=span)
    method.inject(model)
    weights_path, tensors = _read_weights(d)
    try:
        method.load_state_dict({k.removeprefix(PREFIX): v for k, v in tensors.items()})
    except ModelError as e:
        method.rows.remove(model)
        raise ModelError(f"{weights_path}: {e}") from None
    return method
