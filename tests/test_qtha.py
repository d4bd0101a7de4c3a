"""QTHA: a no-op at init, gradients to every part after one step, a parameter budget under LoRA r=8's, its own adapter
files, the simulator modes inside a layer, a fine-tune that learns, generation, resume and the export refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tunelab.config import FinetuneConfig, MethodSection, validate
from tunelab.errors import ConfigError, ModelError
from tunelab.export import export_merged
from tunelab.methods import QTHA, LoRA, QTHALinear, build_method, is_adapter_dir, load_adapter
from tunelab.methods.qtha import auto_bond, lora_num_parameters, qtha_num_parameters
from tunelab.models import PRESETS
from tunelab.serve.generate import answer_chats, load_tuned
from tunelab.train.events import read_events
from tunelab.train.finetune import example_loss, prepare_sft_data, run_finetune

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def one_thread():
    """QTHA runs many small ops; two OpenMP threads on a busy 2-core machine spend most of their time waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(arch: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    """A 2-layer model (hidden 64, 4 query heads, 2 KV heads; Qwen2 with q/k/v biases) in eval mode."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False) | overrides
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    return model_cls(config_cls(**kw)).eval()


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb(method: QTHA, seed: int = 0) -> None:
    """Give every parameter a random nudge (and the zero core random values) so the branch is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fresh_qtha_is_a_no_op_and_only_its_parameters_train(arch):
    model = tiny(arch)
    base = logits(model)
    method = QTHA(qubits=4)
    method.inject(model)
    assert torch.equal(logits(model), base)  # the up-projection's last core is zero: Δ ≡ 0
    assert len(method.layers) == 14 and all(isinstance(m, QTHALinear) for m in method.layers.values())
    assert "lm_head" not in method.layers  # all-linear leaves the output head alone
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{p}" for name, layer in method.layers.items()
                         for p, _ in layer.named_parameters() if not p.startswith("base_layer.")}
    assert method.num_parameters() == sum(p.numel() for p in method.trainable_parameters())
    assert method.layers["model.layers.0.self_attn.q_proj"].qtha_theta.shape == (2, 1, 4)


def test_gradients_reach_every_parameter_after_one_step():
    model = tiny()
    method = QTHA(qubits=4, rotations=["ry", "rz"])
    method.inject(model)
    model.train()
    params = method.trainable_parameters()
    model(input_ids=IDS, labels=IDS).loss.backward()
    zero_cores = [layer.qtha_up.cores[-1] for layer in method.layers.values()]
    assert all(c.grad.abs().sum() > 0 for c in zero_cores)  # the zero core gets a gradient at step 0 ...
    others = [p for p in params if all(p is not c for c in zero_cores)]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in others)  # ... the rest sees Δ ≡ 0 through it
    opt = torch.optim.AdamW(params, lr=1e-2)
    opt.step()
    opt.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    named = {f"{name}.{n}": p for name, layer in method.layers.items() for n, p in layer.named_parameters()
             if not n.startswith("base_layer.")}
    assert not [n for n, p in named.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _layer_shapes(h: int, inter: int, heads: int, kv: int, head_dim: int | None = None) -> list[tuple[int, int]]:
    """(in, out) of q, k, v, o, gate, up, down of one decoder layer."""
    hd = head_dim or h // heads
    return [(h, heads * hd), (h, kv * hd), (h, kv * hd), (heads * hd, h), (h, inter), (h, inter), (inter, h)]


def test_default_parameter_budget_is_at_most_24_percent_of_lora_r8():
    # built models: the test's micro model and the demo's "tiny" preset
    fractions = {}
    for preset in ("micro", "tiny"):
        counts = {}
        for method in (QTHA(), LoRA(r=8)):
            model = LlamaForCausalLM(LlamaConfig(vocab_size=128, **PRESETS[preset]))
            method.inject(model)
            counts[method.name] = method.num_parameters()
        fractions[preset] = counts["qtha"] / counts["lora"]
    # shapes only (no weights): Qwen2.5-0.5B and Llama-2-7B decoder layers
    for name, shapes in {"qwen2.5-0.5b": _layer_shapes(896, 4864, 14, 2, 64),
                         "llama-7b": _layer_shapes(4096, 11008, 32, 32)}.items():
        q = sum(qtha_num_parameters(i, o, 8, 2, 1, 3, auto_bond(i, o, 8, 2, 1, 3, 0.24)) for i, o in shapes)
        fractions[name] = q / sum(lora_num_parameters(i, o) for i, o in shapes)
    # measured: micro 0.183, tiny 0.227, qwen2.5-0.5b 0.236, llama-7b 0.220 (the paper: -76%, i.e. 0.24)
    assert all(0.15 <= f <= 0.24 for f in fractions.values()), fractions
    # the analytic count is what the layers hold
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, **PRESETS["tiny"]))
    method = QTHA()
    method.inject(model)
    for layer in method.layers.values():
        i, o = layer.in_features, layer.out_features
        bond = auto_bond(i, o, 8, 2, 1, 3, 0.24)
        assert sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base_layer.")) == \
            qtha_num_parameters(i, o, 8, 2, 1, 3, bond)
        assert qtha_num_parameters(i, o, 8, 2, 1, 3, bond) <= 0.24 * lora_num_parameters(i, o)


