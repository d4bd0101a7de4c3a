"""LLaMA-Adapter: a no-op at init on Llama / Qwen2 / Mistral, the paper's attention (checked against a hand-written
layer), gradients to prompts and gates only, KV-cache generation, its own adapter files, refusals, a fine-tune."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tunelab.config import FinetuneConfig, MethodSection, validate
from tunelab.errors import ConfigError, ModelError
from tunelab.export import export_merged
from tunelab.methods import Adapter, AdaptionPromptAttention, build_method, is_adapter_dir, load_adapter
from tunelab.serve.generate import answer_chats, load_tuned
from tunelab.train.finetune import example_loss, prepare_sft_data, run_finetune

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
         "mistral": (MistralConfig, MistralForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def tiny(arch: str = "llama", seed: int = 0, attn: str = "sdpa", **overrides) -> nn.Module:
    """A 3-layer model (hidden 64, 4 query heads, 2 KV heads) in eval mode; Qwen2 has q/k/v biases."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False) | overrides
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(**kw)
    config._attn_implementation = attn
    return model_cls(config).eval()


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def open_gates(method: Adapter, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in method.layers.values():
            w.adaption_gate.copy_(torch.randn(w.adaption_gate.shape, generator=g))


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"),
                                       ("mistral", "eager")])
def test_fresh_adapter_is_a_no_op_and_gradients_reach_exactly_prompts_and_gates(arch, attn):
    model = tiny(arch, attn=attn)
    base = logits(model)
    method = Adapter(prompt_len=5, layers=2)
    method.inject(model)
    assert torch.equal(logits(model), base)  # gates are 0: the prompt branch adds exactly 0
    assert list(method.layers) == ["model.layers.1.self_attn", "model.layers.2.self_attn"]  # the top 2 of 3
    want = {f"model.layers.{i}.self_attn.adaption_{k}" for i in (1, 2) for k in ("prompt", "gate")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    assert method.num_parameters() == 2 * (5 * 64 + 4)

    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == want
    gates = [w.adaption_gate.grad for w in method.layers.values()]
    assert all(g.abs().sum() > 0 for g in gates)  # zero-init attention: only the gates move at first
    model.zero_grad(set_to_none=True)
    open_gates(method)
    assert max_diff(logits(model), base) > 1e-4
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in method.trainable_parameters())


def test_attention_matches_a_hand_written_layer():
    """Eqs. 6-8 of the paper with the official per-head tanh gate: separate softmaxes, prompts without RoPE."""
    model = tiny("qwen2", attn="eager", num_key_value_heads=2)
    method = Adapter(prompt_len=3)
    method.inject(model)
    open_gates(method)
    layer = method.layers["model.layers.0.self_attn"]
    attn = layer.base_attn
    b, t, heads, d = 2, 5, 4, 16
    h = torch.randn(b, t, 64)
    pos = torch.arange(t).expand(b, t)
    cos, sin = model.model.rotary_emb(h, pos)
    mask = torch.full((t, t), float("-inf")).triu(1).expand(b, 1, t, t)
    with torch.no_grad():
        got, _ = layer(hidden_states=h, position_embeddings=(cos, sin), attention_mask=mask)
        q = attn.q_proj(h).view(b, t, heads, d).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, 2, d).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, 2, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kp = attn.k_proj(layer.adaption_prompt).view(3, 2, d)  # no RoPE on the prompts
        vp = attn.v_proj(layer.adaption_prompt).view(3, 2, d)
        out = torch.zeros(b, t, heads, d)
        for i in range(heads):
            kv = i // 2  # grouped-query attention: 2 query heads share a KV head
            s_tok = q[:, i] @ k[:, kv].transpose(-1, -2) / math.sqrt(d) + mask[:, 0]
            s_prm = q[:, i] @ kp[:, kv].T / math.sqrt(d)
            out[:, :, i] = (torch.softmax(s_tok, -1) @ v[:, kv]
                            + math.tanh(layer.adaption_gate[i]) * torch.softmax(s_prm, -1) @ vp[:, kv])
        want = attn.o_proj(out.reshape(b, t, heads * d))
    assert max_diff(got, want) <= 1e-5


