"""`tunelab pipeline`: the lifecycle as one recipe of named stages (domain, then sub-domain), with one report.

    name: domain                 # writes <out_dir>/<name>/<stage>/ for each stage, and pipeline_report.{json,html}
    base: models/some-model      # optional: the model the first training stage starts from
    eval: {tasks: [...]}         # optional: a `tunelab eval` suite, run on the base and after every training stage
    stages:                      # run in order
      world: {run: pretrain, model: {preset: tiny, tokenizer: stage:tok}, data: ..., train: ..., target: choice}
      instruct: {run: finetune, data: ..., method: ..., train: ..., target: instructions}

A stage is `run:` (a tunelab command: the keys of `STAGES`) plus that command's own recipe sections; the pipeline
sets `name`, `out_dir` and `seed`, so stage NAME writes `<out_dir>/<name>/NAME/`. A stage's model is the previous
model-making stage's (pretrain, finetune, export), else `base`; `model: NAME` names an earlier stage, `model: DIR`
a model directory. A training stage that starts from a LoRA-family adapter gets it merged first (into the earlier
stage's `merged/`, checked by `tunelab export`'s equivalence test). `stage:NAME` (or `stage:NAME/sub/path`) in any
setting, eval tasks included, stands for an earlier stage's output: its tokenizer, data file, model or adapter.
`target:` names the eval task(s) (or task/metric) a training stage aims at: the report shows the gain on it and the
forgetting on every other task, against the previous stage and against the base.

Everything is checked before anything runs: unknown commands, references to stages that do not exist, come later
or form a cycle, each stage's settings, the input files. A stage is reused when it finished before with the same
settings, the same input files (by content) and the same upstream stages (by their fingerprints), so a changed
stage reruns with every stage that depends on it, and a killed pipeline continues at the stage it was in (a
training stage from its last checkpoint, when `train.save_every` wrote one). A changed `eval:` re-evaluates without
retraining. A stage that fails stops the pipeline with one line; the stages before it stay finished and usable.
Stages run in this process, through the same functions the commands use (`run_pretrain`, `run_finetune`,
`run_eval`, `export_merged`, ...): a new command joins with one entry in `STAGES`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from tunelab.config import (
    EvalConfig,
    EvalTask,
    FinetuneConfig,
    Precision,
    PretrainConfig,
    RunName,
    Section,
    validate,
)
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.io import atomic_write_json, clear_outputs
from tunelab.outputs import check_run_dir, open_run_dir

RUN_KIND = "pipeline run"
STATE = "state.json"  # each stage's fingerprint and status (started / finished), its summary and eval metrics
REPORT_JSON, REPORT_HTML = "pipeline_report.json", "pipeline_report.html"
BASE_EVAL = "base-eval"  # the base model measured by the suite before any stage
REF = "stage:"
PIPELINE_KEYS = ("run", "model", "target")  # a stage's keys that are the pipeline's, not its command's
# settings that change nothing a stage computes (as a resume ignores them)
FREE_KEYS = {"train": ("log_every", "save_every", "keep_checkpoints", "resume", "resume_force", "distributed")}


class PipelineError(TunelabError):
    """A stage failed; the stages before it are finished and kept."""


class PipelineEval(Section):
    """The suite run on the base model and after every training stage (the tasks of a `tunelab eval` recipe)."""

    precision: Precision = "auto"
    tasks: list[EvalTask] = Field(min_length=1)


class PipelineConfig(Section):
    """`tunelab pipeline`: named stages run in order, each on the previous one's output; one report."""

    name: RunName = "pipeline"
    seed: int = Field(0, ge=0)
    out_dir: str = "runs"
    base: str | None = None  # the model directory the first training stage starts from (unless it sets model:)
    eval: PipelineEval | None = None
    stages: dict[str, dict[str, Any]] = Field(min_length=1)


# ---------------------------------------------------------------------------------------------------------
# the plan: every stage resolved and validated before anything runs


@dataclass
class Stage:
    index: int
    name: str
    run: str
    settings: dict[str, Any]  # the command's sections as written (stage: references unresolved)
    where: str  # "<recipe>: stages.<name>", for messages
    dir: Path
    targets: list[str] = field(default_factory=list)
    model_stage: str | None = None  # the earlier stage whose model this one starts from
    model_path: str | None = None  # or a model directory
    refs: list[str] = field(default_factory=list)  # every earlier stage it reads
    cfg: Any = None  # the command's validated config
    needs_merge: bool = False  # a later training stage starts from this stage's adapter
    key: str = ""

    @property
    def kind(self) -> Kind:
        return STAGES[self.run]


@dataclass
class Plan:
    cfg: PipelineConfig
    source: str
    dir: Path
    stages: list[Stage]
    by_name: dict[str, Stage]
    tasks: list[Any]  # the eval suite's tasks, references resolved
    base: str | None  # the model the suite measures before any stage (the first training stage's input)


