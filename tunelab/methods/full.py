"""Full fine-tuning: every weight of the model trains (optionally not the input embeddings).

There is nothing to fold back: the trained weights already are the model. So `mergeable` is True, `merge()` and
`unmerge()` are no-ops (the model is always "merged"), and `unload()` returns the model itself. `save()` writes a
standard HF model directory (`tunelab.models.save_model`).
Supported: any `nn.Module`; `freeze_embeddings` needs a HF model (`get_input_embeddings`). A tied output head
shares the embedding weight, so it is frozen with it; an untied head keeps training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunelab.errors import ModelError
from tunelab.methods.base import Method
from tunelab.models import save_model


class Full(Method):
    """All parameters trainable, except the input embeddings (and a tied head) when `freeze_embeddings`."""

    name = "full"
    mergeable = True  # trivially: the trained weights are the model (merge/unmerge do nothing)

    def __init__(self, freeze_embeddings: bool = False):
        self.freeze_embeddings = freeze_embeddings
        self.model: nn.Module | None = None

    def inject(self, model: nn.Module) -> None:
        """Make every parameter trainable, then freeze the input embeddings if asked."""
        model.requires_grad_(True)
        if self.freeze_embeddings:
            get = getattr(model, "get_input_embeddings", None)
            emb = get() if callable(get) else None
            if emb is None:
                raise ModelError(f"method.freeze_embeddings: {type(model).__name__} has no input embeddings to "
                                 f"freeze (no get_input_embeddings()); set method.freeze_embeddings=false")
            emb.requires_grad_(False)
        self.model = model

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that requires grad (tied weights once)."""
        return [p for p in self._require_model().parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by HF name (tied weights under their first name)."""
        return {n: p.detach() for n, p in self._require_model().named_parameters() if p.requires_grad}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy tensors written by `state_dict` in; unknown or missing names and wrong shapes are errors."""
        params = {n: p for n, p in self._require_model().named_parameters() if p.requires_grad}
        for key in sorted(sd):
            if key not in params:
                raise ModelError(f"tensor {key}: not a trainable parameter of this model; it was saved from "
                                 f"another model or with other frozen parts")
            if tuple(sd[key].shape) != tuple(params[key].shape):
                raise ModelError(f"tensor {key}: shape {tuple(sd[key].shape)} but this model has "
                                 f"{tuple(params[key].shape)}; it was saved from another model")
        if missing := [n for n in params if n not in sd]:
            raise ModelError(f"{len(missing)} trainable parameters missing, first: {missing[0]}")
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(sd[key])

    def merge(self) -> None:
        """Nothing to do: the trained weights already are the model."""

    def unmerge(self) -> None:
        """Nothing to do (see `merge`)."""

    def unload(self) -> nn.Module:
        """The model itself: it has no wrappers."""
        return self._require_model()

    def save(self, out_dir: str | Path, base_model_path: str | None = None, tokenizer=None) -> Path:
        """Write the whole model (and tokenizer) as a standard HF directory, atomically."""
        model = self._require_model()
        if not hasattr(model, "save_pretrained"):
            raise ModelError(f"{type(model).__name__} is not a Hugging Face model; save its state_dict() instead")
        return save_model(model, tokenizer, out_dir, inputs={"base model": base_model_path})

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise ModelError("this full fine-tuning method is not injected into a model (call inject(model) first)")
        return self.model
