"""HF PEFT adapter directories: write a tunelab LoRA as a PEFT LoRA adapter, and read PEFT LoRA adapters.

Written (atomically): `adapter_config.json` (every setting that changes the maths spelled out, `use_rslora`
included) and `adapter_model.safetensors` with keys `base_model.model.<HF module path>.lora_A.weight` /
`.lora_B.weight` and metadata {"format": "pt"}; optionally the tokenizer. `PeftModel.from_pretrained` loads it
with no missing or unexpected keys.
Read: `peft_type: LORA` on nn.Linear layers with r, lora_alpha, lora_dropout, use_rslora, rank_pattern,
alpha_pattern, target_modules (list, regex or "all-linear") and exclude_modules; weights from
adapter_model.safetensors (or the pickle fallback adapter_model.bin, read with weights_only=True), with or
without the `base_model.model.` prefix. Every targeted module must have both tensors (never silently zero).
DoRA (`use_dora: true`, with a `...lora_magnitude_vector` tensor per module) is written and read too (`dora.py`).
Trainable token rows (`trainable_token_indices`, one contiguous range; `token_rows.py`) are written and read.
Refused as "not supported yet": other peft types, LoRA bias / bias != "none", modules_to_save, embedding
LoRA, layers_to_transform, layer_replication, target_parameters, and inits that change the
base weights (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA). Adapters saved under a non-default adapter name
(a sub-folder) are not looked for: pass the sub-folder itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tunelab.errors import ConfigError, ModelError
from tunelab.methods.base import CONFIG_NAME, WEIGHTS_NAME, write_adapter_dir
from tunelab.methods.dora import MAGNITUDE, DoRA
from tunelab.methods.lora import LoRA
from tunelab.methods.token_rows import DELTA

PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# adapter_config.json keys whose feature tunelab does not implement; an adapter that uses one is refused.
_UNSUPPORTED = {
    "lora_bias": "LoRA bias terms (lora_bias: true)",
    "modules_to_save": "modules_to_save (extra fully trained modules)",
    "layers_to_transform": "layers_to_transform (LoRA on some layer indices only)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "use_qalora": "QA-LoRA (use_qalora: true)",
    "use_bdlora": "BD-LoRA (use_bdlora: true)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


def is_adapter_dir(path: str | Path) -> bool:
    """True when `path` is a directory holding an adapter_config.json."""
    return (Path(path) / CONFIG_NAME).is_file()


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The parsed adapter_config.json of an adapter directory (e.g. to find `base_model_name_or_path`)."""
    d = Path(path)
    if not d.is_dir():
        raise ModelError(f"adapter '{path}' is not a local directory; pass the directory that holds {CONFIG_NAME}")
    p = d / CONFIG_NAME
    if not p.is_file():
        raise ModelError(f"{d}: no {CONFIG_NAME}; an adapter directory is what `tunelab finetune` (method lora) "
                         f"or PEFT's save_pretrained writes")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{p}: not readable JSON ({e}); write the adapter again") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{p}: expected a JSON object of adapter settings, found {type(cfg).__name__}")
    return cfg


def save_lora_adapter(method: LoRA, out_dir: str | Path, base_model_path: str | None = None,
                      tokenizer=None, *, tensors: dict[str, torch.Tensor] | None = None,
                      **config_updates: Any) -> Path:
    """Write `method` as a PEFT LoRA adapter directory (atomically) and return its path.

    Methods built on LoRA pass what differs: `tensors` (keys without the `base_model.model.` prefix; default
    `method.state_dict()`) and adapter_config.json values (e.g. `use_dora=True`, or LoRA-Dash's r / rank_pattern).
    """
    if not method.layers:
        raise ModelError("nothing to save: this LoRA has no adapted layers (inject it into a model first)")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path, "revision": None,
        "r": method.r, "lora_alpha": _number(method.alpha), "lora_dropout": method.dropout,
        "use_rslora": method.rslora, "use_dora": False,
        "target_modules": method.peft_target_modules(), "exclude_modules": None,
        # key order matters (the first matching pattern wins), so the file is written unsorted
        "rank_pattern": dict(method.rank_pattern), "alpha_pattern": dict(method.alpha_pattern),
        "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
        "init_lora_weights": True if method.init == "kaiming" else "gaussian",
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    } | ({"trainable_token_indices": method.rows.peft_indices()} if getattr(method, "rows", None) else {}) \
        | config_updates
    tensors = {PREFIX + k: v for k, v in (method.state_dict() if tensors is None else tensors).items()}
    return write_adapter_dir(out_dir, config, tensors, tokenizer)


def load_lora_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> LoRA:
    """Inject the LoRA described by `adapter_dir` into `model`, load its weights and return the method.

    On any error the model is left as it was (no LoRA layers).
    """
    d = Path(adapter_dir)
    cfg = read_adapter_config(d)
    where = d / CONFIG_NAME
    settings = _lora_settings(cfg, where)
    dora = cfg.get("use_dora") is True
    weights_path, tensors = _read_weights(d)
    sd = {}
    for key, tensor in tensors.items():
        _check_tensor_kind(key, weights_path, dora)
        sd[key.removeprefix(PREFIX)] = tensor
    try:
        method = DoRA(**settings) if dora else LoRA(**settings)
        method.inject(model)
    except (ConfigError, ModelError) as e:
        raise ModelError(f"{where}: {e}") from None
    try:
        method.load_state_dict(sd)
    except ModelError as e:
        method.remove()
        raise ModelError(f"{weights_path}: {e}") from None
    return method