def _refs_in(value: Any) -> list[str]:
    """Names of the stages a setting refers to with stage:NAME."""
    if isinstance(value, str):
        return [value[len(REF):].split("/")[0]] if value.startswith(REF) else []
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs_in(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs_in(v)]
    return []


def _resolve(value: Any, stages: dict[str, Stage], base_output: bool = False) -> Any:
    """`value` with every stage:NAME[/sub] replaced by that stage's output path."""
    if isinstance(value, str) and value.startswith(REF):
        name, _, sub = value[len(REF):].partition("/")
        s = stages[name]
        out = s.kind.base(s) if base_output and s.kind.base else s.kind.output(s)
        return str(out / sub) if sub else str(out)
    if isinstance(value, dict):
        return {k: _resolve(v, stages, base_output) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, stages, base_output) for v in value]
    return value


def _cycle(start: str, graph: dict[str, list[str]]) -> list[str] | None:
    """A path of references from `start` back to itself, if there is one."""
    def walk(node: str, path: list[str]) -> list[str] | None:
        for nxt in graph.get(node, []):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = walk(nxt, path + [nxt])
                if found:
                    return found
        return None
    return walk(start, [start])


def _check_graph(cfg: PipelineConfig, source: str) -> dict[str, list[str]]:
    """Every stage's command is known and every reference names an earlier stage; {stage: its references}."""
    names = list(cfg.stages)
    graph: dict[str, list[str]] = {}
    for name, raw in cfg.stages.items():
        where = f"{source}: stages.{name}"
        validate(_StageName, {"name": name}, source=where)
        if name == BASE_EVAL:
            raise ConfigError(f"{where}: {BASE_EVAL!r} is the name of the base model's evaluation; rename the stage")
        run = raw.get("run")
        if run not in STAGES:
            why = f"unknown command {run!r}" if run is not None else "no run: key"
            raise ConfigError(f"{where}.run: {why}; use one of {', '.join(STAGES)}")
        refs = _refs_in({k: v for k, v in raw.items() if k != "model"})
        model = raw.get("model")
        if isinstance(model, str) and (model in names or model.startswith(REF)):
            refs.append(model.removeprefix(REF).split("/")[0])
        elif isinstance(model, dict):
            refs += _refs_in(model)
        graph[name] = refs
    for name in names:
        for ref in graph[name]:
            where = f"{source}: stages.{name}"
            if ref not in cfg.stages:
                raise ConfigError(f"{where}: refers to stage {ref!r}, which does not exist; the stages are "
                                  f"{', '.join(names)}")
            if ref == name:
                raise ConfigError(f"{where}: refers to itself (a cycle); a stage reads only earlier stages' outputs")
            if names.index(ref) > names.index(name):
                loop = _cycle(name, graph)
                if loop:
                    raise ConfigError(f"{where}: the stages form a cycle ({' -> '.join(loop)}); a stage reads only "
                                      f"earlier stages' outputs")
                raise ConfigError(f"{where}: refers to stage {ref!r}, which comes later; a stage reads only the "
                                  f"outputs of stages above it (move {ref!r} up, or refer to an earlier stage)")
    for task in (cfg.eval.tasks if cfg.eval else []):
        for ref in _refs_in(task.model_dump()):
            if ref not in cfg.stages:
                raise ConfigError(f"{source}: eval: task {task.name or task.type!r} refers to stage {ref!r}, which "
                                  f"does not exist; the stages are {', '.join(names)}")
            first_training = next((n for n in names if STAGES[cfg.stages[n]["run"]].trains), None)
            if first_training is not None and names.index(ref) >= names.index(first_training):
                raise ConfigError(f"{source}: eval: task {task.name or task.type!r} refers to stage {ref!r}, which "
                                  f"runs after the first training stage ({first_training}); the suite runs on "
                                  f"the base and after every training stage, so its data must come first")
    return graph


class _StageName(Section):
    name: RunName


