"""Text generation with a Hugging Face model: greedy or sampled completions of prompts."""

from __future__ import annotations

import torch


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 32) -> list[str]:
    """The continuation of each prompt (without the prompt), stopping at EOS; greedy when temperature=0.

    Prompts are batched with left padding and the KV cache, as `generate` expects for decoder-only models.
    """
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    sample = temperature > 0
    outputs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample,
                                 temperature=temperature if sample else None, top_p=top_p if sample else None,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
