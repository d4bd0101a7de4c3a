"""`tunelab compare`: a method bake-off on one base model, one data set, one token budget and one seed.

Every entry of the recipe's `methods:` list becomes an ordinary fine-tuning run (`run_finetune`) under
`<out_dir>/<name>/runs/<label>/`, with the shared `model`, `data` and `train` sections: the same steps,
micro-batch, accumulation and `max_len`, hence the same batches in the same order. An entry may override
other `train` keys (a higher lr for LLaMA-Adapter, say); the override is recorded and shown beside the
results, since it changes the comparison. Each run is measured the same way: trainable parameters, the final
train loss (mean of the last `final_loss_steps` steps, default 10% of the steps), the held-out eval loss
(`data.eval`, or `data.eval_fraction` of the examples), strict accuracy of the saved model on `eval:` prompts
with answers (greedy, `tunelab/evaluate/generation.py`), trained tokens/s, peak memory and wall time.

Each method runs in a child process (forked from a clean server process that has only imported tunelab), so
its peak memory is its own and a crash, an out-of-memory kill or a bad setting fails that method only: the
row says `failed` with the one-line error (the traceback is in the run's `error.json`) and the comparison goes
on. Entries whose settings do not validate fail the same way, before anything trains. A data error (say, an
example with nothing to train on) is no method's failure: every method shares the data, so the comparison
stops with it (exit code 2 on the command line). A method is reused, not retrained, when its run directory
holds a finished run (`compare.json`, written last) made with the same fine-tuning recipe, data files and base
model files; a changed entry reruns only that entry, and an interrupted comparison continues where it stopped.
A changed `eval:` section re-evaluates the saved models without retraining them.

Optionally a `pretrain:` section makes the base model first (a tokenizer and a preset pretrained on the text
of the training examples, the held-out ones excluded), once, under `<out_dir>/<name>/base/`.

Results: `results.json` (every number and each method's per-step losses), `results.csv` (one row per
method) and `report.html` (one self-contained page: the table with the best value of each column marked, the
winner, the training-loss curves and eval loss against trainable parameters as inline SVG). Results are
written at the end, atomically; a stale report is removed when a comparison starts.
Not supported: running under torchrun (the methods run one after another, each in its own process).
Called from Python, `run_compare` must run under `if __name__ == "__main__":` in a script (it starts processes).
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import html
import io
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab import __version__
from tunelab.config import (
    CompareConfig,
    FinetuneConfig,
    FinetuneTrain,
    GenerationTask,
    MethodSection,
    ModelSection,
    PretrainConfig,
    PretrainData,
    Source,
    dump_config,
    validate,
)
from tunelab.errors import ConfigError, DataError, ModelError, TunelabError
from tunelab.evaluate.generation import Item, evaluate_generation, read_prompts
from tunelab.evaluate.report import CSS, _table
from tunelab.io import atomic_write_json, atomic_write_text, clear_outputs, ensure_writable_dir
from tunelab.train.checkpoint import fingerprint
from tunelab.train.events import EventLog, read_events
from tunelab.train.finetune import read_all, run_finetune, split_examples

RECORD, ERROR = "compare.json", "error.json"  # in each run directory: the finished method / why it failed
BUDGET_KEYS = ("steps", "epochs", "eval_batches")  # the same for every method: not overridable per entry
# recipe keys that do not change what a run computes (a run directory may move; logging and saving may differ)
FREE_TRAIN_KEYS = ("log_every", "save_every", "keep_checkpoints", "resume", "resume_force")
OUTPUTS = ["results.json", "results.csv", "report.html"]


@dataclass
class Plan:
    """One entry of `methods:`: its fine-tuning recipe, or why it cannot run."""

    index: int
    label: str
    settings: dict[str, Any]  # the entry's method keys as written (name, r, ...)
    overrides: dict[str, Any]  # the entry's train overrides as written
    cfg: FinetuneConfig | None = None
    error: str | None = None
    key: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# the stage


def run_compare(cfg: CompareConfig, only: list[str] | None = None, rerun: bool = False,
                log: Callable[[str], None] = print, source: str = "recipe") -> dict[str, Any]:
    """Run (or reuse) every method of `cfg`, then write results.json, results.csv and report.html.

    `only` restricts the comparison to those labels; `rerun` retrains methods even when a finished run with
    the same settings exists. Returns the results (as written to results.json) with the output paths.
    """
    started = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("tunelab compare runs its methods one after another, each in its own process; run it "
                          "without torchrun (a method's run may not be distributed)")
    out = ensure_writable_dir(Path(cfg.out_dir) / cfg.name, "comparison directory")
    entries = _select(cfg, only)
    items = _preflight(cfg)
    clear_outputs(out, OUTPUTS)
    ctx: Any = None

    def context():
        nonlocal ctx
        ctx = ctx or _context()
        return ctx

    with EventLog(out / "events.jsonl") as events:
        events.write("start", config=dump_config(cfg), only=only, rerun=rerun)
        base, base_record = _base_model(cfg, out, context, log)
        data_fp = fingerprint(cfg.data.train + cfg.data.eval)
        base_sig = _dir_signature(base)
        eval_key = _eval_key(cfg.eval)
        plans = [_plan(cfg, i, e, base, out / "runs", source, data_fp, base_sig) for i, e in entries]
        if cfg.baseline and cfg.baseline not in {p.label for p in plans}:
            log(f"the baseline {cfg.baseline} is not among the methods compared (--only); ratios are relative to "
                f"{plans[0].label}")
        bad = [p for p in plans if p.error]
        if bad:
            log(f"{len(bad)} of {len(plans)} method(s) have settings that do not validate and will be reported as "
                f"failed: " + "; ".join(f"{p.label}: {p.error}" for p in bad))
        rows = []
        for n, p in enumerate(plans, 1):
            tag = f"[{n}/{len(plans)}] {p.label}"
            row = _run_one(p, cfg, items, eval_key, rerun, context, tag, log)
            rows.append(row)
            events.write("method", **{k: v for k, v in row.items() if k not in ("losses", "samples")})
        results = _results(cfg, rows, base, base_record, items, started)
        paths = write_results(results, out)
        events.write("end", wall_s=results["wall_s"], failed=results["failed"], winner=results["winner"])
    return {**results, **paths}


def _select(cfg: CompareConfig, only: list[str] | None) -> list[tuple[int, Any]]:
    """(index, entry) of the methods to compare: all, or those `--only` names."""
    labels = [m.label for m in cfg.methods]
    if not only:
        return list(enumerate(cfg.methods))
    unknown = [x for x in only if x not in labels]
    if unknown:
        raise ConfigError(f"--only: no method labelled {', '.join(map(repr, unknown))}; the labels are "
                          f"{', '.join(labels)}")
    return [(i, m) for i, m in enumerate(cfg.methods) if m.label in only]


def _preflight(cfg: CompareConfig) -> list[Item] | None:
    """Check what every method shares before anything trains: the base model, the data files, the eval prompts."""
    if cfg.model is not None:
        base = Path(cfg.model.base)
        if not (base / "config.json").is_file():
            raise ModelError(f"model.base {cfg.model.base}: no model directory there (no config.json); make the base "
                             f"model first (`tunelab demo` writes runs/demo/pretrain/model, `tunelab pretrain "
                             f"<recipe>` writes <out_dir>/<name>/model), or make one with a pretrain: section")
    d = cfg.data
    read_all(d.train, d.format, d.same_role)  # a missing file or a malformed line fails now, not once per method
    if d.eval:
        read_all(d.eval, d.format, d.same_role)
    if cfg.eval is None:
        return None
    return read_prompts(cfg.eval.path, cfg.eval.group_by, True, cfg.eval.limit)


def _plan(cfg: CompareConfig, index: int, entry, base: str, runs: Path, source: str, data_fp: dict,
          base_sig: list) -> Plan:
    """The entry's fine-tuning recipe (shared sections + its method + its train overrides), or its error."""
    settings, overrides = dict(entry.model_extra or {}), dict(entry.train)
    plan = Plan(index, entry.label, settings, overrides)
    where = f"{source}: methods.{index} ({entry.label})"
    try:
        method = validate(MethodSection, settings, source=where)
        fixed = [k for k in BUDGET_KEYS if k in overrides]
        if fixed:
            raise ConfigError(f"{where}: train.{fixed[0]} cannot differ between methods (every method gets the same "
                              f"budget); set it in the shared train: section instead")
        train = validate(FinetuneTrain, {**cfg.train.model_dump(mode="json"), **overrides}, source=f"{where}: train")
        shared = cfg.train.micro_batch_size * cfg.train.grad_accum
        if train.micro_batch_size * train.grad_accum != shared:
            raise ConfigError(f"{where}: train.micro_batch_size x train.grad_accum must stay {shared} (the shared "
                              f"batch); change only how it is split, e.g. micro_batch_size "
                              f"{max(1, cfg.train.micro_batch_size // 2)} with grad_accum {cfg.train.grad_accum * 2}")
        model = cfg.model.model_copy(update={"base": base}) if cfg.model else ModelSection(base=base)
        plan.cfg = FinetuneConfig(name=entry.label, seed=cfg.seed, out_dir=str(runs), model=model, data=cfg.data,
                                  method=method, train=train)
        plan.key = _train_key(plan.cfg, data_fp, base_sig)
    except TunelabError as e:
        plan.error = str(e).removeprefix(f"{where}: ")
    return plan


