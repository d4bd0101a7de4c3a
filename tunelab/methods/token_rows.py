"""Trainable embedding rows next to an adapter: the new tokens of an extended vocabulary (or every row) learn.

`method.train_embeddings` (LoRA): `new` trains the rows of the tokens `tunelab vocab extend --model` added (the
range it records in config.json as `tunelab_vocab_extension`), `all` every row, `none` nothing (the default). The
input embedding and the output head are wrapped: rows [first, end) of the frozen weight are replaced by one
trainable matrix; a tied head shares it (so it stays tied), an untied head gets its own. Saved as PEFT's
`trainable_token_indices` (the rows' values, `<module>.token_adapter.trainable_tokens_delta`, as PEFT saves
them): `PeftModel.from_pretrained` loads it, and merging writes the rows into the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError, ModelError

EXTENSION_KEY = "tunelab_vocab_extension"  # config.json: {"first_new_id": ..., "vocab_size": ...}
TOKENS_DELTA = "trainable_tokens_delta"  # PEFT's name for the rows' values
DELTA = f"token_adapter.{TOKENS_DELTA}"  # ... inside a LoRA adapter
CHOICES = ("none", "new", "all")


def token_range(model: nn.Module, train_embeddings: str) -> tuple[int, int] | None:
    """The rows [first, end) `train_embeddings` trains in `model`, or None for `none`."""
    if train_embeddings not in CHOICES:
        raise ConfigError(f"method.train_embeddings {train_embeddings!r}: choose none, new or all")
    if train_embeddings == "none":
        return None
    rows = model.get_input_embeddings().weight.shape[0]
    if train_embeddings == "all":
        return 0, rows
    ext = getattr(model.config, EXTENSION_KEY, None)
    if not isinstance(ext, dict) or not isinstance(ext.get("first_new_id"), int):
        raise ConfigError(f"method.train_embeddings=new: this model's config.json has no {EXTENSION_KEY} (it was not "
                          f"written by `tunelab vocab extend --model`), so tunelab does not know which rows are new; "
                          f"set method.train_embeddings=all, or extend the model with tunelab")
    return ext["first_new_id"], min(int(ext.get("vocab_size", rows)), rows)


class TrainableRows(nn.Module):
    """A frozen embedding or linear head (`base_layer`) whose rows [first, end) are the trainable `values`."""

    def __init__(self, base_layer: nn.Module, first: int, end: int, values: nn.Parameter | None = None):
        super().__init__()
        self.base_layer, self.first, self.end = base_layer, first, end
        self.values = values if values is not None else nn.Parameter(base_layer.weight[first:end].detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return torch.cat([w[:self.first], self.values.to(w.dtype), w[self.end:]])

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        if isinstance(b, nn.Embedding):
            out = F.embedding(x, self.weight, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)
            scale = getattr(b, "embed_scale", None)  # Gemma's scaled embedding multiplies its lookup
            return out if scale is None else out * (scale.to(out.dtype) if torch.is_tensor(scale) else scale)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class TokenRows:
    """The wrapped embedding (and head) of one model; `inject` after the adapter's own layers."""

    def __init__(self, first: int, end: int):
        if not 0 <= first < end:
            raise ConfigError(f"trainable token rows [{first}, {end}): an empty or negative range")
        self.first, self.end = first, end
        self.wrapped: dict[str, TrainableRows] = {}  # module path -> wrapper (embedding first)
        self.tied = False

    def inject(self, model: nn.Module) -> None:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        if not isinstance(emb, nn.Embedding):
            raise ModelError(f"{type(model).__name__}: the input embedding is a {type(emb).__name__}, not an "
                             f"nn.Embedding; trainable token rows are not supported for it")
        if self.end > emb.weight.shape[0]:
            raise ModelError(f"trainable token rows [{self.first}, {self.end}) run past the model's "
                             f"{emb.weight.shape[0]} embedding rows; the adapter belongs to another model")
        names = {m: n for n, m in model.named_modules()}
        self.tied = head is not None and head.weight is emb.weight
        wrapper = TrainableRows(emb, self.first, self.end)
        self._put(model, names[emb], wrapper)
        if head is not None:
            shared = wrapper.values if self.tied else None
            self._put(model, names[head], TrainableRows(head, self.first, self.end, shared))

    def _put(self, model: nn.Module, name: str, module: TrainableRows) -> None:
        from tunelab.methods.base import set_submodule

        set_submodule(model, name, module)
        self.wrapped[name] = module

    def parameters(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for w in self.wrapped.values():
            if id(w.values) not in seen:
                seen.add(id(w.values))
                out.append(w.values)
        return out

    def peft_indices(self) -> list[int] | dict[str, list[int]]:
        """adapter_config.json's `trainable_token_indices`: a list (the embedding; a tied head follows it), or
        {embedding name: ids, head name: ids} for an untied head."""
        ids = list(range(self.first, self.end))
        if self.tied or len(self.wrapped) == 1:
            return ids
        return {name.rsplit(".", 1)[-1]: ids for name in self.wrapped}

    def state_dict(self, peft_type: str = "LORA") -> dict[str, torch.Tensor]:
        """The rows' values under PEFT's names: in a LoRA adapter `<module path>.token_adapter.trainable_tokens_delta`
        (a tied head has none of its own); in a TRAINABLE_TOKENS adapter `<module path>.trainable_tokens_delta` for
        every wrapped module (a tied head repeats the embedding's)."""
        if peft_type == "TRAINABLE_TOKENS":  # a tied head's copy is a copy (safetensors refuses shared memory)
            return {f"{name}.{TOKENS_DELTA}": w.values.detach().clone() if i and self.tied else w.values.detach()
                    for i, (name, w) in enumerate(self.wrapped.items())}
        items = list(self.wrapped.items())[:1] if self.tied else self.wrapped.items()
        return {f"{name}.{DELTA}": w.values.detach() for name, w in items}

    def load_state_dict(self, sd: dict[str, torch.Tensor], peft_type: str = "LORA") -> None:
        expected = self.state_dict(peft_type)
        for key, param in expected.items():
            if key not in sd:
                raise ModelError(f"the adapter has no {key} (trainable token rows); the weights are incomplete")
            if tuple(sd[key].shape) != tuple(param.shape):
                raise ModelError(f"{key} has shape {tuple(sd[key].shape)}, this model expects {tuple(param.shape)} "
                                 f"(rows {self.first}..{self.end - 1}); load the adapter onto its own base model")
        if extra := sorted(set(sd) - set(expected)):
            raise ModelError(f"adapter tensor {extra[0]} is not a trainable-token tensor of this model's embedding "
                             f"or head; the adapter belongs to another model")
        suffix = TOKENS_DELTA if peft_type == "TRAINABLE_TOKENS" else DELTA
        with torch.no_grad():
            for name, w in self.wrapped.items():
                if f"{name}.{suffix}" in expected:
                    w.values.copy_(sd[f"{name}.{suffix}"])

    @torch.no_grad()
    def unload(self, model: nn.Module) -> None:
        """Write the rows into the frozen weights and put the original modules back."""
        from tunelab.methods.base import set_submodule

        for name, w in self.wrapped.items():
            w.base_layer.weight[self.first:self.end] = w.values.to(w.base_layer.weight.dtype)
            set_submodule(model, name, w.base_layer)
        self.wrapped = {}

    def remove(self, model: nn.Module) -> None:
        """Put the original modules back without writing the rows."""
        from tunelab.methods.base import set_submodule

        for name, w in self.wrapped.items():
            set_submodule(model, name, w.base_layer)
        self.wrapped = {}
