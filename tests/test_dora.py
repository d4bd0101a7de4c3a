"""DoRA: a no-op at init, PEFT's forward and gradients, exact merge, PEFT files both ways, a short fine-tune."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import IDS, logits, tiny
from test_peft_interop import max_diff, peft_load
from torch import nn

from tunelab.config import FinetuneConfig, MethodSection, validate
from tunelab.methods import DoRA, DoRALinear, build_method, load_adapter
from tunelab.models import load_model
from tunelab.serve.generate import load_tuned
from tunelab.train.finetune import example_loss, prepare_sft_data, run_finetune

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:Could not find a config file"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")]








def randomize(method: DoRA, seed: int = 0) -> None:
    """Non-zero A, B and magnitudes 0.5..1.5 times their init, so every part of DoRA matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in method.layers.values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            m = layer.lora_magnitude_vector
            m.mul_(0.5 + torch.rand(m.shape, generator=g))




@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fresh_dora_is_a_no_op_and_gradients_reach_exactly_a_b_and_m(arch):
    model = tiny(arch)
    base = logits(model)
    norms = {n: m.weight.detach().norm(dim=1) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    method = DoRA(r=4, alpha=8, dropout=0.0)
    method.inject(model)
    assert torch.equal(logits(model), base)
    for name, layer in method.layers.items():  # m starts at the row norms of W (B = 0)
        assert torch.allclose(layer.lora_magnitude_vector, norms[name], rtol=1e-6)
    want = {f"{m}.{k}" for m in method.layers for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    assert method.num_parameters() == sum(4 * (m.in_features + m.out_features) + m.out_features
                                          for m in method.layers.values())

    randomize(method)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == want
    assert all(p.grad.abs().sum() > 0 for p in method.trainable_parameters())


def test_forward_and_gradients_match_peft_with_dropout():
    """PEFT's DoRA forward term for term (dropout mask, detached norm): same logits and gradients in training."""
    base = tiny()
    ours = copy.deepcopy(base)
    method = DoRA(r=4, alpha=8, dropout=0.2, target_modules=["q_proj", "v_proj", "down_proj"])
    method.inject(ours)
    randomize(method)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, use_dora=True,
                                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, layer in method.layers.items():
            p = theirs.base_model.model.get_submodule(name)
            assert torch.allclose(p.lora_magnitude_vector["default"].weight, layer.weight.norm(dim=1))  # same init
            p.lora_A["default"].weight.copy_(layer.lora_A.weight)
            p.lora_B["default"].weight.copy_(layer.lora_B.weight)
            p.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    out = {}
    for key, model in (("ours", ours), ("theirs", theirs)):
        model.train()
        torch.manual_seed(7)  # the same dropout masks, drawn in the same order
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        out[key] = loss.item(), {n.removeprefix("base_model.model.").replace(".default", "")
                                 .replace("vector.weight", "vector"): p.grad
                                 for n, p in model.named_parameters() if p.requires_grad}
    assert out["ours"][0] == pytest.approx(out["theirs"][0], abs=1e-6)
    assert set(out["ours"][1]) == set(out["theirs"][1])
    for name, g in out["ours"][1].items():
        assert max_diff(g, out["theirs"][1][name]) <= 1e-6, name
    assert max_diff(logits(ours.eval()), logits(theirs.eval())) <= 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_unmerge_unload(rslora):
    model = tiny("qwen2")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = DoRA(r=4, alpha=8, rslora=rslora)
    method.inject(model)
    randomize(method)
    want = logits(model)
    method.merge()
    assert max_diff(logits(model), want) <= 1e-5
    method.unmerge()
    assert max_diff(logits(model), want) <= 1e-6
    assert max(max_diff(p, w0[n.replace(".base_layer", "")]) for n, p in model.named_parameters()
               if not p.requires_grad) <= 1e-6
    plain = method.unload()
    assert not any(isinstance(m, DoRALinear) for m in plain.modules())
    assert max_diff(logits(plain), want) <= 1e-5


def test_tunelab_dora_loads_in_peft_and_peft_dora_loads_in_tunelab(tmp_path):
    model = tiny()
    method = DoRA(r=4, alpha=6, rslora=True, target_modules=["q_proj", "k_proj", "up_proj"],
                  rank_pattern={"k_proj": 2})
    method.inject(model)
    randomize(method)
    ours = logits(model)
    assert max_diff(ours, logits(tiny())) > 1e-3
    adapter = method.save(tmp_path / "dora", base_model_path="/models/tiny")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA" and cfg["use_rslora"] is True
    tensors = load_file(adapter / "adapter_model.safetensors")
    mags = [k for k in tensors if k.endswith(".lora_magnitude_vector")]  # PEFT's key: no .weight suffix
    assert len(mags) == len(method.layers) and len(tensors) == 3 * len(method.layers)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"].shape == (64,)

    theirs = peft_load(tiny(), adapter)
    assert max_diff(logits(theirs), ours) <= 1e-5
    back = load_adapter(tiny(), adapter)
    assert isinstance(back, DoRA) and max_diff(logits(back.model), ours) <= 1e-6
    # merging: ours equals PEFT's merge_and_unload
    merged_theirs = theirs.merge_and_unload().state_dict()
    merged_ours = back.unload().state_dict()
    assert max(max_diff(merged_ours[k], v) for k, v in merged_theirs.items()) <= 1e-6

    # a DoRA adapter PEFT wrote (its own init, then changed weights) loads in tunelab with the same logits
    torch.manual_seed(3)
    peft_model = get_peft_model(tiny("qwen2"), LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                                          target_modules="all-linear"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.2)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft-dora")
    loaded = load_adapter(tiny("qwen2"), tmp_path / "peft-dora")
    assert isinstance(loaded, DoRA)
    assert max_diff(logits(loaded.model), logits(peft_model)) <= 1e-5


def test_peft_dora_without_magnitudes_is_refused(tmp_path):
    method = DoRA(r=2, target_modules=["q_proj"])
    method.inject(tiny())
    adapter = method.save(tmp_path / "a")
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, adapter / "adapter_model.safetensors")
    model = tiny()
    with pytest.raises(Exception, match="no lora_magnitude_vector"):
        load_adapter(model, adapter)
    assert not any(isinstance(m, DoRALinear) for m in model.modules())  # left as it was


def test_build_method_and_a_short_finetune(tmp_path, base_model_dir, chat_file):
    assert isinstance(build_method(MethodSection(name="dora", r=2)), DoRA)
    cfg = validate(FinetuneConfig, {
        "name": "dora", "out_dir": str(tmp_path), "model": {"base": str(base_model_dir)},
        "data": {"train": [str(chat_file)], "eval_fraction": 0.1, "max_len": 64},
        "method": {"name": "dora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"steps": 30, "micro_batch_size": 8, "lr": 1e-2, "warmup_steps": 3, "eval_every": 0}})
    s = run_finetune(cfg, device="cpu")
    assert s["eval_after"]["eval_loss"] < s["eval_before"]["eval_loss"] - 0.3
    model, tok, method = load_tuned(s["output_dir"])  # merged for inference
    assert isinstance(method, DoRA) and method.merged
    data = prepare_sft_data(cfg, tok)
    again = example_loss(model, data.eval, 8, cfg.train.eval_batches, tok.pad_token_id)
    assert again["eval_loss"] == pytest.approx(s["eval_after"]["eval_loss"], abs=1e-5)
    linears = [m for m in load_model(base_model_dir).modules() if isinstance(m, nn.Linear)][:-1]  # no head
    assert s["trainable_parameters"] == sum(4 * (m.in_features + m.out_features) + m.out_features for m in linears)