def _run_one(p: Plan, cfg: CompareConfig, items: list[Item] | None, eval_key: dict | None, rerun: bool,
             context, tag: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Train and evaluate one method in a child process (or reuse its finished run); its row."""
    if p.error:
        log(f"{tag}: FAILED before training: {p.error}")
        return _row(p, cfg, "failed", p.error)
    run_dir = Path(p.cfg.out_dir) / p.cfg.name
    record = None if rerun else _finished(run_dir, p.key)
    if record is not None and record.get("eval_key") == eval_key:
        row = _row(p, cfg, "ok", None, record, reused=True, reevaluated=False)
        log(f"{tag}: reused the finished run in {run_dir} (same recipe, data and base model): {_brief(row)}")
        return row
    train = record is None
    log(f"{tag}: " + (f"training {_describe(p)}" if train else "re-evaluating (the eval: section changed)")
        + f" -> {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    error = _in_child(context(), _method_job, (p.cfg, train, cfg.eval, items, {"key": p.key, "eval_key": eval_key,
                                                                                "label": p.label}), run_dir)
    if error is not None:
        if (_read_json(run_dir / ERROR) or {}).get("type") == "DataError":  # the data every method shares
            raise DataError(f"{error} (every method shares the data, so the comparison stops at {p.label}; "
                            f"methods that finished are reused when it runs again)")
        log(f"{tag}: FAILED: {error}")
        return _row(p, cfg, "failed", error)
    row = _row(p, cfg, "ok", None, _read_json(run_dir / RECORD), reused=not train, reevaluated=not train)
    log(f"{tag}: done: {_brief(row)}")
    return row


def _finished(run_dir: Path, key: dict) -> dict | None:
    """The run's record when it finished with the same recipe, data and base model; else None."""
    record = _read_json(run_dir / RECORD)
    if record is None or record.get("key") != key:
        return None
    output = Path(record.get("summary", {}).get("output_dir", run_dir / "missing"))
    if not ((run_dir / "summary.json").is_file() and (run_dir / "events.jsonl").is_file() and output.is_dir()):
        return None
    return record


def _train_key(fcfg: FinetuneConfig, data_fp: dict, base_sig: list) -> dict:
    """What decides a run's numbers: its recipe (less names and logging), the data files, the base model files."""
    config = dump_config(fcfg)
    for k in ("name", "out_dir"):
        config.pop(k)
    for k in FREE_TRAIN_KEYS:
        config["train"].pop(k, None)
    return json.loads(json.dumps({"config": config, "data": data_fp, "base": base_sig}))


def _eval_key(task: GenerationTask | None) -> dict | None:
    if task is None:
        return None
    settings = task.model_dump(mode="json")
    settings.pop("name", None)
    return {"task": settings, "file": _sha256(Path(task.path))}


def _dir_signature(path: str | Path) -> list:
    """(name, size, modification time) of each file of a model directory: changes when the model is rewritten."""
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in Path(path).iterdir() if f.is_file())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------
# child processes: each method (and the optional base pretraining) runs in its own process


