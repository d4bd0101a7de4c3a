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
written at the end, atomically (`compare_report.py`); a stale report is removed when a comparison starts.
Not supported: running under torchrun (the methods run one after another, each in its own process).
Called from Python, `run_compare` must run under `if __name__ == "__main__":` in a script (it starts processes).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab import __version__
from tunelab.compare_report import write_results
from tunelab.config import (
    CompareConfig,
    FinetuneConfig,
    FinetuneTrain,
    GeneralEval,
    GenerationTask,
    MethodSection,
    ModelSection,
    PretrainConfig,
    PretrainData,
    Source,
    dump_config,
    validate,
)
from tunelab.data.records import Example
from tunelab.errors import ConfigError, DataError, ModelError, TunelabError
from tunelab.evaluate.generation import Item, evaluate_generation, read_prompts
from tunelab.io import atomic_write_json, atomic_write_text, clear_outputs
from tunelab.outputs import check_run_dir, open_run_dir
from tunelab.train.checkpoint import fingerprint
from tunelab.train.events import EventLog, read_events
from tunelab.train.finetune import read_all, run_finetune, split_examples

RECORD, ERROR = "compare.json", "error.json"  # in each run directory: the finished method / why it failed
BUDGET_KEYS = ("steps", "epochs", "eval_batches")  # the same for every method: not overridable per entry
# recipe keys that do not change what a run computes (a run directory may move; logging and saving may differ)
FREE_TRAIN_KEYS = ("log_every", "save_every", "keep_checkpoints", "resume", "resume_force")
OUTPUTS = ["results.json", "results.csv", "report.html"]
RUN_KIND = "comparison"
BASE_EVAL = "base-eval"  # the base model measured before tuning (accuracy, general loss)


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
    out = check_run_dir(Path(cfg.out_dir) / cfg.name, RUN_KIND,
                        OUTPUTS + ["events.jsonl", "base", "runs", BASE_EVAL],
                        {"base model": cfg.model.base if cfg.model else None, "data": cfg.data.train + cfg.data.eval,
                         "eval data": cfg.eval.path if cfg.eval else None,
                         "general data": cfg.general.path if cfg.general else None,
                         "recipe": source if Path(source).is_file() else None})
    entries = _select(cfg, only)
    items = _preflight(cfg)
    general = _general_examples(cfg)
    open_run_dir(out, RUN_KIND)
    clear_outputs(out, OUTPUTS)
    ctx: Any = None

    def context():
        nonlocal ctx
        ctx = ctx or _context()
        return ctx

    with EventLog(out / "events.jsonl") as events, _terminate_as_interrupt():
        events.write("start", config=dump_config(cfg), only=only, rerun=rerun)
        base, base_record = _base_model(cfg, out, context, log)
        data_fp = fingerprint(cfg.data.train + cfg.data.eval)
        base_sig = _dir_signature(base)
        eval_key = {"eval": _eval_key(cfg.eval), "general": _general_key(cfg)}
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
            row = _run_one(p, cfg, items, general, eval_key, rerun, context, tag, log)
            rows.append(row)
            events.write("method", **{k: v for k, v in row.items() if k not in ("losses", "samples")})
        before = _base_eval(cfg, base, out, items, general, eval_key, base_sig, context, log) \
            if items is not None or general is not None else None
        results = _results(cfg, rows, base, base_record, items, started, before)
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
        train = validate(FinetuneTrain, {**cfg.train.model_dump(mode="json", exclude_unset=True), **overrides},
                         source=f"{where}: train")  # exclude_unset: what the recipe set stays what was set
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


def _run_one(p: Plan, cfg: CompareConfig, items: list[Item] | None, general: list[Example] | None,
             eval_key: dict | None, rerun: bool, context, tag: str, log: Callable[[str], None]) -> dict[str, Any]:
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
    error = _in_child(context(), _method_job, (p.cfg, train, cfg.eval, items, cfg.general, general,
                                                {"key": p.key, "eval_key": eval_key, "label": p.label}), run_dir)
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


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a `kill`, a job scheduler) stops the comparison as Ctrl-C does, so the running method's child
    process is terminated too instead of training on as an orphan."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
                gcfg: GeneralEval | None, general: list[Example] | None, record: dict) -> None:
    """In the child: fine-tune (or reuse the finished training), measure accuracy and general loss, write the
    run's record last."""
    run_dir = Path(fcfg.out_dir) / fcfg.name
    summary = run_finetune(fcfg) if train else json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    accuracy = _accuracy(summary["output_dir"], task, items, fcfg.train.precision) if task is not None else None
    general_loss = None
    if general is not None:  # the saved tokenizer carries the template the method trained with
        general_loss = _general_loss(summary["output_dir"], general, gcfg.max_len or fcfg.data.max_len, None,
                                     fcfg.train.micro_batch_size, fcfg.train.precision)
    atomic_write_json(run_dir / RECORD, {**record, "summary": summary, "accuracy": accuracy,
                                         "general": general_loss, "device": _device()})


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"


