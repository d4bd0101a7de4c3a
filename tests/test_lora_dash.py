"""LoRA-Dash: LoRA before the switch, the switch at the configured optimizer step (whatever the accumulation,
evaluation or activation checkpointing), the chosen directions, merge, the rank-(r+s) PEFT export, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_lora import IDS, logits, tiny
from test_peft_interop import max_diff, peft_load
from torch import nn

import tunelab.train.finetune as finetune
import tunelab.train.loop as loop
from tunelab.config import FinetuneConfig, FinetuneTrain, MethodSection, validate
from tunelab.errors import ConfigError, ModelError
from tunelab.methods import LoRA, LoRADash, LoRADashLinear, build_method, load_adapter
from tunelab.serve.generate import load_tuned
from tunelab.train.checkpoint import latest_checkpoint
from tunelab.train.events import read_events
from tunelab.train.finetune import example_loss, prepare_sft_data, run_finetune

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore:Could not find a config file"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated"),
              pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")]








def randomize(method: LoRA, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in method.layers.values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def dashed(arch: str = "llama", seed: int = 0, **kw) -> tuple[nn.Module, LoRADash]:
    """A model with a LoRA-Dash past its switch: random A, B, then the directions, then a random δ."""
    model = tiny(arch)
    method = LoRADash(**({"r": 4, "alpha": 8, "dash_steps": 1, "dash_directions": 3} | kw))
    method.inject(model)
    randomize(method, seed)
    method.on_step(method.dash_steps)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in method.layers.values():
            layer.dash_delta.copy_(torch.randn(layer.dash_delta.shape, generator=g) * 0.5)
    return model, method


# --- the pre-launch phase and the switch ------------------------------------------------------------------------


def test_before_the_switch_it_is_lora_and_delta_stays_exactly_zero():
    """Same seed: the same init, dropout and updates as LoRA, bit for bit, while δ (in the optimizer from the start,
    in the no-decay group) gets no gradient and stays 0; after the switch δ trains and the runs part."""
    cfg = FinetuneTrain(lr=1e-2, weight_decay=0.1)  # decay on matrices; δ is a vector: never decayed
    runs = {}
    for kind in ("lora", "dash"):
        model = tiny()
        torch.manual_seed(5)
        method = (LoRA(r=4, alpha=8, dropout=0.1) if kind == "lora"
                  else LoRADash(r=4, alpha=8, dropout=0.1, dash_steps=3, dash_directions=2))
        method.inject(model)
        params = method.trainable_parameters()
        opt = loop.make_optimizer(params, cfg)
        if kind == "dash":
            deltas = [layer.dash_delta for layer in method.layers.values()]
            no_decay = [g for g in opt.param_groups if g["weight_decay"] == 0.0][0]["params"]
            assert all(any(d is p for p in no_decay) for d in deltas)
        model.train()
        losses, events = [], []
        for step in range(1, 6):
            loss = model(input_ids=IDS, labels=IDS).loss
            loss.backward()
            if kind == "dash" and step <= 3:
                assert all(d.grad is None for d in deltas)  # the dash branch is not computed yet
            opt.step()
            opt.zero_grad(set_to_none=True)
            events.append(method.on_step(step))
            losses.append(loss.item())
            if kind == "dash" and step == 3:
                assert all(torch.equal(d, torch.zeros_like(d)) for d in deltas)
        runs[kind] = (losses, events, method)
    lora_losses, dash_losses = runs["lora"][0], runs["dash"][0]
    assert dash_losses[:4] == lora_losses[:4]  # step 4 still runs with δ = 0: identical
    assert dash_losses[4] != lora_losses[4]  # δ moved at step 4
    events = runs["dash"][1]
    assert events[:2] == [None, None] and events[3:] == [None, None]
    assert events[2]["event"] == "lora_dash_switch" and events[2]["step"] == 3 and events[2]["layers"] == 14
    assert events[2]["directions"] == 28 and events[2]["svd_s"] >= 0
    method = runs["dash"][2]
    assert method.switch_step == 3 and all(layer.dash_delta.abs().sum() > 0 for layer in method.layers.values())
    assert method.num_parameters() == runs["lora"][2].num_parameters() + 14 * 2


def test_fresh_lora_dash_is_a_no_op_and_gradients_reach_a_b_and_delta():
    model = tiny("qwen2")
    base = logits(model)
    method = LoRADash(r=4, alpha=8, dash_steps=1, dash_directions=3)
    method.inject(model)
    assert torch.equal(logits(model), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{k}" for m in method.layers for k in ("lora_A.weight", "lora_B.weight", "dash_delta")}
    randomize(method)
    before = logits(model)
    method.on_step(1)
    assert torch.equal(logits(model), before)  # the switch itself changes nothing (δ = 0)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    assert all(p.grad.abs().sum() > 0 for p in method.trainable_parameters())
    # the frozen directions are buffers outside the HF model's own state dict (they live in the method's)
    assert not any(k.endswith(("dash_U", "dash_Vh")) for k in model.state_dict())


def test_chosen_directions_match_a_brute_force_computation():
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=False)
    with torch.no_grad():  # rank-deficient W: two directions with σ = 0 (in fp32 about 1e-7, or exactly 0)
        u, _, vh = torch.linalg.svd(torch.randn(10, 12), full_matrices=False)
        sigma = torch.tensor([5.0, 4, 3, 2.5, 2, 1.5, 1, 0.5, 0.0, 0.0])
        base.weight.copy_(u @ torch.diag(sigma) @ vh)
    layer = LoRADashLinear(base, r=3, alpha=6, directions=4)
    with torch.no_grad():
        layer.lora_A.weight.normal_()
        layer.lora_B.weight.normal_()
    idx = layer.find_directions()

    w = base.weight.detach().double()
    U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)  # the same decomposition the layer uses
    dw = (layer.lora_B.weight.detach().double() @ layer.lora_A.weight.detach().double()) * layer.scaling
    floor = float(S.max()) * 12 * torch.finfo(torch.float32).eps
    rates = []
    for i in range(10):
        d_sigma = float(U[:, i].double() @ dw @ Vh[i].double())
        rates.append(abs(d_sigma) / max(float(S[i]), floor))
    want = sorted(range(10), key=lambda i: -rates[i])[:4]
    assert idx.tolist() == want
    assert torch.equal(layer.dash_U, U[:, want]) and torch.equal(layer.dash_Vh, Vh[want])
    # σ ≈ 0 is clamped to σ_max·12·eps: the null directions rank first, by |δσ|, with finite rates (unclamped they
    # are inf or nan, and an exact 0/0 would be nan and never chosen)
    assert sorted(want[:2]) == [8, 9] and all(r < float("inf") for r in rates)
    assert layer.dashing and torch.equal(layer.dash_delta, torch.zeros(4))
    # where the singular vectors are unique (σ > 0, distinct), an independent float64 SVD gives the same ones
    U64, _, Vh64 = torch.linalg.svd(w, full_matrices=False)
    for j, i in enumerate(want[2:], start=2):
        assert abs(float(U64[:, i] @ layer.dash_U[:, j].double())) == pytest.approx(1.0, abs=1e-5)
        assert abs(float(Vh64[i] @ layer.dash_Vh[j].double())) == pytest.approx(1.0, abs=1e-5)
    # the dash term is x (U_s diag(δ) Vh_s)ᵀ, without forming that matrix
    with torch.no_grad():
        layer.dash_delta.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    x = torch.randn(5, 12)
    dense = x @ base.weight.detach().T + x @ dw.float().T + x @ (U[:, want] @ torch.diag(layer.dash_delta) @ Vh[want]).T
    with torch.no_grad():
        assert max_diff(layer(x), dense) <= 1e-5


def test_merge_unmerge_and_state_dict_restore_the_phase():
    model, method = dashed("qwen2", dash_directions=40)  # more than the 32 of k/v_proj: s = min(40, 32, 64)
    assert {layer.s for layer in method.layers.values()} == {32, 40}
    want = logits(model)
    assert max_diff(want, logits(tiny("qwen2"))) > 1e-3
    method.merge()
    assert max_diff(logits(model), want) <= 1e-5
    method.unmerge()
    assert max_diff(logits(model), want) <= 1e-6

    sd = method.state_dict()
    assert sd["lora_dash.switch_step"].tolist() == [1]
    other_model = tiny("qwen2")
    other = LoRADash(r=4, alpha=8, dash_steps=1, dash_directions=40)
    other.inject(other_model)
    assert not other.dashing
    other.load_state_dict({k: v.clone() for k, v in sd.items()})
    assert other.dashing and other.switch_step == 1 and all(layer.dashing for layer in other.layers.values())
    assert torch.equal(logits(other_model), want)
    assert other.on_step(5) is None  # never switches twice
    with pytest.raises(ModelError, match="lora_dash.switch_step"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "lora_dash.switch_step"})
    broken = LoRADash(r=4, alpha=8, dash_directions=2)
    broken.inject(tiny("qwen2"))
    with pytest.raises(ModelError, match="dash_U has shape"):
        broken.load_state_dict(sd)
    plain = method.unload()
    assert not any(isinstance(m, LoRADashLinear) for m in plain.modules())
    assert max_diff(logits(plain), want) <= 1e-5


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="dash_steps"):
        LoRADash(dash_steps=0)
    with pytest.raises(ConfigError, match="dash_directions"):
        LoRADash(dash_directions=0)
    m = build_method(MethodSection(name="lora-dash", r=2, dash_steps=7, dash_directions=3))
    assert isinstance(m, LoRADash) and (m.dash_steps, m.dash_directions, m.r) == (7, 3, 2)


# --- export as a plain PEFT LoRA of rank r + s -------------------------------------------------------------------




@pytest.mark.parametrize("case", ["uniform", "rslora-patterns"])
def test_export_is_a_rank_r_plus_s_peft_lora_with_the_same_logits(tmp_path, case):
    if case == "uniform":
        arch, kw = "llama", dict(r=4, alpha=8, dash_directions=3)
    else:  # per-layer ranks (rank_pattern) and s capped by the k/v projections' 32 outputs
        arch, kw = "qwen2", dict(r=4, alpha=6, rslora=True, rank_pattern={"v_proj": 2}, dash_directions=36)
    model, method = dashed(arch, **kw)
    ours = logits(model)
    adapter = method.save(tmp_path / "dash", base_model_path="/models/tiny")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    r_prime = kw["r"] + kw["dash_directions"]
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["use_dora"]) == (
        "LORA", r_prime, r_prime, False, False)
    tensors = load_file(adapter / "adapter_model.safetensors")
    for name, layer in method.layers.items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        assert a.shape == (layer.r + layer.s, layer.in_features)
        assert torch.equal(a[:layer.r], layer.lora_A.weight) and torch.equal(a[layer.r:], layer.dash_Vh)
    theirs = peft_load(tiny(arch), adapter)
    assert max_diff(logits(theirs), ours) <= 1e-5
    assert max_diff(logits(load_adapter(tiny(arch), adapter).model), ours) <= 1e-5  # a plain LoRA in tunelab


def test_export_before_the_switch_is_the_plain_lora(tmp_path):
    model = tiny()
    method = LoRADash(r=4, alpha=8, dash_steps=10)
    method.inject(model)
    randomize(method)
    adapter = method.save(tmp_path / "early")
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert max_diff(logits(peft_load(tiny(), adapter)), logits(model)) <= 1e-5


# --- in the training stage: the switch step, events, resume -------------------------------------------------------


def recipe(tmp_path, base_model_dir, chat_file, method: str = "lora-dash", name: str = "run",
           **train) -> FinetuneConfig:
    return validate(FinetuneConfig, {
        "name": name, "out_dir": str(tmp_path), "seed": 3, "model": {"base": str(base_model_dir)},
        "data": {"train": [str(chat_file)], "eval_fraction": 0.1, "max_len": 64},
        "method": {"name": method, "r": 4, "alpha": 8, "dropout": 0.1, "dash_steps": 3, "dash_directions": 2},
        "train": {"steps": 6, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 0, "log_every": 5, **train}})


def step_losses(run_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(Path(run_dir) / "events.jsonl") if e["event"] == "step"}


def test_switch_at_the_optimizer_step_despite_accumulation_eval_and_activation_checkpointing(
        tmp_path, base_model_dir, chat_file, monkeypatch):
    lora = run_finetune(recipe(tmp_path, base_model_dir, chat_file, "lora", "lora"), device="cpu")

    load_model = finetune.load_model

    def load_checkpointed(ref, *args, **kwargs):
        model = load_model(ref, *args, **kwargs)
        model.activation_checkpointing_enable()  # every layer's forward of a training step runs twice
        return model

    monkeypatch.setattr(finetune, "load_model", load_checkpointed)
    # grad_accum 2 and an evaluation after every step: forward calls of a layer are ~5 per optimizer step
    dash = run_finetune(recipe(tmp_path, base_model_dir, chat_file, eval_every=1), device="cpu")
    events = read_events(Path(dash["run_dir"]) / "events.jsonl")
    switches = [e for e in events if e["event"] == "lora_dash_switch"]
    assert [e["step"] for e in switches] == [3] and switches[0]["layers"] == 14 and switches[0]["svd_s"] >= 0
    assert len([e for e in events if e["event"] == "eval"]) == 7
    # identical to LoRA through step 4 (δ is still 0 in step 4's forward), different from step 5 on
    want, got = step_losses(lora["run_dir"]), step_losses(dash["run_dir"])
    assert max(abs(got[s] - want[s]) for s in range(1, 5)) <= 1e-6
    assert abs(got[5] - want[5]) > 1e-6
    sd = load_file(latest_checkpoint(dash["run_dir"]) / "trainable.safetensors")
    assert sd["lora_dash.switch_step"].tolist() == [3]
    assert dash["trainable_parameters"] == lora["trainable_parameters"] + 14 * 2
    # the exported rank-(r+s) adapter reproduces the run's final eval loss, in tunelab and in PEFT
    cfg = recipe(tmp_path, base_model_dir, chat_file)
    model, tok, method = load_tuned(dash["output_dir"])
    data = prepare_sft_data(cfg, tok)
    again = example_loss(model, data.eval, 4, cfg.train.eval_batches, tok.pad_token_id)
    assert again["eval_loss"] == pytest.approx(dash["eval_after"]["eval_loss"], abs=1e-5)
    theirs = peft_load(load_model(base_model_dir), dash["output_dir"])
    x = torch.tensor([data.eval[0].input_ids])
    with torch.no_grad():
        assert max_diff(theirs(input_ids=x).logits, model(input_ids=x).logits) <= 1e-5


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_step", [3, 6])
def test_resume_across_the_switch_reproduces_the_uninterrupted_run(tmp_path, base_model_dir, chat_file, monkeypatch,
                                                                    crash_step):
    """Crash inside step 3 (resume from step 2, before the switch) or step 6 (from step 4, after it)."""
    reference = run_finetune(recipe(tmp_path / "ref", base_model_dir, chat_file, save_every=2, steps=7), device="cpu")
    want = step_losses(reference["run_dir"])

    calls = [0]
    original = loop.forward_loss_sum

    def crashing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2 * (crash_step - 1) + 1:  # the first micro-batch of `crash_step` (grad_accum 2)
            raise Crash
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "forward_loss_sum", crashing)
    with pytest.raises(Crash):
        run_finetune(recipe(tmp_path / "crash", base_model_dir, chat_file, save_every=2, steps=7), device="cpu")
    monkeypatch.setattr(loop, "forward_loss_sum", original)
    resumed = run_finetune(recipe(tmp_path / "crash", base_model_dir, chat_file, save_every=2, steps=7,
                                  resume=True), device="cpu")
    assert resumed["resumed_from_step"] == 2 * ((crash_step - 1) // 2)
    got = step_losses(resumed["run_dir"])
    assert sorted(got) == list(range(1, 8))
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6
    switches = [e["step"] for e in read_events(Path(resumed["run_dir"]) / "events.jsonl")
                if e["event"] == "lora_dash_switch"]
    assert switches == [3]  # once: before the crash (crash_step 6) or after the resume (crash_step 3)
    a = load_file(Path(reference["output_dir"]) / "adapter_model.safetensors")
    b = load_file(Path(resumed["output_dir"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max(max_diff(a[k], b[k]) for k in a) <= 1e-6