def _context():
    """Processes forked from a server that has only imported tunelab: cheap to start, no inherited torch state
    (forking a process that has run torch's OpenMP threads can hang), and each child's peak memory is its own."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["tunelab.compare"])
        return ctx
    return mp.get_context("spawn")


def _child(job: Callable, args: tuple, error_path: str) -> None:
    """A child process's body: run `job`; on an error, write its one-line message and traceback to `error_path`."""
    try:
        job(*args)
    except KeyboardInterrupt:  # Ctrl-C reached the parent too, which stops the comparison
        sys.exit(130)
    except Exception as e:  # reported as the method's failure; the parent goes on with the next method
        atomic_write_json(error_path, {"error": _one_line(e), "type": type(e).__name__,
                                       "traceback": traceback.format_exc()})


def _in_child(ctx, job: Callable, args: tuple, run_dir: Path) -> str | None:
    """Run `job(*args)` in a child process that must write `run_dir/compare.json`; None, or why it failed."""
    error_path = run_dir / ERROR
    for name in (RECORD, ERROR):
        (run_dir / name).unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    proc = ctx.Process(target=_child, args=(job, args, str(error_path)), name=f"tunelab-compare-{run_dir.name}")
    proc.start()
    try:
        proc.join()
    except BaseException:  # Ctrl-C reaches the child too; make sure it is gone before the parent leaves
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
        raise
    if error_path.is_file():
        return (_read_json(error_path) or {}).get("error") or "failed (see error.json)"
    if not (run_dir / RECORD).is_file():
        why = " (killed: out of memory?)" if proc.exitcode == -9 else ""
        return f"the method's process ended with exit code {proc.exitcode}{why} before finishing"
    return None


def _method_job(fcfg: FinetuneConfig, train: bool, task: GenerationTask | None, items: list[Item] | None,
                record: dict) -> None:
    """In the child: fine-tune (or reuse the finished training), measure accuracy, write the run's record last."""
    import torch

    run_dir = Path(fcfg.out_dir) / fcfg.name
    summary = run_finetune(fcfg) if train else json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    accuracy = _accuracy(summary["output_dir"], task, items, fcfg.train.precision) if task is not None else None
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    atomic_write_json(run_dir / RECORD, {**record, "summary": summary, "accuracy": accuracy, "device": device})


def _accuracy(output_dir: str, task: GenerationTask, items: list[Item], precision: str) -> dict[str, Any]:
    """Strict accuracy of the saved model (loaded back from disk, as a user would) on the eval prompts."""
    import torch

    from tunelab.serve.generate import load_tuned

    model, tokenizer, _ = load_tuned(output_dir)
    if torch.cuda.is_available():
        bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())
        model.to("cuda", torch.bfloat16 if bf16 else torch.float32)
    r = evaluate_generation(model, tokenizer, items, task.extract, task.pattern, task.tolerance, task.chat_template,
                            task.max_new_tokens, task.batch_size)
    return {"accuracy": r["metrics"]["accuracy"], "per_group": r["per_group"], "examples": r["examples"],
            "no_answer": r["no_answer"], "wall_s": r["wall_s"], "samples": r["samples"][:20]}


# ---------------------------------------------------------------------------------------------------------
# the base model: given (model.base) or made once (pretrain:)