def test_save_and_load_its_own_adapter_format(tmp_path):
    model = tiny("qwen2")
    method = QTHA(qubits=4, depth=3, rotations=["ry", "rx"], bond=3, target_modules=["q_proj", "down_proj"])
    method.inject(model)
    perturb(method)
    ours = logits(model)
    assert not torch.equal(ours, logits(tiny("qwen2")))
    adapter = method.save(tmp_path / "adapter", base_model_path="/models/tiny")
    assert is_adapter_dir(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TUNELAB_QTHA" and cfg["base_model_name_or_path"] == "/models/tiny"
    assert (cfg["qubits"], cfg["depth"], cfg["rotations"], cfg["bond"], cfg["mode"]) == (4, 3, ["ry", "rx"], 3, "exact")
    assert cfg["modules"] == list(method.layers) and len(cfg["modules"]) == 4
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert set(tensors) == set(method.state_dict())
    assert all(".qtha_" in k for k in tensors)  # no frozen base weight
    back = load_adapter(tiny("qwen2"), adapter)
    assert isinstance(back, QTHA) and list(back.layers) == list(method.layers)
    assert torch.equal(logits(back.model), ours)
    # a base of another shape is named, and left as it was
    other = tiny("qwen2", hidden_size=32)
    with pytest.raises(ModelError, match=r"adapter tensor model\.layers\..*\.qtha_.*: shape .* this model expects"):
        load_adapter(other, adapter)
    assert not any(isinstance(m, QTHALinear) for m in other.modules())


def test_merging_is_refused_and_remove_restores_the_base():
    model = tiny()
    method = QTHA(qubits=3)
    method.inject(model)
    for call in (method.merge, method.unmerge, method.unload):
        with pytest.raises(ModelError, match="cannot be merged.*nonlinear"):
            call()
    with pytest.raises(ModelError, match="already has QTHA layers"):
        QTHA().inject(model)
    base = method.remove()
    assert not any(isinstance(m, QTHALinear) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())
    assert torch.equal(logits(base), logits(tiny()))


def test_simulator_modes_inside_a_layer():
    torch.manual_seed(0)
    base = nn.Linear(24, 12).double()
    x = torch.randn(5, 3, 24, dtype=torch.float64)
    layers = {m: QTHALinear(base, qubits=3, rotations=("ry", "rz"), bond=2, mode=m, shots=20_000)
              for m in ("exact", "parameter-shift", "shots")}
    state = layers["exact"].state_dict()
    for layer in layers.values():
        layer.load_state_dict(state)
        with torch.no_grad():
            layer.qtha_up.cores[-1].normal_(generator=torch.Generator().manual_seed(1))
    grads = {}
    for mode, layer in layers.items():
        layer.zero_grad()
        out = layer(x)
        out.sum().backward()
        grads[mode] = (out.detach(), *(p.grad for n, p in layer.named_parameters() if not n.startswith("base")))
    # the parameter-shift rule in fp32 circuits is exact up to rounding; shots only statistically close
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(grads["exact"], grads["parameter-shift"]))
    assert (grads["exact"][0] - grads["shots"][0]).abs().max() <= 0.1
    # shots mode: training forwards advance the sampling stream, eval forwards repeat themselves
    shots = layers["shots"]
    before = shots.shot_calls
    with torch.no_grad():
        a, b = shots(x), shots(x)
        assert not torch.equal(a, b) and shots.shot_calls == before + 2
        shots.eval()
        c, d = shots(x), shots(x)
        assert torch.equal(c, d) and shots.shot_calls == before + 2


