"""Text generation with a Hugging Face model: greedy or sampled completions of prompts."""

from __future__ import annotations

import torch


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> list[str]:
    """The continuation of each prompt (without the prompt), stopping at EOS; greedy when temperature=0."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        sample = temperature > 0
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=sample, temperature=temperature if sample else None,
                             top_p=top_p if sample else None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        outputs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return outputs
