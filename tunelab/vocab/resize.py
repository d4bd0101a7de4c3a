"""Resize a model to an extended vocabulary and initialise the new embedding (and output head) rows.

Inits (reference/pipeline.md 1.5): `sub-token-mean` (default; Fast Vocabulary Transfer): each new row is the mean
of the rows of the base tokens that spell the new token (the base's own segmentation of its bytes), in the input
embedding and, when the head is not tied, in the output head, so the model reads a new token as it read its
pieces; `mean`: the mean of all the base's rows (as transformers' `mean_resizing`, without the noise); `random`:
normal with the config's `initializer_range`. Original rows are copied unchanged; a tied head stays tied.
The loss is measured in bits per byte (tokenizer-independent) before and after resizing: the base model, the
resized model reading the base's ids (what the new rows' share of the softmax costs), and the resized model with
the new tokenizer (unseen tokens, not yet trained).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tunelab.errors import ModelError

INITS = ("sub-token-mean", "mean", "random")
LOSS_CHARS = 3000  # characters of each text the losses are measured on (a 135M model scores them in seconds)


def check_model_dir(base: str | Path, base_tok) -> int:
    """The embedding rows of the model at `base`; a ModelError when it is not a model directory or its
    tokenizer has ids past its embedding."""
    from transformers import AutoConfig

    d = Path(base)
    if not (d / "config.json").is_file():
        raise ModelError(f"{d}: --model needs a model directory (config.json and weights) with its tokenizer; "
                         f"this one has no config.json (leave out --model to extend the tokenizer only)")
    try:
        config = AutoConfig.from_pretrained(d, local_files_only=True)
    except Exception as e:  # a loader boundary: a foreign or broken config
        raise ModelError(f"{d}/config.json: cannot read the model config ({str(e).splitlines()[0][:200]})") from None
    rows = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
    if not isinstance(rows, int) or rows < len(base_tok):
        raise ModelError(f"{d}: the tokenizer has {len(base_tok):,} tokens but the model's config.json has "
                         f"vocab_size {rows}: ids past {rows} would have no embedding row, so this model and "
                         f"tokenizer do not belong together; give a model directory with its own tokenizer")
    return rows


def sub_token_ids(base_tok, new_tok, ids: range) -> list[list[int]]:
    """For each new id, the base's ids for the same bytes (its own BPE segmentation of the token)."""
    model, vocab = base_tok.backend_tokenizer.model, base_tok.get_vocab()
    return [[vocab[t.value] for t in model.tokenize(new_tok.convert_ids_to_tokens(i))] for i in ids]


@torch.no_grad()
def init_rows(weight: torch.Tensor, old: torch.Tensor, new_ids: range, pieces: list[list[int]], init: str,
              n_base: int, std: float, generator: torch.Generator) -> None:
    """Fill `weight[new_ids]` from the base's rows `old` by `init`."""
    if init == "sub-token-mean":
        for i, ids in zip(new_ids, pieces):
            weight[i] = old[ids].mean(0)
    elif init == "mean":
        weight[new_ids.start:new_ids.stop] = old[:n_base].mean(0)
    else:
        weight[new_ids.start:new_ids.stop] = torch.randn(len(new_ids), old.shape[1], generator=generator) * std


def loss_texts(texts: list[str], limit: int = LOSS_CHARS) -> list[str]:
    """The first `limit` characters of `texts` (whole documents, the last one cut)."""
    out, left = [], limit
    for t in texts:
        if left <= 0:
            break
        out.append(t[:left])
        left -= len(out[-1])
    return out


def bits_per_byte(model, tokenizer, texts: list[str]) -> float:
    from tunelab.evaluate.perplexity import perplexity

    model.eval()
    return perplexity(model, tokenizer, texts, max_length=512, stride=512)["bits_per_byte"]


def resize_model_dir(base: str | Path, base_tok, new_tok, directory: Path, init: str, texts: list[str],
                     log: Callable[[str], None]) -> dict:
    """Load the model at `base`, resize it to `new_tok`, initialise the new rows, write it into `directory`
    (next to the tokenizer already there) and return what was done and measured."""
    from tunelab.models import load_model, write_model_files
    from tunelab.vocab.extend import ENGLISH_SAMPLE

    model = load_model(base)
    emb = model.get_input_embeddings()
    rows, n_base, n_new = emb.weight.shape[0], len(base_tok), len(new_tok)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    old_in = emb.weight.detach().clone()
    old_out = head.weight.detach().clone() if head is not None and not tied else None
    samples = {"held-out text": loss_texts(texts), "English sample": [ENGLISH_SAMPLE]}
    log(f"measuring the base model's loss on {', '.join(samples)}")
    loss = {name: {"base": bits_per_byte(model, base_tok, t)} for name, t in samples.items()}
    model.resize_token_embeddings(max(rows, n_new), mean_resizing=False)
    new_ids = range(n_base, n_new)
    pieces = sub_token_ids(base_tok, new_tok, new_ids)
    std = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    gen = torch.Generator().manual_seed(0)
    init_rows(model.get_input_embeddings().weight, old_in, new_ids, pieces, init, n_base, std, gen)
    head = model.get_output_embeddings()
    still_tied = head is not None and head.weight is model.get_input_embeddings().weight
    if tied != still_tied:
        raise ModelError(f"{base}: the output head was {'tied' if tied else 'untied'} before resizing and is not "
                         f"now; this model's resize is not supported")
    if old_out is not None:
        init_rows(head.weight, old_out, new_ids, pieces, init, n_base, std, gen)
    log("measuring the resized model's loss")
    for name, t in samples.items():
        loss[name]["resized_base_ids"] = bits_per_byte(model, base_tok, t)
        loss[name]["resized"] = bits_per_byte(model, new_tok, t)
    from tunelab.methods.token_rows import EXTENSION_KEY
    setattr(model.config, EXTENSION_KEY, {"first_new_id": n_base, "vocab_size": n_new})  # for train_embeddings=new
    write_model_files(model, None, directory)
    return {"rows_before": rows, "rows_after": model.get_input_embeddings().weight.shape[0], "tied": tied,
            "init": init, "config_vocab_size": model.config.vocab_size, "loss": loss,
            "loss_chars": {name: sum(map(len, t)) for name, t in samples.items()}}
