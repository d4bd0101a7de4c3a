"""The suite runner: read every task's data, run the tasks on each model, compare, write the report.

`run_eval(cfg)` runs an `EvalConfig` (a list of perplexity / choice / generation / judge tasks) on each of
its models and writes `<out_dir>/<name>/results.json`, `report.html` (deltas from the first model) and
`events.jsonl`. A model is a model directory or an adapter directory (its base comes from
`adapter_config.json`), optionally labelled `label=dir`. All data is read and checked, and a judge URL is
probed, before the first model loads, so a typo fails in seconds; then each model is loaded, evaluated on
every task and freed. Pairwise judge tasks run once every model has answered: each model against the first.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunelab import __version__
from tunelab.config import EvalConfig, Section, apply_override, read_yaml, validate
from tunelab.data.chat import chat_template_for
from tunelab.errors import ConfigError, warn
from tunelab.evaluate.choice import evaluate_choice, read_choice_dir
from tunelab.evaluate.common import Progress as ProgressFn
from tunelab.evaluate.generation import evaluate_generation, generate_replies, read_prompts
from tunelab.evaluate.judge import Judge, LocalJudge, URLJudge, check_local_judge, judge_pairwise, judge_single
from tunelab.evaluate.perplexity import evaluate_perplexity, read_text_files
from tunelab.evaluate.report import comparison, fmt, write_report
from tunelab.models import inference_placement
from tunelab.outputs import check_run_dir, open_run_dir
from tunelab.serve.generate import load_tuned, resolve_base


@dataclass
class Prepared:
    """A task with its name, its data (read once for all models) and, for judge tasks, how to get the judge."""

    task: Any
    name: str
    data: Any
    judge: Callable[[], Judge] | None = None


# ---------------------------------------------------------------------------------------------------------
# recipe and models


def load_eval_config(path: str | None = None, overrides: list[str] = (), models: str | None = None,
                     tasks: list[str] = (), judge_url: str | None = None) -> EvalConfig:
    """A recipe (or none) plus `--task type:path` shortcuts, dotted overrides, `--models` and `--judge-url`."""
    raw: dict[str, Any] = read_yaml(path) if path else {}
    for spec in tasks:
        kind, sep, data = spec.partition(":")
        if not sep or not data:
            raise ConfigError(f"--task {spec!r}: expected type:path, e.g. choice:../shared/data/cmmlu")
        raw.setdefault("tasks", []).append({"type": kind, "path": data})
    for item in overrides:
        apply_override(raw, item)
    if judge_url:
        for t in raw.get("tasks") or []:
            if isinstance(t, dict) and t.get("type") == "judge":
                t["judge_url"], t["judge"] = judge_url, None
    if models:
        raw["models"] = [m for m in models.split(",") if m.strip()]
    if not raw.get("tasks"):
        raise ConfigError(f"{path or 'command line'}: no tasks; give a recipe with tasks: (see examples/"
                          f"eval_cmmlu.yaml) or --task type:path (perplexity, choice, generation, judge)")
    cfg = validate(EvalConfig, raw, source=str(path) if path else "command line", overrides=overrides)
    if not cfg.models:
        raise ConfigError("no models to evaluate: pass --models dir[,dir...] (a model or adapter directory, "
                          "optionally label=dir) or list them under models: in the recipe")
    return cfg


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    """(label, directory) for each "dir" or "label=dir"; labels default to the directory's name."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        label, sep, ref = spec.strip().partition("=")
        if not sep:
            label, ref = _label(spec.strip()), spec.strip()
        elif not ref.strip() or not label.strip():
            raise ConfigError(f"--models / models: {spec.strip()!r} names no "
                              f"{'directory' if label.strip() else 'label'}; give dir or label=dir (e.g. "
                              f"base=runs/demo/pretrain/model), separated by commas")
        while label in {lab for lab, _ in out}:
            label += "'"
        out.append((label, ref))
    return out


def _label(ref: str) -> str:
    p = Path(ref)
    return p.parent.name if p.name in ("model", "adapter") and p.parent.name else (p.name or ref)


def task_names(tasks: list[Section]) -> list[str]:
    """Each task's name: its `name`, else its type (numbered when a type repeats)."""
    names: list[str] = []
    for t in tasks:
        name = t.name or t.type
        if t.name and t.name in names:
            raise ConfigError(f"two tasks are named {t.name!r}; give each task its own name")
        n = 2
        while name in names:
            name, n = f"{t.type}_{n}", n + 1
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------------------
# preparing and running tasks


def prepare_task(task: Section, name: str, n_models: int) -> Prepared:
    """Read a task's data (and set up its judge) once, before any model is loaded."""
    if task.type == "perplexity":
        return Prepared(task, name, read_text_files(task.path, task.text_key))
    if task.type == "choice":
        subjects = read_choice_dir(task.path, task.split, task.fewshot_split, task.k, task.subjects or None, task.limit)
        short = [s for s in subjects if len(s.dev) < task.k]
        if short:
            warn(f"task {name!r}: k={task.k}, but {len(short)} of {len(subjects)} subject(s) have fewer few-shot "
                 f"examples in {task.fewshot_split}/ (e.g. {short[0].name}: {len(short[0].dev)}); their prompts use "
                 f"all they have, and the results report the k actually used")
        return Prepared(task, name, subjects)
    if task.type == "generation":
        return Prepared(task, name, read_prompts(task.path, task.group_by, True, task.limit))
    items = read_prompts(task.path, need_reference=False, limit=task.limit)
    if task.mode == "pairwise" and n_models < 2:
        raise ConfigError(f"task {name!r}: a pairwise judge compares models; pass at least two with --models "
                          f"(each is judged against the first) or set mode: single")
    if task.judge_url:
        judge = URLJudge(task.judge_url, task.judge_model, task.timeout, task.judge_max_tokens, task.api_key_env)
        judge.check()
        return Prepared(task, name, items, lambda: judge)
    loaded: list[Judge] = []

    def local() -> Judge:
        if not loaded:
            loaded.append(LocalJudge(task.judge, task.judge_max_tokens, task.batch_size))
        return loaded[0]

    check_local_judge(task.judge)  # a missing judge directory (or one with no model) fails now
    return Prepared(task, name, items, local)


