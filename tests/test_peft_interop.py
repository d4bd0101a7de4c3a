"""HF PEFT interoperability: tunelab-written adapters load in `peft` with the same logits and no missing keys, and
PEFT-written adapters (rank/alpha patterns, rsLoRA, regex targets) load in tunelab; bad adapters give clear errors."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import IDS, logits, tiny
from torch import nn

from tunelab.errors import ModelError, TunelabError
from tunelab.methods import LoRA, LoRALinear, is_adapter_dir, load_adapter, read_adapter_config, save_lora_adapter

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:Could not find a config file"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def tunelab_adapter(tmp_path, arch: str = "llama", seed: int = 0, **lora) -> tuple[nn.Module, LoRA, object]:
    """A tunelab LoRA with random A and B saved to tmp_path/adapter; returns (model, method, adapter dir)."""
    model = tiny(arch, seed)
    method = LoRA(**lora)
    method.inject(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, method, save_lora_adapter(method, tmp_path / "adapter", base_model_path="/models/tiny-base")


def peft_load(base: nn.Module, adapter_dir) -> nn.Module:
    """PeftModel.from_pretrained, failing on PEFT's 'missing adapter keys' warning (a silently inactive adapter)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    problems = [str(w.message) for w in caught if "adapter keys" in str(w.message) or "unexpected" in str(w.message)]
    assert not problems, problems
    return model


# --- tunelab -> PEFT ----------------------------------------------------------------------------------------------

CASES = {
    "all-linear": ("llama", dict(r=8, alpha=16, target_modules="all-linear")),
    "rslora-subset": ("llama", dict(r=4, alpha=8, rslora=True, target_modules=["q_proj", "v_proj"])),
    "regex-qwen2": ("qwen2", dict(r=4, alpha=6, rslora=True,
                                  target_modules=r"model\.layers\.\d+\.(self_attn\.k_proj|mlp\.down_proj)")),
    "one-layer-only": ("llama", dict(r=2, alpha=4, target_modules=["layers.1.self_attn.q_proj"])),
    "patterns": ("qwen2", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.down_proj": 3})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tunelab_adapter_loads_in_peft_with_the_same_logits(tmp_path, case):
    arch, lora = CASES[case]
    model, method, adapter_dir = tunelab_adapter(tmp_path, arch, **lora)
    ours, base = logits(model), logits(tiny(arch))
    assert max_diff(ours, base) > 1e-3  # the adapter matters, so a silently dropped one would fail below

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["use_rslora"], cfg["use_dora"], cfg["r"]) == (
        "LORA", "CAUSAL_LM", lora.get("rslora", False), False, lora["r"])
    assert cfg["base_model_name_or_path"] == "/models/tiny-base" and cfg["inference_mode"] is True
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    assert len(tensors) == 2 * len(method.layers)

    peft_model = peft_load(tiny(arch), adapter_dir)
    assert max_diff(logits(peft_model), ours) <= 1e-5
    assert set(get_peft_model_state_dict(peft_model)) == set(tensors)  # nothing missing, nothing extra
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert adapted == set(method.layers)
    for name, layer in method.layers.items():
        assert peft_model.base_model.model.get_submodule(name).scaling["default"] == pytest.approx(layer.scaling)

    reloaded = load_adapter(tiny(arch), adapter_dir)  # and back into tunelab
    assert max_diff(logits(reloaded.model), ours) <= 1e-6


def test_target_names_written_for_peft(tmp_path):
    cfg = read_adapter_config(tunelab_adapter(tmp_path, target_modules="all-linear")[2])
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert "lm_head" not in cfg["target_modules"]
    cfg = read_adapter_config(tunelab_adapter(tmp_path, target_modules=["layers.1.self_attn.q_proj"])[2])
    assert cfg["target_modules"] == ["model.layers.1.self_attn.q_proj"]  # "q_proj" would select layer 0 too
    cfg = read_adapter_config(tunelab_adapter(tmp_path, target_modules=r".*\.q_proj")[2])
    assert cfg["target_modules"] == r".*\.q_proj"


def test_saved_adapter_is_complete_and_atomic(tmp_path):
    model, method, adapter_dir = tunelab_adapter(tmp_path, target_modules=["q_proj"])
    assert is_adapter_dir(adapter_dir) and not is_adapter_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary directories left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TunelabError, match="refusing to replace"):
        save_lora_adapter(method, tmp_path / "other")
    with pytest.raises(ModelError, match="nothing to save"):
        save_lora_adapter(LoRA(), tmp_path / "empty")


