"""The adapters a server knows: names (identifiers, never paths), their directories, and their validated files.

An adapter is registered by name at start (`--adapter NAME=DIR`), at run time (`/v1/load_lora_adapter`), or found
on first use as `<adapters dir>/<name>` (`--adapters-dir`); a name must match `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`
without `..`, and a directory found under the adapters directory must stay inside it once symlinks are resolved.
Served: PEFT LoRA adapters on linear layers (rsLoRA, rank/alpha patterns; LoRA-Dash exports are plain LoRA) and
DoRA (`use_dora`, its own maths in the bank). Refused with the reason: LLaMA-Adapter and QTHA (their updates are
not a low-rank term a mixed batch can gather), and every PEFT feature `peft_io` refuses (modules_to_save, biases,
embedding LoRA, ...). Each adapter answers chats with its own chat template when its directory holds a tokenizer
(whose vocabulary must be the base's), else with the base's.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.data.chat import chat_template_for, end_of_turn_ids
from tunelab.errors import TunelabError
from tunelab.methods.adapter import PEFT_TYPE as ADAPTION_PROMPT_TYPE
from tunelab.methods.base import CONFIG_NAME
from tunelab.methods.dora import MAGNITUDE
from tunelab.methods.lora import LoRA, _pattern_value
from tunelab.methods.peft_io import PREFIX, _check_tensor_kind, _lora_settings, _read_weights, read_adapter_config
from tunelab.methods.qtha import PEFT_TYPE as QTHA_TYPE
from tunelab.models import load_tokenizer
from tunelab.serve.lora_bank import LoraWeights

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error", 503: "service_unavailable"}


class ServeError(TunelabError):
    """A request the server refuses: an HTTP status and OpenAI's error fields (type, code, param)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


@dataclass
class AdapterInfo:
    """A validated adapter: what the API needs to render and stop its chats, and the key the bank knows it by."""

    name: str
    path: Path
    template: str
    chat_stop_ids: list[int]
    rank: int
    dora: bool
    key: tuple  # (name, resolved path, the files' mtimes): changed files under the same name are another adapter


