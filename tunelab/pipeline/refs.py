"""`stage:NAME[/sub]` references in a stage's settings (found, resolved to paths), a stage's model directory,
and a command's config as the pipeline builds it: what the planner and the stage builders share."""

from __future__ import annotations

from typing import Any

from tunelab.config import Section, validate
from tunelab.errors import ConfigError
from tunelab.pipeline.recipe import REF, PipelineConfig, Stage


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
