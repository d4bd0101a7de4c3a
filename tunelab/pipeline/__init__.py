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

The package: recipe.py (the recipe model and plain types), refs.py (stage: references, a stage's model
input), stages.py (each command's builder and runner; `STAGES`), plan.py (the graph checks and the plan),
runner.py (fingerprints, state.json, `run_pipeline`), report.py (pipeline_report.json and .html).
"""

from tunelab.pipeline.plan import plan_pipeline
from tunelab.pipeline.recipe import (
    BASE_EVAL,
    REPORT_HTML,
    REPORT_JSON,
    RUN_KIND,
    STATE,
    PipelineConfig,
    PipelineError,
    PipelineEval,
    Plan,
    Stage,
)
from tunelab.pipeline.runner import fingerprint_stages, run_pipeline
from tunelab.pipeline.stages import STAGES, Kind

__all__ = ["BASE_EVAL", "REPORT_HTML", "REPORT_JSON", "RUN_KIND", "STAGES", "STATE", "Kind", "PipelineConfig",
           "PipelineError", "PipelineEval", "Plan", "Stage", "fingerprint_stages", "plan_pipeline", "run_pipeline"]