def _lora_settings(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """LoRA(...) keyword arguments from a PEFT config, refusing what tunelab does not implement."""
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise ModelError(f"{where}: peft_type {peft_type!r} is not supported yet; tunelab loads LORA adapters only")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise ModelError(f"{where}: task_type {cfg['task_type']!r} is not supported; tunelab loads CAUSAL_LM adapters")
    if cfg.get("use_dora") not in (None, False, True):
        raise ModelError(f"{where}: use_dora must be true or false, found {cfg['use_dora']!r}")
    for key, what in _UNSUPPORTED.items():
        if _in_use(cfg.get(key)):
            raise ModelError(f"{where}: {what} is not supported yet (key {key!r} = {cfg[key]!r}); "
                             f"use a plain LoRA adapter, or serve this one with PEFT")
    if cfg.get("bias", "none") != "none":
        raise ModelError(f"{where}: bias {cfg['bias']!r} (trained base biases) is not supported yet; "
                         f"tunelab loads adapters with bias: none")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ModelError(f"{where}: init_lora_weights {init!r} changes the base weights and is not supported yet; "
                         f"convert it to a plain LoRA with PEFT (save_pretrained(..., "
                         f"path_initial_model_for_weight_conversion=...)) first")
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ModelError(f"{where}: r must be an integer >= 1, found {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise ModelError(f"{where}: lora_alpha must be a number > 0, found {alpha!r}")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets)):
        raise ModelError(f"{where}: target_modules is {targets!r}; it must name the adapted modules (a list of "
                         f"names or a regex); tunelab does not guess PEFT's per-architecture defaults")
    dropout = cfg.get("lora_dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ModelError(f"{where}: lora_dropout must be a number in [0, 1), found {dropout!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise ModelError(f"{where}: {key} must be a mapping of module pattern -> value, found {cfg[key]!r}")
    return dict(r=r, alpha=alpha, dropout=dropout, rslora=bool(cfg.get("use_rslora", False)),
                token_rows=_token_rows(cfg.get("trainable_token_indices"), where),
                target_modules=targets, init="gaussian" if init == "gaussian" else "kaiming",
                rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {},
                exclude_modules=cfg.get("exclude_modules") or None)


def _token_rows(indices: Any, where: Path) -> tuple[int, int] | None:
    """`trainable_token_indices` as the row range [first, end) tunelab trains (one contiguous range, the same for
    the embedding and an untied head), or None."""
    if indices is None:
        return None
    lists = list(indices.values()) if isinstance(indices, dict) else [indices]
    ids = lists[0] if lists else None
    if not (isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise ModelError(f"{where}: trainable_token_indices {indices!r} is not a list of token ids")
    if any(x != ids for x in lists) or ids != list(range(ids[0], ids[0] + len(ids))):
        raise ModelError(f"{where}: trainable_token_indices other than one contiguous range of ids (the same for "
                         f"every module) are not supported yet; tunelab trains the rows of the tokens "
                         f"`tunelab vocab extend` appended (or every row)")
    return ids[0], ids[0] + len(ids)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _in_use(value: Any) -> bool:
    """A config value other than its 'off' defaults (None, False, empty); 0 counts as in use (a layer index)."""
    return value is not None and value is not False and value != "" and value != [] and value != {}


def _read_weights(d: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = d / WEIGHTS_NAME
    try:
        if path.is_file():
            tensors = load_file(str(path))
        elif (d / PICKLE_WEIGHTS_NAME).is_file():
            path = d / PICKLE_WEIGHTS_NAME
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ModelError(f"{d}: no {WEIGHTS_NAME} (nor {PICKLE_WEIGHTS_NAME}); the adapter directory is "
                             f"incomplete: copy the weights file next to {CONFIG_NAME}")
    except ModelError:
        raise
    except Exception as e:  # a loader boundary: truncated or corrupt files, foreign pickles
        raise ModelError(f"{path}: cannot read the adapter weights ({str(e).splitlines()[0][:200]}); "
                         f"write the adapter again") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ModelError(f"{path}: expected a mapping of tensor names to tensors")
    if not tensors:
        raise ModelError(f"{path}: holds no tensors; the adapter was saved empty: train or export it again")
    return path, tensors


def _check_tensor_kind(key: str, path: Path, dora: bool = False) -> None:
    """ModelError naming `key` when it is not a plain lora_A / lora_B weight (or, for DoRA, a magnitude)."""
    if key.endswith((".lora_A.weight", ".lora_B.weight", "." + DELTA)) or (dora and key.endswith("." + MAGNITUDE)):
        return
    if key.endswith(".lora_B.bias"):
        what = "a LoRA bias (lora_bias)"
    elif MAGNITUDE in key:
        what = "a DoRA magnitude vector in an adapter without use_dora: true"
    elif "lora_embedding_" in key:
        what = "embedding LoRA"
    elif ".lora_" in key:
        what = "an unknown kind of LoRA tensor"
    else:
        what = "not a LoRA weight (a modules_to_save or trainable-token tensor?)"
    raise ModelError(f"{path}: tensor {key} is {what}; not supported yet: tunelab loads lora_A / lora_B "
                     f"weights of linear layers only")
