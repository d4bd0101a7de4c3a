"""`tunelab pretrain`: text sources → packed blocks → weighted mixture → the training loop → an HF model.

Pretrain a size preset from scratch (with a tokenizer directory) or continue pretraining any local
model. Held-out documents give the eval loss and perplexity before and after. With `data.document_mask: true`
positions restart at each document inside a block and attention stays inside each document, in training and in the
eval loss (`tunelab/data/packing.py`, `document_positions`). Everything lands in
`<out_dir>/<name>/`: `events.jsonl`, `config.json` (the resolved recipe), `summary.json`, `model/`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.config import PretrainConfig, dump_config
from tunelab.data.mixture import Schedule, mixture_schedule
from tunelab.data.packing import Packed, document_positions, pack_documents, tokenize_documents
from tunelab.data.text import read_documents
from tunelab.errors import ConfigError
from tunelab.io import atomic_write_json, clear_outputs
from tunelab.methods import Full
from tunelab.models import (
    count_parameters,
    create_model,
    load_model,
    load_tokenizer,
    record_trained_seq_len,
    save_model,
)
from tunelab.outputs import check_run_dir, open_run_dir
from tunelab.train.checkpoint import begin_events, checkpoint_callback, fingerprint, prepare_resume, resume_note
from tunelab.train.distributed import check_fsdp, cleanup, full_parameters, init_distributed, shard_model, uses_fsdp
from tunelab.train.events import EventLog, LiveView
from tunelab.train.loop import autocast_dtype, count_loss_tokens, forward_loss_sum, train
from tunelab.train.loss import check_packed_attention


@dataclass
class PretrainData:
    """Packed training blocks per source, the mixture schedule over them, and packed eval blocks."""

    sources: list[Packed]
    schedule: Schedule
    eval_blocks: np.ndarray
    report: list[dict[str, Any]]
    eval_starts: np.ndarray | None = None  # where each eval document begins (for data.document_mask)


def prepare_data(cfg: PretrainConfig, tokenizer) -> PretrainData:
    """Read, split, tokenize and pack every source; draw the mixture schedule for the whole run."""
    seq_len, eos = cfg.data.seq_len, tokenizer.eos_token_id
    train_packed, eval_docs, report = [], [], []
    for i, src in enumerate(cfg.data.sources):
        docs = read_documents(src.path, src.text_key)
        if not cfg.data.eval_paths and cfg.data.eval_fraction > 0:
            docs, held_out = split_documents(docs, cfg.data.eval_fraction, cfg.seed + i)
            eval_docs.extend(held_out)
        packed = pack_documents(tokenize_documents(docs, tokenizer), seq_len, eos, where=src.path)
        train_packed.append(packed)
    for path in cfg.data.eval_paths:
        eval_docs.extend(read_documents(path, cfg.data.eval_text_key))
    n_samples = cfg.train.steps * cfg.train.grad_accum * cfg.train.micro_batch_size
    weights = [s.weight for s in cfg.data.sources]
    schedule = mixture_schedule([p.blocks.shape[0] for p in train_packed], weights, n_samples, cfg.seed)
    counts, epochs = schedule.counts(), schedule.effective_epochs()
    for src, packed, w, c, e in zip(cfg.data.sources, train_packed, weights, counts, epochs):
        report.append({"path": src.path, "weight": w / sum(weights), "documents": packed.n_docs,
                       "tokens": packed.n_tokens, "blocks": int(packed.blocks.shape[0]),
                       "packing_efficiency": round(packed.efficiency, 5), "samples": c,
                       "share": round(c / n_samples, 4), "effective_epochs": round(e, 3)})
    eval_blocks, eval_starts = np.empty((0, seq_len), dtype=np.int64), None
    if eval_docs:
        eval_tokens = tokenize_documents(eval_docs, tokenizer)
        n = sum(len(t) + 1 for t in eval_tokens)
        packed = pack_documents(eval_tokens, min(seq_len, n), eos, where="held-out eval text")
        eval_blocks, eval_starts = packed.blocks, packed.starts
    return PretrainData(train_packed, schedule, eval_blocks, report, eval_starts)


def split_documents(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out a seeded random `fraction` of documents (at least one when there are two or more)."""
    if len(docs) < 2:
        return docs, []
    n_eval = min(len(docs) - 1, max(1, round(len(docs) * fraction)))
    held = set(np.random.default_rng(seed).permutation(len(docs))[:n_eval].tolist())
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def block_batch(blocks: np.ndarray, starts: np.ndarray | None) -> dict[str, torch.Tensor]:
    """A micro-batch of blocks; with the document starts (data.document_mask), its document-masked labels and
    position ids."""
    ids = torch.from_numpy(blocks)
    if starts is None:
        return {"input_ids": ids, "labels": ids}
    labels, positions = document_positions(blocks, starts)
    return {"input_ids": ids, "labels": torch.from_numpy(labels), "position_ids": torch.from_numpy(positions)}


