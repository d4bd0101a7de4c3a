"""`tunelab finetune`: instruction / chat data → loss masks → a method (`tunelab/methods/`) → the training loop.

Supports: any local HF causal LM as the base (including one written by `tunelab pretrain`); Alpaca,
messages, ShareGPT and plain-text files (`tunelab/data/records.py`); the loss on assistant tokens only,
the last assistant turn or everything, masks derived from the tokenizer's own chat template
(`tunelab/data/chat.py`); LoRA, LoRA-Dash, DoRA, LLaMA-Adapter, QTHA or full fine-tuning (`tunelab/methods/`; an
event a method's `on_step` returns, e.g. LoRA-Dash's switch, goes to events.jsonl). Examples are shuffled once per
epoch from the seed and padded to the longest of each micro-batch; a step's micro-batches are a pure
function of the step number, so a run resumes from its checkpoints exactly (`checkpoint.py`). Under torchrun it
runs data-parallel, replicated or sharded by FSDP2 (`train.distributed`, `distributed.py`).

Packing (`data.packing: true`): the training examples are grouped once into rows of at most `data.max_len` tokens
by best-fit decreasing (`tunelab/data/packing.py`; no example is split, one longer than `max_len` is cut as
without packing and fills a row alone), and the rows, not the examples, are shuffled per epoch and batched
(`train.micro_batch_size` rows a micro-batch). In a row the position ids restart at each example and no attention
mask is passed, so transformers' mask keeps attention inside each example (checked on the model before training:
`loss.check_packed_attention`); an example's first label is -100, so no token is predicted from the example before
it. The loss is summed per trainable token and divided by the step's trainable tokens, so a step on packed rows has
the loss and gradients of the same examples padded. Evaluation stays per example (the same numbers either way).

Everything lands in `<out_dir>/<name>/`: `config.json`, `events.jsonl`, `lint.json`, `summary.json` and
`adapter/` (a PEFT LoRA / DoRA adapter directory, or tunelab's LLaMA-Adapter or QTHA one) or `model/` (full: a HF
model directory).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.config import FinetuneConfig, dump_config
from tunelab.data.chat import Encoded, chat_template_for, encode_example, template_special_ids
from tunelab.data.lint import format_lint, lint_examples
from tunelab.data.packing import best_fit_decreasing
from tunelab.data.records import Example, read_examples
from tunelab.errors import DataError, warn
from tunelab.io import atomic_write_json, clear_outputs
from tunelab.methods import build_method
from tunelab.models import count_parameters, load_model, load_tokenizer, record_trained_seq_len, untrained_rows
from tunelab.outputs import check_run_dir, open_run_dir
from tunelab.train.checkpoint import begin_events, checkpoint_callback, fingerprint, prepare_resume, resume_note
from tunelab.train.distributed import (
    broadcast_parameters,
    check_fsdp,
    cleanup,
    full_parameters,
    init_distributed,
    shard_model,
    uses_fsdp,
)
from tunelab.train.events import EventLog, LiveView
from tunelab.train.loop import autocast_dtype, count_loss_tokens, forward_loss_sum, train
from tunelab.train.loss import check_packed_attention


@dataclass
class SFTData:
    """Encoded training and evaluation examples, the chat template used, and the lint report."""

    train: list[Encoded]
    eval: list[Encoded]
    template: str
    lint: dict[str, Any]
    rows: list[list[int]] | None = None  # data.packing: the training examples (indices) of each packed row

    @property
    def n_units(self) -> int:
        """What an epoch walks through: packed rows, or examples."""
        return len(self.rows) if self.rows is not None else len(self.train)


def read_all(paths: list[str], fmt: str, same_role: str) -> list[Example]:
    """Every example of every path, in order."""
    return [ex for p in paths for ex in read_examples(p, fmt, same_role)]


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded random `fraction` of the examples (at least one when there are two or more)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(np.random.default_rng(seed).permutation(len(examples))[:n_eval].tolist())
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def prepare_sft_data(cfg: FinetuneConfig, tokenizer) -> SFTData:
    """Read, split, encode and lint the data; examples without a trainable token stop the run unless allowed."""
    d = cfg.data
    template = chat_template_for(tokenizer, d.chat_template)
    train_ex = read_all(d.train, d.format, d.same_role)
    if d.eval:
        eval_ex = read_all(d.eval, d.format, d.same_role)
    else:
        train_ex, eval_ex = split_examples(train_ex, d.eval_fraction, cfg.seed)
    train_enc = [encode_example(ex, tokenizer, template, d.max_len, d.train_on) for ex in train_ex]
    eval_enc = [encode_example(ex, tokenizer, template, d.max_len, d.train_on) for ex in eval_ex]
    report = lint_examples(train_enc, eval_enc, train_ex, eval_ex)
    empty = [e.where for e in train_enc if e.n_trainable == 0]
    if empty and not d.allow_empty:
        raise DataError(f"{len(empty)} training example(s) have no trainable token (first: {', '.join(empty[:3])}): "
                        f"no assistant turn, or every assistant token was cut at data.max_len={d.max_len}"
                        f"{' (a packed row holds at most data.max_len tokens too)' if d.packing else ''}; "
                        f"raise data.max_len, fix the data, or set data.allow_empty=true to drop them")
    train_enc = [e for e in train_enc if e.n_trainable > 0]
    eval_enc = [e for e in eval_enc if e.n_trainable > 0]
    if not train_enc:
        raise DataError(f"{', '.join(d.train)}: no training example with a trainable token")
    rows = best_fit_decreasing([len(e.input_ids) for e in train_enc], d.max_len) if d.packing else None
    if rows is not None:
        tokens = sum(len(e.input_ids) for e in train_enc)
        report["packing"] = {"rows": len(rows), "examples": len(train_enc), "tokens": tokens,
                             "fill": round(tokens / (len(rows) * d.max_len), 4)}
    return SFTData(train_enc, eval_enc, template, report, rows)


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pad id in the inputs, -100 in the labels, 0 in the attention mask."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(rows: list[list[Encoded]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows, right-padded to the longest: position ids restart at each example (and at the padding, its own
    segment), the first label of each example is -100, no attention mask (attention follows the position ids)."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[i, at:at + n] = torch.tensor(e.input_ids)
            labels[i, at + 1:at + n] = torch.tensor(e.labels[1:], dtype=torch.long)
            positions[i, at:at + n] = torch.arange(n)
            at += n
        positions[i, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def sample_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """The seeded permutation of the `n` training examples (or packed rows) for `epoch` (a pure function:
    resumable)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_batches_fn(examples: list[Encoded], micro_batch_size: int, grad_accum: int, seed: int, pad_id: int,
                    rows: list[list[int]] | None = None):
    """`step -> micro-batches`: sample k of the run is unit `sample_order(n, k // n)[k % n]`, a unit being an
    example, or with `rows` (data.packing) a packed row of examples."""
    n = len(rows) if rows is not None else len(examples)

    def step_batches(step: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for m in range(grad_accum):
            lo = (step * grad_accum + m) * micro_batch_size
            picked = [sample_order(n, k // n, seed)[k % n] for k in range(lo, lo + micro_batch_size)]
            if rows is None:
                out.append(collate([examples[i] for i in picked], pad_id))
            else:
                out.append(collate_packed([[examples[j] for j in rows[i]] for i in picked], pad_id))
        return out
    return step_batches


@torch.no_grad()
def example_loss(model: torch.nn.Module, examples: list[Encoded], micro_batch_size: int, max_batches: int,
                 pad_id: int, precision: str = "auto") -> dict[str, float]:
    """Token-weighted mean loss (and perplexity) over the trainable tokens of up to `max_batches` micro-batches."""
    examples = examples[: micro_batch_size * max_batches]
    if not examples:
        return {}
    device = next(model.parameters()).device
    dtype = autocast_dtype(precision, device)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), micro_batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + micro_batch_size], pad_id).items()}
        total += forward_loss_sum(model, batch, dtype).item()
        count += count_loss_tokens(batch)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


