"""`tunelab export --format gguf`: a Llama, Qwen2 or Gemma3 model (or base + a mergeable adapter) as one GGUF file.

The file is written with the `gguf` package's `GGUFWriter` and its tensor-name map, as llama.cpp's converter
writes it (../shared/reference/gguf.md sections 3-7): Llama's q/k rows permuted to llama.cpp's rotary layout,
Gemma's RMSNorm weights stored as 1 + w, no `output.weight` when the head is tied, 1-D tensors and norms in
f32, 2-D weights in the chosen type (q8_0 through `gguf.quants`; a row length that is not a multiple of 32
falls back to f16). The tokenizer goes in as metadata: byte-level BPE as `gpt2` (tokens, types, merges,
pre-tokenizer id) or a Gemma SentencePiece-style BPE as `llama` (tokens, scores, types, and the merges too, so
transformers rebuilds it exactly), with the special ids, add_bos as the tokenizer really behaves, and the
chat template. Beside it goes an Ollama `Modelfile` whose Go `TEMPLATE` renders what the Jinja template does.

Before the directory appears under its final name, the file is loaded back with transformers' own GGUF loader
(`from_pretrained(dir, gguf_file=...)`): its logits on probe inputs must be within the type's bound of the
source model's (base + adapter unmerged), and its tokenizer must encode the probe texts to the same ids.
Otherwise nothing is left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import TunelabError
from tunelab.formats.modelfile import PROBE_CHAT, adds_special, modelfile

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_TYPE = "f16"
# The check's bound per type: the largest |logit difference| between the source model and its GGUF as
# transformers loads it back, as a share of the source's largest |logit| on the same probes (so it is the same
# test on a tiny random model with logits near 1 and a real one with logits near 40). Measured (README, Export):
# f32 0 everywhere; tiny Llama/Qwen2/Gemma3 f16 <= 1.0e-3, bf16 <= 9.9e-3, q8_0 <= 2.8e-2; SmolLM2-135M
# f16 3.0e-3, bf16 9.4e-3, q8_0 4.9e-2. A layout bug (q/k rows not permuted) gives > 1.
BOUNDS = {"f32": 1e-5, "f16": 1e-2, "bf16": 5e-2, "q8_0": 0.15}
# config.model_type -> GGUF architecture
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
GGUF_NAME = "model.gguf"
REPORT_NAME = "tunelab_gguf_export.json"


class GGUFExportError(TunelabError):
    """A model, adapter, tokenizer or option that tunelab cannot export to GGUF (or an export that failed its check)."""


# ---------------------------------------------------------------------------------------------------- weights


def _gguf():
    import gguf

    return gguf


def gguf_arch(config) -> str:
    """The GGUF architecture of an HF config, or an error naming the supported ones."""
    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is None:
        raise GGUFExportError(f"GGUF export supports Llama, Qwen2 and Gemma3 (text) models (model_type "
                              f"{', '.join(ARCHITECTURES)}); this model is {config.model_type!r}")
    return arch


def _rope_parameters(config, which: str = "full_attention") -> dict:
    rp = getattr(config, "rope_parameters", None) or {}
    if which in rp and isinstance(rp[which], dict):
        return rp[which]
    return rp


def _check_config(config, arch: str) -> None:
    """Refuse what the GGUF file (as llama.cpp and transformers read it) cannot say."""
    rope_type = _rope_parameters(config).get("rope_type", "default")
    if rope_type not in (None, "default"):
        raise GGUFExportError(f"GGUF export of RoPE scaling {rope_type!r} is not supported yet (transformers' GGUF "
                              f"loader drops it, so the export could not be verified); only plain RoPE models")
    if arch == "gemma3":
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
            raise GGUFExportError("GGUF export of a Gemma3 model with logit soft-capping is not supported")
        if getattr(config, "query_pre_attn_scalar", None) != config.head_dim:
            raise GGUFExportError(f"Gemma3 query_pre_attn_scalar {config.query_pre_attn_scalar} != head_dim "
                                  f"{config.head_dim}: llama.cpp scales attention by 1/sqrt(head_dim), so this "
                                  f"model cannot be exported to GGUF")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half rows of a q/k projection (weight or bias) into llama.cpp's interleaved rotary layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_data(name: str, x: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(array, raw_dtype) for GGUFWriter.add_tensor, with the converter's type policy."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if x.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or gguf_type == "f32":
        return x.astype(np.float32), None
    if gguf_type == "f16":
        return x.astype(np.float16), None
    if gguf_type == "bf16":
        return gguf.quants.quantize(x, q.BF16), q.BF16
    try:
        return gguf.quants.quantize(x, q.Q8_0), q.Q8_0
    except gguf.quants.QuantError:  # a row length that is not a multiple of 32
        return x.astype(np.float16), None


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _add_hparams(w, config, arch: str, gguf_type: str, name: str) -> None:
    gguf = _gguf()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_name(name)
    w.add_type("model")
    w.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type])))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(float(_rope_parameters(config).get("rope_theta", 10000.0)))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "llama":
        w.add_vocab_size(config.vocab_size)
        w.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(config.sliding_window)
        w.add_rope_freq_base_swa(float(_rope_parameters(config, "sliding_attention").get("rope_theta", 10000.0)))


def _add_tensors(w, model, arch: str, gguf_type: str) -> dict[str, int]:
    """Every weight under its GGUF name; returns the count of tensors per GGUF type."""
    gguf = _gguf()
    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for hf_name, t in model.state_dict().items():
        if "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
            continue
        g = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise GGUFExportError(f"GGUF export: no GGUF name for tensor {hf_name!r} of this {arch} model")
        x = t.detach().to(torch.float32).cpu().numpy()
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            x = permute_qk(x, config.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            x = permute_qk(x, config.num_key_value_heads)
        elif arch == "gemma3" and hf_name.endswith("norm.weight"):
            x = x + 1.0  # HF Gemma computes x * (1 + w), llama.cpp x * w; transformers' loader subtracts 1
        data, raw = _tensor_data(g, x, gguf_type)
        w.add_tensor(g, data, raw_dtype=raw)
        kind = raw.name if raw is not None else gguf.GGMLQuantizationType.F16.name if data.dtype == np.float16 \
            else "F32"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


# -------------------------------------------------------------------------------------------------- tokenizer

def _tokenizer_json(tokenizer) -> dict:
    if not getattr(tokenizer, "is_fast", False):
        raise GGUFExportError("GGUF export needs a fast tokenizer (tokenizer.json)")
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _bpe_pre(tj: dict) -> str:
    """llama.cpp's pre-tokenizer id for a byte-level BPE tokenizer.json, or an error when the family is unknown."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = parts[0].get("pattern", {}).get("Regex")
        for name in ("llama-bpe", "qwen2"):  # ids llama.cpp knows, with the split transformers applies for them
            if regex == GGUF_PRE_TOKENIZER_SPLITS[name]:
                return name
    raise GGUFExportError(f"GGUF export: this byte-level BPE tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) "
                          f"matches none that llama.cpp and transformers both know (GPT-2, SmolLM, Llama-3, Qwen2); "
                          f"exporting it would tokenize differently, so it is refused")


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
           "unk": tokenizer.unk_token_id}
    return {k: int(v) for k, v in ids.items() if v is not None}


