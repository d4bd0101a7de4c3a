"""`tunelab export`: merge an adapter into its base and write a standard Hugging Face model directory.

Before the exported directory appears under its final name, it is loaded back with plain `transformers`
and its logits on probe inputs are compared with the base model + adapter (unmerged); above the
tolerance nothing is written and an error says by how much they differ. The merge is done in fp32 on the
fp32 base weights; the bound is `tolerance` times the largest |logit| (at least 1), since a real model's logits
reach tens and fp32 rounding grows with them. The check's figures are saved in the directory as
`tunelab_export.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunelab.data.text import bos_ids, with_bos
from tunelab.errors import ModelError
from tunelab.io import atomic_dir, atomic_write_json
from tunelab.methods import load_adapter
from tunelab.models import load_model, load_tokenizer, write_model_files
from tunelab.outputs import check_outputs, check_replaceable
from tunelab.serve.generate import resolve_base

EXPORT_KIND = "merged model"
PROBE_TEXTS = ["The quick brown fox jumps over the lazy dog.", "你好，世界！今天天气很好。",
               "def add(a, b):\n    return a + b\n", "1 2 3 4 5 6 7 8 9 10"]


def probe_inputs(tokenizer, n_random: int = 4, length: int = 24, seed: int = 0) -> list[torch.Tensor]:
    """Token id rows to compare models on: a few real texts (and a chat), each after BOS when the tokenizer's rule
    adds one (as tunelab feeds text to the model), plus seeded random ids."""
    texts = list(PROBE_TEXTS)
    if tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"},
                                                    {"role": "assistant", "content": "Hi, how can I help?"}],
                                                   tokenize=False))
    bos = bos_ids(tokenizer)
    rows = [torch.tensor([with_bos(tokenizer(t, add_special_tokens=False)["input_ids"], bos)]) for t in texts]
    g = torch.Generator().manual_seed(seed)
    rows += [torch.randint(0, len(tokenizer), (1, length), generator=g) for _ in range(n_random)]
    return [r for r in rows if r.shape[1] > 0]


@torch.no_grad()
def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, inputs: list[torch.Tensor]) -> float:
    """The largest absolute difference of the two models' logits over the probe inputs."""
    a.eval()
    b.eval()
    return max(float((a(input_ids=x).logits - b(input_ids=x).logits).abs().max()) for x in inputs)


@torch.no_grad()
def logit_scale(model: torch.nn.Module, inputs: list[torch.Tensor]) -> float:
    """The largest |logit| of `model` over the probe inputs: real models' logits reach tens (Gemma's soft-cap is
    30), so an fp32 merge's rounding is judged against it."""
    model.eval()
    return max(float(model(input_ids=x).logits.abs().max()) for x in inputs)


def export_merged(model_ref: str | Path, out_dir: str | Path, adapter: str | Path | None = None,
                  tolerance: float = 1e-4) -> dict[str, Any]:
    """Merge `adapter` (or the adapter dir `model_ref`) into its base, check equivalence, save to `out_dir`."""
    base, adapter_dir = resolve_base(model_ref, adapter)
    if adapter_dir is None:
        raise ModelError(f"{model_ref}: not an adapter directory (no adapter_config.json): export merges an adapter "
                         f"into its base, and a full fine-tune's model/ directory is already a standard HF model")
    inputs = {"adapter": adapter_dir, "base model": base}
    check_outputs([out_dir], inputs)  # before any work: never merge onto the base or into the adapter
    check_replaceable(out_dir, EXPORT_KIND)
    own_tok = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter_dir if own_tok else base)
    reference = load_model(base)
    method = load_adapter(reference, adapter_dir)  # base + adapter, unmerged
    if not method.mergeable:
        raise ModelError(f"{adapter_dir}: a {method.name!r} adapter cannot be merged into the base weights; "
                         f"serve it with its base instead (tunelab generate/chat {adapter_dir})")
    merged = load_adapter(load_model(base), adapter_dir).unload()
    probes = probe_inputs(tokenizer)
    with atomic_dir(out_dir, kind=EXPORT_KIND, inputs=inputs) as tmp:
        write_model_files(merged, tokenizer, tmp)
        diff, scale = max_logit_diff(reference, load_model(tmp), probes), logit_scale(reference, probes)
        bound = tolerance * max(1.0, scale)
        report = {"base": str(base), "adapter": str(adapter_dir), "out_dir": str(out_dir),
                  "max_abs_logit_diff": diff, "max_abs_logit": scale, "tolerance": tolerance, "bound": bound,
                  "probes": len(probes)}
        if not diff <= bound:
            raise ModelError(f"{out_dir}: the merged model's logits differ from base + adapter by {diff:.3g} "
                             f"(bound {bound:.3g} = tolerance {tolerance:g} x the largest |logit|, "
                             f"{scale:.3g}); nothing was written")
        atomic_write_json(tmp / "tunelab_export.json", report)
    return report