def plan_pipeline(cfg: PipelineConfig, source: str = "recipe") -> Plan:
    """Resolve and validate every stage (its model input, references, settings) without running anything."""
    graph = _check_graph(cfg, source)
    root = Path(cfg.out_dir) / cfg.name
    stages: list[Stage] = []
    by_name: dict[str, Stage] = {}
    last_model: str | None = None
    for i, (name, raw) in enumerate(cfg.stages.items()):
        settings = {k: v for k, v in raw.items() if k not in PIPELINE_KEYS}
        target = raw.get("target")
        s = Stage(i, name, raw["run"], settings, f"{source}: stages.{name}", root / name,
                  targets=[target] if isinstance(target, str) else list(target or []), refs=graph[name])
        if s.kind.takes_model:
            _model_input(s, raw.get("model"), by_name, last_model, cfg.base)
        elif "model" in raw:
            raise ConfigError(f"{s.where}.model: a {s.run} stage takes no model; remove the key")
        s.cfg = s.kind.build(s, by_name, cfg)
        if s.kind.base is not None:
            last_model = name
        stages.append(s)
        by_name[name] = s
    for s in stages:
        m = by_name.get(s.model_stage) if s.model_stage else None
        if m is not None and s.kind.wants_base and m.kind.merge_needed(m):
            if not m.kind.mergeable(m):
                raise ConfigError(f"{s.where}: starts from stage {m.name}'s {m.cfg.method.name} adapter, which cannot "
                                  f"be merged into its base; train {m.name} with lora, lora-dash, dora, tokens or full")
            m.needs_merge = True
    tasks = [t.model_copy(update=_resolve(t.model_dump(exclude_unset=True), by_name)) for t in
             (cfg.eval.tasks if cfg.eval else [])]
    _check_targets(stages, tasks, cfg)
    first = next((s for s in stages if s.kind.trains), None)
    base = None
    if first is not None and first.model_stage is None:
        base = first.model_path
    return Plan(cfg, source, root, stages, by_name, tasks, base)


def _model_input(s: Stage, model: Any, by_name: dict[str, Stage], last_model: str | None, base: str | None) -> None:
    """Where stage `s` takes its model from: an earlier stage, a directory, or (pretrain) a model section."""
    if isinstance(model, dict):
        if not s.kind.model_section:
            raise ConfigError(f"{s.where}.model: a {s.run} stage takes its model as a stage name or a directory, "
                              f"not a section")
        b = model.get("base")
        if isinstance(b, str) and b.removeprefix(REF) in by_name:
            s.model_stage = b.removeprefix(REF)
        else:
            s.model_path = b
        return
    if isinstance(model, str):
        name = model.removeprefix(REF)
        if name in by_name:
            if by_name[name].kind.base is None:
                raise ConfigError(f"{s.where}.model: stage {name!r} ({by_name[name].run}) makes no model; name a "
                                  f"pretrain, finetune or export stage, or a model directory")
            s.model_stage = name
        else:
            s.model_path = model
        return
    if model is not None:
        raise ConfigError(f"{s.where}.model: expected a stage name or a model directory, got {model!r}")
    if last_model is not None:
        s.model_stage = last_model
    elif base is not None:
        s.model_path = base
    elif not (s.kind.model_section or s.kind.model_optional):
        raise ConfigError(f"{s.where}: no model to start from: no earlier stage makes one and the recipe has no "
                          f"base:; set base: (a model directory) or model: on the stage")


def _check_targets(stages: list[Stage], tasks: list[Any], cfg: PipelineConfig) -> None:
    from tunelab.evaluate.suite import task_names

    names = task_names(tasks) if tasks else []
    for s in stages:
        if not s.targets:
            continue
        if not s.kind.trains:
            raise ConfigError(f"{s.where}.target: only a training stage (pretrain, finetune) has a target")
        if not tasks:
            raise ConfigError(f"{s.where}.target: there is no eval: suite to measure it; add one, or remove target")
        for t in s.targets:
            if t.split("/")[0] not in names:
                raise ConfigError(f"{s.where}.target: {t!r} is not a task of the eval: suite (its tasks: "
                                  f"{', '.join(names)}); give a task name, or task/metric")


def _model_of(s: Stage, by_name: dict[str, Stage], as_base: bool) -> str | None:
    """The model directory stage `s` starts from: an earlier stage's (its merged model when `as_base`) or a path."""
    if s.model_stage is None:
        return s.model_path
    m = by_name[s.model_stage]
    return str(m.kind.base(m) if as_base else m.kind.output(m))


def _command_config(cls: type[Section], s: Stage, cfg: PipelineConfig, settings: dict[str, Any]) -> Section:
    raw = {**settings, "name": s.name, "out_dir": str(s.dir.parent), "seed": cfg.seed}
    for key in ("name", "out_dir", "seed"):
        if key in s.settings:
            raise ConfigError(f"{s.where}.{key}: set by the pipeline (the stage's name, the pipeline's out_dir and "
                              f"seed); remove it")
    return validate(cls, raw, source=s.where)


# ---------------------------------------------------------------------------------------------------------
# the stages: how each command is built, run and where its output lands


def _build_pretrain(s: Stage, by_name: dict[str, Stage], cfg: PipelineConfig) -> PretrainConfig:
    settings = _resolve(s.settings, by_name)
    model = cfg.stages[s.name].get("model")
    section = _resolve(model, by_name, base_output=True) if isinstance(model, dict) else {}
    if s.model_stage is not None or s.model_path is not None:
        section = {**section, "base": _model_of(s, by_name, as_base=True)}
    if not section:
        raise ConfigError(f"{s.where}: no model to start from; set model: {{preset: tiny, tokenizer: DIR}} to "
                          f"pretrain from scratch, or base: / model: to continue pretraining a model")
    return _command_config(PretrainConfig, s, cfg, {**settings, "model": section})