def _add_tokenizer(w, tokenizer, config, arch: str) -> str:
    """The tokenizer metadata; returns the tokenizer model written (`gpt2` or `llama`)."""
    gguf = _gguf()
    TT = gguf.TokenType
    tj = _tokenizer_json(tokenizer)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')!r}")
    backend = tokenizer.backend_tokenizer
    n_tok = backend.get_vocab_size(with_added_tokens=True)
    if n_tok > config.vocab_size:
        raise GGUFExportError(f"the tokenizer has {n_tok} tokens but the model only {config.vocab_size} embeddings")
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    byte_level = (tj.get("decoder") or {}).get("type") == "ByteLevel"
    spm = bool(model.get("byte_fallback")) and not byte_level
    if arch == "gemma3" and not spm:
        raise GGUFExportError("GGUF export of Gemma3 needs Gemma's SentencePiece-style tokenizer (BPE with byte "
                              "fallback and '▁' for spaces)")
    if arch != "gemma3" and not byte_level:
        raise GGUFExportError(f"GGUF export of {arch} supports byte-level BPE tokenizers (Llama-3, SmolLM2, "
                              f"Qwen2 style) only")
    tokens, types, scores = [], [], []
    for i in range(config.vocab_size):
        tok = backend.id_to_token(i) if i < n_tok else None
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
            scores.append(-1000.0)
            continue
        tokens.append(tok)
        if i in added:
            types.append(TT.CONTROL if added[i].get("special") else TT.USER_DEFINED)
            scores.append(-1000.0 if added[i].get("special") else 0.0)
        elif spm and re.fullmatch(r"<0x[0-9A-F]{2}>", tok):
            types.append(TT.BYTE)
            scores.append(0.0)
        elif spm and tok == model.get("unk_token"):
            types.append(TT.UNKNOWN)
            scores.append(0.0)
        else:
            types.append(TT.NORMAL)
            scores.append(-float(i))  # SentencePiece BPE: a piece's score is its merge rank
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m)
              for m in model.get("merges", [])]
    if byte_level and not merges:
        raise GGUFExportError("GGUF export: the byte-level BPE tokenizer has no merges")
    if spm:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores(scores)
        w.add_add_space_prefix(False)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_bpe_pre(tj))
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    ids = _special_ids(tokenizer)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                     ("unk", w.add_unk_token_id)):
        if key in ids:
            add(ids[key])
    add_bos, add_eos = adds_special(tokenizer)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    eot = [t for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>") if t in tokenizer.get_vocab()]
    if eot:
        w.add_eot_token_id(tokenizer.convert_tokens_to_ids(eot[0]))
    if isinstance(tokenizer.chat_template, str) and tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
    return "llama" if spm else "gpt2"


# ------------------------------------------------------------------------------------------------------ write


def write_gguf(model, tokenizer, path: str | Path, gguf_type: str = DEFAULT_TYPE, name: str = "model") -> dict:
    """Write `model` (a plain HF Llama/Qwen2/Gemma3 causal LM) and `tokenizer` to the GGUF file `path`."""
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    gguf = _gguf()
    config = model.config
    arch = gguf_arch(config)
    _check_config(config, arch)
    w = gguf.GGUFWriter(str(path), arch)
    _add_hparams(w, config, arch, gguf_type, name)
    tok_model = _add_tokenizer(w, tokenizer, config, arch)
    counts = _add_tensors(w, model, arch, gguf_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"architecture": arch, "tokenizer_model": tok_model, "tensor_types": counts}


# ------------------------------------------------------------------------------------------------------ check


def tokenizer_probe_texts(tokenizer) -> list[str]:
    from tunelab.export import PROBE_TEXTS

    texts = list(PROBE_TEXTS) + ["Don't split 12345 tokens!  Two  spaces\tand\nnew lines.", "北京是中国的首都。"]
    if isinstance(tokenizer.chat_template, str) and tokenizer.chat_template:
        try:
            texts.append(tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False, add_generation_prompt=True))
        except Exception:  # noqa: S110 - a template that cannot render this chat is checked elsewhere
            pass
    return texts


