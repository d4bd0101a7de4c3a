"""Text generation: load a base model (optionally with an adapter), complete prompts, answer chats, stream.

Greedy when temperature is 0, else sampling with temperature and top-p. Generation stops at EOS and, for
chats, at the template's end-of-turn token (`<|im_end|>` for ChatML). An adapter is merged into the
weights for inference when its maths allows (exact, and as fast as the base model). Models run on the GPU
when there is one (bf16 where supported).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch
from transformers import TextStreamer

from tunelab.data.chat import chat_template_for, end_of_turn_ids, prompt_for_generation
from tunelab.data.text import bos_ids, with_bos
from tunelab.errors import ModelError, warn
from tunelab.methods import is_adapter_dir, load_adapter, read_adapter_config
from tunelab.methods.base import recorded_base
from tunelab.models import (
    TRAINED_SEQ_LEN,
    inference_placement,
    load_model,
    load_tokenizer,
    require_local_dir,
    trained_seq_len,
)


def resolve_base(model_ref: str | Path, adapter: str | Path | None) -> tuple[Path, Path | None]:
    """(base dir, adapter dir): `model_ref` may itself be an adapter directory that names its base."""
    require_local_dir(model_ref, "model or adapter")
    if adapter is None and is_adapter_dir(model_ref):
        return adapter_base(model_ref), Path(model_ref)
    return Path(model_ref), Path(adapter) if adapter is not None else None


def adapter_base(adapter: str | Path) -> Path:
    """The base model directory of an adapter: `base_model_name_or_path` as PEFT reads it (absolute, or relative
    to the working directory), else the base's path relative to the adapter recorded when tunelab wrote it, else a
    relative `base_model_name_or_path` taken from the adapter directory; so a moved project keeps its adapters."""
    d = Path(adapter)
    named = read_adapter_config(d).get("base_model_name_or_path")
    candidates = [Path(named)] if named else []
    recorded = recorded_base(d)
    if recorded is not None:
        candidates.append(recorded)
    if named and not Path(named).is_absolute():
        candidates.append(d / named)
    for c in candidates:
        if c.is_dir():
            return c
    tried = f" (nor {recorded}, where it was relative to the adapter)" if recorded is not None else ""
    raise ModelError(f"{d}/adapter_config.json names base model {named!r}, which is not a local directory "
                     f"here{tried}; give the base model directory and the adapter separately (tunelab "
                     f"generate/chat <base> --adapter {d}; tunelab export {d} --base <base>), or set "
                     f"base_model_name_or_path in that file")


def load_tuned(model_ref: str | Path, adapter: str | Path | None = None, merge: bool = True,
               precision: str | None = None):
    """(model, tokenizer, method or None): a base model, with an adapter injected (and merged) when given.

    `precision` ("auto", "fp32", "bf16"): place the model with `inference_placement` (the GPU when there is one);
    None leaves it on the CPU in fp32.

    The tokenizer comes from the adapter directory when it holds one (it carries the chat template the
    adapter was trained with), else from the base model directory.
    """
    base, adapter_dir = resolve_base(model_ref, adapter)
    model = load_model(base)
    has_own_tokenizer = adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter_dir if has_own_tokenizer else base)
    method = None
    if adapter_dir is not None:
        method = load_adapter(model, adapter_dir)
        if merge and method.mergeable:
            method.merge()
    if precision is not None:
        device, dtype = inference_placement(precision)
        model.to(device=device, dtype=dtype)
    model.eval()
    return model, tokenizer, method


def _stop_ids(tokenizer, stop_ids: list[int] | None) -> list[int]:
    ids = list(stop_ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 32, stop_ids: list[int] | None = None) -> list[str]:
    """The continuation of each prompt (without the prompt), stopping at EOS or a stop id; greedy at temperature 0.

    Prompts are batched with left padding and the KV cache, as `generate` expects for decoder-only models.
    """
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    outputs: list[str] = []
    lengths: list[int] = []  # prompt + reply tokens of each sequence
    try:
        for i in range(0, len(prompts), batch_size):
            enc = encode_prompts(tokenizer, prompts[i:i + batch_size]).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=_stop_ids(tokenizer, stop_ids), **_sampling(temperature, top_p))
            new = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            generated = (new != tokenizer.pad_token_id).sum(1) if tokenizer.pad_token_id is not None else \
                torch.full((len(new),), new.shape[1])
            lengths.extend((enc["attention_mask"].sum(1) + generated).tolist())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    warn_past_trained(model, lengths)
    return outputs


def encode_prompts(tokenizer, prompts: list[str]):
    """Input ids and attention mask of prompts, padded on the tokenizer's padding side; each starts with the
    tokenizer's BOS when its rule adds one (`bos_ids`), once, even where a chat template wrote it already."""
    bos = bos_ids(tokenizer)
    rows = [with_bos(ids, bos) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    return tokenizer.pad({"input_ids": rows}, padding=len(rows) > 1, return_tensors="pt")


def warn_past_trained(model, lengths: list[int]) -> None:
    """Warn (once) when sequences (prompt and reply) ran past the positions tunelab trained the model on."""
    trained = trained_seq_len(model)
    over = [n for n in lengths if trained is not None and n > trained]
    if over:
        warn(f"{len(over)} of {len(lengths)} prompt(s) with their replies ran past the {trained} positions the model "
             f"was trained on (up to {max(over)} tokens; config.json {TRAINED_SEQ_LEN}): text past them is unreliable")


def _sampling(temperature: float, top_p: float) -> dict:
    if temperature <= 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}


def answer_chats(model, tokenizer, chats: list[list[dict[str, str]]], template: str | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int = 32) -> list[str]:
    """The assistant's reply to each conversation, rendered with the chat template (batched)."""
    template = template or chat_template_for(tokenizer)
    prompts = [prompt_for_generation(m, tokenizer, template) for m in chats]
    return [r.strip() for r in complete(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed,
                                        batch_size, stop_ids=end_of_turn_ids(tokenizer, template))]


class _Streamer(TextStreamer):
    """Writes finished pieces of text to a stream as they are decoded."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text)
        self.out.flush()


@torch.no_grad()
def stream(model, tokenizer, prompt: str, stop_ids: list[int] | None = None, max_new_tokens: int = 256,
           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, out: TextIO = sys.stdout) -> str:
    """Generate one continuation, writing it to `out` as it is produced; returns the text."""
    device = next(model.parameters()).device
    enc = encode_prompts(tokenizer, [prompt]).to(device)
    torch.manual_seed(seed)
    ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=_stop_ids(tokenizer, stop_ids), streamer=_Streamer(tokenizer, out),
                         **_sampling(temperature, top_p))
    warn_past_trained(model, [ids.shape[1]])
    return tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
