"""Packed fine-tuning (data.packing) and document-masked pretraining (data.document_mask): whole examples in
best-fit-decreasing rows, attention and positions confined to each example, the same loss and gradients as the
examples unpadded one by one, exact resume, and clear errors."""

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import assert_clean_error, tunelab
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from tunelab.config import FinetuneConfig, PretrainConfig, validate
from tunelab.data.chat import Encoded
from tunelab.data.packing import best_fit_decreasing, document_positions, pack_documents
from tunelab.errors import ModelError
from tunelab.models import load_tokenizer
from tunelab.train.events import read_events
from tunelab.train.finetune import collate, collate_packed, prepare_sft_data, run_finetune, step_batches_fn
from tunelab.train.loop import count_loss_tokens, full_logits_loss_sum
from tunelab.train.loss import check_packed_attention, chunked_loss_sum
from tunelab.train.pretrain import run_pretrain


def test_best_fit_decreasing_keeps_examples_whole_and_fills_the_fullest_row():
    assert best_fit_decreasing([5, 3, 8, 2, 2, 1, 7], 10) == [[2, 3], [6, 1], [0, 4, 5]]
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))  # every example once, none split
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 64 + 1  # BFD is near the bound on random lengths
    assert best_fit_decreasing(lengths, 64) == bins  # deterministic
    with pytest.raises(ValueError):
        best_fit_decreasing([65], 64)


def encoded(n: int, g: torch.Generator, vocab: int = 300) -> Encoded:
    ids = torch.randint(1, vocab, (n,), generator=g).tolist()
    labels = [t if k >= n // 3 else -100 for k, t in enumerate(ids)]  # a prompt without loss, then the answer
    return Encoded(ids, labels, "x", False, sum(x != -100 for x in labels), n)


def tiny_models():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(  # a sliding window shorter than the examples: both masks are packed
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"]))
    return {"llama": llama, "gemma3": gemma}


def step_loss_and_grads(model, batches, loss_fn):
    """The loop's maths for one step: each micro-batch's summed loss over the step's loss tokens, backward."""
    model.zero_grad(set_to_none=True)
    n = sum(count_loss_tokens(b) for b in batches)
    total = 0.0
    for b in batches:
        loss = loss_fn(model, b, None)
        (loss / n).backward()
        total += loss.item()
    return total / n, n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_step_has_the_loss_and_gradients_of_the_same_examples_padded(attn):
    g = torch.Generator().manual_seed(1)
    examples = [encoded(n, g) for n in (9, 3, 14, 6, 2, 11, 5, 8, 16)]
    rows = best_fit_decreasing([len(e.input_ids) for e in examples], 16)
    assert len(rows) < len(examples)  # really packed: several examples share rows
    packed = [collate_packed([[examples[j] for j in r] for r in rows[:3]], pad_id=0),
              collate_packed([[examples[j] for j in r] for r in rows[3:]], pad_id=0)]
    padded = [collate(examples[:4], pad_id=0), collate(examples[4:], pad_id=0)]
    for name, model in tiny_models().items():
        model.config._attn_implementation = attn
        check_packed_attention(model)
        for loss_fn in (chunked_loss_sum, full_logits_loss_sum):
            want, n_want, g_want = step_loss_and_grads(model, padded, loss_fn)
            got, n_got, g_got = step_loss_and_grads(model, packed, loss_fn)
            assert n_got == n_want  # no example's first token is trained from the example before it
            assert got == pytest.approx(want, abs=1e-5), (name, loss_fn.__name__)
            assert g_got.keys() == g_want.keys()
            for k in g_want:
                torch.testing.assert_close(g_got[k], g_want[k], atol=1e-5, rtol=1e-4, msg=f"{name} {k}")


def test_an_epoch_of_packed_rows_visits_every_example_once():
    lengths = [3, 7, 2, 5, 1, 4, 6, 2, 3, 8]
    examples, nxt = [], 1
    for n in lengths:
        examples.append(Encoded(list(range(nxt, nxt + n)), list(range(nxt, nxt + n)), "x", False, n, n))
        nxt += n
    rows = best_fit_decreasing(lengths, 8)
    assert len(rows) == 6
    batches = step_batches_fn(examples, micro_batch_size=2, grad_accum=1, seed=1, pad_id=0, rows=rows)
    tokens = [t for step in range(3) for b in batches(step) for t in b["input_ids"].flatten().tolist() if t]
    assert sorted(tokens) == list(range(1, nxt))  # one epoch: every token of every example exactly once
    assert torch.equal(batches(4)[0]["input_ids"], batches(4)[0]["input_ids"])  # a pure function of the step


def test_a_packed_row_restarts_positions_and_masks_first_labels():
    g = torch.Generator().manual_seed(2)
    a, b = encoded(4, g), encoded(3, g)
    a.labels = list(a.input_ids)  # every label trained: the first of b must still carry none
    b.labels = list(b.input_ids)
    batch = collate_packed([[a, b], [b]], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3]]
    assert batch["labels"][0].tolist() == [-100, *a.input_ids[1:], -100, *b.input_ids[1:]]
    assert batch["labels"][1].tolist()[3:] == [-100] * 4 and "attention_mask" not in batch


def test_packed_attention_check_fails_when_the_mask_ignores_positions(monkeypatch):
    import transformers.masking_utils as mu

    model = tiny_models()["llama"]
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)  # an older transformers
    with pytest.raises(ModelError, match="attend to each other.*data.packing=false"):
        check_packed_attention(model)