def _base_model(cfg: CompareConfig, out: Path, context, log: Callable[[str], None]) -> tuple[str, dict | None]:
    """(base model directory, the pretraining record or None); a finished base is reused even under --rerun."""
    if cfg.pretrain is None:
        return cfg.model.base, None
    base_dir = out / "base"
    model_dir = base_dir / "pretrain" / "model"
    d = cfg.data
    key = json.loads(json.dumps({"pretrain": cfg.pretrain.model_dump(mode="json"), "seed": cfg.seed,
                                 "data": fingerprint(d.train + d.eval), "split": [d.eval_fraction, d.format,
                                                                                  d.same_role, d.eval]}))
    record = _read_json(base_dir / RECORD)
    if record is not None and record.get("key") == key and (model_dir / "config.json").is_file():
        log(f"[base] reused {model_dir} (same pretrain: section and data)")
        return str(model_dir), record
    p = cfg.pretrain
    log(f"[base] making the base model: a {p.vocab_size}-token tokenizer and the {p.preset} {p.arch} preset "
        f"pretrained on the text of the training examples (held-out examples excluded) -> {model_dir}")
    base_dir.mkdir(parents=True, exist_ok=True)
    error = _in_child(context(), _pretrain_job, (cfg, str(base_dir), key), base_dir)
    if error is not None:
        raise TunelabError(f"pretrain: making the base model failed: {error} (traceback in {base_dir / ERROR})")
    record = _read_json(base_dir / RECORD)
    s = record["summary"]
    log(f"[base] done: {record['documents']} documents, {s['tokens']:,} tokens in {s['train_wall_s']:.0f}s, "
        f"eval loss {s['eval_after'].get('eval_loss', float('nan')):.4f}")
    return str(model_dir), record


def _pretrain_job(cfg: CompareConfig, base_dir: str, key: dict) -> None:
    """In the child: the training examples' text → tokenizer → pretrained preset, under `base_dir`."""
    from tunelab.train.pretrain import run_pretrain
    from tunelab.vocab.train import train_tokenizer_files

    d, p, root = cfg.data, cfg.pretrain, Path(base_dir)
    examples = read_all(d.train, d.format, d.same_role)
    held = 0
    if not d.eval:  # the same seeded split every method's run makes: held-out examples never reach the base
        examples, heldout = split_examples(examples, d.eval_fraction, cfg.seed)
        held = len(heldout)
    texts = [ex.text if ex.text is not None else "\n".join(m["content"] for m in ex.messages) for ex in examples]
    text_path = root / "text.jsonl"
    atomic_write_text(text_path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts if t))
    train_tokenizer_files([text_path], root / "tokenizer", vocab_size=p.vocab_size, split_cjk=p.split_cjk)
    pcfg = PretrainConfig(name="pretrain", seed=cfg.seed, out_dir=str(root),
                          model=ModelSection(preset=p.preset, arch=p.arch, tokenizer=str(root / "tokenizer")),
                          data=PretrainData(sources=[Source(path=str(text_path))], seq_len=p.seq_len,
                                            eval_fraction=p.eval_fraction), train=p.train)
    summary = run_pretrain(pcfg)
    atomic_write_json(root / RECORD, {"key": key, "documents": len(texts), "held_out_examples": held,
                                      "summary": summary})


# ---------------------------------------------------------------------------------------------------------
# rows, winner, results


def _describe(p: Plan) -> str:
    """The method as the entry wrote it: `lora r=8, alpha=16`, plus its train overrides."""
    s = dict(p.settings)
    text = str(s.pop("name", "lora")) + "".join(f", {k}={v}" for k, v in s.items())
    return text + "".join(f", train.{k}={v}" for k, v in p.overrides.items())