def test_bad_settings_are_config_errors_naming_the_key():
    for kwargs, key in (({"qubits": 13}, "qtha_qubits"), ({"depth": 0}, "qtha_depth"), ({"bond": 0}, "qtha_bond"),
                        ({"rotations": ["ry", "h"]}, "qtha_rotations"), ({"mode": "adjoint"}, "qtha_mode"),
                        ({"budget": 0}, "qtha_budget"), ({"target_modules": []}, "target_modules")):
        with pytest.raises(ConfigError, match=key):
            QTHA(**kwargs)
    with pytest.raises(ModelError, match=r"method qtha.*matches no module"):
        QTHA(target_modules=["nope"]).inject(tiny())
    with pytest.raises(ConfigError, match="qtha_rotations"):
        validate(FinetuneConfig, {"model": {"base": "x"}, "data": {"train": ["x"]},
                                  "method": {"name": "qtha", "qtha_rotations": ["cz"]}})


def recipe(tmp_path, base_model_dir, chat_file, method: dict | None = None, **train) -> FinetuneConfig:
    return validate(FinetuneConfig, {
        "name": "qtha", "out_dir": str(tmp_path), "seed": 3, "model": {"base": str(base_model_dir)},
        "data": {"train": [str(chat_file)], "eval_fraction": 0.1, "max_len": 64},
        "method": {"name": "qtha", "qtha_qubits": 4, "dropout": 0.0, **(method or {})},
        "train": {"steps": 30, "micro_batch_size": 8, "lr": 1e-2, "warmup_steps": 3, "eval_every": 0, **train}})


def test_finetune_learns_then_generation_works_and_export_refuses(tmp_path, base_model_dir, chat_file):
    m = build_method(MethodSection(name="qtha", qtha_qubits=5, qtha_depth=1, qtha_bond=2, qtha_rotations=["rx"],
                                   qtha_mode="shots", qtha_shots=10, dropout=0.1, target_modules=["v_proj"]))
    assert isinstance(m, QTHA) and (m.qubits, m.depth, m.bond, m.rotations, m.mode, m.shots, m.dropout) == \
        (5, 1, 2, ("rx",), "shots", 10, 0.1) and m.target_modules == ["v_proj"]
    s = run_finetune(recipe(tmp_path, base_model_dir, chat_file), device="cpu")
    # a random micro model with a frozen random head: 6.04 -> 5.56 measured (LoRA r=4: 5.19)
    assert s["eval_after"]["eval_loss"] < s["eval_before"]["eval_loss"] - 0.3
    assert s["method"] == "qtha" and Path(s["output_dir"]).name == "adapter"
    model, tok, method = load_tuned(s["output_dir"])  # not mergeable: served with the branch
    assert isinstance(method, QTHA) and model.training is False
    cfg = recipe(tmp_path, base_model_dir, chat_file)
    again = example_loss(model, prepare_sft_data(cfg, tok).eval, 8, cfg.train.eval_batches, tok.pad_token_id)
    assert again["eval_loss"] == pytest.approx(s["eval_after"]["eval_loss"], abs=1e-5)
    replies = answer_chats(model, tok, [[{"role": "user", "content": "colour of river?"}]], max_new_tokens=3)
    assert len(replies) == 1 and isinstance(replies[0], str)
    with pytest.raises(ModelError, match="'qtha' adapter cannot be merged"):
        export_merged(s["output_dir"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def step_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "step"}


@pytest.mark.parametrize("method", [{"dropout": 0.1}, {"qtha_mode": "shots", "qtha_shots": 32, "qtha_qubits": 3}],
                         ids=["exact", "shots"])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, base_model_dir, chat_file, method):
    cfg = recipe(tmp_path, base_model_dir, chat_file, method, steps=6, save_every=3, grad_accum=2,
                 micro_batch_size=4)
    s = run_finetune(cfg, device="cpu")
    run_dir = Path(s["run_dir"])
    want = step_losses(run_dir)
    final = load_file(Path(s["output_dir"]) / "adapter_model.safetensors")
    # as if the run had died during step 6: the last complete checkpoint is step 3
    shutil.rmtree(run_dir / "checkpoints" / "step-000006")
    (run_dir / "checkpoints" / "latest").write_text("step-000003\n")
    resumed = run_finetune(recipe(tmp_path, base_model_dir, chat_file, method, steps=6, save_every=3, grad_accum=2,
                                  micro_batch_size=4, resume=True), device="cpu")
    assert resumed["resumed_from_step"] == 3
    got = step_losses(run_dir)
    assert sorted(got) == list(range(1, 7)) and max(abs(got[k] - want[k]) for k in want) <= 1e-6
    again = load_file(Path(resumed["output_dir"]) / "adapter_model.safetensors")
    assert set(again) == set(final) and all(torch.allclose(again[k].double(), final[k].double(), atol=1e-6)
                                            for k in final)
