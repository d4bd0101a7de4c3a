"""`tunelab pipeline`'s recipe model and plain types: its constants, errors, sections, a stage and a plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from tunelab.config import EvalTask, Precision, RunName, Section
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.pipeline.stages import Kind

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


@dataclass
class Stage:
    index: int
    name: str
    run: str
    settings: dict[str, Any]  # the command's sections as written (stage: references unresolved)
    where: str  # "<recipe>: stages.<name>", for messages
    dir: Path
    kind: Kind = field(repr=False)  # STAGES[run]: how its command is built, run and found
    targets: list[str] = field(default_factory=list)
    model_stage: str | None = None  # the earlier stage whose model this one starts from
    model_path: str | None = None  # or a model directory
    refs: list[str] = field(default_factory=list)  # every earlier stage it reads
    cfg: Any = None  # the command's validated config
    needs_merge: bool = False  # a later training stage starts from this stage's adapter
    key: str = ""


@dataclass
class Plan:
    cfg: PipelineConfig
    source: str
    dir: Path
    stages: list[Stage]
    by_name: dict[str, Stage]
    tasks: list[Any]  # the eval suite's tasks, references resolved
    base: str | None  # the model the suite measures before any stage (the first training stage's input)


class _StageName(Section):
    name: RunName
