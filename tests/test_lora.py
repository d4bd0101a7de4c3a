"""LoRA and full fine-tuning as tunelab methods: init, targets, gradients, merge / unmerge / unload, state dicts."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tunelab.config import MethodSection
from tunelab.errors import ConfigError, ModelError
from tunelab.methods import Full, LoRA, LoRALinear, build_method

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
ATTN = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
MLP = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]


def tiny(arch: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    """A 2-layer model (hidden 64, 4 query heads, 2 KV heads) in eval mode; Qwen2 has q/k/v biases."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False) | overrides
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(method: LoRA, seed: int = 0, std: float = 0.1) -> None:
    """Non-zero A and B, so the adapter changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in method.layers.values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * std)


# --- initialisation, trainable parameters, gradients ----------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fresh_lora_is_a_no_op_and_only_a_b_train(arch):
    model = tiny(arch)
    base = logits(model)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    method = LoRA(r=8, alpha=16, dropout=0.0)
    method.inject(model)

    assert torch.equal(logits(model), base)  # B = 0
    assert sorted(method.layers) == sorted(ATTN + MLP)  # all-linear: every linear except lm_head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{k}.weight" for m in ATTN + MLP for k in "AB"}
    expected = sum(8 * (i + o) for n, (i, o) in shapes.items() if n != "lm_head")
    assert method.num_parameters() == expected == 16384  # per layer 8·(128+96+96+128+192+192+192)
    assert len(method.trainable_parameters()) == 2 * 14

    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(layer.lora_B.weight.grad.abs().sum() > 0 for layer in method.layers.values())
    if arch == "qwen2":  # the base bias exists and stays frozen
        q = method.layers["model.layers.0.self_attn.q_proj"]
        assert q.bias is not None and not q.base_layer.bias.requires_grad


def test_init_kinds_and_determinism():
    def a_weights(init: str, seed: int) -> list[torch.Tensor]:
        model = tiny()  # (seeds torch itself)
        torch.manual_seed(seed)
        method = LoRA(r=8, alpha=16, init=init, target_modules=["q_proj", "v_proj"])
        method.inject(model)
        assert all(not layer.lora_B.weight.any() for layer in method.layers.values())
        return [layer.lora_A.weight.detach().clone() for layer in method.layers.values()]

    kaiming = a_weights("kaiming", 0)
    assert all(a.abs().max() <= 1 / math.sqrt(64) for a in kaiming)  # uniform(±1/√fan_in)
    assert all(a.abs().max() > 0.9 / math.sqrt(64) for a in kaiming)
    gaussian = torch.cat([a.flatten() for a in a_weights("gaussian", 0)])
    assert abs(float(gaussian.std()) - 1 / 8) < 0.1 / 8  # std 1/r
    assert all(torch.equal(a, b) for a, b in zip(kaiming, a_weights("kaiming", 0)))
    assert not torch.equal(kaiming[0], a_weights("kaiming", 1)[0])


def test_dropout_only_on_the_branch():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.5).train()
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout must not touch the base path
    nn.init.normal_(layer.lora_B.weight)
    assert not torch.equal(layer(x), layer(x))  # the branch is dropped at random in training
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert layer.weight is base.weight and (layer.in_features, layer.out_features) == (16, 8)


# --- target matching and validation -----------------------------------------------------------------------------


def test_target_list_regex_and_all_linear():
    method = LoRA(target_modules=["q_proj", "v_proj"])
    method.inject(tiny())
    assert sorted(method.layers) == sorted(n for n in ATTN if n.endswith(("q_proj", "v_proj")))

    method = LoRA(target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj")
    method.inject(tiny())
    assert list(method.layers) == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]

    method = LoRA(target_modules=["layers.0.self_attn.k_proj", "lm_head"])  # a dotted suffix; the head on request
    method.inject(tiny())
    assert list(method.layers) == ["model.layers.0.self_attn.k_proj", "lm_head"]


def test_unknown_targets_list_the_linear_layers():
    model = tiny()
    with pytest.raises(ModelError) as e:
        LoRA(target_modules=["query"]).inject(model)
    msg = str(e.value)
    assert "['query']" in msg and "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in msg
    assert "15 in all" in msg
    with pytest.raises(ModelError, match=r"entries \['nope'\] match no module"):
        LoRA(target_modules=["q_proj", "nope"]).inject(model)
    with pytest.raises(ModelError, match="LlamaMLP"):
        LoRA(target_modules=["mlp"]).inject(model)
    with pytest.raises(ModelError, match="matches no module"):
        LoRA(target_modules=r"q_proj").inject(model)  # a regex must match the whole name
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # failed injections change nothing
    assert all(p.requires_grad for p in model.parameters())


def test_tied_head_and_double_injection_are_refused():
    tied = tiny(tie_word_embeddings=True)
    with pytest.raises(ModelError, match="tied"):
        LoRA(target_modules=["lm_head"]).inject(tied)
    method = LoRA(target_modules=["q_proj"])
    method.inject(tied)
    with pytest.raises(ModelError, match="already has LoRA layers"):
        LoRA(target_modules=["v_proj"]).inject(tied)
    with pytest.raises(ModelError, match="already injected"):
        method.inject(tiny())


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(r=-2), dict(r=2.5), dict(alpha=0), dict(alpha=-1.0),
                                    dict(dropout=1.0), dict(init="xavier"), dict(target_modules=[]),
                                    dict(target_modules="(unclosed"), dict(rank_pattern={"q_proj": 0})])
def test_bad_hyperparameters_are_refused(kwargs):
    with pytest.raises(ConfigError):
        LoRA(**kwargs)


def test_config_section_rejects_bad_rank_and_alpha():
    for bad in (dict(r=0), dict(alpha=0), dict(alpha=-3), dict(dropout=1)):
        with pytest.raises(ValidationError):
            MethodSection(**bad)


# --- merge, unmerge, unload, scaling -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,rslora", [("llama", False), ("qwen2", True)])
def test_merge_unmerge_unload(arch, rslora):
    model = tiny(arch)
    base_logits = logits(model)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    method = LoRA(r=4, alpha=8, rslora=rslora)
    method.inject(model)
    randomize(method)
    adapted = logits(model)
    assert (adapted - base_logits).abs().max() > 1e-2

    method.merge()
    assert (logits(model) - adapted).abs().max() <= 1e-5
    q = method.layers["model.layers.0.self_attn.q_proj"]
    delta = q.base_layer.weight - base_weights["model.layers.0.self_attn.q_proj.weight"]
    scaling = 8 / (math.sqrt(4) if rslora else 4)
    assert q.scaling == scaling
    assert torch.allclose(delta, scaling * q.lora_B.weight @ q.lora_A.weight, atol=1e-6)

    method.unmerge()
    for name in method.layers:
        restored = method.layers[name].base_layer.weight
        assert (restored - base_weights[f"{name}.weight"]).abs().max() <= 1e-6
    assert (logits(model) - adapted).abs().max() <= 1e-5

    plain = method.unload()
    assert plain is model and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in ATTN + MLP)
    assert set(model.state_dict()) == set(base_weights)  # saves as a standard HF model
    assert all(p.requires_grad for p in model.parameters())  # as it was before inject
    assert (logits(model) - adapted).abs().max() <= 1e-5
    with pytest.raises(ModelError, match="not injected"):
        method.merge()


def test_rslora_scales_the_update_by_alpha_over_sqrt_r():
    torch.manual_seed(0)
    base, x = nn.Linear(32, 16), torch.randn(3, 32)
    plain = LoRALinear(base, r=16, alpha=8)
    rs = LoRALinear(base, r=16, alpha=8, rslora=True)
    nn.init.normal_(plain.lora_B.weight)
    rs.load_state_dict(plain.state_dict())
    assert (plain.scaling, rs.scaling) == (0.5, 2.0)
    assert torch.allclose(rs(x) - base(x), 4 * (plain(x) - base(x)), atol=1e-5)


def test_rank_and_alpha_patterns():
    method = LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                  alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})
    method.inject(tiny())
    ranks = {n: (layer.r, layer.scaling) for n, layer in method.layers.items()}
    assert ranks == {"model.layers.0.self_attn.q_proj": (4, 2.0), "model.layers.0.self_attn.v_proj": (2, 4.0),
                     "model.layers.1.self_attn.q_proj": (4, 0.75), "model.layers.1.self_attn.v_proj": (2, 4.0)}
    assert method.num_parameters() == 2 * (4 * (64 + 64) + 2 * (64 + 32))


def test_bf16_autocast_and_bf16_weights():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base_auto = logits(model)
    method = LoRA(r=4, alpha=8)
    method.inject(model)
    randomize(method)
    ref = logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = logits(model)
    assert auto.dtype == torch.bfloat16
    assert (auto.float() - ref).abs().max() < 0.05  # the fp32 result, to bf16 precision
    assert (auto.float() - base_auto.float()).abs().max() > 0.3  # and the adapter is active under autocast

    half = tiny().to(torch.bfloat16)
    method = LoRA(r=4, alpha=8)
    method.inject(half)
    assert method.layers["model.layers.0.self_attn.q_proj"].lora_A.weight.dtype == torch.bfloat16
    randomize(method)
    before = logits(half)
    method.merge()
    assert (logits(half).float() - before.float()).abs().max() < 0.1


# --- state dicts --------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_and_errors():
    source = LoRA(r=4, alpha=8, target_modules=["q_proj", "down_proj"])
    model = tiny()
    source.inject(model)
    randomize(source)
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    assert sorted(sd)[0] == "model.layers.0.mlp.down_proj.lora_A.weight" and len(sd) == 8

    def fresh() -> tuple[LoRA, nn.Module]:
        m, target = LoRA(r=4, alpha=8, target_modules=["q_proj", "down_proj"]), tiny()
        m.inject(target)
        return m, target

    m, target = fresh()
    m.load_state_dict(sd)
    assert torch.equal(logits(target), logits(model))

    missing = dict(sd)
    del missing["model.layers.1.self_attn.q_proj.lora_B.weight"]
    with pytest.raises(ModelError, match=r"model\.layers\.1\.self_attn\.q_proj: the adapter has no lora_B"):
        fresh()[0].load_state_dict(missing)
    with pytest.raises(ModelError, match="this model has no module model.layers.7.mlp.down_proj"):
        fresh()[0].load_state_dict(sd | {"model.layers.7.mlp.down_proj.lora_A.weight": torch.zeros(4, 128)})
    with pytest.raises(ModelError, match="not selected by target_modules"):
        fresh()[0].load_state_dict(sd | {"model.layers.0.self_attn.v_proj.lora_A.weight": torch.zeros(4, 64)})
    wrong = sd | {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}
    with pytest.raises(ModelError, match=r"q_proj: lora_A has shape \(4, 32\) .* expects \(4, 64\)"):
        fresh()[0].load_state_dict(wrong)


# --- full fine-tuning and the factory -------------------------------------------------------------------------------


def test_full_fine_tuning(tmp_path):
    model = tiny(tie_word_embeddings=True)
    total = sum(p.numel() for p in model.parameters())
    full = Full()
    full.inject(model)
    assert full.num_parameters() == total and full.mergeable
    full.merge()
    full.unmerge()
    assert full.unload() is model

    frozen = Full(freeze_embeddings=True)
    frozen.inject(model)
    assert not model.lm_head.weight.requires_grad  # tied to the embeddings
    assert frozen.num_parameters() == total - 128 * 64
    untied = tiny()
    Full(freeze_embeddings=True).inject(untied)
    assert untied.lm_head.weight.requires_grad and not untied.model.embed_tokens.weight.requires_grad

    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    other = tiny(tie_word_embeddings=True, seed=1)
    copy = Full(freeze_embeddings=True)
    copy.inject(other)
    copy.load_state_dict(frozen.state_dict())
    with torch.no_grad():
        other.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
    assert torch.equal(logits(other), logits(model))
    with pytest.raises(ModelError, match="shape"):
        copy.load_state_dict(frozen.state_dict() | {"model.norm.weight": torch.ones(3)})

    out = frozen.save(tmp_path / "model")
    assert (out / "config.json").is_file()
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(reloaded), logits(model))


def test_build_method_from_config():
    lora = build_method(MethodSection())
    assert isinstance(lora, LoRA) and (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (
        8, 16.0, 0.05, "all-linear")
    assert lora.mergeable and lora.name == "lora"
    full = build_method(MethodSection(name="full", freeze_embeddings=True))
    assert isinstance(full, Full) and full.freeze_embeddings and full.name == "full"
    full.on_step(3)  # the optional hook exists and does nothing
