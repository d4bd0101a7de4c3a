"""The stages of `tunelab pipeline`: how each command is built, run and where its output lands (`STAGES`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from tunelab.config import EvalConfig, FinetuneConfig, PretrainConfig, Section, validate
from tunelab.errors import ConfigError
from tunelab.pipeline.recipe import PipelineConfig, Plan, Stage
from tunelab.pipeline.refs import _command_config, _model_of, _resolve


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
                          f"base:; set base: (a model directory) at the recipe's top level, or model: (a stage or a "
                          f"directory) on the stage")
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


def _settings(cls: type[Section]) -> Callable:
    """The builder of a stage whose settings are exactly `cls`'s keys (references to earlier stages resolved)."""
    return lambda s, by_name, cfg: validate(cls, _resolve(s.settings, by_name), source=s.where)


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
    "tokenizer train": Kind(_settings(TokenizerSettings), _run_tokenizer, lambda s: s.dir / "tokenizer",
                            lambda s: {"corpus": s.cfg.files}),
    "data select": Kind(_settings(SelectSettings), _run_select, lambda s: s.dir / "data.jsonl",
                        lambda s: {"data": s.cfg.paths}),
}