def _build_finetune(s: Stage, by_name: dict[str, Stage], cfg: PipelineConfig) -> FinetuneConfig:
    settings = _resolve(s.settings, by_name)
    model = cfg.stages[s.name].get("model")
    section = _resolve(model, by_name, base_output=True) if isinstance(model, dict) else {}
    if s.model_stage is None and s.model_path is None:
        raise ConfigError(f"{s.where}: no model to fine-tune: no earlier stage makes one and the recipe has no "
                          f"base:; set base: (a model directory) or model: (a stage or a directory) on the stage")
    return _command_config(FinetuneConfig, s, cfg, {**settings,
                                                     "model": {**section, "base": _model_of(s, by_name, True)}})


def _run_training(run: Callable) -> Callable:
    def go(plan: Plan, s: Stage, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
        cfg = s.cfg.model_copy(update={"train": s.cfg.train.model_copy(update={"resume": "auto" if resume else False})})
        return run(cfg, recipe=plan.source if Path(plan.source).is_file() else None)
    return go


def _run_pretrain(cfg, recipe=None):
    from tunelab.train.pretrain import run_pretrain
    return run_pretrain(cfg, recipe=recipe)


def _run_finetune(cfg, recipe=None):
    from tunelab.train.finetune import run_finetune
    return run_finetune(cfg, recipe=recipe)


def _finetune_output(s: Stage) -> Path:
    return s.dir / ("model" if s.cfg.method.name == "full" else "adapter")


def _finetune_base(s: Stage) -> Path:
    return s.dir / ("model" if s.cfg.method.name == "full" else "merged")


def _build_eval(s: Stage, by_name: dict[str, Stage], cfg: PipelineConfig) -> EvalConfig:
    settings = _resolve(s.settings, by_name)
    if "models" in settings:
        raise ConfigError(f"{s.where}.models: an eval stage evaluates its model: (default: the previous stage's); "
                          f"remove models:")
    return _command_config(EvalConfig, s, cfg, {**settings, "models": [f"{s.name}={_model_of(s, by_name, False)}"]})


def _run_eval_stage(plan: Plan, s: Stage, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from tunelab.evaluate.suite import run_eval

    r = run_eval(s.cfg, log=log)
    return {"results_path": r["results_path"], "report_path": r["report_path"],
            "metrics": {k: v.get("metrics", {}) for k, v in r["models"][0]["tasks"].items()}}


class ExportSettings(Section):
    """An export stage: merge the previous stage's adapter into its base (a HF model directory), or write GGUF."""

    format: str = Field("hf", pattern="^(hf|gguf)$")
    gguf_type: str = "f16"
    tolerance: float | None = Field(None, ge=0)


def _build_export(s: Stage, by_name: dict[str, Stage], cfg: PipelineConfig) -> dict[str, Any]:
    e = validate(ExportSettings, s.settings, source=s.where)
    return {**e.model_dump(), "model": _model_of(s, by_name, False)}


def _run_export(plan: Plan, s: Stage, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    c = s.cfg
    if c["format"] == "gguf":
        from tunelab.formats.gguf_export import export_gguf
        return export_gguf(c["model"], s.dir / "gguf", gguf_type=c["gguf_type"], tolerance=c["tolerance"])
    from tunelab.export import export_merged
    s.dir.mkdir(parents=True, exist_ok=True)
    return export_merged(c["model"], s.dir / "model", tolerance=1e-4 if c["tolerance"] is None else c["tolerance"])


class TokenizerSettings(Section):
    """A `tokenizer train` stage: the keys of the command's options."""

    files: list[str] = Field(min_length=1)
    vocab_size: int = Field(32000, ge=1)
    min_frequency: int = Field(2, ge=0)
    text_key: str = "text"
    special_tokens: list[str] = []
    split_cjk: bool = False


def _build_tokenizer(s: Stage, by_name: dict[str, Stage], cfg: PipelineConfig) -> TokenizerSettings:
    return validate(TokenizerSettings, _resolve(s.settings, by_name), source=s.where)


def _run_tokenizer(plan: Plan, s: Stage, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from tunelab.vocab.train import train_tokenizer_files

    c = s.cfg
    s.dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer_files(c.files, s.dir / "tokenizer", vocab_size=c.vocab_size, min_frequency=c.min_frequency,
                                text_key=c.text_key, extra_special_tokens=c.special_tokens, split_cjk=c.split_cjk,
                                log=log)
    return {"tokenizer": str(s.dir / "tokenizer"), "tokens": len(tok)}


class SelectSettings(Section):
    """A `data select` stage: a slice of JSONL/JSON records (see tunelab/data/select.py)."""

    model_config = {**Section.model_config, "populate_by_name": True}
    paths: list[str] = Field(min_length=1, alias="from")
    where: dict[str, Any] = {}
    contains: list[str] = []
    exclude: list[str] = []
    skip: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1)
    text: bool = False


def _build_select(s: Stage, by_name: dict[str, Stage], cfg: PipelineConfig) -> SelectSettings:
    return validate(SelectSettings, _resolve(s.settings, by_name), source=s.where)


def _run_select(plan: Plan, s: Stage, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from tunelab.data.select import select_records

    c = s.cfg
    s.dir.mkdir(parents=True, exist_ok=True)
    r = select_records(c.paths, s.dir / "data.jsonl", c.where, c.contains, c.exclude, c.skip, c.limit, c.text)
    log(f"selected {r['selected']:,} of {r['read']:,} records -> {r['path']}")
    return r


class VocabSettings(Section):
    """A `vocab extend` stage: new tokens learned from `corpus`, the stage's model resized to them."""

    corpus: list[str] = Field(min_length=1)
    add: int = Field(ge=1)
    init: str = Field("sub-token-mean", pattern="^(sub-token-mean|mean|random)$")
    held_out: float = Field(0.05, ge=0, lt=1)
    min_frequency: int = Field(2, ge=1)
    text_key: str = "text"


def _build_vocab(s: Stage, by_name: dict[str, Stage], cfg: PipelineConfig) -> VocabSettings:
    return validate(VocabSettings, _resolve(s.settings, by_name), source=s.where), _model_of(s, by_name, True)


def _run_vocab(plan: Plan, s: Stage, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from tunelab.vocab.extend import extend_vocab, summary_lines

    v, base = s.cfg
    s.dir.mkdir(parents=True, exist_ok=True)
    r = extend_vocab(base, v.corpus, v.add, s.dir / "model", model=True, init=v.init, held_out=v.held_out,
                     min_frequency=v.min_frequency, text_key=v.text_key, log=log)
    for line in summary_lines(r):
        log(line)
    return {k: r[k] for k in ("added", "vocab_size_before", "vocab_size_after", "held_out", "wall_s") if k in r}


def _build_self_instruct(s: Stage, by_name: dict[str, Stage], cfg: PipelineConfig) -> Any:
    from tunelab.data.self_instruct import SelfInstructConfig

    settings = _resolve(s.settings, by_name)
    for key in ("out", "report", "generator"):
        if key in settings:
            raise ConfigError(f"{s.where}.{key}: set by the pipeline (the output is {s.dir / 'tasks.jsonl'}; the "
                              f"generator is the stage's model:, or generator_url); remove it")
    if "seed" in settings:
        raise ConfigError(f"{s.where}.seed: the pipeline's seed is used; remove it")
    model = None if settings.get("generator_url") else _model_of(s, by_name, as_base=False)
    return validate(SelfInstructConfig, {**settings, "out": str(s.dir / "tasks.jsonl"), "generator": model,
                                         "seed": cfg.seed}, source=s.where)


def _run_self_instruct(plan: Plan, s: Stage, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    import os

    from tunelab.data.self_instruct import format_summary, run_self_instruct

    s.dir.mkdir(parents=True, exist_ok=True)
    key = os.environ.get(s.cfg.api_key_env) if s.cfg.api_key_env else None
    r = run_self_instruct(s.cfg, api_key=key, log=log)
    for line in format_summary(r):
        log(line)
    return {"kept": r.get("kept"), "status": r.get("status"), "path": s.cfg.out}


CLEAN_KEYS = ("from", "workers", "on_error")  # a data clean / dedup stage's own keys; the rest is the recipe


def _build_clean(cls_name: str) -> Callable:
    def build(s: Stage, by_name: dict[str, Stage], cfg: PipelineConfig) -> tuple:
        from tunelab import clean

        settings = _resolve(s.settings, by_name)
        paths = settings.get("from")
        if not isinstance(paths, list) or not paths:
            raise ConfigError(f"{s.where}.from: the input files, directories or globs, as a list (e.g. [stage:x])")
        workers, on_error = settings.get("workers", 1), settings.get("on_error", "skip")
        if not isinstance(workers, int) or workers < 1 or on_error not in ("skip", "stop"):
            raise ConfigError(f"{s.where}: workers must be 1 or more (got {workers!r}), on_error skip or stop "
                              f"(got {on_error!r})")
        recipe = validate(getattr(clean, cls_name), {k: v for k, v in settings.items() if k not in CLEAN_KEYS},
                          source=s.where)
        return [str(p) for p in paths], recipe, workers, on_error
    return build


def _run_clean(plan: Plan, s: Stage, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from tunelab.clean import run_clean, run_dedup

    paths, recipe, workers, on_error = s.cfg
    run = run_clean if s.run == "data clean" else run_dedup
    r = run(paths, s.dir, recipe, workers=workers, on_error=on_error, log=log)
    return {k: v for k, v in r.items() if isinstance(v, int | float | str)}


@dataclass(frozen=True)
class Kind:
    """How the pipeline builds, runs and finds the output of one command."""

    build: Callable[[Stage, dict[str, Stage], PipelineConfig], Any]  # the validated settings, references resolved
    run: Callable[[Plan, Stage, bool, Callable[[str], None]], dict[str, Any]]  # do it (resume: continue a kill)
    output: Callable[[Stage], Path]  # what stage:NAME means
    inputs: Callable[[Stage], dict[str, Any]]  # every path it reads
    base: Callable[[Stage], Path] | None = None  # the model a later training stage starts from (None: makes none)
    trains: bool = False  # the eval suite runs after it; it has a target
    takes_model: bool = False
    model_section: bool = False  # `model:` may be a section (pretrain from a preset)
    wants_base: bool = False  # its model input is a whole model (an earlier adapter is merged for it)
    model_optional: bool = False  # it may run without a model (self-instruct with generator_url)
    merge_needed: Callable[[Stage], bool] = lambda s: False  # its output must be merged to be trained on
    mergeable: Callable[[Stage], bool] = lambda s: True


def _train_inputs(module: str) -> Callable[[Stage], dict[str, Any]]:
    def inputs(s: Stage) -> dict[str, Any]:
        import importlib
        return importlib.import_module(module).run_inputs(s.cfg)
    return inputs


STAGES: dict[str, Kind] = {
    "pretrain": Kind(_build_pretrain, _run_training(_run_pretrain), lambda s: s.dir / "model",
                     _train_inputs("tunelab.train.pretrain"), base=lambda s: s.dir / "model", trains=True,
                     takes_model=True, model_section=True, wants_base=True),
    "finetune": Kind(_build_finetune, _run_training(_run_finetune), _finetune_output,
                     _train_inputs("tunelab.train.finetune"), base=_finetune_base, trains=True, takes_model=True,
                     model_section=True, wants_base=True, merge_needed=lambda s: s.cfg.method.name != "full",
                     mergeable=lambda s: s.cfg.method.name in ("lora", "lora-dash", "dora", "tokens", "full")),
    "eval": Kind(_build_eval, _run_eval_stage, lambda s: s.dir,
                 lambda s: {"model": s.cfg.models[0].partition("=")[2],
                            "task data": [getattr(t, "path", None) for t in s.cfg.tasks],
                            "judge model": [getattr(t, "judge", None) for t in s.cfg.tasks]}, takes_model=True),
    "export": Kind(_build_export, _run_export,
                   lambda s: s.dir / ("gguf" if s.cfg["format"] == "gguf" else "model"),
                   lambda s: {"adapter": s.cfg["model"]},
                   base=lambda s: s.dir / "model", takes_model=True),
    "vocab extend": Kind(_build_vocab, _run_vocab, lambda s: s.dir / "model",
                         lambda s: {"base model": s.cfg[1], "corpus": s.cfg[0].corpus}, base=lambda s: s.dir / "model",
                         takes_model=True, wants_base=True),
    "data clean": Kind(_build_clean("CleanConfig"), _run_clean, lambda s: s.dir / "data",
                       lambda s: {"data": s.cfg[0]}),
    "data dedup": Kind(_build_clean("DedupConfig"), _run_clean, lambda s: s.dir / "data",
                       lambda s: {"data": s.cfg[0]}),
    "data self-instruct": Kind(_build_self_instruct, _run_self_instruct, lambda s: s.dir / "tasks.jsonl",
                               lambda s: {"seed tasks": s.cfg.seed_tasks, "generator model": s.cfg.generator},
                               takes_model=True, model_optional=True),
    "tokenizer train": Kind(_build_tokenizer, _run_tokenizer, lambda s: s.dir / "tokenizer",
                            lambda s: {"corpus": s.cfg.files}),
    "data select": Kind(_build_select, _run_select, lambda s: s.dir / "data.jsonl", lambda s: {"data": s.cfg.paths}),
}


# ---------------------------------------------------------------------------------------------------------
# fingerprints


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def _paths(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | Path):
        return [str(value)] if str(value) else []
    return [str(v) for v in value if v]


def _external(plan: Plan, inputs: dict[str, Any], s: Stage | None = None) -> list[str]:
    """The paths among `inputs` that are not outputs of the stages `s` reads (or, for the suite, of any stage):
    the user's own files, which no output may touch and whose contents are fingerprinted."""
    upstream = [plan.by_name[r].dir.resolve() for r in ((s.refs + [s.model_stage] if s.model_stage else s.refs)
                                                         if s is not None else plan.by_name)]
    return sorted({p for v in inputs.values() for p in _paths(v)
                   if not any(d == Path(p).resolve() or d in Path(p).resolve().parents for d in upstream)})


def _settings_key(s: Stage) -> dict[str, Any]:
    """A stage's settings as written, less those that change nothing it computes."""
    raw = json.loads(json.dumps(s.settings, default=str))
    for section, keys in FREE_KEYS.items():
        if isinstance(raw.get(section), dict):
            for k in keys:
                raw[section].pop(k, None)
    return raw


def fingerprint_stages(plan: Plan) -> None:
    """Each stage's key: its command, settings, seed, model input, input files (content) and upstream keys."""
    from tunelab.train.checkpoint import fingerprint

    for s in plan.stages:
        model = plan.cfg.stages[s.name].get("model")
        upstream = {r: plan.by_name[r].key for r in sorted(set(s.refs + ([s.model_stage] if s.model_stage else [])))}
        s.key = _digest({"run": s.run, "settings": _settings_key(s), "model": model, "seed": plan.cfg.seed,
                         "model_path": s.model_path, "files": fingerprint(_external(plan, s.kind.inputs(s), s)),
                         "upstream": upstream})


def _eval_key(plan: Plan, model_key: str) -> str | None:
    from tunelab.train.checkpoint import fingerprint

    if plan.cfg.eval is None:
        return None
    tasks = [t.model_dump(mode="json") for t in plan.tasks]
    files = fingerprint([p for t in plan.tasks for p in _paths(getattr(t, "path", None))
                         + _paths(getattr(t, "judge", None))])
    return _digest({"tasks": tasks, "files": files, "precision": plan.cfg.eval.precision, "seed": plan.cfg.seed,
                    "model": model_key})


# ---------------------------------------------------------------------------------------------------------
# running


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"stages": {}}
    return state if isinstance(state, dict) and isinstance(state.get("stages"), dict) else {"stages": {}}


def _check_inputs_exist(plan: Plan) -> None:
    """Every file or directory a stage reads from outside the pipeline exists (before anything runs)."""
    import glob

    for s in plan.stages:
        for kind, value in s.kind.inputs(s).items():
            for p in _external(plan, {kind: value}, s):
                if not (Path(p).exists() or (glob.has_magic(p) and glob.glob(p, recursive=True))):
                    raise DataError(f"{s.where}: the {kind} {p} does not exist; fix the path (relative paths are "
                                    f"relative to {Path.cwd()})")
    for t in plan.tasks:
        for p in _external(plan, {"data": getattr(t, "path", None)}):
            if not (Path(p).exists() or glob.glob(p, recursive=True)):
                raise DataError(f"{plan.source}: eval: task {t.name or t.type!r}: {p} does not exist; fix the path")


def run_pipeline(cfg: PipelineConfig, source: str = "recipe", rerun: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or reuse) every stage in order, evaluate after each training stage, write the report.

    Returns the report (as written to pipeline_report.json) with the paths of the two report files. A stage's
    failure raises `PipelineError` after the report of the stages before it is written."""
    from tunelab.pipeline_report import build_report, write_report
    from tunelab.train.events import EventLog

    started = time.time()
    plan = plan_pipeline(cfg, source)
    inputs = {f"{kind} of stage {s.name}": _external(plan, {kind: v}, s) for s in plan.stages
              for kind, v in s.kind.inputs(s).items()}
    inputs["eval data"] = _external(plan, {"d": [getattr(t, "path", None) for t in plan.tasks]})
    inputs["recipe"] = source if Path(source).is_file() else None
    out = check_run_dir(plan.dir, RUN_KIND, [s.name for s in plan.stages] +
                        [BASE_EVAL, STATE, "events.jsonl", REPORT_JSON, REPORT_HTML], inputs)
    _check_inputs_exist(plan)
    fingerprint_stages(plan)
    open_run_dir(out, RUN_KIND)
    clear_outputs(out, [REPORT_JSON, REPORT_HTML])
    state = _read_state(out / STATE)
    runner = _Runner(plan, state, out / STATE, rerun, log)
    error: str | None = None
    with EventLog(out / "events.jsonl", append=True) as events:
        events.write("start", stages=[s.name for s in plan.stages], rerun=rerun)
        try:
            for s in plan.stages:
                if s.kind.trains and plan.base is not None and runner.base_eval is None and plan.tasks:
                    runner.evaluate_base()
                runner.stage(s)
                events.write("stage", name=s.name, run=s.run, status=runner.status[s.name])
        except Exception as e:  # noqa: BLE001 - any stage's failure stops the pipeline with one line
            what = runner.current if runner.current == BASE_EVAL else \
                f"stages.{runner.current} ({plan.by_name[runner.current].run})"
            text = (str(e).strip().splitlines() or [""])[0]
            error = f"{what} failed: {text if isinstance(e, TunelabError) else f'{type(e).__name__}: {text}'}"
            runner.status[runner.current] = "failed"
            events.write("failed", stage=runner.current, error=error)
        report = build_report(plan, state, runner.status, runner.base_eval, error, time.time() - started)
        paths = write_report(report, out)
        events.write("end", wall_s=report["wall_s"], failed=runner.current if error else None)
    if error is not None:
        done = [n for n, st in runner.status.items() if st in ("ran", "reused", "reevaluated")]
        kept = f"the stages before it ({', '.join(done)}) are finished and kept in {out}" if done else \
            "no stage had finished"
        raise PipelineError(f"{error} ({kept}; the report is {paths['report_path']}); fix it and run the same "
                            f"command again: finished stages are reused")
    return {**report, **paths}


class _Runner:
    """Runs the stages of a plan, keeping their state (key, status, summary, metrics) in state.json."""

    def __init__(self, plan: Plan, state: dict, path: Path, rerun: bool, log: Callable[[str], None]):
        self.plan, self.state, self.path, self.rerun, self.log = plan, state, path, rerun, log
        self.status: dict[str, str] = {}
        self.current: str | None = None
        self.base_eval: dict[str, Any] | None = None

    def save(self) -> None:
        atomic_write_json(self.path, self.state)

    def stage(self, s: Stage) -> None:
        self.current = s.name
        n = len(self.plan.stages)
        tag = f"[{s.index + 1}/{n}] {s.name} ({s.run})"
        records = self.state["stages"]
        rec = records.get(s.name)
        output = s.kind.output(s)
        if not self.rerun and rec and rec.get("status") == "finished" and rec.get("key") == s.key and output.exists():
            self.status[s.name] = "reused"
            self.log(f"{tag}: reused (same settings, inputs and upstream stages): {output}")
        else:
            if rec and rec.get("run") != s.run and s.dir.is_dir():
                shutil.rmtree(s.dir)  # this pipeline's own earlier stage of another command
            resume = bool(rec and rec.get("status") == "started" and rec.get("key") == s.key and not self.rerun)
            records[s.name] = rec = {"run": s.run, "key": s.key, "status": "started"}
            self.save()
            self.log(f"{tag}: {'continuing' if resume else 'running'} -> {s.dir}")
            t0 = time.time()
            summary = s.kind.run(self.plan, s, resume, self.log)
            rec.update(status="finished", summary=_plain(summary), wall_s=round(time.time() - t0, 1),
                       output=str(output))
            self.save()
            self.status[s.name] = "ran"
            self.log(f"{tag}: done in {rec['wall_s']:.0f}s: {output}")
        if s.needs_merge and not (rec.get("merged") and (s.kind.base(s) / "config.json").is_file()):
            self.merge(s, rec, tag)
        if s.kind.trains and self.plan.tasks:
            self.evaluate(s, rec, tag)

    def merge(self, s: Stage, rec: dict, tag: str) -> None:
        from tunelab.export import export_merged

        self.log(f"{tag}: merging the adapter into its base for the next stage -> {s.kind.base(s)}")
        r = export_merged(s.kind.output(s), s.kind.base(s))
        rec["merged"] = {"dir": str(s.kind.base(s)), "max_abs_logit_diff": r["max_abs_logit_diff"]}
        self.save()

    def evaluate(self, s: Stage, rec: dict, tag: str) -> None:
        key = _eval_key(self.plan, s.key)
        results = s.dir / "eval" / "results.json"
        if rec.get("eval_key") == key and results.is_file() and rec.get("eval") is not None:
            return
        self.log(f"{tag}: evaluating {s.kind.output(s)} on the suite")
        rec["eval"] = self._suite(str(s.kind.output(s)), s.name, s.dir, "eval")
        rec["eval_key"] = key
        if self.status.get(s.name) == "reused":
            self.status[s.name] = "reevaluated"
        self.save()

    def evaluate_base(self) -> None:
        base = self.plan.base
        from tunelab.train.checkpoint import fingerprint

        key = _eval_key(self.plan, _digest(fingerprint([base])))
        rec = self.state.get("base") or {}
        if rec.get("key") == key and (self.plan.dir / BASE_EVAL / "results.json").is_file():
            self.base_eval = rec
            return
        self.current = BASE_EVAL
        self.log(f"[base] evaluating the base model {base} on the suite")
        self.state["base"] = self.base_eval = {"key": key, "model": base,
                                               "eval": self._suite(base, "base", self.plan.dir, BASE_EVAL)}
        self.save()

    def _suite(self, model: str, label: str, out_dir: Path, name: str) -> dict[str, dict[str, float]]:
        from tunelab.evaluate.suite import run_eval

        p = self.plan
        ecfg = EvalConfig(name=name, seed=p.cfg.seed, out_dir=str(out_dir), models=[f"{label}={model}"],
                          precision=p.cfg.eval.precision, tasks=p.tasks)
        r = run_eval(ecfg, log=lambda line: self.log(f"  {line}"))
        return {"results_path": r["results_path"],
                "metrics": {k: v.get("metrics", {}) for k, v in r["models"][0]["tasks"].items()}}


def _plain(value: Any) -> Any:
    """A summary as JSON data (paths as strings)."""
    return json.loads(json.dumps(value, default=str))

