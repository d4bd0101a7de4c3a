"""Models and tokenizers: load local Hugging Face directories, create size presets, save in HF format.

tunelab works from local directories only (no hub downloads). Anything `AutoModelForCausalLM` can load
from a directory works; the presets build Llama- or Qwen2-style models from scratch for pretraining.
What `save_model` writes loads in plain `transformers` without tunelab and gives the same logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    PreTrainedModel,
    Qwen2Config,
)
from transformers import logging as hf_logging

from tunelab.errors import ConfigError, ModelError
from tunelab.io import atomic_dir

hf_logging.disable_progress_bar()  # tunelab shows its own progress; no per-shard bars
hf_logging.set_verbosity_error()

# Sizes for from-scratch training. micro: unit tests; tiny: learns the demo world in ~2 minutes on
# 2 CPU cores; small: ~100M parameters with a 32k vocabulary (GPT-2-small class).
PRESETS: dict[str, dict[str, int]] = {
    "micro": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=512),
    "tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=512, max_position_embeddings=1024),
    "small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, max_position_embeddings=2048),
}
ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def require_local_dir(ref: str | Path, what: str = "model") -> Path:
    """`ref` as a Path if it is a local directory, else an error explaining tunelab's local-only rule."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    hint = ""
    first = Path(str(ref).split("/")[0])
    if not p.exists() and str(ref).count("/") == 1 and not str(ref).startswith((".", "/", "~")) \
            and not first.exists():  # `runs/model` with a local runs/ is a missing path, not a Hub id
        hint = (f" If '{ref}' is a Hub id, download it once outside tunelab (e.g. `hf download {ref} "
                f"--local-dir models/{Path(str(ref)).name}`) and pass that directory.")
    raise ModelError(f"{what} '{ref}' is not a local directory: tunelab works from local directories "
                     f"only and never downloads.{hint}")


