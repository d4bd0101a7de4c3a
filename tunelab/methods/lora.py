"""LoRA (Hu et al., arXiv 2106.09685) on `nn.Linear` layers, with rsLoRA scaling and exact fp32 merge.

Each adapted layer computes `W x (+ b) + s · B A dropout(x)` with `s = α/r` (rsLoRA: `α/√r`); only A and B
train, the base weight and bias stay frozen. B starts at zero, so a fresh adapter leaves the model unchanged.

Supported: targets chosen as in HF PEFT (a list of module names, each matching a module whose name equals it or
ends with "." + it; one full-match regex over the whole module name; or "all-linear": every `nn.Linear` except
the output head), `exclude_modules`, per-module rank / alpha (`rank_pattern` / `alpha_pattern`, PEFT's rule),
init as PEFT's `init_lora_weights=True` (kaiming-uniform A, B = 0) or `"gaussian"` (A ~ N(0, (1/r)²), B = 0),
fp32 weights or bf16 autocast. The LoRA weights take the dtype and device of the layer they adapt.
`train_embeddings` (new|all) also trains embedding rows (`token_rows.py`: PEFT's `trainable_token_indices`).
Not supported (yet): DoRA, LoRA on embeddings / Conv1D / quantised layers, trainable biases, a tied output
head as a target, several adapters on one model. PEFT adapter files: see `peft_io.py`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import ConfigError, ModelError
from tunelab.methods.base import Method, WrappedLinear, put_back, set_submodule
from tunelab.methods.token_rows import DELTA, TokenRows, token_range


class LoRALinear(WrappedLinear):
    """A frozen `nn.Linear` (`base_layer`) plus the low-rank update `lora_B(lora_A(dropout(x))) * scaling`."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        _check_hparams(r, alpha, dropout)
        w = base_layer.weight
        if not w.is_floating_point():
            raise ModelError(f"cannot add LoRA to a linear layer with {w.dtype} weights (quantised?); "
                             f"load the model in fp32 or bf16")
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha = r, float(alpha)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.merged = False
        self.reset_lora_parameters("kaiming")

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """B = 0 and A kaiming-uniform (a=√5, as nn.Linear and PEFT) or Gaussian with std 1/r."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            raise ConfigError(f"method.init: unknown LoRA init {init!r}; use kaiming or gaussian")
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        # W x + b + s · B A dropout(x), with B's matmul adding its product, scaled by s (addmm's alpha), into the
        # frozen layer's output in place: no [tokens, out_features] temporaries for the product, the scaling or the
        # sum, forward or backward. That output is a fresh [tokens, out_features] matrix (the frozen layer runs on
        # x's rows) which its own backward does not need.
        out = self.base_layer(x.reshape(-1, x.shape[-1]))
        h = self.lora_A(self.lora_dropout(x))
        out.addmm_(h.reshape(-1, h.shape[-1]).to(out.dtype), self.lora_B.weight.t().to(out.dtype), alpha=self.scaling)
        return out.view(*x.shape[:-1], out.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A in fp32, shaped like the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + ΔW (computed in fp32, then cast to W's dtype); the forward then skips the branch."""
        if not self.merged:
            w = self.base_layer.weight
            w.copy_(w.float() + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − ΔW: restores the base weight (exactly up to fp32 rounding; lossy for bf16 weights)."""
        if self.merged:
            w = self.base_layer.weight
            w.copy_(w.float() - self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


class LoRA(Method):
    """LoRA as a tunelab method: choose target linears, wrap them in `LoRALinear`, train only A and B."""

    name = "lora"
    mergeable = True

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, rslora: bool = False,
                 target_modules: list[str] | str = "all-linear", init: str = "kaiming",
                 rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                 exclude_modules: list[str] | str | None = None, train_embeddings: str = "none",
                 token_rows: tuple[int, int] | None = None):
        _check_hparams(r, alpha, dropout)
        if init not in ("kaiming", "gaussian"):
            raise ConfigError(f"method.init: unknown LoRA init {init!r}; use kaiming or gaussian")
        if isinstance(target_modules, str):
            if target_modules != "all-linear":
                _check_regex(target_modules, "method.target_modules")
        elif not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ConfigError(f"method.target_modules: {target_modules!r} is not a non-empty list of module names; "
                              f"give names such as [q_proj, v_proj], a regex string, or all-linear")
        for key, value in (rank_pattern or {}).items():
            _check_regex(key, "rank_pattern")
            _check_hparams(value, alpha, dropout, what=f"rank_pattern[{key!r}]")
        for key, value in (alpha_pattern or {}).items():
            _check_regex(key, "alpha_pattern")
            _check_hparams(r, value, dropout, what=f"alpha_pattern[{key!r}]")
        self.r, self.alpha, self.dropout, self.rslora, self.init = r, float(alpha), float(dropout), rslora, init
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.rank_pattern, self.alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
        self.exclude_modules = exclude_modules
        # embedding rows trained too (token_rows.py): `train_embeddings` none|new|all, or the rows an adapter saved
        self.train_embeddings, self.token_rows = train_embeddings, token_rows
        self.rows: TokenRows | None = None
        self.model: nn.Module | None = None
        self.layers: dict[str, LoRALinear] = {}  # HF module path -> its LoRA wrapper, in model order
        self.merged = False
        self._requires_grad: dict[str, bool] = {}

    # --- which modules -------------------------------------------------------------------------------------------

    def select(self, model: nn.Module) -> list[str]:
        """Names of the modules `target_modules` selects in `model`; ModelError if none, or a list entry, matches."""
        if any(isinstance(m, LoRALinear) for m in model.modules()):
            raise ModelError("the model already has LoRA layers; load the base model again (or unload() the "
                             "other adapter) before adding LoRA")
        head = _output_head(model)
        linears, matched, used = [], [], set()
        for name, module in model.named_modules():
            if not name:
                continue
            if isinstance(module, nn.Linear):
                linears.append(name)
            if _matches_any(self.exclude_modules, name):
                continue
            if self.target_modules == "all-linear":
                hit = isinstance(module, nn.Linear) and module is not head
            elif isinstance(self.target_modules, str):
                hit = re.fullmatch(self.target_modules, name) is not None
            else:
                hits = {t for t in self.target_modules if name == t or name.endswith("." + t)}
                used |= hits
                hit = bool(hits)
            if hit:
                matched.append(name)
        if not matched:
            raise ModelError(f"target_modules {self.target_modules!r} matches no module of "
                             f"{type(model).__name__}; {_describe_linears(linears)}")
        if isinstance(self.target_modules, list) and (unused := [t for t in self.target_modules if t not in used]):
            raise ModelError(f"target_modules entries {unused} match no module of {type(model).__name__}; "
                             f"{_describe_linears(linears)}")
        tied = _input_embedding_weight(model)
        for name in matched:
            module = model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise ModelError(f"target_modules selects {name}, a {type(module).__name__}; tunelab LoRA "
                                 f"adapts nn.Linear layers only: {_describe_linears(linears)}")
            if tied is not None and module.weight is tied:
                raise ModelError(f"target_modules selects {name}, whose weight is tied to the input "
                                 f"embeddings; LoRA on it is not supported (merging would change the embeddings "
                                 f"too): leave it out of target_modules")
        return matched

    def inject(self, model: nn.Module) -> None:
        """Freeze `model` and replace each selected `nn.Linear` by a `LoRALinear` (in place)."""
        if self.model is not None:
            raise ModelError("this LoRA is already injected into a model; build a new method for another model")
        names = self.select(model)
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        for name in names:
            r = int(_pattern_value(self.rank_pattern, name, self.r))
            alpha = float(_pattern_value(self.alpha_pattern, name, self.alpha))
            layer = self.new_layer(model.get_submodule(name), r, alpha)
            layer.reset_lora_parameters(self.init)
            set_submodule(model, name, layer)
            self.layers[name] = layer
        span = self.token_rows or token_range(model, self.train_embeddings)
        if span is not None:
            self.rows = TokenRows(*span)
            self.rows.inject(model)
        self.model = model

    def new_layer(self, base_layer: nn.Linear, r: int, alpha: float) -> LoRALinear:
        """The wrapper for one selected linear (methods built on LoRA, e.g. DoRA, return their own subclass)."""
        return LoRALinear(base_layer, r, alpha, self.dropout, self.rslora)

    # --- training ------------------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """lora_A and lora_B weights of every adapted layer, in model order (then any trainable token rows)."""
        rows = self.rows.parameters() if self.rows else []
        return [p for layer in self.layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight)] + rows

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`<module path>.lora_A.weight` / `.lora_B.weight` for every adapted layer (tensors, not copies)."""
        sd = {}
        for name, layer in self.layers.items():
            sd[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
            sd[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
        return sd | (self.rows.state_dict() if self.rows else {})

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy A/B weights in; an unknown key, a wrong shape or a missing key is a ModelError naming the module."""
        self._require_model()
        if self.merged:
            raise ModelError("the LoRA weights are merged into the model; unmerge() before loading new ones")
        if self.rows:
            self.rows.load_state_dict({k: v for k, v in sd.items() if k.endswith(DELTA)})
        sd = {k: v for k, v in sd.items() if not (self.rows and k.endswith(DELTA))}
        expected = {}
        for name, layer in self.layers.items():
            expected[f"{name}.lora_A.weight"] = (name, layer, layer.lora_A.weight)
            expected[f"{name}.lora_B.weight"] = (name, layer, layer.lora_B.weight)
        for key in sorted(sd):
            if key not in expected:
                raise ModelError(self._explain_unexpected(key))
        for key, (name, layer, param) in expected.items():
            if key in sd and tuple(sd[key].shape) != tuple(param.shape):
                kind = key.rsplit(".", 2)[-2]
                raise ModelError(
                    f"{name}: {kind} has shape {tuple(sd[key].shape)} in the adapter but this model expects "
                    f"{tuple(param.shape)} (r={layer.r}, in_features={layer.in_features}, "
                    f"out_features={layer.out_features}): the adapter was trained on another base model "
                    f"(or its config gives another rank); load it onto the base it was trained on")
        if missing := [k for k in expected if k not in sd]:
            raise ModelError(f"{expected[missing[0]][0]}: the adapter has no {missing[0].rsplit('.', 2)[-2]} weight "
                             f"for this targeted module ({len(missing)} of {len(expected)} LoRA tensors missing); "
                             f"the weights are incomplete or do not belong to this adapter config")
        with torch.no_grad():
            for key, (_, _, param) in expected.items():
                param.copy_(sd[key])

    def _explain_unexpected(self, key: str) -> str:
        module, _, kind = key.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            return (f"adapter tensor {key} is not a LoRA A/B weight (expected <module>.lora_A.weight or "
                    f".lora_B.weight); this kind of tensor is not supported yet")
        try:
            found = self.model.get_submodule(module)
        except AttributeError:
            return (f"adapter tensor {key}: this model has no module {module}; the adapter was trained on "
                    f"another base model: load it onto the base it was trained on")
        return (f"adapter tensor {key}: {module} ({type(found).__name__}) is not selected by target_modules "
                f"{self.target_modules!r}; the weights and the config do not belong together")

    # --- merging -------------------------------------------------------------------------------------------------

    def merge(self) -> None:
        """Add s·BA into every base weight (fp32 arithmetic); the forward then skips the LoRA branches."""
        self._require_model()
        for layer in self.layers.values():
            layer.merge()
        self.merged = True

    def unmerge(self) -> None:
        """Subtract what `merge` added; the LoRA branches are active again."""
        self._require_model()
        for layer in self.layers.values():
            layer.unmerge()
        self.merged = False

    def unload(self) -> nn.Module:
        """Merge, put the plain `nn.Linear` layers back, restore requires_grad, and return the model."""
        self._require_model()
        self.merge()
        if self.rows:
            self.rows.unload(self.model)
        return self.remove()

    def remove(self) -> nn.Module:
        """Take the LoRA layers out without merging (an unmerged model becomes the base again); return it."""
        if self.rows:
            self.rows.remove(self._require_model())
        model = put_back(self._require_model(), {n: layer.base_layer for n, layer in self.layers.items()},
                         self._requires_grad)
        self.model, self.layers, self.merged, self.rows = None, {}, False, None
        return model

    # --- saving --------------------------------------------------------------------------------------------------

    def save(self, out_dir: str | Path, base_model_path: str | None = None, tokenizer=None) -> Path:
        """Write a HF PEFT adapter directory (adapter_config.json, adapter_model.safetensors[, tokenizer])."""
        from tunelab.methods.peft_io import save_lora_adapter  # peft_io imports this module

        return save_lora_adapter(self, out_dir, base_model_path, tokenizer=tokenizer)

    def peft_target_modules(self) -> list[str] | str:
        """`target_modules` for adapter_config.json that selects exactly the adapted modules under PEFT's rules."""
        self._require_model()
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear" and not self.exclude_modules:
            return self.target_modules
        inner = tuple(f"{name}." for name in self.layers)
        names = [n for n, _ in self.model.named_modules() if n and not n.startswith(inner)]
        short = sorted({name.rsplit(".", 1)[-1] for name in self.layers})
        selected = {n for n in names if any(n == s or n.endswith("." + s) for s in short)}
        return short if selected == set(self.layers) else list(self.layers)

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise ModelError("this LoRA is not injected into a model (call inject(model) first; "
                             "after unload() the method is spent)")
        return self.model


def _check_hparams(r, alpha, dropout, what: str = "method") -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"{what}: LoRA rank r must be an integer >= 1 (got {r!r})")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"{what}: LoRA alpha must be a number > 0 (got {alpha!r})")
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(f"{what}: LoRA dropout must be in [0, 1) (got {dropout!r})")


def _check_regex(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{what}: {pattern!r} is not a valid regular expression ({e})") from None


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key that matches the end of the module name wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _matches_any(targets: list[str] | str | None, name: str) -> bool:
    """PEFT's target rule: a string is a full-match regex; list entries match a name or its last components."""
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _input_embedding_weight(model: nn.Module) -> torch.Tensor | None:
    try:
        return getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):
        return None


def _describe_linears(linears: list[str]) -> str:
    short = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linears))
    return (f"its nn.Linear modules are named {', '.join(short) or '(none)'} ({len(linears)} in all); set "
            f"target_modules to some of these names, a full-match regex over the whole module name "
            f"(e.g. {linears[0] if linears else 'model.layers.0.mlp'!r}), or all-linear")