def resolve_steps(cfg: FinetuneConfig, n_examples: int) -> int:
    """`train.steps`, or enough steps for `train.epochs` passes over the training examples (packed rows, with
    data.packing)."""
    t = cfg.train
    if t.epochs is None:
        return t.steps
    steps = max(1, math.ceil(t.epochs * n_examples / (t.micro_batch_size * t.grad_accum)))
    if "steps" in t.model_fields_set:
        warn(f"train.epochs={t.epochs:g} decides the number of steps ({steps}), so train.steps={t.steps} is ignored; "
             f"set only one of them (train.epochs=null to train {t.steps} steps)")
    return steps


RUN_KIND = "finetune run"
RUN_ENTRIES = ["config.json", "lint.json", "events.jsonl", "summary.json", "model", "adapter", "checkpoints"]


def run_inputs(cfg: FinetuneConfig, recipe: str | Path | None = None) -> dict[str, Any]:
    """Every path a fine-tuning run reads, which none of its outputs may touch."""
    template = cfg.data.chat_template
    return {"base model": cfg.model.base, "tokenizer": cfg.model.tokenizer,
            "data": list(cfg.data.train) + list(cfg.data.eval),
            "chat template": template if template not in (None, "chatml", "plain") else None, "recipe": recipe}


def run_finetune(cfg: FinetuneConfig, device: str | None = None, view: LiveView | None = None,
                 recipe: str | Path | None = None, command: str | None = None) -> dict[str, Any]:
    """Run (or resume) a whole fine-tuning job; returns (and writes) its summary. `recipe` is the YAML it came
    from, if any (an input no output may touch); `command` the command line that started it (recorded in the start
    event, for the resume command `tunelab runs` prints)."""
    dist = init_distributed()
    fsdp = uses_fsdp(cfg.train.distributed, dist)
    if fsdp:
        check_fsdp(device or dist.device)
    run_dir = check_run_dir(Path(cfg.out_dir) / cfg.name, RUN_KIND, RUN_ENTRIES, run_inputs(cfg, recipe))
    model = load_model(cfg.model.base)  # first: a wrong model.base is reported as the model, not its tokenizer
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.base)
    data = prepare_sft_data(cfg, tokenizer)
    steps = resolve_steps(cfg, data.n_units)
    t = cfg.train.model_copy(update={"steps": steps})
    torch.manual_seed(cfg.seed)  # the adapter's initialisation, dropout
    method = build_method(cfg.method)
    method.inject(model)
    if dist.is_main:
        warn_untrained_template_tokens(model, tokenizer, data.template, cfg)
    if not fsdp:  # FSDP moves each shard to the device as it shards the model
        model.to(device or dist.device)
    if data.rows is not None:
        check_packed_attention(model)
    config = dump_config(cfg)
    open_run_dir(run_dir, RUN_KIND)
    resume, saver = prepare_resume(run_dir, t, config, fingerprint(cfg.data.train + cfg.data.eval), method,
                                   dist.rank, dist.world_size)
    broadcast_parameters(method.trainable_parameters(), dist)
    net = shard_model(model, dist, device or dist.device) if fsdp else model  # what trains and evaluates
    view = view or LiveView(steps, t.log_every, quiet=not dist.is_main)
    n_total, n_train = count_parameters(model), method.num_parameters()
    view.note(f"model: {cfg.model.base}, {n_total / 1e6:.2f}M parameters; method {cfg.method.name}: "
              f"{n_train:,} trainable ({n_train / n_total:.3%})")
    for line in format_lint(data.lint):
        view.note(line)
    unit = "packed rows" if data.rows is not None else "examples"
    if data.rows is not None:
        p = data.lint["packing"]
        view.note(f"packing: {p['examples']} examples in {p['rows']} rows of data.max_len={cfg.data.max_len} "
                  f"({p['fill']:.1%} of the row tokens are example tokens)")
    view.note(f"{steps} steps x {t.micro_batch_size * t.grad_accum} {unit} "
              f"({steps * t.micro_batch_size * t.grad_accum / data.n_units:.2f} epochs of {data.n_units})"
              + (f" on {dist.world_size} processes" if dist.world_size > 1 else "")
              + (", parameters sharded (FSDP)" if fsdp else ""))
    if resume is not None:
        view.note(f"resuming from {resume.path} (step {resume.step} of {steps})")
    pad_id = tokenizer.pad_token_id

    def evaluate() -> dict[str, float]:
        return example_loss(net, data.eval, t.micro_batch_size, t.eval_batches, pad_id, t.precision)

    has_eval = bool(data.eval)
    per_step, n = t.micro_batch_size * t.grad_accum, data.n_units

    def position(step: int) -> dict[str, Any]:
        seen = step * per_step
        return {("rows_seen" if data.rows is not None else "examples_seen"): seen, "epoch": seen // n,
                "offset": seen % n, "order": f"numpy default_rng([seed={cfg.seed}, epoch]).permutation({n})"
                + (" of the packed rows (best-fit decreasing)" if data.rows is not None else "")}

    if dist.is_main:
        atomic_write_json(run_dir / "config.json", config)
        atomic_write_json(run_dir / "lint.json", data.lint)
        clear_outputs(run_dir, ["summary.json", "model", "adapter"])
    with EventLog(run_dir / "events.jsonl" if dist.is_main else os.devnull, append=resume is not None) as events:
        before = begin_events(events, resume, evaluate if has_eval else None, dist.world_size, config=config,
                              parameters=n_total, trainable_parameters=n_train, steps=steps, lint=data.lint,
                              command=command)
        batches = step_batches_fn(data.train, t.micro_batch_size, t.grad_accum, cfg.seed, pad_id, data.rows)
        result = train(net, method.trainable_parameters(), batches, t, events, evaluate if has_eval else None, view,
                       checkpoint_callback(saver, method, steps, position), resume,
                       method_hook(method, events, view, dist), dist)
        after = result.evals[-1] if result.evals else {}
        summary = {
            "run_dir": str(run_dir), "method": cfg.method.name,
            "output_dir": str(run_dir / ("model" if cfg.method.name == "full" else "adapter")),
            "base": cfg.model.base, "parameters": n_total, "trainable_parameters": n_train,
            "steps": steps, "examples": len(data.train), "eval_examples": len(data.eval),
            "train_loss_first": result.losses[0], "train_loss_last": result.losses[-1],
            "eval_before": _metrics(before), "eval_after": _metrics(after),
            "tokens": result.tokens, "tokens_per_s": round(result.tokens_per_s, 1),
            "train_wall_s": round(result.wall_s, 2), "total_wall_s": round(saver.elapsed(), 2),
            "peak_memory_mb": round(result.peak_memory_mb, 1), "resumed_from_step": resume.step if resume else None,
            **resume_note(resume),
        }
        with full_parameters(net, dist, frozen=cfg.method.name == "full"):  # FSDP: full tensors on rank 0
            if dist.is_main:
                tokenizer.chat_template = data.template  # the saved tokenizer renders prompts as training did
                record_trained_seq_len(model, max(len(e.input_ids) for e in data.train), from_scratch=False)
                method.save(summary["output_dir"], base_model_path=str(Path(cfg.model.base).resolve()),
                            tokenizer=tokenizer)
                events.write("end", **summary)
    if dist.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    cleanup(dist)
    return summary


