"""`tunelab pipeline`'s plan: the graph of stage references checked (known commands, no missing, later or
cyclic references), each stage's model input found and its settings validated, before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config import validate
from tunelab.errors import ConfigError
from tunelab.pipeline.recipe import BASE_EVAL, PIPELINE_KEYS, REF, PipelineConfig, Plan, Stage, _StageName
from tunelab.pipeline.refs import _refs_in, _resolve
from tunelab.pipeline.stages import STAGES


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
        s = Stage(i, name, raw["run"], settings, f"{source}: stages.{name}", root / name, STAGES[raw["run"]],
                  targets=[target] if isinstance(target, str) else list(target or []), refs=graph[name])
        if s.kind.takes_model and "base" in raw:
            raise ConfigError(f"{s.where}.base: base: is a key of the recipe's top level (the first training "
                              f"stage's model); on a stage write model: {raw['base']}")
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
                          f"base:; set base: (a model directory) at the recipe's top level, or model: on the stage")


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
