import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tunelab.config import TrainSection
from tunelab.models import create_model, load_tokenizer
from tunelab.train.events import EventLog, read_events
from tunelab.train.loop import lr_at, train


def masked_examples(n: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Variable-length examples padded to 12, with a different number of loss tokens in each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + (i * 5) % 9
        ids = torch.randint(4, vocab, (12,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 3] = -100  # a prompt that carries no loss
        labels[length:] = -100  # padding
        mask = (torch.arange(12) < length).long()
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def run_one_step(model, examples, micro: int, accum: int, tmp_path):
    cfg = TrainSection(steps=1, micro_batch_size=micro, grad_accum=accum, lr=1e-3, warmup_steps=0,
                       weight_decay=0.0, eval_every=0, log_every=1, grad_clip=0)

    def step_batches(step):
        return [{k: torch.stack([e[k] for e in examples[m * micro:(m + 1) * micro]]) for k in examples[0]}
                for m in range(accum)]

    model = copy.deepcopy(model)
    with EventLog(tmp_path / f"events-{micro}x{accum}.jsonl") as events:
        result = train(model, list(model.parameters()), step_batches, cfg, events)
    return result.losses[0], torch.cat([p.detach().flatten() for p in model.parameters()])


def reference_loss_and_grad_norm(model, examples):
    """Mean token loss over all examples at once, computed directly, and its gradient norm."""
    model = copy.deepcopy(model)
    batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    return loss.item(), norm.item()


def test_accumulation_invariance_with_masked_variable_length_examples(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    model = create_model("micro", "llama", tok, seed=0)
    examples = masked_examples(8, len(tok))
    want_loss, want_norm = reference_loss_and_grad_norm(model, examples)
    ref_loss, ref_params = run_one_step(model, examples, 8, 1, tmp_path)
    for micro, accum in [(8, 1), (1, 8), (2, 4)]:
        loss, params = run_one_step(model, examples, micro, accum, tmp_path)
        step = read_events(tmp_path / f"events-{micro}x{accum}.jsonl")[0]
        # the logged loss and the gradient are those of one mean over every loss token of the window
        assert loss == pytest.approx(want_loss, abs=1e-5)
        assert step["grad_norm"] == pytest.approx(want_norm, rel=1e-4)
        assert torch.allclose(params, ref_params, atol=1e-5), (micro, accum)
    n_loss_tokens = sum(int((e["labels"][1:] != -100).sum()) for e in examples)
    assert step["tokens"] == n_loss_tokens


def test_non_finite_loss_stops_the_run_with_a_clear_error(tmp_path, tokenizer_dir):
    from tunelab.errors import TunelabError

    model = create_model("micro", "llama", load_tokenizer(tokenizer_dir), seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight[5, 0] = float("nan")
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[5, 6, 7, 8]])}
    cfg = TrainSection(steps=2, warmup_steps=0)
    with EventLog(tmp_path / "e.jsonl") as events, pytest.raises(TunelabError, match="step 1: .*not finite"):
        train(model, list(model.parameters()), lambda step: [batch], cfg, events)


def test_warmup_then_cosine_schedule():
    cfg = TrainSection(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def _amx(monkeypatch, present: bool) -> None:
    """This process's CPU, as `auto` sees it: with or without AMX, and no TUNELAB_CPU_BF16 (conftest sets 0)."""
    monkeypatch.delenv("TUNELAB_CPU_BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: present)


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_is_bf16_on_a_cpu_with_amx_only(monkeypatch, amx):
    from tunelab.models import inference_placement
    from tunelab.train.loop import autocast_dtype

    cpu = torch.device("cpu")
    _amx(monkeypatch, amx)
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if amx else None)
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", cpu) == torch.bfloat16
    if not torch.cuda.is_available():  # inference: the same rule on the CPU
        assert inference_placement("auto") == (cpu, torch.bfloat16 if amx else torch.float32)
        assert inference_placement("fp32") == (cpu, torch.float32)
    monkeypatch.setenv("TUNELAB_CPU_BF16", "0")  # the override, both ways
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setenv("TUNELAB_CPU_BF16", "1")
    assert autocast_dtype("auto", cpu) == torch.bfloat16 and autocast_dtype("fp32", cpu) is None


def test_a_bad_cpu_bf16_override_names_the_variable(monkeypatch):
    from tunelab.errors import ConfigError
    from tunelab.train.loop import autocast_dtype

    monkeypatch.setenv("TUNELAB_CPU_BF16", "yes")
    with pytest.raises(ConfigError, match=r"TUNELAB_CPU_BF16='yes'.*use 0.*1"):
        autocast_dtype("auto", torch.device("cpu"))


def test_auto_on_an_amx_cpu_trains_exactly_as_bf16(tmp_path, tokenizer_dir, monkeypatch):
    """The loop's `auto` on an AMX CPU is bf16 autocast: the same loss and update as `precision: bf16`, not fp32's."""
    tok = load_tokenizer(tokenizer_dir)
    model = create_model("micro", "llama", tok, seed=0)
    examples = masked_examples(4, len(tok))
    batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    _amx(monkeypatch, True)
    runs = {}
    for precision in ("auto", "bf16", "fp32"):
        net = copy.deepcopy(model)
        cfg = TrainSection(steps=2, micro_batch_size=4, lr=1e-3, warmup_steps=0, eval_every=0, log_every=1,
                           precision=precision)
        with EventLog(tmp_path / f"events-{precision}.jsonl") as events:
            result = train(net, list(net.parameters()), lambda step: [batch], cfg, events)
        runs[precision] = result.losses, torch.cat([p.detach().flatten() for p in net.parameters()])
    assert runs["auto"][0] == runs["bf16"][0] and torch.equal(runs["auto"][1], runs["bf16"][1])
    assert runs["auto"][0] != runs["fp32"][0] and all(math.isfinite(x) for x in runs["auto"][0])
    assert abs(runs["auto"][0][0] - runs["fp32"][0][0]) < 0.05  # the same loss, to bf16 precision
