"""`tunelab checkpoint export`: a checkpoint, full or sharded and of any number of processes, as what the run
would have written had it ended there: a plain HF model directory (pretraining, full fine-tuning) or the method's
adapter directory (a PEFT one for LoRA, LoRA-Dash and DoRA).

The recipe comes from the checkpoint's `state.json`; the base model and tokenizer it names are read again (they
must still be where the run found them). Runs on one process: a sharded checkpoint's shards are read whole.
Not here: the `tunelab_train_seq_len` record of a fine-tuned full model whose base had one (the run took it from
its data; the export keeps the base's, the lower of the two).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunelab.config import FinetuneConfig, PretrainConfig, validate
from tunelab.outputs import check_outputs
from tunelab.train.checkpoint import checkpoint_tensors, latest_checkpoint, read_state
from tunelab.train.sharded import CheckpointError, is_sharded


def resolve_checkpoint(path: str | Path) -> Path:
    """`path` itself when it is a checkpoint directory; a run directory's latest checkpoint otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint directory; give <run>/checkpoints/step-NNNNNN or a run "
                              f"directory (its latest checkpoint)")
    if (p / "state.json").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p}: not a tunelab checkpoint (no state.json) nor a run directory with a complete "
                              f"one (no checkpoints/latest); give <run>/checkpoints/step-NNNNNN")
    return latest


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write checkpoint `checkpoint` (or a run's latest) to `out` as an HF model or adapter directory."""
    path = resolve_checkpoint(checkpoint)
    state = read_state(path)
    config = state["config"]
    fine_tune = isinstance(config, dict) and "method" in config
    cfg = validate(FinetuneConfig if fine_tune else PretrainConfig, config, source=f"{path}/state.json")
    if fine_tune:
        kind = _export_finetune(cfg, path, out)
    else:
        kind = _export_pretrain(cfg, path, out)
    return {"checkpoint": str(path), "step": state["step"], "kind": kind, "out_dir": str(out),
            "format": "sharded" if is_sharded(path) else "full", "world_size": state.get("world_size", 1),
            "stage": "finetune" if fine_tune else "pretrain"}


def _run_checkpoints(path: Path) -> dict[str, Path]:
    """The run's checkpoints directory holding `path`, as an input: a rerun of the run prunes what lies there."""
    return {"run's checkpoints": path.parent} if path.parent.name == "checkpoints" else {}


def _load_into(method, path: Path) -> None:
    with torch.no_grad():
        method.load_state_dict(checkpoint_tensors(path, method))


def _export_finetune(cfg: FinetuneConfig, path: Path, out: str | Path) -> str:
    from tunelab.data.chat import chat_template_for
    from tunelab.methods import build_method
    from tunelab.models import load_model, load_tokenizer

    base = cfg.model.base
    check_outputs([out], {"checkpoint": path, **_run_checkpoints(path), "base model": base,
                          "tokenizer": cfg.model.tokenizer})
    model = load_model(base)
    tokenizer = load_tokenizer(cfg.model.tokenizer or base)
    tokenizer.chat_template = chat_template_for(tokenizer, cfg.data.chat_template)  # as the run saved it
    method = build_method(cfg.method)
    method.inject(model)
    _load_into(method, path)
    method.save(out, base_model_path=str(Path(base).resolve()), tokenizer=tokenizer)
    return "model" if cfg.method.name == "full" else "adapter"


def _export_pretrain(cfg: PretrainConfig, path: Path, out: str | Path) -> str:
    from tunelab.methods import Full
    from tunelab.models import record_trained_seq_len, save_model
    from tunelab.train.pretrain import build_model

    inputs = {"checkpoint": path, "base model": cfg.model.base, "tokenizer": cfg.model.tokenizer}
    check_outputs([out], {**inputs, **_run_checkpoints(path)})
    model, tokenizer = build_model(cfg)
    method = Full()
    method.inject(model)
    _load_into(method, path)
    record_trained_seq_len(model, cfg.data.seq_len, from_scratch=cfg.model.base is None)
    save_model(model, tokenizer, out, inputs=inputs)
    return "model"
