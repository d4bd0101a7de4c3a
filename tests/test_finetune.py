"""Supervised fine-tuning end to end: LoRA and full on a micro model, adapter reload, export, bad data."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.config import FinetuneConfig, validate
from tunelab.errors import DataError, ModelError
from tunelab.export import export_merged, probe_inputs
from tunelab.models import load_model, load_tokenizer
from tunelab.serve.generate import answer_chats, load_tuned
from tunelab.train.events import read_events
from tunelab.train.finetune import run_finetune, sample_order, step_batches_fn


def recipe(tmp_path, base_model_dir, chat_file, **sections):
    raw = {"name": "ft", "out_dir": str(tmp_path / "runs"), "model": {"base": str(base_model_dir)},
           "data": {"train": [str(chat_file)], "eval_fraction": 0.1, "max_len": 64},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"steps": 100, "micro_batch_size": 8, "lr": 1e-2, "warmup_steps": 3, "eval_every": 0,
                     "log_every": 10}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate(FinetuneConfig, raw)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_model_dir, chat_file):
    tmp = tmp_path_factory.mktemp("lora")
    return run_finetune(recipe(tmp, base_model_dir, chat_file), device="cpu")


def test_lora_finetune_loss_falls_and_the_adapter_reloads_to_identical_outputs(lora_run, base_model_dir):
    # the base is a random micro model with a frozen random head, so LoRA cannot sharpen its logits
    # much: the loss falls by about 1 nat
    s = lora_run
    assert s["eval_after"]["eval_loss"] < s["eval_before"]["eval_loss"] - 0.5
    assert s["train_loss_last"] < s["train_loss_first"] - 0.5
    adapter = s["output_dir"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in Path(adapter).iterdir()}
    # the adapter holds only LoRA tensors
    from safetensors import safe_open
    with safe_open(f"{adapter}/adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    # reloading the adapter (merged for inference) reproduces the eval loss the run measured
    from tunelab.train.finetune import example_loss, prepare_sft_data
    cfg = FinetuneConfig.model_validate(json.loads((Path(s["run_dir"]) / "config.json").read_text()))
    model, tok, method = load_tuned(adapter)
    data = prepare_sft_data(cfg, tok)
    again = example_loss(model, data.eval, cfg.train.micro_batch_size, cfg.train.eval_batches, tok.pad_token_id)
    assert again["eval_loss"] == pytest.approx(s["eval_after"]["eval_loss"], abs=1e-5)
    assert method is not None and method.name == "lora"
    # the greedy replies now take the trained form (one colour word, then the end of turn)
    questions = [[{"role": "user", "content": f"colour of {w}?"}] for w in ("river", "stone", "lantern")]
    assert set(answer_chats(model, tok, questions, max_new_tokens=4)) <= {"red", "blue", "green"}
    assert not set(answer_chats(load_model(base_model_dir), tok, questions, max_new_tokens=4)) <= {"red", "blue",
                                                                                                  "green"}


def test_events_and_summary_record_the_run(lora_run):
    events = read_events(f"{lora_run['run_dir']}/events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("step") == 100
    start = events[0]
    assert start["trainable_parameters"] == lora_run["trainable_parameters"] < start["parameters"] / 5
    lint = json.loads(open(f"{lora_run['run_dir']}/lint.json").read())
    assert lint["n_examples"] == 108  # 120 chats, 10% held out


def test_export_merges_and_plain_transformers_loads_the_same_logits(lora_run, tmp_path):
    report = export_merged(lora_run["output_dir"], tmp_path / "merged")
    assert report["max_abs_logit_diff"] <= 1e-4
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tuned, tok, _ = load_tuned(lora_run["output_dir"])
    for x in probe_inputs(tok):
        torch.testing.assert_close(plain(input_ids=x).logits, tuned(input_ids=x).logits, atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "merged" / "tunelab_export.json").read_text())["max_abs_logit_diff"] <= 1e-4


def test_export_of_an_adapter_onto_another_base_names_the_module(lora_run, tmp_path, tokenizer_dir):
    from tunelab.models import create_model, save_model
    tok = load_tokenizer(tokenizer_dir)
    other = create_model("tiny", "llama", tok, seed=0)  # hidden 192, not 64
    save_model(other, tok, tmp_path / "other")
    with pytest.raises(ModelError, match=r"layers\.0\..*proj"):
        export_merged(tmp_path / "other", tmp_path / "out", adapter=lora_run["output_dir"])
    assert not (tmp_path / "out").exists()


def test_full_finetune_with_frozen_embeddings_saves_a_model(tmp_path, base_model_dir, chat_file):
    cfg = recipe(tmp_path, base_model_dir, chat_file, method={"name": "full", "freeze_embeddings": True},
                 train={"steps": 5, "lr": 1e-3})
    s = run_finetune(cfg, device="cpu")
    assert s["output_dir"].endswith("/model")
    base, tuned = load_model(base_model_dir), load_model(s["output_dir"])
    torch.testing.assert_close(base.get_input_embeddings().weight, tuned.get_input_embeddings().weight)
    changed = [n for (n, p), q in zip(base.named_parameters(), tuned.parameters()) if not torch.equal(p, q)]
    assert any("layers.0" in n for n in changed)


def test_epochs_decide_the_number_of_steps_and_each_epoch_visits_every_example(tmp_path, base_model_dir,
                                                                                chat_file):
    order0, order1 = sample_order(10, 0, seed=1), sample_order(10, 1, seed=1)
    assert sorted(order0) == list(range(10)) and list(order0) != list(order1)
    from tunelab.data.chat import Encoded
    examples = [Encoded(input_ids=[i, i + 1], labels=[i, i + 1], where=f"x:{i}", truncated=False,
                        n_trainable=2, n_tokens_before_truncation=2) for i in range(10)]
    batches = step_batches_fn(examples, micro_batch_size=2, grad_accum=1, seed=1, pad_id=0)
    seen = [int(b["input_ids"][r, 0]) for step in range(5) for b in batches(step) for r in range(2)]
    assert sorted(seen) == list(range(10))
    assert torch.equal(batches(3)[0]["input_ids"], batches(3)[0]["input_ids"])  # a pure function of the step


def test_examples_without_a_trainable_token_stop_training_unless_allowed(tmp_path, base_model_dir):
    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]}] * 6
    rows.append({"messages": [{"role": "user", "content": "only a question"}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = recipe(tmp_path, base_model_dir, data, data={"train": [str(data)], "eval_fraction": 0},
                 train={"steps": 2})
    with pytest.raises(DataError, match=r"d\.jsonl:7"):
        run_finetune(cfg, device="cpu")
    cfg = recipe(tmp_path, base_model_dir, data, data={"train": [str(data)], "eval_fraction": 0,
                                                         "allow_empty": True}, train={"steps": 2})
    assert run_finetune(cfg, device="cpu")["examples"] == 6