def _general_examples(cfg: CompareConfig) -> list[Example] | None:
    """The `general:` examples (read now, so a bad file fails before anything trains), or None."""
    g = cfg.general
    if g is None:
        return None
    examples = read_all(g.path, g.format, cfg.data.same_role)
    return examples[: g.limit] if g.limit else examples


def _general_key(cfg: CompareConfig) -> dict | None:
    g = cfg.general
    if g is None:
        return None
    return {"settings": g.model_dump(mode="json"), "data": fingerprint(g.path), "max_len": cfg.data.max_len}


def _general_loss(ref: str, examples: list[Example], max_len: int, chat_template: str | None, micro_batch_size: int,
                  precision: str) -> dict[str, Any]:
    """Token loss of the model (or adapter) `ref` on the general examples' assistant tokens."""
    from tunelab.data.chat import chat_template_for, encode_example
    from tunelab.serve.generate import load_tuned
    from tunelab.train.finetune import example_loss

    started = time.time()
    model, tokenizer, _ = load_tuned(ref, precision=precision)
    template = chat_template_for(tokenizer, chat_template)
    encoded = [e for e in (encode_example(ex, tokenizer, template, max_len) for ex in examples) if e.n_trainable]
    r = example_loss(model, encoded, micro_batch_size, math.ceil(len(encoded) / micro_batch_size),
                     tokenizer.pad_token_id, precision)
    return {"loss": r.get("eval_loss"), "examples": len(encoded), "tokens": r.get("eval_tokens"),
            "wall_s": round(time.time() - started, 2)}


def _base_eval(cfg: CompareConfig, base: str, out: Path, items: list[Item] | None, general: list[Example] | None,
               eval_key: dict, base_sig: list, context, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The base model before any tuning, measured as the methods are (accuracy, general loss); reused when the
    base, the eval: and general: sections are unchanged. None when it could not be measured (logged)."""
    d = out / BASE_EVAL
    key = json.loads(json.dumps({"eval": eval_key, "base": base_sig, "chat_template": cfg.data.chat_template}))
    record = _read_json(d / RECORD)
    if record is not None and record.get("key") == key:
        return record
    d.mkdir(parents=True, exist_ok=True)
    log(f"[base] measuring the base model before tuning ({'accuracy' if items is not None else ''}"
        f"{', ' if items is not None and general is not None else ''}{'general loss' if general is not None else ''})")
    error = _in_child(context(), _base_job, (cfg, base, items, general, key, str(d)), d)
    if error is not None:
        log(f"[base] could not be measured: {error}")
        return None
    return _read_json(d / RECORD)


def _base_job(cfg: CompareConfig, base: str, items: list[Item] | None, general: list[Example] | None, key: dict,
              out: str) -> None:
    """In the child: the base model's accuracy (with the methods' template) and general loss."""
    t, template = cfg.train, cfg.data.chat_template
    task = cfg.eval
    if task is not None and template is not None and task.chat_template == "auto":
        task = task.model_copy(update={"chat_template": template})  # the template the methods are asked with
    accuracy = _accuracy(base, task, items, t.precision) if items is not None else None
    general_loss = _general_loss(base, general, cfg.general.max_len or cfg.data.max_len, template,
                                 t.micro_batch_size, t.precision) if general is not None else None
    atomic_write_json(Path(out) / RECORD, {"key": key, "accuracy": accuracy, "general": general_loss,
                                           "device": _device()})


def _accuracy(output_dir: str, task: GenerationTask, items: list[Item], precision: str) -> dict[str, Any]:
    """Strict accuracy of the saved model (loaded back from disk, as a user would) on the eval prompts."""
    from tunelab.serve.generate import load_tuned

    model, tokenizer, _ = load_tuned(output_dir, precision=precision)
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
    s, acc, general = record["summary"], record.get("accuracy") or {}, record.get("general") or {}
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
        "general_loss": general.get("loss"),
        "tokens": s["tokens"], "tokens_per_s": s["tokens_per_s"], "peak_memory_mb": s["peak_memory_mb"],
        "train_wall_s": s["train_wall_s"],
        "wall_s": round(s["total_wall_s"] + acc.get("wall_s", 0.0) + general.get("wall_s", 0.0), 2),
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
             started: float, before: dict | None = None) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    before_acc, before_general = ((before or {}).get("accuracy") or {}), ((before or {}).get("general") or {})
    for r in ok:  # forgetting: how much worse than the base each tuned model is on the general data
        g0 = before_general.get("loss")
        r["general_loss_delta"] = r["general_loss"] - g0 if r.get("general_loss") is not None and g0 else None
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
        "accuracy_before": before_acc.get("accuracy"), "accuracy_per_group_before": before_acc.get("per_group"),
        "general_loss_before": before_general.get("loss"),
        "general": None if cfg.general is None else {"path": cfg.general.path, "examples": before_general.get(
            "examples"), "tokens": before_general.get("tokens")},
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


def _one_line(e: BaseException) -> str:
    """An error on one line: a TunelabError's message as is, anything else prefixed by its type."""
    text = (str(e).strip().splitlines() or [""])[0][:400]
    if isinstance(e, TunelabError):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