def step_batches_fn(data: PretrainData, micro_batch_size: int, grad_accum: int, document_mask: bool = False):
    """`step -> micro-batches` over the schedule: sample k of the run is schedule entry k."""
    def step_batches(step: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for m in range(grad_accum):
            lo = (step * grad_accum + m) * micro_batch_size
            picked = list(zip(data.schedule.source[lo:lo + micro_batch_size],
                              data.schedule.index[lo:lo + micro_batch_size]))
            blocks = np.stack([data.sources[s].blocks[i] for s, i in picked])
            starts = np.stack([data.sources[s].starts[i] for s, i in picked]) if document_mask else None
            out.append(block_batch(blocks, starts))
        return out
    return step_batches


@torch.no_grad()
def block_loss(model: torch.nn.Module, blocks: np.ndarray, micro_batch_size: int, max_batches: int,
               precision: str = "auto", starts: np.ndarray | None = None) -> dict[str, float]:
    """Token-weighted mean next-token loss and perplexity over (evenly spaced) packed blocks; document-masked
    when given the document `starts`."""
    n = min(len(blocks), micro_batch_size * max_batches)
    if n == 0:
        return {}
    pick = np.linspace(0, len(blocks) - 1, n).round().astype(int)
    device = next(model.parameters()).device
    dtype = autocast_dtype(precision, device)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n, micro_batch_size):
        rows = pick[i:i + micro_batch_size]
        batch = block_batch(blocks[rows], None if starts is None else starts[rows])
        batch = {k: v.to(device) for k, v in batch.items()}
        total += forward_loss_sum(model, batch, dtype).item()
        count += count_loss_tokens(batch)
    loss = total / count
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


def build_model(cfg: PretrainConfig):
    """(model, tokenizer) from the recipe: continue from `model.base` or create `model.preset`."""
    m = cfg.model
    model = load_model(m.base) if m.base is not None else None
    tokenizer = load_tokenizer(m.tokenizer or m.base)
    if model is None:
        model = create_model(m.preset, m.arch, tokenizer, seed=cfg.seed)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"tokenizer {m.tokenizer or m.base} has {len(tokenizer)} tokens but the model's "
                          f"embedding has {model.get_input_embeddings().num_embeddings} rows; use the model's "
                          f"own tokenizer (or resize the model for an extended vocabulary)")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.data.seq_len > max_pos:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's maximum positions "
                          f"({max_pos}, config.max_position_embeddings); set data.seq_len to at most {max_pos}")
    return model, tokenizer


RUN_KIND = "pretrain run"
RUN_ENTRIES = ["config.json", "events.jsonl", "summary.json", "model", "checkpoints"]


def run_inputs(cfg: PretrainConfig, recipe: str | Path | None = None) -> dict[str, Any]:
    """Every path a pretraining run reads, which none of its outputs may touch."""
    return {"base model": cfg.model.base, "tokenizer": cfg.model.tokenizer,
            "data": [s.path for s in cfg.data.sources] + list(cfg.data.eval_paths), "recipe": recipe}