def check_name(name: object, param: str = "model") -> str:
    """`name` if it is an adapter identifier, else a 400 that says what an identifier is."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ServeError(400, f"{name!r} is not an adapter name: names are identifiers of letters, digits, '.', '_' "
                              f"and '-' (at most 64, no '..'), never paths", code="invalid_model_name", param=param)
    return name


def read_lora_weights(adapter_dir: str | Path, model: torch.nn.Module) -> LoraWeights:
    """The adapter in `adapter_dir` as bank-ready tensors for `model` (scaling and DoRA's factor folded into B).

    ServeError 400 naming the file for an adapter the bank cannot serve or whose tensors do not fit `model`."""
    d = Path(adapter_dir)
    try:
        cfg = read_adapter_config(d)
        kind = cfg.get("peft_type")
        if kind in (ADAPTION_PROMPT_TYPE, QTHA_TYPE):
            what = "a LLaMA-Adapter (adaption prompts)" if kind == ADAPTION_PROMPT_TYPE else "a QTHA adapter"
            raise ServeError(400, f"{d}: {what} cannot share a batch with LoRA rows (its update is not a low-rank "
                                  f"term of linear layers); serve it alone with `tunelab generate/chat <base> "
                                  f"--adapter {d}`", code="adapter_not_servable")
        if kind == "TRAINABLE_TOKENS" or cfg.get("trainable_token_indices"):
            raise ServeError(400, f"{d}: this adapter trains embedding rows (an extended vocabulary), which one "
                                  f"shared base cannot batch; merge it into a model with `tunelab export` and serve "
                                  f"that model as its own base", code="adapter_not_servable")
        settings = _lora_settings(cfg, d / CONFIG_NAME)
        if cfg.get("fan_in_fan_out"):
            raise ServeError(400, f"{d / CONFIG_NAME}: fan_in_fan_out (GPT-2 Conv1D layers) is not supported by the "
                                  f"server; it serves LoRA on nn.Linear layers", code="adapter_not_servable")
        dora = cfg.get("use_dora") is True
        path, tensors = _read_weights(d)
        for key in tensors:
            _check_tensor_kind(key, path, dora)
        tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
        names = LoRA(**settings).select(model)
    except TunelabError as e:
        if isinstance(e, ServeError):
            raise
        raise ServeError(400, str(e), code="adapter_not_servable") from None
    modules, used = {}, set()
    for name in names:
        modules[name] = _module_weights(model.get_submodule(name), name, tensors, settings, dora, path)
        used |= {f"{name}.lora_A.weight", f"{name}.lora_B.weight", f"{name}.{MAGNITUDE}"}
    if extra := sorted(set(tensors) - used):
        raise ServeError(400, f"{path}: tensor {extra[0]} belongs to no module the config's target_modules selects "
                              f"in this base model; the weights and the config do not belong together",
                         code="adapter_not_servable")
    return LoraWeights(modules)


def _module_weights(linear, name: str, tensors: dict, settings: dict, dora: bool, path: Path):
    r = int(_pattern_value(settings["rank_pattern"], name, settings["r"]))
    alpha = float(_pattern_value(settings["alpha_pattern"], name, settings["alpha"]))
    scaling = alpha / math.sqrt(r) if settings["rslora"] else alpha / r
    a, b = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
    want = {"lora_A": (r, linear.in_features), "lora_B": (linear.out_features, r)}
    for what, t in (("lora_A", a), ("lora_B", b)):
        if t is None:
            raise ServeError(400, f"{path}: no {name}.{what}.weight, a module the config targets; the adapter is "
                                  f"incomplete", code="adapter_not_servable")
        if tuple(t.shape) != want[what]:
            raise ServeError(400, f"{path}: {name}.{what}.weight has shape {tuple(t.shape)}, this base model needs "
                                  f"{want[what]} (rank {r}); the adapter was trained on another base model",
                             code="adapter_not_servable")
    dtype = linear.weight.dtype
    a32, b32 = a.float(), b.float() * scaling
    g = None
    if dora:
        m = tensors.get(f"{name}.{MAGNITUDE}")
        if m is None or tuple(m.shape) != (linear.out_features,):
            raise ServeError(400, f"{path}: {name}.{MAGNITUDE} is missing or not of shape ({linear.out_features},)",
                             code="adapter_not_servable")
        w = linear.weight.detach().float().to(a32.device)
        g = m.float() / torch.linalg.norm(w + b32 @ a32, dim=1)
        b32 = g.unsqueeze(1) * b32
    dev = linear.weight.device
    return a32.to(dev, dtype), b32.to(dev, dtype), None if g is None else g.to(dev)


class AdapterRegistry:
    """Name -> adapter, thread-safe: the registered ones, and those found under `adapters_dir` on first use.

    Validated adapters (`AdapterInfo`, no weights) are kept in an LRU of `keep` entries; the weights live in the
    engine's bank (`--max-loaded` slots), read from disk again when an adapter comes back after eviction.
    """

    def __init__(self, model, tokenizer, base_name: str, adapters: dict[str, Path] | None = None,
                 adapters_dir: str | Path | None = None, keep: int = 256):
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.adapters_dir = Path(adapters_dir) if adapters_dir is not None else None
        if self.adapters_dir is not None and not self.adapters_dir.is_dir():
            raise ServeError(400, f"--adapters-dir {adapters_dir}: not a directory")
        self.base_template = chat_template_for(tokenizer)
        self.base_stop_ids = end_of_turn_ids(tokenizer, self.base_template)
        self._vocab = tokenizer.get_vocab()
        self.registered: dict[str, Path] = {}
        self.infos: OrderedDict[str, AdapterInfo] = OrderedDict()
        self.keep = keep
        self._lock = threading.RLock()
        self.on_unload = lambda info: None  # the engine frees the adapter's bank slot
        for name, path in (adapters or {}).items():
            self.load(name, path)

    def names(self) -> list[str]:
        """Every adapter a request may name: registered, validated, and the adapter directories under
        `adapters_dir` (not validated until used)."""
        with self._lock:
            names = list(dict.fromkeys([*self.registered, *self.infos]))
        if self.adapters_dir is not None:
            for p in sorted(self.adapters_dir.iterdir()):
                if p.name not in names and NAME_RE.fullmatch(p.name) and ".." not in p.name \
                        and self._inside_root(p) and (p / CONFIG_NAME).is_file():
                    names.append(p.name)
        return names

    def resolve(self, name: str) -> AdapterInfo | None:
        """The adapter a request's `model` names (None: the base model); 400/403/404 ServeError otherwise."""
        if name == self.base_name:
            return None
        check_name(name)
        with self._lock:
            if name in self.infos:
                self.infos.move_to_end(name)
                return self.infos[name]
            path = self.registered.get(name)
        if path is None:
            path = self._find(name)
        info = self._validate(name, path)
        with self._lock:
            if name in self.infos:  # validated meanwhile by another request
                return self.infos[name]
            self.infos[name] = info
            while len(self.infos) > self.keep:
                self.infos.popitem(last=False)
        return info

    def load(self, name: str, path: str | Path) -> AdapterInfo:
        """Register adapter `name` at `path` (validated now); 400 when the name is taken or the files are bad."""
        check_name(name, "lora_name")
        if name == self.base_name:
            raise ServeError(400, f"adapter name {name!r} is the base model's name; choose another",
                             param="lora_name")
        with self._lock:
            if name in self.registered or name in self.infos:
                raise ServeError(400, f"The lora adapter '{name}' has already been loaded; unload it first",
                                 param="lora_name")
        p = Path(path)
        if p.is_dir() and not (p / CONFIG_NAME).is_file() and (p / "config.json").is_file():
            raise ServeError(400, f"lora_path {str(path)!r} is a full model directory (config.json, no "
                                  f"{CONFIG_NAME}), not an adapter: serve it as its own base (`tunelab serve "
                                  f"{path}`)", param="lora_path")
        if not p.is_dir() or not (p / CONFIG_NAME).is_file():
            raise ServeError(400, f"lora_path {str(path)!r} is not an adapter directory here (it needs "
                                  f"{CONFIG_NAME})", param="lora_path")
        info = self._validate(name, p)
        with self._lock:
            self.registered[name] = p
            self.infos[name] = info
        return info

    def unload(self, name: str) -> None:
        """Forget adapter `name`; 404 when no adapter of that name is loaded. Running requests finish."""
        with self._lock:
            info = self.infos.pop(name, None)
            known = self.registered.pop(name, None)
        if info is None and known is None:
            raise ServeError(404, f"The lora adapter '{name}' cannot be found.", code="model_not_found",
                             param="lora_name")
        if info is not None:
            self.on_unload(info)

    def _find(self, name: str) -> Path:
        unknown = ServeError(404, f"The model `{name}` does not exist.", code="model_not_found", param="model")
        if self.adapters_dir is None:
            raise unknown
        path = self.adapters_dir / name
        if not path.exists():
            raise unknown
        if not self._inside_root(path):
            raise ServeError(403, f"adapter {name!r} resolves outside the adapters directory (a symlink?); refused",
                             code="adapter_outside_root", param="model")
        if not (path / CONFIG_NAME).is_file():
            raise unknown
        return path

    def _inside_root(self, path: Path) -> bool:
        root = os.path.realpath(self.adapters_dir)
        real = os.path.realpath(path)
        return real != root and os.path.commonpath([real, root]) == root

    def _validate(self, name: str, path: Path) -> AdapterInfo:
        weights = read_lora_weights(path, self.model)
        template, stops = self._chat_template(path)
        cfg = read_adapter_config(path)
        stamp = tuple(p.stat().st_mtime_ns for p in sorted(Path(path).glob("adapter_*")))
        return AdapterInfo(name=name, path=path, template=template, chat_stop_ids=stops, rank=weights.rank,
                           dora=cfg.get("use_dora") is True, key=(name, str(Path(path).resolve()), stamp))

    def _chat_template(self, path: Path) -> tuple[str, list[int]]:
        if not (path / "tokenizer_config.json").is_file():
            return self.base_template, self.base_stop_ids
        try:
            own = load_tokenizer(path)
        except TunelabError as e:
            raise ServeError(400, str(e), code="adapter_not_servable") from None
        if own.get_vocab() != self._vocab:
            raise ServeError(400, f"{path}: the adapter's tokenizer has another vocabulary than the base model's "
                                  f"(added tokens?); merge it (`tunelab export {path}`) and serve the merged model "
                                  f"as its own base", code="adapter_not_servable")
        template = chat_template_for(own)
        return template, end_of_turn_ids(self.tokenizer, template)