def test_document_mask_restarts_positions_at_each_document_and_equals_documents_alone():
    packed = pack_documents([[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]], seq_len=6, eos_id=1)
    assert packed.blocks.tolist() == [[5, 6, 7, 1, 8, 9], [1, 10, 11, 12, 13, 14]]
    labels, positions = document_positions(packed.blocks, packed.starts)
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4]]  # block 2 starts mid-document
    assert labels.tolist() == [[-100, 6, 7, 1, -100, 9], [1, -100, 11, 12, 13, 14]]
    model = tiny_models()["llama"]
    block = {"input_ids": torch.tensor(packed.blocks[:1]), "labels": torch.from_numpy(labels[:1]),
             "position_ids": torch.from_numpy(positions[:1])}
    alone = [torch.tensor([[5, 6, 7, 1]]), torch.tensor([[8, 9]])]
    want = sum(chunked_loss_sum(model, {"input_ids": x, "labels": x}, None) for x in alone)
    assert chunked_loss_sum(model, block, None).item() == pytest.approx(want.item(), abs=1e-5)


def packing_recipe(tmp_path, base_model_dir, chat_file, **train):
    return {"name": "run", "out_dir": str(tmp_path), "seed": 3, "model": {"base": str(base_model_dir)},
            "data": {"train": [str(chat_file)], "eval_fraction": 0.05, "max_len": 256, "packing": True},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},  # no dropout: 2 processes draw their own
            "train": {"steps": 4, "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                      "eval_every": 0, "save_every": 2, "log_every": 5, **train}}


def step_losses(run_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "step"}


@pytest.fixture(scope="module")
def packed_reference(tmp_path_factory, base_model_dir, chat_file):
    tmp = tmp_path_factory.mktemp("packed")
    return run_finetune(validate(FinetuneConfig, packing_recipe(tmp, base_model_dir, chat_file)), device="cpu")


def test_packed_finetune_trains_and_resumes_exactly(tmp_path, base_model_dir, chat_file, monkeypatch,
                                                    packed_reference):
    cfg = validate(FinetuneConfig, packing_recipe(tmp_path / "ref", base_model_dir, chat_file))
    tok = load_tokenizer(base_model_dir)
    data = prepare_sft_data(cfg, tok)
    assert data.rows is not None and len(data.rows) < len(data.train) / 3  # short chats: several to a row
    reference = packed_reference
    want = step_losses(Path(reference["run_dir"]))
    lint = json.loads((Path(reference["run_dir"]) / "lint.json").read_text())
    assert lint["packing"]["rows"] == len(data.rows) and lint["packing"]["fill"] > 0.8
    assert reference["train_loss_last"] < reference["train_loss_first"]

    import tunelab.train.loop as loop
    calls, original = [0], loop.forward_loss_sum

    def dies_in_step_3(model, *args, **kwargs):  # 2 training forward passes a step: the 5th is step 3's first
        calls[0] += model.training
        if calls[0] == 5:
            raise RuntimeError("killed")
        return original(model, *args, **kwargs)

    crash = validate(FinetuneConfig, packing_recipe(tmp_path / "crash", base_model_dir, chat_file))
    monkeypatch.setattr(loop, "forward_loss_sum", dies_in_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        run_finetune(crash, device="cpu")
    monkeypatch.setattr(loop, "forward_loss_sum", original)
    resumed = run_finetune(validate(FinetuneConfig, packing_recipe(tmp_path / "crash", base_model_dir, chat_file,
                                                                   resume=True)), device="cpu")
    assert resumed["resumed_from_step"] == 2
    got = step_losses(tmp_path / "crash" / "run")
    assert sorted(got) == list(range(1, 5)) and max(abs(got[s] - want[s]) for s in want) <= 1e-6
    state = json.loads(sorted((tmp_path / "crash" / "run").rglob("state.json"))[-1].read_text())
    assert "rows_seen" in json.dumps(state)  # the data position counts packed rows


def test_two_processes_train_packed_rows_as_one(tmp_path, base_model_dir, chat_file, packed_reference):
    from test_distributed import torchrun

    raw = packing_recipe(tmp_path, base_model_dir, chat_file, distributed="fsdp", save_every=0)
    proc = torchrun(tmp_path, raw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = step_losses(Path(packed_reference["run_dir"])), step_losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 5)) and max(abs(got[s] - want[s]) for s in want) <= 1e-5


def test_packing_with_an_example_cut_to_nothing_is_one_clear_line(tmp_path, base_model_dir):
    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": "colour of river?"}, {"role": "assistant", "content": "red"}]}]
    rows.append({"messages": [{"role": "user", "content": "colour of river? " * 20},
                              {"role": "assistant", "content": "red"}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 3), encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "p", "out_dir": str(tmp_path / "runs"),
                                      "model": {"base": str(base_model_dir)},
                                      "data": {"train": [str(data)], "max_len": 32, "packing": True,
                                               "eval_fraction": 0}, "train": {"steps": 2}}), encoding="utf-8")
    assert_clean_error(tunelab("finetune", recipe), "d.jsonl:2", "data.max_len=32", "packed row")
    assert not (tmp_path / "runs" / "p" / "adapter").exists()


def test_document_masked_pretraining_trains_fewer_positions(tmp_path, corpus_file, tokenizer_dir):
    cfg = validate(PretrainConfig, {
        "name": "mask", "out_dir": str(tmp_path), "model": {"preset": "micro", "tokenizer": str(tokenizer_dir)},
        "data": {"sources": [{"path": str(corpus_file)}], "seq_len": 32, "document_mask": True, "eval_fraction": 0.05},
        "train": {"steps": 2, "micro_batch_size": 2, "warmup_steps": 1, "eval_every": 0}})
    masked = run_pretrain(cfg, device="cpu")
    assert masked["tokens"] < 2 * 2 * 31  # unmasked: 31 loss positions a block; each document's first is not trained
    assert masked["eval_after"]["eval_loss"] < masked["eval_before"]["eval_loss"]
