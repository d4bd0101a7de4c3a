"""The chunked loss: same value and gradients as the plain full-logits loss, and never a [B, T, V] tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
)

from tunelab.errors import ModelError
from tunelab.methods import LoRA
from tunelab.train.loop import full_logits_loss_sum as forward_loss_sum  # the plain reference
from tunelab.train.loss import chunked_loss_sum

V = 1000  # a vocabulary no other dimension equals, so a tensor with last dim V is a block of logits
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def llama(tied: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tied))


def batch(b: int = 2, t: int = 24, seed: int = 1, pad: bool = False) -> dict[str, torch.Tensor]:
    """Random tokens; SFT-style labels: a prompt prefix and (row 1) a tail without loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 3] = -100
    labels[1, -4:] = -100
    out = {"input_ids": ids, "labels": labels}
    if pad:  # row 1 right-padded: no attention, no loss
        mask = torch.ones(b, t, dtype=torch.long)
        mask[1, -4:] = 0
        out["attention_mask"] = mask
    return out


def loss_and_grads(fn, model: nn.Module, data, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn(model, data, None, **kw)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(model: nn.Module, data, chunk_size: int | None, rtol: float = 1e-5) -> None:
    ref, ref_grads = loss_and_grads(forward_loss_sum, model, data)
    got, got_grads = loss_and_grads(chunked_loss_sum, model, data, chunk_size=chunk_size)
    assert torch.allclose(got, ref, rtol=rtol, atol=0), (got.item(), ref.item())
    assert got_grads.keys() == ref_grads.keys() and ref_grads
    for name, g in ref_grads.items():
        scale = g.abs().max().clamp_min(1e-12)
        assert ((got_grads[name] - g).abs().max() / scale) < 1e-4, name


# --- value and gradients -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_full_fine_tuning_matches_full_logits_loss(tied, chunk_size):
    model = llama(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert_same(model, batch(), chunk_size)


def test_attention_mask_and_head_bias():
    """Right padding through the attention mask; a head with a bias (Phi) gets its gradient too."""
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4))
    assert model.lm_head.bias is not None
    assert_same(model, batch(pad=True), 5)


@pytest.mark.parametrize("tied", [False, True])
def test_lora_model_matches_full_logits_loss(tied):
    model = llama(tied)
    method = LoRA(r=4, alpha=8)
    method.inject(model)
    with torch.no_grad():  # a trained-looking adapter, so the LoRA branches change the loss and get gradients
        for p in method.trainable_parameters():
            p.normal_(0, 0.05)
    assert_same(model, batch(), 6)


def test_lora_on_the_head_uses_the_module_path():
    """A LoRA-wrapped head is not a plain nn.Linear: the checkpointed per-chunk path must give the same numbers."""
    model = llama(tied=False)
    method = LoRA(r=4, alpha=8, target_modules=["q_proj", "lm_head"])
    method.inject(model)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.normal_(0, 0.05)
    ref, ref_grads = loss_and_grads(forward_loss_sum, model, batch())
    got, got_grads = loss_and_grads(chunked_loss_sum, model, batch(), chunk_size=5)
    assert "lm_head.lora_B.weight" in got_grads
    assert torch.allclose(got, ref, rtol=1e-5)
    for name, g in ref_grads.items():
        assert torch.allclose(got_grads[name], g, rtol=1e-4, atol=1e-6 * g.abs().max().item()), name


@pytest.mark.parametrize("make", [
    lambda: Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=0.5)),
    lambda: CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.25)),
    lambda: GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=4.0)),
], ids=["gemma2-softcap", "cohere-logit-scale", "granite-logits-scaling"])
def test_logit_scaling_and_softcapping(make):
    torch.manual_seed(0)
    model = make()
    assert_same(model, batch(), 7)


def test_bf16_autocast_is_close_and_upcasts_only_chunks():
    model = llama()
    data = batch()
    ref, ref_grads = loss_and_grads(lambda m, b, _: forward_loss_sum(m, b, torch.bfloat16), model, data)
    got, got_grads = loss_and_grads(lambda m, b, _, **kw: chunked_loss_sum(m, b, torch.bfloat16, **kw), model, data,
                                    chunk_size=7)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=2e-3)
    for name, g in ref_grads.items():
        assert ((got_grads[name] - g).abs().max() / g.abs().max()) < 3e-2, name


def test_bf16_weights_without_autocast():
    model = llama().to(torch.bfloat16)
    data = batch()
    ref, ref_grads = loss_and_grads(forward_loss_sum, model, data)
    got, got_grads = loss_and_grads(chunked_loss_sum, model, data, chunk_size=7)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=2e-3)
    for name, g in ref_grads.items():
        assert got_grads[name].dtype == torch.bfloat16
        assert ((got_grads[name].float() - g.float()).abs().max() / g.float().abs().max()) < 5e-2, name


def test_no_loss_positions_and_no_grad():
    model = llama()
    data = batch()
    with torch.no_grad():
        assert torch.allclose(chunked_loss_sum(model, data, None, chunk_size=4), forward_loss_sum(model, data, None),
                              rtol=1e-5)
    data["labels"][:] = -100
    loss = chunked_loss_sum(model, data, None)
    loss.backward()  # the loop always calls backward: it must work with nothing to learn
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_loss_sum(model, batch(), None, chunk_size=0)


def test_model_whose_logits_the_config_does_not_explain_is_refused():
    class Doubled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    model = Doubled(LlamaConfig(**SMALL))
    with pytest.raises(ModelError, match="plain full-logits loss"):
        chunked_loss_sum(model, batch(), None)
    with pytest.raises(ModelError, match="get_output_embeddings"):
        chunked_loss_sum(nn.Sequential(nn.Linear(2, 2)), batch(), None)


# --- memory: no [B, T, V] logits -----------------------------------------------------------------------------------


class LargestLogits(TorchDispatchMode):
    """The largest number of elements of a tensor an op allocates (not a view) whose last dimension is V."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[-1] == V
                    and t.untyped_storage().data_ptr() not in inputs):  # views and out= results are not new
                self.largest = max(self.largest, t.numel())
        return out


def largest_logits(fn, model, data, **kw) -> int:
    with LargestLogits() as mode:
        fn(model, data, None, **kw).backward()
    return mode.largest


@pytest.mark.parametrize("lora", [False, True])
def test_full_logits_are_never_materialised(lora):
    model = llama(tied=True)
    if lora:
        LoRA(r=4, alpha=8).inject(model)
    data = batch(b=2, t=64)
    chunk = 16
    full = data["input_ids"].numel() * V
    assert largest_logits(forward_loss_sum, model, data) >= full  # the probe sees the plain loss's logits
    assert largest_logits(chunked_loss_sum, model, data, chunk_size=chunk) <= chunk * V