# --- PEFT -> tunelab ----------------------------------------------------------------------------------------------

PEFT_CASES = {
    "list": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "patterns-rslora": ("qwen2", dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                                      rank_pattern={"v_proj": 2, "layers.1.mlp.up_proj": 6},
                                      alpha_pattern={"o_proj": 3})),
    "regex-exclude": ("llama", dict(r=3, lora_alpha=5, target_modules=r".*\.(q_proj|up_proj)",
                                    exclude_modules=["model.layers.0.mlp.up_proj"])),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_loads_in_tunelab_with_the_same_logits(tmp_path, case):
    arch, kwargs = PEFT_CASES[case]
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny(arch), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kwargs))
    peft_model.eval()
    theirs = logits(peft_model)
    assert max_diff(theirs, logits(tiny(arch))) > 1e-2
    peft_model.save_pretrained(tmp_path / "peft")

    method = load_adapter(tiny(arch), tmp_path / "peft")
    assert max_diff(logits(method.model), theirs) <= 1e-5
    ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in peft_model.named_modules()
             if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {n: layer.r for n, layer in method.layers.items()} == ranks

    # written again by tunelab, it still loads in PEFT with the same logits (patterns and rsLoRA kept)
    method.save(tmp_path / "again", base_model_path="base")
    assert max_diff(logits(peft_load(tiny(arch), tmp_path / "again")), theirs) <= 1e-5


def test_merge_of_a_peft_adapter_matches_peft_merge_and_unload(tmp_path):
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                   init_lora_weights=False, use_rslora=True))
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = peft_model.merge_and_unload().eval()
    ours = load_adapter(tiny(), tmp_path / "peft").unload().eval()
    assert all(type(m) is not LoRALinear for m in ours.modules())
    assert max(float((ours.state_dict()[k] - v).abs().max()) for k, v in theirs.state_dict().items()) <= 1e-6


def test_training_matches_peft_step_for_step():
    """Same init, same data, same optimizer: tunelab LoRA and PEFT LoRA give the same losses (same gradients)."""
    base = tiny(tie_word_embeddings=True)
    ours = copy.deepcopy(base)
    method = LoRA(r=4, alpha=8, dropout=0.0, rslora=True)
    method.inject(ours)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True,
                                                            target_modules="all-linear"))
    with torch.no_grad():
        for name, layer in method.layers.items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            assert not peft_layer.lora_B["default"].weight.any()

    def losses(model: nn.Module, params: list) -> list[float]:
        opt, out = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0), []
        model.train()
        for _ in range(5):
            loss = model(input_ids=IDS, labels=IDS).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    a = losses(ours, method.trainable_parameters())
    b = losses(theirs, [p for p in theirs.parameters() if p.requires_grad])
    assert len(method.trainable_parameters()) == sum(p.requires_grad for p in theirs.parameters())
    assert a[-1] < a[0] - 0.05
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5


# --- bad adapters -------------------------------------------------------------------------------------------------


