"""`tunelab import`: a llama.cpp GGUF file -> a standard Hugging Face model directory.

transformers' own GGUF loader de-quantises the weights (to fp32) and builds the tokenizer; tunelab then
fixes the config where that loader drops what the file says (llama3 RoPE in `rope_freqs.weight`, RoPE
scaling keys, Gemma3's sliding pattern, local RoPE base, soft-capping and attention scale; see
reference/gguf.md section 8.4), clears the quantisation flag the loader leaves, writes the directory and
loads it back with plain `transformers`: its logits on probe inputs must equal transformers' GGUF-loaded
model's (with the same config fixes) within the tolerance, and its tokenizer must give the same ids, or
nothing is left behind. What was done is recorded in `tunelab_import.json`.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import ModelError

RECORD_NAME = "tunelab_import.json"
KIND = "imported model"
# Architectures whose config tunelab checks against the file's metadata (the others: as transformers reads them).
CHECKED_ARCHS = ("llama", "qwen2", "gemma3")
# End-of-generation tokens llama.cpp recognises by their text (src/llama-vocab.cpp), kept as extra EOS ids.
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|eom_id|>")
# Not in a GGUF (llama3 RoPE): only the ratios to it matter; Llama 3.x's published value.
LLAMA3_ORIGINAL_CONTEXT = 8192


class GGUFImportError(ModelError):
    """A GGUF file cannot be imported: not GGUF, truncated, an architecture transformers cannot load, ..."""


def _need_gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFImportError("GGUF import needs the `gguf` package: pip install gguf accelerate") from None
    return gguf


def supported_architectures() -> list[str]:
    """The `general.architecture` values transformers' GGUF loader can build a model from."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_gguf(path: str | Path):
    """Open `path` with the `gguf` package's reader after checking it is a complete GGUF file."""
    p = Path(path)
    if not p.is_file():
        raise GGUFImportError(f"{p}: no such file" if not p.exists() else f"{p}: a directory, not a GGUF file")
    with open(p, "rb") as f:
        head = f.read(8)
    if len(head) < 8 and b"GGUF".startswith(head[:4]):
        raise GGUFImportError(f"{p}: truncated GGUF file (only {len(head)} bytes); download or assemble it again")
    if head[:4] != b"GGUF":
        raise GGUFImportError(f"{p}: not a GGUF file (it starts with {head[:4]!r}; a GGUF file starts with the "
                              f"bytes b'GGUF')")
    version = struct.unpack("<I", head[4:8])[0] if len(head) == 8 else None
    if version not in (2, 3):
        raise GGUFImportError(f"{p}: GGUF version {version} is not supported (2 and 3 are); the file may be "
                              f"truncated or written big-endian")
    gguf = _need_gguf()
    size = p.stat().st_size
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as e:  # the reader's errors on a cut header are IndexError/ValueError/struct errors
        raise GGUFImportError(f"{p}: truncated or corrupt GGUF file ({size:,} bytes; the reader failed: "
                              f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); download or "
                              f"assemble it again") from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise GGUFImportError(f"{p}: truncated GGUF file: its tensors need {end:,} bytes, the file has "
                              f"{size:,}; download or assemble it again")
    return reader


def field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def quantisation(reader) -> dict[str, Any]:
    """The file type (`general.file_type`) and the count of tensors of each ggml type."""
    gguf = _need_gguf()
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    ft = field(reader, "general.file_type")
    try:
        ft_name = gguf.LlamaFileType(ft).name if ft is not None else None
    except ValueError:
        ft_name = str(ft)
    return {"file_type": ft_name, "tensor_types": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}


def _f32(x: float) -> float:
    """A float stored as f32 in the file, as the shortest decimal that gives the same f32 (1e-06, not 9.99e-07)."""
    return float(str(np.float32(x)))


# ---------------------------------------------------------------------------------------------------------
# Config fixes: what the GGUF says and transformers' loader does not read (reference/gguf.md 2.2, 4.4, 8.4).