def _row(p: Plan, cfg: CompareConfig, status: str, error: str | None, record: dict | None = None,
         reused: bool = False, reevaluated: bool = False) -> dict[str, Any]:
    """One method's line of the table (and of results.json, with its per-step losses)."""
    row: dict[str, Any] = {
        "label": p.label, "method": str(p.settings.get("name", "lora")), "settings": p.settings,
        "train_overrides": p.overrides, "lr": p.cfg.train.lr if p.cfg else None, "status": status, "error": error,
        "reused": reused, "reevaluated": reevaluated,
        "run_dir": str(Path(p.cfg.out_dir) / p.cfg.name) if p.cfg else None,
    }
    if record is None:
        return row
    s, acc = record["summary"], record.get("accuracy") or {}
    losses = _step_losses(Path(row["run_dir"]) / "events.jsonl")
    n_final = min(len(losses), cfg.final_loss_steps or max(1, s["steps"] // 10)) or 1
    row.update({
        "output_dir": s["output_dir"], "device": record.get("device"), "parameters": s["parameters"],
        "trainable_parameters": s["trainable_parameters"],
        "trainable_pct": 100 * s["trainable_parameters"] / s["parameters"], "steps": s["steps"],
        "train_loss_first": s["train_loss_first"],
        "final_train_loss": sum(losses[-n_final:]) / n_final if losses else s["train_loss_last"],
        "final_loss_steps": n_final, "eval_loss": s["eval_after"].get("eval_loss"),
        "eval_loss_before": s["eval_before"].get("eval_loss"), "eval_tokens": s["eval_after"].get("eval_tokens"),
        "accuracy": acc.get("accuracy"), "accuracy_per_group": acc.get("per_group"), "no_answer": acc.get("no_answer"),
        "tokens": s["tokens"], "tokens_per_s": s["tokens_per_s"], "peak_memory_mb": s["peak_memory_mb"],
        "train_wall_s": s["train_wall_s"], "wall_s": round(s["total_wall_s"] + acc.get("wall_s", 0.0), 2),
        "losses": losses, "samples": acc.get("samples", []),
    })
    return row


def _count_parameters(model_dir: str) -> int | None:
    """Parameters of the base model, read from its safetensors headers (no weights loaded); None without them."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    total = 0
    for f in files:
        with safe_open(f, "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118
    return total or None


def _step_losses(path: Path) -> list[float]:
    """Per-step training losses from a run's events (a step logged twice around a resume counts once)."""
    if not path.is_file():
        return []
    by_step = {e["step"]: e["loss"] for e in read_events(path) if e.get("event") == "step"}
    return [by_step[k] for k in sorted(by_step)]


def _brief(row: dict) -> str:
    parts = [f"eval loss {row['eval_loss']:.4f}" if row.get("eval_loss") is not None else None,
             f"accuracy {100 * row['accuracy']:.1f}%" if row.get("accuracy") is not None else None,
             f"train loss {row['final_train_loss']:.4f} (mean of the last {row['final_loss_steps']} steps)",
             f"{row['trainable_parameters']:,} trainable ({row['trainable_pct']:.2f}%)",
             f"{row['tokens_per_s']:,.0f} tok/s", f"{row['peak_memory_mb']:,.0f} MB", f"{row['wall_s']:.0f}s"]
    return ", ".join(x for x in parts if x)


def winner(rows: list[dict]) -> dict[str, Any] | None:
    """The best method: by accuracy when measured (eval loss breaks ties), else by eval loss, else by train loss."""
    ok = [r for r in rows if r["status"] == "ok"]
    if any(r.get("accuracy") is not None for r in ok):
        by, ranked = "accuracy", sorted((r for r in ok if r.get("accuracy") is not None),
                                        key=lambda r: (-r["accuracy"], r.get("eval_loss") or math.inf))
    elif any(r.get("eval_loss") is not None for r in ok):
        by, ranked = "eval_loss", sorted((r for r in ok if r.get("eval_loss") is not None),
                                         key=lambda r: r["eval_loss"])
    else:
        by, ranked = "final_train_loss", sorted(ok, key=lambda r: r["final_train_loss"])
    if not ranked:
        return None
    best = ranked[0]
    out = {"label": best["label"], "by": by, "value": best[by], "trainable_parameters": best["trainable_parameters"],
           "trainable_pct": best["trainable_pct"], "runner_up": None, "margin": None}
    if len(ranked) > 1:
        second = ranked[1]
        out.update({"runner_up": second["label"], "runner_up_value": second[by],
                    "margin": best[by] - second[by] if by == "accuracy" else second[by] - best[by]})
        if by == "accuracy" and out["margin"] == 0:  # a tie on accuracy: eval loss decided
            out["tie_break"] = {"by": "eval_loss", "value": best.get("eval_loss"),
                                "runner_up_value": second.get("eval_loss")}
    return out


def _results(cfg: CompareConfig, rows: list[dict], base: str, base_record: dict | None, items: list[Item] | None,
             started: float) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    baseline = cfg.baseline if cfg.baseline in {r["label"] for r in rows} else rows[0]["label"]
    ref = next((r for r in ok if r["label"] == baseline), None)
    for r in ok:
        r["tokens_per_s_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref and ref["tokens_per_s"] else None
        r["peak_memory_ratio"] = r["peak_memory_mb"] / ref["peak_memory_mb"] if ref and ref["peak_memory_mb"] else None
    steps = ok[0]["steps"] if ok else cfg.train.steps
    t = cfg.train
    return {
        "name": cfg.name, "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tunelab": __version__, "seed": cfg.seed, "base": base, "device": ok[0].get("device") if ok else None,
        "base_parameters": _count_parameters(base),
        "eval_loss_before": ok[0]["eval_loss_before"] if ok else None,
        "pretrain": None if base_record is None else {k: base_record[k] for k in ("documents", "held_out_examples",
                                                                                 "summary")},
        "data": {"train": cfg.data.train, "eval": cfg.data.eval, "eval_fraction": cfg.data.eval_fraction,
                 "max_len": cfg.data.max_len, "chat_template": cfg.data.chat_template},
        "budget": {"steps": steps, "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum,
                   "examples_per_step": t.micro_batch_size * t.grad_accum, "max_len": cfg.data.max_len,
                   "lr": t.lr, "seed": cfg.seed},
        "eval": None if cfg.eval is None else {"path": cfg.eval.path, "extract": cfg.eval.extract,
                                               "examples": len(items or []), "max_new_tokens": cfg.eval.max_new_tokens},
        "baseline": baseline, "smooth_steps": cfg.smooth_steps or max(1, round(steps / 25)),
        "winner": winner(rows), "failed": [r["label"] for r in rows if r["status"] != "ok"],
        "reused": [r["label"] for r in rows if r.get("reused")], "methods": rows,
        "wall_s": round(time.time() - started, 1),
    }


# ---------------------------------------------------------------------------------------------------------
# outputs: results.json, results.csv, report.html

CSV_COLUMNS = ["label", "method", "status", "error", "reused", "settings", "train_overrides", "lr",
               "trainable_parameters", "trainable_pct", "parameters", "train_loss_first", "final_train_loss",
               "final_loss_steps", "eval_loss", "eval_loss_before", "accuracy", "tokens_per_s", "tokens_per_s_ratio",
               "peak_memory_mb", "peak_memory_ratio", "train_wall_s", "wall_s", "steps", "run_dir"]


def write_results(results: dict, out: str | Path) -> dict[str, str]:
    """results.json, results.csv and report.html in `out`, each written atomically."""
    out = Path(out)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.csv", to_csv(results))
    atomic_write_text(out / "report.html", render_html(results))
    return {"results_path": str(out / "results.json"), "csv_path": str(out / "results.csv"),
            "report_path": str(out / "report.html")}


def to_csv(results: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in results["methods"]:
        writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, dict) else v
                         for k, v in r.items() if k in CSV_COLUMNS})
    return buf.getvalue()


# (key, header, lower is better, format); the best value of each column among the finished methods is marked
COLUMNS = [
    ("trainable_parameters", "trainable params", True, lambda r: f"{r['trainable_parameters']:,}"),
    ("trainable_pct", "% of model", True, lambda r: _pct(r["trainable_pct"])),
    ("final_train_loss", "train loss", True, lambda r: f"{r['final_train_loss']:.4f}"),
    ("eval_loss", "eval loss", True, lambda r: f"{r['eval_loss']:.4f}"),
    ("accuracy", "accuracy", False, lambda r: f"{100 * r['accuracy']:.1f}%"),
    ("tokens_per_s", "tokens/s", False, lambda r: f"{r['tokens_per_s']:,.0f}" + _ratio(r.get("tokens_per_s_ratio"))),
    ("peak_memory_mb", "peak MB", True, lambda r: f"{r['peak_memory_mb']:,.0f}" + _ratio(r.get("peak_memory_ratio"))),
    ("train_wall_s", "train s", True, lambda r: f"{r['train_wall_s']:.1f}"),
    ("wall_s", "total s", True, lambda r: f"{r['wall_s']:.1f}"),
]
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
EXTRA_CSS = """
td.best{background:#e3f4e8;font-weight:600}tr.failed td{color:#c0262d}.winner{font-size:1.1em;padding:.6em 1em;
background:#f3f8ff;border-left:4px solid #1f77b4}svg{background:#fff;border:1px solid #eee}
"""


def _pct(v: float) -> str:
    return f"{v:.3g}%" if v < 10 else f"{v:.1f}%"


def _ratio(v: float | None) -> str:
    return f" ({v:.2f}x)" if v is not None else ""


def _e(value: object) -> str:
    return html.escape(str(value))


def winner_sentence(results: dict) -> str:
    """The winner, its margin over the runner-up and its parameter count, in one plain sentence."""
    w = results["winner"]
    if w is None:
        return "No method finished."
    what = {"accuracy": "held-out accuracy", "eval_loss": "held-out eval loss",
            "final_train_loss": "final train loss (there is no held-out data)"}[w["by"]]
    value = f"{100 * w['value']:.1f}%" if w["by"] == "accuracy" else f"{w['value']:.4f}"
    text = f"Winner by {what}: {w['label']}, {value}"
    if w["runner_up"] is not None:
        if w["by"] == "accuracy":
            n = (results.get("eval") or {}).get("examples")
            prompts = f" ({round(w['margin'] * n)} of {n} prompts)" if n else ""
            text += (f", {100 * w['margin']:.1f} points{prompts} above {w['runner_up']} "
                     f"({100 * w['runner_up_value']:.1f}%)")
            if "tie_break" in w:
                text += " (tied on accuracy; the lower eval loss decides)"
        else:
            rel = 100 * w["margin"] / w["runner_up_value"] if w["runner_up_value"] else 0.0
            text += f", {w['margin']:.4f} ({rel:.1f}%) below {w['runner_up']} ({w['runner_up_value']:.4f})"
    return text + f"; {w['trainable_parameters']:,} trainable parameters ({_pct(w['trainable_pct'])} of the model)."


def render_html(results: dict) -> str:
    """The report as one self-contained page: inline CSS and SVG, no scripts, no external assets."""
    rows, b = results["methods"], results["budget"]
    ok = [r for r in rows if r["status"] == "ok"]
    has_acc = any(r.get("accuracy") is not None for r in ok)
    columns = [c for c in COLUMNS if c[0] != "accuracy" or has_acc]
    best = {}
    for key, _, lower, _ in columns:
        values = [r[key] for r in ok if r.get(key) is not None]
        if len(values) > 1:
            best[key] = min(values) if lower else max(values)
    overrides = any(r["train_overrides"] for r in rows)
    head = ["label", "method", "lr"] + [h + (" ↓" if lower else " ↑") for _, h, lower, _ in columns] + ["status"]
    body = []
    for r in rows:
        cells = [f"<td class='l'>{_e(r['label'])}</td>", f"<td class='l'>{_e(_settings_text(r))}</td>",
                 f"<td>{_e(_lr_text(r))}{' †' if r['train_overrides'] else ''}</td>"]
        for key, _, _, show in columns:
            if r["status"] != "ok" or r.get(key) is None:
                cells.append("<td class='muted'>–</td>")
            else:
                mark = " class='best'" if key in best and r[key] == best[key] else ""
                cells.append(f"<td{mark}>{_e(show(r))}</td>")
        status = ("reused" if r.get("reused") else "ok") if r["status"] == "ok" else f"failed: {r['error']}"
        cells.append(f"<td class='l'>{_e(status)}</td>")
        cls = " class='failed'" if r["status"] != "ok" else ""
        body.append(f"<tr data-label='{_e(r['label'])}'{cls}>{''.join(cells)}</tr>")
    th = "".join(f"<th class='{'l' if i < 2 or i == len(head) - 1 else ''}'>{_e(h)}</th>" for i, h in enumerate(head))
    table = f"<table id='results'><tr>{th}</tr>{''.join(body)}</table>"
    n_final = sorted({r["final_loss_steps"] for r in ok})
    notes = [
        f"Every method: the same base model, data, seed and budget: {b['steps']} steps × {b['micro_batch_size']} "
        f"examples × {b['grad_accum']} accumulation, max_len {b['max_len']}, shared lr {b['lr']:g}"
        + ("; † marks a per-method override of the shared train: section, which changes the comparison" if overrides
           else "") + ".",
        "train loss: the mean of the last " + "/".join(map(str, n_final or [0])) + " steps' losses. eval loss: token "
        "loss on the held-out examples after training" + (
            f" (the base model before tuning: {results['eval_loss_before']:.4f})"
            if results.get("eval_loss_before") is not None else "") + ".",
        f"tokens/s: trained (loss-carrying) tokens per second of training, with the ratio to {results['baseline']}; "
        "peak MB: the method's process peak resident memory on CPU (allocated memory on a GPU), ratio to the "
        "baseline. Each method runs in its own process. train s: the training loop; total s: the fine-tuning run "
        "(training, evaluations, saving) plus the accuracy evaluation.",
    ]
    if results.get("eval"):
        e = results["eval"]
        notes.append(f"accuracy: strict ({e['extract']}) accuracy of greedy replies (up to {e['max_new_tokens']} "
                     f"tokens) to the {e['examples']} prompts of {e['path']}, by the saved model loaded back "
                     f"from disk.")
    if results["reused"]:
        notes.append("Reused finished runs (same recipe, data and base model): " + ", ".join(results["reused"]) + ".")
    parts = [f"<h1>tunelab compare: {_e(results['name'])}</h1>",
             f"<p class='muted'>{_e(results['created'])} · tunelab {_e(results['tunelab'])} · "
             f"{_e(results.get('device') or '')} · base {_e(results['base'])}"
             + (f" ({results['base_parameters']:,} parameters)" if results.get("base_parameters") else "")
             + f" · {_e(results['wall_s'])} s in all</p>",
             f"<p class='winner'>{_e(winner_sentence(results))}</p>", "<h2>Results</h2>", table]
    parts += [f"<p class='muted'>{_e(n)}</p>" for n in notes]
    colours = {r["label"]: PALETTE[i % len(PALETTE)] for i, r in enumerate(ok)}  # one colour a method, both charts
    curves = [(r["label"], r["losses"]) for r in ok if r.get("losses")]
    if curves:
        s = results["smooth_steps"]
        parts += ["<h2>Training loss</h2>", loss_chart(curves, s, colours),
                  "<p class='muted'>Per-step training loss from each run's events.jsonl"
                  + (f", moving average over {s} steps" if s > 1 else "") + "; log scale.</p>"]
    points = [(r["label"], r["trainable_parameters"], r["eval_loss"]) for r in ok if r.get("eval_loss") is not None]
    if points:
        parts += ["<h2>Eval loss against trainable parameters</h2>", scatter_chart(points, colours),
                  "<p class='muted'>Held-out eval loss after training (lower is better); trainable parameters on a "
                  "log scale.</p>"]
    groups = sorted({g for r in ok for g in (r.get("accuracy_per_group") or {})})
    if groups:
        parts += ["<h2>Accuracy per group</h2>", _table(["label"] + [_e(g) for g in groups], [
            [_e(r["label"])] + [_e(f"{100 * r['accuracy_per_group'][g]:.1f}%") if g in r["accuracy_per_group"]
                                else "–" for g in groups] for r in ok if r.get("accuracy_per_group")])]
    parts.append("<h2>Runs</h2>" + _table(["label", "run directory", "output"], [
        [_e(r["label"]), f"<code>{_e(r.get('run_dir') or '')}</code>", f"<code>{_e(r.get('output_dir') or '')}</code>"]
        for r in rows], left=3))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>tunelab compare: {_e(results['name'])}"
            f"</title><style>{CSS}{EXTRA_CSS}</style></head><body>" + "".join(parts) + "</body></html>\n")