def test_adapter_for_another_base_names_module_and_shapes(tmp_path):
    _, _, adapter_dir = tunelab_adapter(tmp_path, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    narrow = tiny(hidden_size=32)  # trained on hidden 64; this base has 32
    with pytest.raises(ModelError) as e:
        load_adapter(narrow, adapter_dir)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "(4, 64)" in msg and "(4, 32)" in msg
    assert "another base model" in msg and "adapter_model.safetensors" in msg
    assert not any(isinstance(m, LoRALinear) for m in narrow.modules())  # the model is left as it was

    deeper_dir = tunelab_adapter(tmp_path / "deep", target_modules=["q_proj"], **{"r": 4})[2]
    shallow = tiny(num_hidden_layers=1)
    with pytest.raises(ModelError, match="no module model.layers.1.self_attn.q_proj.*another base model"):
        load_adapter(shallow, deeper_dir)


def test_missing_files_are_named(tmp_path):
    _, _, adapter_dir = tunelab_adapter(tmp_path, target_modules=["q_proj"])
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match=f"{adapter_dir}: no adapter_model.safetensors"):
        load_adapter(tiny(), adapter_dir)
    (adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(ModelError, match=f"{adapter_dir}: no adapter_config.json"):
        load_adapter(tiny(), adapter_dir)
    with pytest.raises(ModelError, match="not a local directory"):
        read_adapter_config(tmp_path / "nowhere")
    (adapter_dir / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="adapter_config.json: not readable JSON"):
        read_adapter_config(adapter_dir)


def test_missing_and_foreign_tensors_are_errors(tmp_path):
    model, _, adapter_dir = tunelab_adapter(tmp_path, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)

    incomplete = dict(tensors)
    del incomplete["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(incomplete, weights, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"model\.layers\.1\.self_attn\.v_proj: the adapter has no lora_B"):
        load_adapter(tiny(), adapter_dir)

    for key, shape in [("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", (64,)),
                       ("base_model.model.lm_head.weight", (128, 64)),
                       ("base_model.model.model.embed_tokens.lora_embedding_A", (4, 128)),
                       ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (64,))]:
        save_file(tensors | {key: torch.zeros(shape)}, weights, metadata={"format": "pt"})
        with pytest.raises(ModelError, match=f"tensor {key} is .*not supported yet"):
            load_adapter(tiny(), adapter_dir)

    # keys without the `base_model.model.` prefix (as some tools write them) are still read, never dropped
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, weights)
    assert max_diff(logits(load_adapter(tiny(), adapter_dir).model), logits(model)) <= 1e-6
    # the pickle fallback adapter_model.bin
    weights.unlink()
    torch.save(tensors, adapter_dir / "adapter_model.bin")
    assert max_diff(logits(load_adapter(tiny(), adapter_dir).model), logits(model)) <= 1e-6


def test_unsupported_adapters_are_refused_clearly(tmp_path):
    _, _, adapter_dir = tunelab_adapter(tmp_path, target_modules=["q_proj"])
    config_path = adapter_dir / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for change, message in [({"peft_type": "IA3"}, "peft_type 'IA3' is not supported yet"),
                            ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                            ({"layers_to_transform": 0}, "layers_to_transform"),
                            ({"bias": "all"}, "bias 'all'"),
                            ({"use_dora": "yes"}, "use_dora must be true or false"),
                            ({"init_lora_weights": "pissa"}, "changes the base weights"),
                            ({"r": 0}, "r must be an integer >= 1"),
                            ({"target_modules": None}, "target_modules is None"),
                            ({"target_modules": ["nope"]}, r"json: target_modules \['nope'\] matches no module")]:
        config_path.write_text(json.dumps(good | change))
        model = tiny()
        with pytest.raises(ModelError, match=message):
            load_adapter(model, adapter_dir)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_saved_adapter_keeps_its_base_when_overwritten(tmp_path):
    """Saving twice to one directory replaces the earlier adapter (it is an output of the same kind)."""
    model, method, adapter_dir = tunelab_adapter(tmp_path, target_modules=["q_proj"])
    with torch.no_grad():
        method.layers["model.layers.0.self_attn.q_proj"].lora_B.weight.mul_(2)
    save_lora_adapter(method, adapter_dir, base_model_path="/other/base")
    assert read_adapter_config(adapter_dir)["base_model_name_or_path"] == "/other/base"
    assert max_diff(logits(load_adapter(tiny(), adapter_dir).model), logits(model)) <= 1e-6