def _template(tokenizer, name: str | None) -> str | None:
    return None if name is None else chat_template_for(tokenizer, None if name == "auto" else name)


def run_task(model, tokenizer, p: Prepared, progress: ProgressFn | None = None) -> dict:
    """One task on one model: its result dict (with `metrics`)."""
    t = p.task
    if t.type == "perplexity":
        return evaluate_perplexity(model, tokenizer, p.data, t.max_length, t.stride, t.batch_size, progress)
    if t.type == "choice":
        return evaluate_choice(model, tokenizer, p.data, t.k, t.prompt, _template(tokenizer, t.chat_template),
                               t.max_length, t.batch_size, t.subject_names, progress)
    if t.type == "generation":
        return evaluate_generation(model, tokenizer, p.data, t.extract, t.pattern, t.tolerance, t.chat_template,
                                   t.max_new_tokens, t.batch_size)
    answers = generate_replies(model, tokenizer, p.data, t.chat_template, t.max_new_tokens, t.batch_size)
    if t.mode == "single":
        return {**judge_single(p.judge(), _questions(p), answers), "answers": answers}
    return {"metrics": {}, "answers": answers}


def _questions(p: Prepared) -> list[str]:
    return [it.messages[-1]["content"] if it.messages else "" for it in p.data]


@contextlib.contextmanager
def _bar(description: str) -> Iterator[ProgressFn | None]:
    """A transient progress bar on a terminal (stderr); nothing on a pipe or file."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def summary_line(result: dict) -> str:
    """A task result's metrics on one line."""
    return ", ".join(f"{k} {fmt(k, v)}" for k, v in result.get("metrics", {}).items()
                     if "/" not in k and not k.endswith("_micro"))


RUN_KIND = "eval run"
RUN_ENTRIES = ["results.json", "report.html", "events.jsonl"]


def run_eval(cfg: EvalConfig, log: Callable[[str], None] = print, recipe: str | Path | None = None) -> dict:
    """Run the suite on every model, judge pairs, write results.json, report.html and events.jsonl.

    A previous run's results stay in place until the new ones are complete (each is replaced atomically)."""
    started = time.time()
    models = parse_models(cfg.models)
    refs: list[Any] = []
    for _, ref in models:
        refs += [p for p in resolve_base(ref, None) if p]  # a missing model or adapter base fails before any work
    out = check_run_dir(Path(cfg.out_dir) / cfg.name, RUN_KIND, RUN_ENTRIES, {
        "model": refs, "task data": [getattr(t, "path", None) for t in cfg.tasks],
        "judge model": [getattr(t, "judge", None) for t in cfg.tasks], "recipe": recipe})
    names = task_names(cfg.tasks)
    prepared = [prepare_task(t, n, len(models)) for t, n in zip(cfg.tasks, names)]
    device, dtype = inference_placement(cfg.precision)
    placement = f"{device.type} {str(dtype).removeprefix('torch.')}"
    open_run_dir(out, RUN_KIND)
    entries = []
    with open(out / "events.jsonl", "w", encoding="utf-8") as events:
        def event(name: str, **fields: Any) -> None:
            events.write(json.dumps({"event": name, "time": round(time.time(), 3), **fields}, ensure_ascii=False)
                         + "\n")
            events.flush()

        for label, ref in models:
            base, adapter = resolve_base(ref, None)
            model, tokenizer, _ = load_tuned(ref, precision=cfg.precision)
            entry = {"label": label, "ref": ref, "base": str(base), "adapter": str(adapter) if adapter else None,
                     "tasks": {}}
            for p in prepared:
                torch.manual_seed(cfg.seed)
                t0 = time.time()
                with _bar(f"{label} · {p.name}") as progress:
                    result = run_task(model, tokenizer, p, progress)
                result["wall_s"] = round(time.time() - t0, 2)
                entry["tasks"][p.name] = result
                event("task", model=label, task=p.name, metrics=result.get("metrics"), wall_s=result["wall_s"])
                log(f"{label} · {p.name}: {summary_line(result) or 'answers generated'} ({result['wall_s']:.1f}s)")
            entries.append(entry)
            del model
        for p in prepared:
            if p.task.type == "judge" and p.task.mode == "pairwise":
                entries[0]["tasks"][p.name]["baseline"] = True
                for entry in entries[1:]:
                    result = judge_pairwise(p.judge(), _questions(p), entry["tasks"][p.name]["answers"],
                                            entries[0]["tasks"][p.name]["answers"])
                    entry["tasks"][p.name].update(result)
                    event("judge", model=entry["label"], task=p.name, metrics=result["metrics"])
                    log(f"{entry['label']} vs {entries[0]['label']} · {p.name}: {summary_line(result)}")
        results = {"name": cfg.name, "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                   "tunelab": __version__, "seed": cfg.seed, "device": placement,
                   "tasks": [{"name": p.name, "type": p.task.type, "config": p.task.model_dump(mode="json")}
                             for p in prepared],
                   "models": entries, "wall_s": round(time.time() - started, 1)}
        results["comparison"] = comparison(results)
        json_path, html_path = write_report(results, out)
        event("done", wall_s=results["wall_s"])
    return {**results, "results_path": str(json_path), "report_path": str(html_path)}