def load_gguf(directory: Path, name: str = GGUF_NAME):
    """(model, tokenizer) as transformers' own GGUF loader reads them (de-quantised to fp32)."""
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:  # transformers' GGUF loader draws its own tqdm bars on stderr
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                                         local_files_only=True)
            tok = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)
    return model, tok


def compare_tokenizers(source, loaded, texts: list[str]) -> list[str]:
    """The probe texts that the two tokenizers encode differently (with and without special tokens)."""
    bad = []
    for t in texts:
        for special in (False, True):
            if source(t, add_special_tokens=special)["input_ids"] != loaded(t, add_special_tokens=special)["input_ids"]:
                bad.append(t)
                break
    return bad


@torch.no_grad()
def _logits(model, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=x).logits.float() for x in probes]


# ----------------------------------------------------------------------------------------------------- export


def export_gguf(model_ref: str | Path, out_dir: str | Path, adapter: str | Path | None = None,
                gguf_type: str = DEFAULT_TYPE, tolerance: float | None = None,
                extra_check: Callable[[Any, Any], None] | None = None) -> dict[str, Any]:
    """Export a model directory, or base + a mergeable adapter (merged in fp32), to `out_dir`/model.gguf with a
    Modelfile and a report; verified through transformers' GGUF loader against the source model.

    `extra_check(model, tokenizer)`, if given, is called with the GGUF as transformers loaded it, after the built-in
    checks (e.g. to compare greedy generations); an exception it raises leaves nothing behind, as theirs do."""
    from tunelab.export import probe_inputs
    from tunelab.io import atomic_dir, atomic_write_json
    from tunelab.methods import load_adapter
    from tunelab.models import load_model, load_tokenizer
    from tunelab.serve.generate import resolve_base

    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if tolerance is not None and not tolerance >= 0:  # also refuses nan
        raise GGUFExportError(f"tolerance must be >= 0 (got {tolerance:g}): it is the largest |logit difference| "
                              f"allowed, as a share of the logits' scale")
    bound = BOUNDS[gguf_type] if tolerance is None else tolerance  # relative to the logits' scale
    t0 = time.perf_counter()
    base, adapter_dir = resolve_base(model_ref, adapter)
    own_tok = adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter_dir if own_tok else base)
    model = load_model(base)
    arch = gguf_arch(model.config)
    _check_config(model.config, arch)
    method = None
    if adapter_dir is not None:
        method = load_adapter(model, adapter_dir)
        if not method.mergeable:
            raise GGUFExportError(f"{adapter_dir}: a {method.name!r} adapter cannot be merged into the base "
                                  f"weights, so it cannot be exported to GGUF; serve it with its base instead "
                                  f"(tunelab generate/chat {adapter_dir})")
    probes = probe_inputs(tokenizer)
    reference = _logits(model, probes)  # base + adapter, unmerged
    if method is not None:
        model = method.unload()
    src = Path(adapter_dir or base).resolve()
    name = src.parent.name if src.name in ("adapter", "model") else src.name  # runs/<name>/adapter -> <name>
    inputs = {"model": base, "adapter": adapter_dir}
    with atomic_dir(out_dir, kind="gguf export", inputs=inputs) as tmp:
        t1 = time.perf_counter()
        info = write_gguf(model, tokenizer, tmp / GGUF_NAME, gguf_type, name=name)
        write_s = time.perf_counter() - t1
        del model
        t2 = time.perf_counter()
        loaded, loaded_tok = load_gguf(tmp)
        load_s = time.perf_counter() - t2
        got = _logits(loaded, probes)
        scale = max(float(a.abs().max()) for a in reference)
        diff = max(float((a - b).abs().max()) for a, b in zip(reference, got, strict=True))
        same = torch.cat([(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(reference, got, strict=True)])
        top1 = float(same.float().mean())
        if not diff <= bound * scale:
            raise GGUFExportError(f"{out_dir}: the {gguf_type} GGUF's logits (loaded back by transformers) differ "
                                  f"from the source model's by {diff:.3g}, {diff / scale:.3g} of their scale "
                                  f"{scale:.3g}, above the bound {bound:g}; nothing was written")
        bad = compare_tokenizers(tokenizer, loaded_tok, tokenizer_probe_texts(tokenizer))
        if bad:
            raise GGUFExportError(f"{out_dir}: the GGUF's tokenizer (as transformers loads it) encodes "
                                  f"{bad[0]!r} differently from the source tokenizer; nothing was written")
        if extra_check is not None:
            extra_check(loaded, loaded_tok)
        text, chat_format = modelfile(tokenizer)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
        report = {"model": str(base), "adapter": str(adapter_dir) if adapter_dir else None, "out_dir": str(out_dir),
                  "gguf": GGUF_NAME, "gguf_type": gguf_type, **info, "bytes": (tmp / GGUF_NAME).stat().st_size,
                  "max_abs_logit_diff": diff, "bound": bound, "top1_agreement": top1, "probes": len(probes),
                  "tokenizer_check": "same ids", "chat_format": chat_format,
                  "reference_max_abs_logit": scale, "relative_diff": diff / scale,
                  "write_s": round(write_s, 2), "reload_s": round(load_s, 2),
                  "total_s": round(time.perf_counter() - t0, 2)}
        atomic_write_json(tmp / REPORT_NAME, report)
    return report