def warn_untrained_template_tokens(model, tokenizer, template: str, cfg: FinetuneConfig) -> None:
    """Warn when the chat template's special tokens have embeddings that were never trained and stay frozen."""
    if model.get_input_embeddings().weight.requires_grad:
        return  # full fine-tuning trains them
    bad = untrained_rows(model, template_special_ids(tokenizer, template), len(tokenizer))
    if bad:
        names = ", ".join(tokenizer.convert_ids_to_tokens(i) for i in bad)
        warn(f"{cfg.model.base}: the chat template's {names} look never trained (their embedding rows sit with the "
             f"unused rows), and method {cfg.method.name} keeps the embeddings frozen, so the model cannot learn to "
             f"read them; use data.chat_template=plain (answers end with EOS), or method.name=full")


def method_hook(method, events: EventLog, view: LiveView, dist):
    """The loop's `on_step`: the method's hook, with any event it returns (e.g. LoRA-Dash's switch) written."""
    def on_step(step: int) -> None:
        event = method.on_step(step)
        if event and dist.is_main:
            fields = dict(event)
            name = fields.pop("event")
            events.write(name, **fields)
            view.note(f"step {step}: {name} " + ", ".join(f"{k} {v}" for k, v in fields.items() if k != "step"))
    return on_step


def _metrics(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("step", "event", "time")}
