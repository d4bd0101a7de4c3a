"""LLaMA-Adapter (Zhang et al., arXiv 2303.16199): zero-initialised, gated adaption prompts in the top L layers.

Each adapted layer gets K learnable prompt vectors P ∈ R^{K×hidden} (`adapter_prompt_len`, default 10; N(0, 1)
init as the official code and PEFT) and a gate g ∈ R^{heads} (zeros). The prompts are projected by the layer's
own frozen k_proj / v_proj (no RoPE on them, as the official code), every token's query (with RoPE) attends to
them with a softmax of its own, separate from the usual causal attention, and the result is gated and projected
by the frozen o_proj (without its bias, if any) and added to the attention output:

    attn'(x) = attn(x) + o_proj( tanh(g)_h · softmax(q_h K_hᵀ/√d) V_h  for every head h )

Gate: the official code's per-head `tanh(g)` (`alpaca_finetuning_v1/llama/model.py`), not PEFT's one scalar per
layer without tanh nor LitGPT's per-head factor without tanh. With g = 0 the added term is exactly 0, so a fresh
adapter leaves the model's output unchanged. Only P and g train. Layers: the top `adapter_layers` (default None:
every layer; the paper uses the top 30 of 32).

Supported: the `LlamaAttention`, `Qwen2Attention` and `MistralAttention` modules of transformers 5.x, with the
`eager` or `sdpa` attention implementation (the base attention runs unchanged; the prompt branch is plain torch);
generation with a KV cache works as the prompt branch only needs the new tokens' queries. Other attention classes
(e.g. Qwen3's with q/k norms, fused qkv) or implementations (flash / flex attention) are refused with a ModelError.
The attention module is wrapped (`AdaptionPromptAttention`, keeping its path `...self_attn`), transformers' source
is not touched. Not mergeable: prompts change the attention, not a weight. Files: tunelab's own adapter directory,
`adapter_config.json` with `peft_type: TUNELAB_ADAPTION_PROMPT` and `adapter_model.safetensors` holding
`<layer>.self_attn.adaption_prompt` (K, hidden) and `.adaption_gate` (heads,); `load_adapter` reads it, PEFT
does not (its AdaptionPrompt has a scalar gate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError, ModelError
from tunelab.methods.base import CONFIG_NAME, Method, load_adapter_weights, put_back, set_submodule, write_adapter_dir

PEFT_TYPE = "TUNELAB_ADAPTION_PROMPT"
SUPPORTED_ATTENTION = ("LlamaAttention", "Qwen2Attention", "MistralAttention")
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _check_implementation(attn: nn.Module) -> None:
    impl = getattr(attn.config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_IMPLEMENTATIONS:
        raise ModelError(f"LLaMA-Adapter supports the {' and '.join(SUPPORTED_IMPLEMENTATIONS)} attention "
                         f"implementations, not {impl!r}; load the model with attn_implementation='sdpa' (or "
                         f"model.set_attn_implementation('sdpa')) first")


class AdaptionPromptAttention(nn.Module):
    """A Llama / Qwen2 / Mistral attention module plus K gated adaption prompts (see the module doc)."""

    def __init__(self, base_attn: nn.Module, prompt_len: int):
        super().__init__()
        self.base_attn = base_attn
        w = base_attn.q_proj.weight
        cfg = base_attn.config
        self.n_heads = cfg.num_attention_heads
        self.adaption_prompt = nn.Parameter(torch.empty(prompt_len, cfg.hidden_size, device=w.device, dtype=w.dtype))
        self.adaption_gate = nn.Parameter(torch.zeros(self.n_heads, device=w.device, dtype=w.dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Prompts ~ N(0, 1), gates 0 (the layer's output is then unchanged)."""
        nn.init.normal_(self.adaption_prompt)
        nn.init.zeros_(self.adaption_gate)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        _check_implementation(self.base_attn)  # it may have been switched since inject
        out, weights = self.base_attn(hidden_states, *args, **kwargs)
        position_embeddings = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[0]
        return out + self.prompt_output(hidden_states, position_embeddings), weights

    def prompt_output(self, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
        """o_proj(tanh(g) · softmax(q Kₚᵀ/√d) Vₚ): what the prompts add to the attention output."""
        attn = self.base_attn
        *lead, _ = hidden_states.shape
        d = attn.head_dim
        q = attn.q_proj(hidden_states).view(*lead, -1, d).transpose(-3, -2)  # (b, heads, T, d)
        cos, sin = position_embeddings
        q = q * cos.unsqueeze(-3) + _rotate_half(q) * sin.unsqueeze(-3)
        prompt = self.adaption_prompt.to(q.dtype)
        k = attn.k_proj(prompt).view(prompt.shape[0], -1, d).transpose(0, 1)  # (kv heads, K, d), no RoPE
        v = attn.v_proj(prompt).view(prompt.shape[0], -1, d).transpose(0, 1)
        k = k.repeat_interleave(attn.num_key_value_groups, dim=0).to(q.dtype)  # GQA: head h uses kv head h // g
        v = v.repeat_interleave(attn.num_key_value_groups, dim=0).to(q.dtype)
        probs = F.softmax(q @ k.transpose(-1, -2) * attn.scaling, dim=-1, dtype=torch.float32).to(q.dtype)
        gate = torch.tanh(self.adaption_gate).to(q.dtype).view(-1, 1, 1)
        ctx = (probs @ v * gate).transpose(-3, -2).reshape(*lead, -1)
        return F.linear(ctx, attn.o_proj.weight)

    def extra_repr(self) -> str:
        return f"prompt_len={self.adaption_prompt.shape[0]}, heads={self.n_heads}, gate=tanh per head"


class Adapter(Method):
    """LLaMA-Adapter as a tunelab method: prompts and gates in the top `layers` attention modules (all if None)."""

    name = "adapter"
    mergeable = False

    def __init__(self, prompt_len: int = 10, layers: int | None = None):
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 1:
            raise ConfigError(f"method.adapter_prompt_len: must be an integer >= 1 (got {prompt_len!r})")
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
            raise ConfigError(f"method.adapter_layers: must be an integer >= 1 or null for every layer "
                              f"(got {layers!r})")
        self.prompt_len, self.n_layers = prompt_len, layers
        self.model: nn.Module | None = None
        self.layers: dict[str, AdaptionPromptAttention] = {}  # HF module path of self_attn -> its wrapper
        self._requires_grad: dict[str, bool] = {}

    def select(self, model: nn.Module) -> list[str]:
        """Paths of the attention modules of the top layers; ModelError for unsupported models or settings."""
        if any(isinstance(m, AdaptionPromptAttention) for m in model.modules()):
            raise ModelError("the model already has adaption prompts; load the base model again first")
        found = [(n, m) for n, m in model.named_modules() if n.endswith("self_attn")]
        if not found:
            raise ModelError(f"{type(model).__name__} has no `self_attn` attention modules; LLaMA-Adapter supports "
                             f"Llama, Qwen2 and Mistral models")
        if bad := sorted({type(m).__name__ for _, m in found} - set(SUPPORTED_ATTENTION)):
            raise ModelError(f"LLaMA-Adapter supports {', '.join(SUPPORTED_ATTENTION)} only, not {', '.join(bad)} "
                             f"(in {type(model).__name__}); use method lora, dora or lora-dash for this model")
        n = len(found) if self.n_layers is None else self.n_layers
        if n > len(found):
            raise ModelError(f"method.adapter_layers={n}, but {type(model).__name__} has {len(found)} layers; "
                             f"use at most {len(found)} (or null for every layer)")
        for _, m in found:
            _check_implementation(m)
        return [name for name, _ in found[len(found) - n:]]

    def inject(self, model: nn.Module) -> None:
        """Freeze `model` and wrap the attention of its top layers with adaption prompts (in place)."""
        if self.model is not None:
            raise ModelError("this adapter is already injected into a model; build a new method for another model")
        names = self.select(model)
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        for name in names:
            wrapper = AdaptionPromptAttention(model.get_submodule(name), self.prompt_len)
            set_submodule(model, name, wrapper)
            self.layers[name] = wrapper
        self.model = model

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The prompts and gates of every adapted layer, in model order."""
        return [p for w in self.layers.values() for p in (w.adaption_prompt, w.adaption_gate)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`<layer>.self_attn.adaption_prompt` (K, hidden) and `.adaption_gate` (heads,) per adapted layer."""
        sd = {}
        for name, w in self.layers.items():
            sd[f"{name}.adaption_prompt"] = w.adaption_prompt.detach()
            sd[f"{name}.adaption_gate"] = w.adaption_gate.detach()
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy prompts and gates in; unknown, missing or wrongly shaped tensors are ModelErrors naming them."""
        self._require_model()
        expected = {k: v for k, v in self.state_dict().items()}
        for key in sorted(sd):
            if key not in expected:
                raise ModelError(f"adapter tensor {key}: not an adaption prompt or gate of the adapted layers "
                                 f"({len(self.layers)} top layers of {type(self.model).__name__}); it was saved "
                                 f"for another model or another adapter_layers")
            if tuple(sd[key].shape) != tuple(expected[key].shape):
                raise ModelError(f"adapter tensor {key}: shape {tuple(sd[key].shape)}, this model expects "
                                 f"{tuple(expected[key].shape)}; it was saved for another model or prompt length")
        if missing := [k for k in expected if k not in sd]:
            raise ModelError(f"adapter tensor {missing[0]} is missing ({len(missing)} of {len(expected)}); the "
                             f"weights are incomplete")
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(sd[key])

    def merge(self) -> None:
        raise ModelError("a LLaMA-Adapter cannot be merged into the base weights (its prompts change the attention, "
                         "not a weight); serve it with its base model (tunelab generate/chat <adapter dir>)")

    def unmerge(self) -> None:
        self.merge()

    def unload(self) -> nn.Module:
        self.merge()  # raises
        return self._require_model()

    def remove(self) -> nn.Module:
        """Take the prompts out (the model is the base again) and return it."""
        model = put_back(self._require_model(), {n: w.base_attn for n, w in self.layers.items()},
                         self._requires_grad)
        self.model, self.layers = None, {}
        return model

    def save(self, out_dir: str | Path, base_model_path: str | None = None, tokenizer=None) -> Path:
        """Write tunelab's adaption-prompt adapter directory (config, safetensors[, tokenizer]) atomically."""
        self._require_model()
        config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_path,
                  "adapter_len": self.prompt_len, "adapter_layers": len(self.layers),
                  "modules": list(self.layers), "gate": "tanh, one per attention head", "inference_mode": True}
        return write_adapter_dir(out_dir, config, self.state_dict(), tokenizer)

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise ModelError("this adapter is not injected into a model (call inject(model) first)")
        return self.model


def load_adapter_dir(model: nn.Module, adapter_dir: str | Path, cfg: dict[str, Any]) -> Adapter:
    """Inject the adaption-prompt adapter saved in `adapter_dir` (config already read as `cfg`) into `model`."""
    d = Path(adapter_dir)
    where = d / CONFIG_NAME
    prompt_len, n_layers = cfg.get("adapter_len"), cfg.get("adapter_layers")
    try:
        method = Adapter(prompt_len, n_layers)
        method.inject(model)
    except (ConfigError, ModelError) as e:
        raise ModelError(f"{where}: {e}") from None
    load_adapter_weights(method, d, cfg, f"this model's top {n_layers} layers are")
    return method