def load_tokenizer(ref: str | Path):
    """Load a tokenizer directory; gives it a pad token (EOS) when it has none."""
    path = require_local_dir(ref, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a loadable tokenizer directory ({_first_line(e)}); it needs "
                         f"tokenizer.json or the tokenizer files of its model") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(ref: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a causal LM from a local HF directory (fp32 master weights by default, for training)."""
    path = require_local_dir(ref, "model")
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            try:
                base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
            except (OSError, ValueError, KeyError, TypeError):
                base = None
            which = f"its base is {base}" if base else "the model it was trained on"
            raise ModelError(f"{path}: this is an adapter directory (adapter_config.json), not a model; give its "
                             f"base model directory instead ({which}; e.g. as model.base), or merge the adapter "
                             f"into its base first with `tunelab export {path} --out <dir>` and give that directory")
        raise ModelError(f"{path}: no config.json; a model directory is what `save_pretrained` writes")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    except Exception as e:  # a loader boundary: corrupt weights, unknown model type, missing files, ...
        raise ModelError(f"{path}: cannot load as a causal language model ({_first_line(e)})") from e


def create_model(preset: str, arch: str, tokenizer, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised model of a size preset, with the vocabulary of `tokenizer`."""
    if preset not in PRESETS:
        raise ModelError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    if arch not in ARCHS:
        raise ModelError(f"unknown arch '{arch}'; choose one of {', '.join(ARCHS)}")
    vocab = -(-len(tokenizer) // 64) * 64  # round up to a multiple of 64: faster matmuls, room to add tokens
    config = ARCHS[arch](vocab_size=vocab, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **PRESETS[preset])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = generation_config_for(tokenizer)
    return model


def generation_config_for(tokenizer) -> GenerationConfig:
    """Generation defaults that stop at the tokenizer's EOS and pad with its pad token."""
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)


def save_model(model: PreTrainedModel, tokenizer, out_dir: str | Path, inputs: dict | None = None) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer, atomically.

    `inputs` (kind -> path) are the paths this model was made from, which `out_dir` may not touch."""
    with atomic_dir(out_dir, kind="model", inputs=inputs) as tmp:
        write_model_files(model, tokenizer, tmp)
    return Path(out_dir)


def write_model_files(model: PreTrainedModel, tokenizer, directory: Path) -> None:
    """The files of an HF model directory (and its tokenizer's, when given) written into an existing directory."""
    gen = model.generation_config
    if tokenizer is not None and (gen is None or gen.eos_token_id is None):
        model.generation_config = generation_config_for(tokenizer)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if model.generation_config is not None and not (directory / "generation_config.json").exists():
        model.generation_config.save_pretrained(directory)


CPU_BF16_ENV = "TUNELAB_CPU_BF16"  # 0: `auto` is fp32 on every CPU; 1: bf16 on every CPU; unset: the hardware


def auto_is_bf16(device: torch.device) -> bool:
    """Whether `precision: auto` means bf16 on `device`: a CUDA GPU that supports it, or a CPU with Intel AMX tiles.

    AMX multiplies bf16 matrices many times faster than fp32 (one thread, 1024x576 @ 576x1536 on this project's
    Xeon: 510-1,310 vs 43-64 GFLOP/s; a LoRA step of SmolLM2-135M about 1.5x faster, benchmarks/README.md); with
    AVX512-BF16 alone (oneDNN capped below AMX) bf16 was slower than fp32, so it does not count. Read from the
    hardware, never timed, so the same seed, config and data give the same numbers on the same machine.
    TUNELAB_CPU_BF16=0 or 1 overrides the CPU rule.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced not in ("", "0", "1"):
        raise ConfigError(f"{CPU_BF16_ENV}={forced!r}: use 0 (precision auto is fp32 on CPUs), 1 (bf16 on CPUs) "
                          f"or leave it unset (bf16 on CPUs with AMX)")
    if forced:
        return forced == "1"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx is not None and amx())


def inference_placement(precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Where a model runs for inference: the GPU when there is one, else the CPU; bf16 if asked for, or under
    "auto" where `auto_is_bf16` says the hardware multiplies it fast, else fp32."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = precision == "bf16" or (precision == "auto" and auto_is_bf16(device))
    return device, torch.bfloat16 if bf16 else torch.float32


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters, counting tied weights once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


TRAINED_SEQ_LEN = "tunelab_train_seq_len"  # a config.json field: the longest sequences the model was trained on


def trained_seq_len(model) -> int | None:
    """The sequence length tunelab trained the model on (`config.json`'s `tunelab_train_seq_len`), or None."""
    value = getattr(getattr(model, "config", None), TRAINED_SEQ_LEN, None)
    return int(value) if isinstance(value, int) and value > 0 else None


def record_trained_seq_len(model, seq_len: int, from_scratch: bool) -> None:
    """Record in the model's config the longest sequences it has now been trained on.

    A base that tunelab did not train (no record) is taken to know its whole context, so only a model trained from
    scratch, or one whose base has a record, gets one (the longer of the base's and this run's).
    """
    earlier = trained_seq_len(model)
    if from_scratch or earlier is not None:
        setattr(model.config, TRAINED_SEQ_LEN, max(seq_len, earlier or 0))


def positions_warning(model, n_tokens: int, what: str) -> str | None:
    """A warning when `n_tokens` run past the positions the model was trained on (None when they do not)."""
    trained = trained_seq_len(model)
    if trained is None or n_tokens <= trained:
        return None
    return (f"{what} {n_tokens} tokens, beyond the {trained} positions the model was trained on "
            f"(config.json {TRAINED_SEQ_LEN}); its predictions past them are unreliable")


def untrained_rows(model, ids: list[int], n_tokens: int) -> list[int]:
    """Those of `ids` whose input-embedding rows look never trained (the token never was an input).

    Two signatures, measured on models tunelab pretrained: a row that is (near) zero, as some releases leave their
    reserved tokens; or a row that sits with the rows past the tokenizer's `n_tokens` (vocabulary padding, never an
    input by construction). Under AdamW a tied embedding's unused rows do not stay at their initial values: the
    output softmax gives them all nearly the same small gradient, which Adam turns into full-size steps, so they
    move together to one shared vector and differ only by what is left of their random initialisation (in the
    demo's tiny model their norms equal the trained rows', but they lie within that initial spread of each
    other). Without padding rows only the zero test applies.
    """
    weight = model.get_input_embeddings().weight.detach().float()
    norms = weight.norm(dim=1)
    scale = float(norms[:n_tokens].median())
    out = [i for i in ids if float(norms[i]) <= 1e-3 * scale]
    unused = weight[n_tokens:]
    if len(unused) >= 2:
        centre = unused.mean(0)
        spread = float((unused - centre).norm(dim=1).max())
        out += [i for i in ids if i not in out and float((weight[i] - centre).norm()) <= 1.5 * spread]
    return out