def run_pretrain(cfg: PretrainConfig, device: str | None = None, recipe: str | Path | None = None,
                 command: str | None = None) -> dict[str, Any]:
    """Run (or resume) a whole pretraining job; returns (and writes) its summary. `recipe` is the YAML it came
    from, if any (an input no output may touch); `command` the command line that started it (recorded in the start
    event, for the resume command `tunelab runs` prints)."""
    dist = init_distributed()
    fsdp = uses_fsdp(cfg.train.distributed, dist)
    if fsdp:
        check_fsdp(device or dist.device)
    run_dir = check_run_dir(Path(cfg.out_dir) / cfg.name, RUN_KIND, RUN_ENTRIES, run_inputs(cfg, recipe))
    model, tokenizer = build_model(cfg)
    data = prepare_data(cfg, tokenizer)
    if not fsdp:  # FSDP moves each shard to the device as it shards the model
        model.to(device or dist.device)
    if cfg.data.document_mask:
        check_packed_attention(model, "data.document_mask")
    method = Full()  # every weight trains; the method gives checkpoints their tensors
    method.inject(model)
    config = dump_config(cfg)
    sources = [s.path for s in cfg.data.sources] + list(cfg.data.eval_paths)
    open_run_dir(run_dir, RUN_KIND)
    resume, saver = prepare_resume(run_dir, cfg.train, config, fingerprint(sources), method, dist.rank,
                                   dist.world_size)
    net = shard_model(model, dist, device or dist.device) if fsdp else model  # what trains and evaluates
    t = cfg.train
    view = LiveView(t.steps, t.log_every, quiet=not dist.is_main)
    n_params = count_parameters(model)
    view.note(f"model: {cfg.model.base or f'{cfg.model.preset} {cfg.model.arch}'}, {n_params / 1e6:.2f}M "
              f"parameters, vocab {len(tokenizer)}; seq_len {cfg.data.seq_len}, "
              f"{t.steps} steps x {t.micro_batch_size * t.grad_accum} blocks"
              + (f" on {dist.world_size} processes" if dist.world_size > 1 else "")
              + (", parameters sharded (FSDP)" if fsdp else ""))
    for r in data.report:
        view.note(f"source {r['path']}: {r['documents']} docs, {r['tokens']:,} tokens, {r['blocks']} blocks, "
                  f"packing {r['packing_efficiency']:.2%}, weight {r['weight']:.2f} -> share {r['share']:.2f}, "
                  f"{r['effective_epochs']:.2f} epochs")
    if len(data.eval_blocks) == 0:
        view.note("no held-out text (data.eval_fraction=0 and no data.eval_paths): no eval loss")
    if resume is not None:
        view.note(f"resuming from {resume.path} (step {resume.step} of {t.steps})")

    def evaluate() -> dict[str, float]:
        return block_loss(net, data.eval_blocks, t.micro_batch_size, t.eval_batches, t.precision,
                          data.eval_starts if cfg.data.document_mask else None)

    has_eval = len(data.eval_blocks) > 0
    if dist.is_main:
        atomic_write_json(run_dir / "config.json", config)
        clear_outputs(run_dir, ["summary.json", "model"])  # no stale results beside this run's events
    if resume is None:
        torch.manual_seed(cfg.seed)  # dropout and anything else random in training
    with EventLog(run_dir / "events.jsonl" if dist.is_main else os.devnull, append=resume is not None) as events:
        before = begin_events(events, resume, evaluate if has_eval else None, dist.world_size, config=config,
                              parameters=n_params, sources=data.report, command=command)
        result = train(net, method.trainable_parameters(),
                       step_batches_fn(data, t.micro_batch_size, t.grad_accum, cfg.data.document_mask), t, events,
                       evaluate if has_eval else None, view,
                       checkpoint_callback(saver, method, t.steps, lambda step: {
                           "blocks_seen": step * t.micro_batch_size * t.grad_accum,
                           "order": f"mixture schedule of seed {cfg.seed}"}),
                       resume, None, dist)
        after = result.evals[-1] if result.evals else {}
        summary = {
            "run_dir": str(run_dir), "model_dir": str(run_dir / "model"), "parameters": n_params,
            "steps": t.steps, "train_loss_first": result.losses[0], "train_loss_last": result.losses[-1],
            "eval_before": before, "eval_after": {k: v for k, v in after.items() if k != "step"},
            "tokens": result.tokens, "tokens_per_s": round(result.tokens_per_s, 1),
            "train_wall_s": round(result.wall_s, 2), "total_wall_s": round(saver.elapsed(), 2),
            "peak_memory_mb": round(result.peak_memory_mb, 1), "sources": data.report,
            "resumed_from_step": resume.step if resume else None, **resume_note(resume),
        }
        with full_parameters(net, dist, frozen=True):  # FSDP: the whole model in full on rank 0
            if dist.is_main:
                record_trained_seq_len(model, cfg.data.seq_len, from_scratch=cfg.model.base is None)
                save_model(model, tokenizer, run_dir / "model")
        if dist.is_main:
            events.write("end", **{k: v for k, v in summary.items() if k != "sources"})
    if dist.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    cleanup(dist)
    return summary