def llama3_rope_from_factors(factors: np.ndarray, base: float, head_dim: int,
                             original_context: int = LLAMA3_ORIGINAL_CONTEXT, factor_tol: float = 1e-6) -> dict:
    """Rebuild a llama3 `rope_parameters` from the `rope_freqs.weight` tensor (per-frequency divisors).

    The curve depends only on original_context/low_freq_factor and original_context/high_freq_factor (the two
    wavelength bounds), so the original context, which the file does not hold, is fixed (8192, Llama 3.x's, or
    the context length when shorter) and the two factors are fitted to it: the frequencies come out the same for
    any choice. Raises when no llama3 curve fits.
    """
    f = np.asarray(factors, dtype=np.float64)
    n = head_dim // 2
    if f.shape != (n,):
        raise GGUFImportError(f"rope_freqs.weight has {f.size} values, expected head_dim/2 = {n}")
    x = base ** (-2.0 * np.arange(n) / head_dim) / (2 * math.pi)  # 1 / wavelength, decreasing
    factor = float(f.max())
    if factor <= 1 + factor_tol:
        return {"rope_type": "default", "rope_theta": base}
    ones = np.abs(f - 1) <= factor_tol
    full = np.abs(f - factor) <= factor_tol * factor
    mid = ~ones & ~full
    s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)  # 0 at the low-frequency bound, 1 at the high one
    x_one = x[ones].min() if ones.any() else x.max() * 4
    x_full = x[full].max() if full.any() else x.min() / 4
    if mid.sum() >= 2:
        a, b = np.polyfit(x[mid], s, 1)
        x_low, x_high = -b / a, (1 - b) / a
    elif mid.sum() == 1:
        x1, s1 = float(x[mid][0]), float(s[0])
        x_high = math.sqrt(x1 * x_one)
        x_low = (x1 - s1 * x_high) / (1 - s1)
        if not x_low >= x_full:
            x_low = math.sqrt(x1 * x_full)
            x_high = x_low + (x1 - x_low) / s1
    else:
        x_low, x_high = x_full ** (2 / 3) * x_one ** (1 / 3), x_full ** (1 / 3) * x_one ** (2 / 3)
    old = original_context
    params = {"rope_type": "llama3", "rope_theta": base, "factor": _f32(factor),
              "low_freq_factor": float(old * x_low), "high_freq_factor": float(old * x_high),
              "original_max_position_embeddings": old}
    # check against the curve transformers computes (its llama3 formula, in float64)
    wavelen = 1 / x
    low_w, high_w = old / params["low_freq_factor"], old / params["high_freq_factor"]
    smooth = (old / wavelen - params["low_freq_factor"]) / (params["high_freq_factor"] - params["low_freq_factor"])
    rebuilt = np.where(wavelen < high_w, 1.0, np.where(wavelen > low_w, factor,
                                                       1 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(rebuilt, f, rtol=1e-4, atol=0):
        raise GGUFImportError(f"rope_freqs.weight does not follow the llama3 RoPE curve (max relative difference "
                              f"{np.max(np.abs(rebuilt / f - 1)):.2g}); tunelab cannot write a config for it")
    return params


def _rope_scaling_keys(reader, arch: str) -> dict[str, Any]:
    prefix = f"{arch}.rope.scaling."
    return {k[len(prefix):]: field(reader, k) for k in reader.fields if k.startswith(prefix)}


def _scaled_rope(reader, arch: str, base: float, max_pos: int) -> dict | None:
    """`rope_parameters` from `{arch}.rope.scaling.*` (linear, yarn), None when the file has no scaling."""
    keys = _rope_scaling_keys(reader, arch)
    kind = keys.get("type")
    if kind in (None, "none") and not keys.get("factor"):
        return None
    factor = keys.get("factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "rope_theta": base, "factor": _f32(factor)}
    if kind == "yarn" and factor:
        params = {"rope_type": "yarn", "rope_theta": base, "factor": _f32(factor)}
        orig = keys.get("original_context_length")
        params["original_max_position_embeddings"] = int(orig) if orig else int(max_pos / factor)
        if keys.get("attn_factor"):
            params["attention_factor"] = _f32(keys["attn_factor"])
        for src, dst in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if keys.get(src):
                params[dst] = _f32(keys[src])
        return params
    raise GGUFImportError(f"{arch}.rope.scaling.type = {kind!r} (keys {sorted(keys)}): tunelab can import linear "
                          f"and yarn RoPE scaling only")


def fixed_config(reader, config) -> tuple[Any, list[str]]:
    """A copy of transformers' GGUF-derived `config` with what the file says and the loader dropped restored;
    and one line per change. Refuses (GGUFImportError) what it cannot represent."""
    arch = field(reader, "general.architecture")
    cfg = config.__class__.from_dict(config.to_dict())
    changes: list[str] = []

    def setattr_logged(name: str, value: Any, why: str) -> None:
        old = getattr(cfg, name, None)
        if old != value:
            setattr(cfg, name, value)
            changes.append(f"{name}: {old!r} -> {value!r} ({why})")

    tensors = {t.name: t for t in reader.tensors}
    if arch not in CHECKED_ARCHS:
        if _rope_scaling_keys(reader, arch) or "rope_freqs.weight" in tensors:
            raise GGUFImportError(f"architecture {arch!r} with RoPE scaling: tunelab checks RoPE scaling for "
                                  f"{', '.join(CHECKED_ARCHS)} only, and transformers' loader ignores it")
        return cfg, changes

    eps = field(reader, f"{arch}.attention.layer_norm_rms_epsilon")
    if eps is not None:  # the same f32 as the loader's value (no change in the model), written as 1e-06
        cfg.rms_norm_eps = config.rms_norm_eps = _f32(eps)
    max_pos = cfg.max_position_embeddings
    if arch in ("llama", "qwen2"):
        base = _f32(field(reader, f"{arch}.rope.freq_base", 10000.0))
        rope = {"rope_type": "default", "rope_theta": base}
        if "rope_freqs.weight" in tensors:
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            rope = llama3_rope_from_factors(np.asarray(tensors["rope_freqs.weight"].data), base, head_dim,
                                            min(LLAMA3_ORIGINAL_CONTEXT, max_pos))
            why = "rebuilt from rope_freqs.weight, which transformers' loader drops"
        else:
            rope = _scaled_rope(reader, arch, base, max_pos) or rope
            why = f"{arch}.rope.scaling.* in the file"
        if rope != dict(cfg.rope_parameters):
            setattr_logged("rope_parameters", rope, why)
    elif arch == "gemma3":
        base = _f32(field(reader, "gemma3.rope.freq_base", 1e6))
        base_swa = _f32(field(reader, "gemma3.rope.freq_base_swa", 10000.0))
        full = _scaled_rope(reader, arch, base, max_pos) or {"rope_type": "default", "rope_theta": base}
        rope = {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": base_swa}}
        if rope != {k: dict(v) for k, v in cfg.rope_parameters.items()}:
            setattr_logged("rope_parameters", rope, "gemma3.rope.* in the file")
        n = cfg.num_hidden_layers
        pattern = field(reader, "gemma3.attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # per-layer flags: true = sliding window
            if len(pattern) != n:
                raise GGUFImportError(f"gemma3.attention.sliding_window_pattern has {len(pattern)} entries for "
                                      f"{n} layers")
            types = ["sliding_attention" if bool(v) else "full_attention" for v in pattern]
        else:  # llama.cpp: every pattern-th layer is full attention (default 6)
            p = int(pattern)
            types = ["full_attention" if p > 0 and (i + 1) % p == 0 else "sliding_attention" for i in range(n)]
        setattr_logged("layer_types", types, "gemma3.attention.sliding_window_pattern (llama.cpp's default 6)")
        # llama.cpp scales attention by 1/sqrt(head_dim), by 1/sqrt(hidden/heads) for the 62-layer 27B model
        scalar = cfg.hidden_size // cfg.num_attention_heads if n == 62 else cfg.head_dim
        setattr_logged("query_pre_attn_scalar", scalar, "the attention scale llama.cpp uses")
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            value = field(reader, f"gemma3.{key}")
            setattr_logged(key, _f32(value) if value else None, f"gemma3.{key} in the file")
    return cfg, changes


def generation_eos(reader, tokenizer) -> list[int]:
    """EOS ids for generation: the file's EOS, EOT and EOM ids and the end-of-turn tokens llama.cpp stops at."""
    ids = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    vocab = tokenizer.get_vocab()
    ids += [vocab.get(t) for t in EOG_TEXTS]
    out: list[int] = []
    for i in ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    return out


# ---------------------------------------------------------------------------------------------------------


def _load_from_gguf(path: Path):
    """transformers' GGUF load (de-quantised, fp32), without the quantisation flag, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older transformers
        from transformers import GgufConfig
    try:
        import accelerate  # noqa: F401  (transformers needs it to load a GGUF)
    except ImportError:
        raise GGUFImportError("GGUF import needs the `accelerate` package: pip install accelerate") from None
    d, name = str(path.parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32, local_files_only=True,
                                                     quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=name, local_files_only=True)
    except Exception as e:  # a loader boundary: an error in what the file holds
        raise GGUFImportError(f"{path}: transformers cannot load this GGUF file ({str(e).splitlines()[0][:300]})") \
            from e
    # a GGUF-loaded model carries a quantiser that refuses save_pretrained (reference/gguf.md 8.2)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model, tokenizer


def _tokenizer_texts(tokenizer) -> list[str]:
    from tunelab.export import PROBE_TEXTS

    texts = [*PROBE_TEXTS, "  two  spaces, 12345, it's 3.14 — ünïcödé 🙂\n\ttab", "What is the capital of France?"]
    if tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], tokenize=False,
                                                   add_generation_prompt=True))
    return texts


def import_gguf(src: str | Path, out_dir: str | Path, tolerance: float = 1e-4,
                licenses: list[str | Path] | None = None, log=None) -> dict[str, Any]:
    """Import the GGUF file `src` into the HF model directory `out_dir`; returns the import record."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import tunelab
    from tunelab.export import max_logit_diff, probe_inputs
    from tunelab.io import atomic_dir, atomic_write_json
    from tunelab.models import write_model_files
    from tunelab.outputs import check_outputs, check_replaceable

    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    src = Path(src)
    check_outputs([out_dir], {"gguf file": src, "licence file": licenses})  # first: atomic_dir checks again
    check_replaceable(out_dir, KIND)
    reader = read_gguf(src)
    arch = field(reader, "general.architecture")
    supported = supported_architectures()
    if arch not in supported:
        raise GGUFImportError(f"{src}: architecture {arch!r} cannot be loaded by transformers' GGUF loader "
                              f"(transformers {__import__('transformers').__version__} loads: {', '.join(supported)})")
    for lic in licenses or []:
        if not Path(lic).is_file():
            raise GGUFImportError(f"licence file {lic} does not exist")
    say(f"reading {src} ({arch}, {src.stat().st_size / 1e6:,.0f} MB) with transformers' GGUF loader")
    model, tokenizer = _load_from_gguf(src)
    config, changes = fixed_config(reader, model.config)
    if changes:  # the reference: transformers' weights under the corrected config
        reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = reference.load_state_dict(model.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise GGUFImportError(f"{src}: the weights do not fit the corrected config (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        reference.tie_weights()
        as_loaded, model = model, reference
    else:
        as_loaded = None
    eos = generation_eos(reader, tokenizer)
    gen = model.generation_config
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen.bos_token_id = tokenizer.bos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config._name_or_path = ""
    for junk in ("_model_name_or_path",):
        if hasattr(model.config, junk):
            delattr(model.config, junk)
    load_s = time.perf_counter() - t0
    say(f"loaded in {load_s:.0f}s; hashing the file")
    digest = sha256_file(src)
    vocab = model.config.vocab_size
    extra_tokens = [t for t, i in tokenizer.get_vocab().items() if i >= vocab]  # e.g. a <mask> the class adds
    probes = [torch.remainder(p, vocab) for p in probe_inputs(tokenizer)]
    texts = _tokenizer_texts(tokenizer)
    with atomic_dir(out_dir, kind=KIND, inputs={"gguf file": src}) as tmp:
        say(f"writing {out_dir}")
        write_model_files(model, tokenizer, tmp)
        for lic in licenses or []:
            shutil.copy2(lic, tmp / Path(lic).name)
        say("checking: loading the directory with plain transformers and comparing logits")
        written = AutoModelForCausalLM.from_pretrained(tmp, config=AutoConfig.from_pretrained(tmp), dtype=torch.float32)
        diff = max_logit_diff(model, written, probes)
        if not diff <= tolerance:
            raise GGUFImportError(f"{out_dir}: the written model's logits differ from transformers' GGUF-loaded "
                                  f"model by {diff:.3g} (tolerance {tolerance:g}); nothing was written")
        tok_back = AutoTokenizer.from_pretrained(tmp)
        bad = [t for t in texts if tok_back(t, add_special_tokens=True)["input_ids"]
               != tokenizer(t, add_special_tokens=True)["input_ids"]]
        if bad:
            raise GGUFImportError(f"{out_dir}: the written tokenizer encodes {bad[0]!r} differently from the GGUF "
                                  f"tokenizer; nothing was written")
        fix_diff = max_logit_diff(as_loaded, written, probes) if as_loaded is not None else 0.0
        del written
        record = {
            "source": str(src.resolve()), "sha256": digest, "size_bytes": src.stat().st_size,
            "architecture": arch, "name": field(reader, "general.name"),
            "license": field(reader, "general.license"), "licence_files": [Path(p).name for p in licenses or []],
            "quantisation": quantisation(reader), "dtype": "float32",
            "parameters": sum(p.numel() for p in model.parameters()),
            "config_fixes": changes,
            "max_abs_logit_diff": diff, "tolerance": tolerance, "probes": len(probes),
            "max_abs_logit_diff_vs_uncorrected_config": fix_diff,
            "tokenizer_texts_checked": len(texts), "chat_template": bool(tokenizer.chat_template),
            "eos_token_ids": eos, "tokens_beyond_model_vocab": extra_tokens,
            "import_s": round(time.perf_counter() - t0, 1),
            "out_dir": str(out_dir), "tunelab": tunelab.__version__,
            "transformers": __import__("transformers").__version__, "gguf": _gguf_version(),
        }
        atomic_write_json(tmp / RECORD_NAME, record)
    return record


def _gguf_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return None