def _settings_text(r: dict) -> str:
    s = {k: v for k, v in r["settings"].items() if k != "name"}
    return r["method"] + (" " + ", ".join(f"{k}={v}" for k, v in s.items()) if s else "")


def _lr_text(r: dict) -> str:
    lr = r["train_overrides"].get("lr", r.get("lr"))
    return f"{lr:g}" if isinstance(lr, (int, float)) else ("" if lr is None else str(lr))


# ---------------------------------------------------------------------------------------------------------
# inline SVG charts

W, H, LEFT, TOP, BOTTOM = 760, 340, 60, 12, 40
SVG_FONT = "font-family='system-ui,sans-serif' font-size='11' fill='#333'"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] on a linear axis."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks (or every integer multiple for narrow ranges) between lo and hi on a log axis."""
    for mults in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in mults if lo <= m * 10 ** e <= hi]
        if len(ticks) >= 3:
            return ticks
    return _nice_ticks(lo, hi, 4)


def _tick_label(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:.4g}"


def _axis_frame(xt: list[tuple[float, str]], yt: list[tuple[float, str]], right: int, x_label: str,
                y_label: str) -> list[str]:
    """Grid lines, tick labels and axis titles (positions already in pixels)."""
    pw_end, ph_end = W - right, H - BOTTOM
    out = []
    for x, text in xt:
        out.append(f"<line stroke='#eee' x1='{x:.1f}' y1='{TOP}' x2='{x:.1f}' y2='{ph_end}'/>"
                   f"<text x='{x:.1f}' y='{ph_end + 14}' text-anchor='middle'>{_e(text)}</text>")
    for y, text in yt:
        out.append(f"<line stroke='#eee' x1='{LEFT}' y1='{y:.1f}' x2='{pw_end}' y2='{y:.1f}'/>"
                   f"<text x='{LEFT - 5}' y='{y + 4:.1f}' text-anchor='end'>{_e(text)}</text>")
    out.append(f"<rect stroke='#999' x='{LEFT}' y='{TOP}' width='{pw_end - LEFT}' height='{ph_end - TOP}' "
               f"fill='none'/>")
    out.append(f"<text x='{(LEFT + pw_end) / 2:.0f}' y='{H - 6}' text-anchor='middle'>{_e(x_label)}</text>")
    out.append(f"<text x='14' y='{(TOP + ph_end) / 2:.0f}' text-anchor='middle' "
               f"transform='rotate(-90 14 {(TOP + ph_end) / 2:.0f})'>{_e(y_label)}</text>")
    return out


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` values (the first values average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_chart(series: list[tuple[str, list[float]]], window: int = 1, colours: dict[str, str] | None = None) -> str:
    """Every method's training loss against the step on one log-scale plot, with a legend; one polyline each."""
    right = 170
    curves = [(label, smooth(losses, window)) for label, losses in series]
    values = [max(v, 1e-6) for _, ys in curves for v in ys]
    lo, hi = min(values), max(values)
    pad = max(hi / lo, 1.02) ** 0.04  # a little room above and below the curves (log scale)
    lo, hi = lo / pad, hi * pad
    n = max(len(ys) for _, ys in curves)
    pw, ph = W - right - LEFT, H - BOTTOM - TOP

    def px(step: float) -> float:
        return LEFT + (step - 1) / max(n - 1, 1) * pw

    def py(v: float) -> float:
        return TOP + (1 - (math.log10(max(v, 1e-6)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))) * ph

    parts = _axis_frame([(px(t), _tick_label(t)) for t in _nice_ticks(1, n) if t >= 1],
                        [(py(t), _tick_label(t)) for t in _log_ticks(lo, hi)], right, "step", "training loss")
    for i, (label, ys) in enumerate(curves):
        colour = (colours or {}).get(label, PALETTE[i % len(PALETTE)])
        every = max(1, len(ys) // 400)  # at most ~400 points a curve
        pts = " ".join(f"{px(k + 1):.1f},{py(y):.1f}" for k, y in enumerate(ys) if k % every == 0 or k == len(ys) - 1)
        parts.append(f"<polyline class='series' data-label='{_e(label)}' fill='none' stroke='{colour}' "
                     f"stroke-width='1.6' points='{pts}'><title>{_e(label)}: {ys[-1]:.4f} at step {len(ys)}</title>"
                     f"</polyline>")
        y = TOP + 8 + 16 * i
        parts.append(f"<line x1='{W - right + 12}' y1='{y}' x2='{W - right + 34}' y2='{y}' stroke='{colour}' "
                     f"stroke-width='3'/><text x='{W - right + 40}' y='{y + 4}'>{_e(label)}</text>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' {SVG_FONT} class='loss-curves'>"
            f"{''.join(parts)}</svg>")


def scatter_chart(points: list[tuple[str, int, float]], colours: dict[str, str] | None = None) -> str:
    """Eval loss (linear) against trainable parameters (log scale), one labelled point per method."""
    right = 30
    xs, ys = [max(x, 1) for _, x, _ in points], [y for _, _, y in points]
    xlo, xhi = min(xs) / 2, max(xs) * 2
    pad = (max(ys) - min(ys)) * 0.1 or max(abs(ys[0]) * 0.05, 0.01)
    ylo, yhi = min(ys) - pad, max(ys) + pad
    pw, ph = W - right - LEFT, H - BOTTOM - TOP

    def px(x: float) -> float:
        return LEFT + (math.log10(x) - math.log10(xlo)) / (math.log10(xhi) - math.log10(xlo)) * pw

    def py(y: float) -> float:
        return TOP + (1 - (y - ylo) / (yhi - ylo)) * ph

    parts = _axis_frame([(px(t), _tick_label(t)) for t in _log_ticks(xlo, xhi)],
                        [(py(t), f"{t:.4g}") for t in _nice_ticks(ylo, yhi, 6)], right,
                        "trainable parameters (log scale)", "eval loss")
    best = min(ys)
    centres = [(px(max(x, 1)), py(y)) for _, x, y in points]
    taken = [(cx - 6, cy - 6, cx + 6, cy + 6) for cx, cy in centres]  # label boxes must not cover a point
    labels = []
    for i, (label, x, y) in enumerate(points):
        cx, cy = centres[i]
        colour = (colours or {}).get(label, PALETTE[i % len(PALETTE)])
        ring = "r='6' stroke='#222' stroke-width='1.5'" if y == best else "r='4.5'"
        parts.append(f"<circle class='point' data-label='{_e(label)}' cx='{cx:.1f}' cy='{cy:.1f}' {ring} "
                     f"fill='{colour}'><title>{_e(label)}: {x:,} trainable, eval loss {y:.4f}</title></circle>")
        width, left = 6.5 * len(label), cx > LEFT + 0.75 * pw  # labels near the right edge go left of the point
        for dy in (-6, 14, -18, 26, -30, 38, -42, 50, -54):  # the first place that covers no point or label
            x0 = cx - 8 - width if left else cx + 8
            box = (x0, cy + dy - 10, x0 + width, cy + dy + 2)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                break
        taken.append(box)
        labels.append(f"<text x='{cx + (-8 if left else 8):.1f}' y='{cy + dy:.1f}' "
                      f"text-anchor='{'end' if left else 'start'}'>{_e(label)}</text>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' {SVG_FONT} class='scatter'>"
            f"{''.join(parts + labels)}</svg>")


def _one_line(e: BaseException) -> str:
    """An error on one line: a TunelabError's message as is, anything else prefixed by its type."""
    text = (str(e).strip().splitlines() or [""])[0][:400]
    if isinstance(e, TunelabError):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