def test_generation_with_a_kv_cache_equals_full_recomputation():
    model = tiny("llama")
    method = Adapter(prompt_len=4)
    method.inject(model)
    open_gates(method)
    with torch.no_grad():
        for w in method.layers.values():
            w.adaption_gate.mul_(3)
    prompt = IDS[:1, :5]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    ids = prompt
    for _ in range(6):  # greedy, every step a full forward without a cache
        ids = torch.cat([ids, logits(model, ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, ids)
    assert not torch.equal(ids, tiny("llama").generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_unsupported_models_settings_and_merging_are_refused():
    with pytest.raises(ModelError, match="Qwen3Attention"):
        Adapter().inject(tiny("qwen3", head_dim=16))
    flex = tiny()
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(ModelError, match="'flex_attention'.*sdpa"):
        Adapter().inject(flex)
    with pytest.raises(ModelError, match="adapter_layers=4, but LlamaForCausalLM has 3 layers"):
        Adapter(layers=4).inject(tiny())
    with pytest.raises(ConfigError, match="adapter_prompt_len"):
        Adapter(prompt_len=0)
    model = tiny()
    method = Adapter(prompt_len=2)
    method.inject(model)
    with pytest.raises(ModelError, match="already has adaption prompts"):
        Adapter().inject(model)
    with pytest.raises(ModelError, match="cannot be merged"):
        method.merge()
    with pytest.raises(ModelError, match="cannot be merged"):
        method.unload()
    model.config._attn_implementation = "flash_attention_2"  # switched after injection: refused at the forward
    with pytest.raises(ModelError, match="flash_attention_2"):
        logits(model)
    model.config._attn_implementation = "sdpa"
    base = method.remove()
    assert not any(isinstance(m, AdaptionPromptAttention) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())
    assert torch.equal(logits(base), logits(tiny()))


def test_save_and_load_its_own_adapter_format(tmp_path):
    model = tiny("mistral")
    method = Adapter(prompt_len=3, layers=2)
    method.inject(model)
    open_gates(method)
    ours = logits(model)
    adapter = method.save(tmp_path / "adapter", base_model_path="/models/tiny")
    assert is_adapter_dir(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["adapter_len"], cfg["adapter_layers"]) == ("TUNELAB_ADAPTION_PROMPT", 3, 2)
    back = load_adapter(tiny("mistral"), adapter)
    assert isinstance(back, Adapter) and list(back.layers) == list(method.layers)
    assert torch.equal(logits(back.model), ours)
    # a base of another shape is named, and left as it was
    other = tiny("mistral", hidden_size=32)
    with pytest.raises(ModelError, match="adaption_prompt: shape \\(3, 64\\), this model expects \\(3, 32\\)"):
        load_adapter(other, adapter)
    assert not any(isinstance(m, AdaptionPromptAttention) for m in other.modules())


def test_build_method_and_a_short_finetune_then_chat_and_export_refusal(tmp_path, base_model_dir, chat_file):
    m = build_method(MethodSection(name="adapter", adapter_prompt_len=4, adapter_layers=1))
    assert isinstance(m, Adapter) and (m.prompt_len, m.n_layers) == (4, 1)
    cfg = validate(FinetuneConfig, {
        "name": "adapter", "out_dir": str(tmp_path), "model": {"base": str(base_model_dir)},
        "data": {"train": [str(chat_file)], "eval_fraction": 0.1, "max_len": 64},
        "method": {"name": "adapter", "adapter_prompt_len": 4},
        "train": {"steps": 30, "micro_batch_size": 8, "lr": 0.1, "warmup_steps": 3, "eval_every": 0}})
    s = run_finetune(cfg, device="cpu")
    # 2 x 4 prompt vectors on a random micro model (frozen random head) learn slowly: 6.04 -> 5.77 measured
    assert s["eval_after"]["eval_loss"] < s["eval_before"]["eval_loss"] - 0.15
    assert s["trainable_parameters"] == 2 * (4 * 64 + 4)  # micro: 2 layers, hidden 64, 4 heads
    model, tok, method = load_tuned(s["output_dir"])  # not mergeable: served with the prompts injected
    assert isinstance(method, Adapter) and model.training is False
    data = prepare_sft_data(cfg, tok)
    again = example_loss(model, data.eval, 8, cfg.train.eval_batches, tok.pad_token_id)
    assert again["eval_loss"] == pytest.approx(s["eval_after"]["eval_loss"], abs=1e-5)
    assert all(isinstance(r, str) for r in answer_chats(model, tok, [[{"role": "user", "content": "hi"}]],
                                                        max_new_tokens=3))
    with pytest.raises(ModelError, match="'adapter' adapter cannot be merged"):
        export_merged(s["output_dir"], tmp_path / "merged")
    assert not Path(tmp_path / "merged").exists()
