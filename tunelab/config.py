"""Recipes: pydantic models for every section, YAML loading and dotted command-line overrides.

A recipe is a YAML mapping validated by one of the `*Config` models below; unknown keys are errors that
name the key and suggest the closest valid one. Any key can be overridden on the command line as
`section.key=value` (the value is parsed as YAML, so `train.lr=3e-4`, `data.sources.0.weight=2`,
`model.base=null` all work). Relative paths are relative to the current working directory.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunelab.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16"]
Beta = Annotated[float, Field(ge=0, lt=1)]
RunName = Annotated[str, Field(pattern=r"^\w[\w.-]*$")]  # one directory name: letters, digits, _ . -


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False,
                              coerce_numbers_to_str=True)


class ModelSection(Section):
    """Where the model comes from: a local HF directory (`base`) or a built-in size `preset`."""

    base: str | None = None
    preset: Literal["micro", "tiny", "small"] | None = None
    arch: Literal["llama", "qwen2"] = "llama"
    tokenizer: str | None = None  # tokenizer directory; defaults to `base`

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.base is None) == (self.preset is None):
            raise ValueError("set exactly one of model.base (a local HF model directory, to continue "
                             "training) or model.preset (micro|tiny|small, to start from scratch)")
        if self.preset is not None and self.tokenizer is None:
            raise ValueError("model.preset needs model.tokenizer: a local tokenizer directory "
                             "(make one with `tunelab tokenizer train`)")
        return self


class Source(Section):
    """One pretraining source: a file, directory or glob of .txt/.jsonl/.json files, and its weight."""

    path: str
    weight: float = Field(1.0, gt=0)
    text_key: str = "text"


class PretrainData(Section):
    """Pretraining data: weighted sources packed into `seq_len` blocks, and held-out evaluation text."""

    sources: list[Source] = Field(min_length=1)
    seq_len: int = Field(256, ge=8)
    eval_paths: list[str] = []  # held-out files; when empty, `eval_fraction` of each source's documents
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    eval_text_key: str = "text"  # key of the text in .jsonl/.json eval_paths
    document_mask: bool = False  # attention and positions restart at each document inside a block


class TrainSection(Section):
    """The optimisation loop shared by pretraining and fine-tuning."""

    steps: int = Field(200, ge=1)  # optimizer steps
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    precision: Precision = "auto"
    eval_every: int = Field(100, ge=0)  # 0: evaluate only before and after
    eval_batches: int = Field(20, ge=1)  # cap on evaluation micro-batches
    log_every: int = Field(10, ge=1)
    save_every: int = Field(0, ge=0)  # checkpoint every N steps (and at the end); 0: only at the end
    keep_checkpoints: int = Field(2, ge=1)  # the last k complete checkpoints are kept
    resume: bool | Literal["auto"] = False  # true: continue from the last checkpoint; auto: if there is one
    resume_force: bool = False  # resume even when the recipe or the data changed since the checkpoint
    # under torchrun: ddp (every process holds the whole model; gradients summed) or fsdp (FSDP2: parameters,
    # gradients and optimizer state sharded across the processes); one process ignores it
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # full: the first process writes whole tensors; sharded: every process writes its shards
    # (torch.distributed.checkpoint), and the checkpoint resumes on any number of processes
    checkpoint_format: Literal["full", "sharded"] = "full"
    # sync: training waits for the save; async (sharded only): it goes on once the state is copied to memory
    checkpoint: Literal["sync", "async"] = "sync"

    @model_validator(mode="after")
    def _async_is_sharded(self) -> TrainSection:
        if self.checkpoint == "async" and self.checkpoint_format != "sharded":
            raise ValueError("train.checkpoint=async writes sharded checkpoints only; set "
                             "train.checkpoint_format=sharded too (or train.checkpoint=sync)")
        return self


class PretrainConfig(Section):
    """`tunelab pretrain`: pretrain from a preset or continue pretraining a local model."""

    name: RunName = "pretrain"
    seed: int = Field(0, ge=0)
    out_dir: str = "runs"  # the run writes to <out_dir>/<name>/
    model: ModelSection
    data: PretrainData
    train: TrainSection = TrainSection()


class MethodSection(Section):
    """How to fine-tune: `lora` (low-rank adapters on the target linear layers), `full` (every weight),
    `lora-dash` (LoRA, then s task-specific directions), `dora` (LoRA + magnitudes), `adapter` (LLaMA-Adapter) or
    `qtha` (MPO + simulated quantum circuit branch; `dropout` and `target_modules` apply to it too)."""

    name: Literal["lora", "full", "lora-dash", "dora", "adapter", "qtha", "tokens"] = "lora"
    r: int = Field(8, ge=1)  # LoRA rank
    alpha: float = Field(16.0, gt=0)  # scaling = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = Field(0.05, ge=0, lt=1)  # on the input of the LoRA branch only
    rslora: bool = False
    # module names (a layer matches when its name equals one or ends with ".name"), one full-match regex
    # over the whole module name (a string), or "all-linear" (every nn.Linear except the output head)
    target_modules: list[str] | str = "all-linear"
    init: Literal["kaiming", "gaussian"] = "kaiming"  # as PEFT's init_lora_weights=True / "gaussian"
    freeze_embeddings: bool = False  # full only: keep input embeddings (and a tied head) frozen
    # lora: also train embedding rows: new (the tokens `tunelab vocab extend --model` added), all, or none;
    # tokens (only those rows train, Chinese-LLaMA's stage 1): new (its default) or all
    train_embeddings: Literal["none", "new", "all"] = "none"
    dash_steps: int = Field(100, ge=1)  # lora-dash: optimizer steps of plain LoRA before the directions are chosen
    dash_directions: int = Field(8, ge=1)  # lora-dash: directions s trained per layer after the switch
    adapter_prompt_len: int = Field(10, ge=1)  # adapter: prompt tokens K per adapted layer
    adapter_layers: int | None = Field(None, ge=1)  # adapter: the top L layers get prompts; null: every layer
    qtha_qubits: int = Field(8, ge=1, le=12)  # qtha: qubits n of the circuit (its cost grows as 4^n)
    qtha_depth: int = Field(2, ge=1)  # qtha: L layers of rotations + a CNOT ring
    qtha_rotations: list[Literal["ry", "rz", "rx"]] = Field(["ry"], min_length=1)  # qtha: each layer's, in order
    qtha_cores: int = Field(3, ge=1)  # qtha: MPO cores (each dimension split into this many factors)
    # qtha: MPO bond dimension; null: per module the largest (<= 64) within qtha_budget x LoRA r=8's parameters
    qtha_bond: int | None = Field(None, ge=1)
    qtha_budget: float = Field(0.24, gt=0)  # qtha: with qtha_bond null, the share of LoRA r=8's parameters
    qtha_scale: float = Field(1.0, gt=0)  # qtha: s in y = W x + s * delta(x)
    # qtha: exact (autograd), parameter-shift (hardware-style gradients) or shots (sampled expectations)
    qtha_mode: Literal["exact", "parameter-shift", "shots"] = "exact"
    qtha_shots: int = Field(1000, ge=1)  # qtha: measurements per circuit in shots mode


class SFTData(Section):
    """Instruction / chat data: files in Alpaca, messages, ShareGPT or plain-text form (detected)."""

    train: list[str] = Field(min_length=1)  # files, directories or globs (.jsonl, .json, .csv, .parquet)
    eval: list[str] = []  # held-out files; when empty, `eval_fraction` of the training examples
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    format: Literal["auto", "alpaca", "messages", "sharegpt", "seed", "text"] = "auto"
    train_on: Literal["assistant", "last", "all"] = "assistant"  # which tokens carry the loss
    max_len: int = Field(1024, ge=8)  # longer examples are cut at the end (see tunelab/data/chat.py)
    same_role: Literal["merge", "error"] = "merge"  # two consecutive turns of one role
    allow_empty: bool = False  # drop examples with no trainable token instead of stopping
    packing: bool = False  # examples packed into max_len rows, attention kept inside each (data/packing.py)
    chat_template: str | None = None  # "chatml", "plain" or a .jinja file; default: the tokenizer's own


class FinetuneTrain(TrainSection):
    """The loop's settings; `epochs`, when set, decides the number of steps from the data size."""

    epochs: float | None = Field(None, gt=0)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)


class FinetuneConfig(Section):
    """`tunelab finetune`: supervised fine-tuning of a local model with LoRA or full fine-tuning."""

    name: RunName = "finetune"
    seed: int = Field(0, ge=0)
    out_dir: str = "runs"
    model: ModelSection
    data: SFTData
    method: MethodSection = MethodSection()
    train: FinetuneTrain = FinetuneTrain()

    @model_validator(mode="after")
    def _needs_base(self) -> FinetuneConfig:
        if self.model.base is None:
            raise ValueError("fine-tuning needs model.base: a local HF model directory (for example one "
                             "written by `tunelab pretrain`, runs/<name>/model)")
        return self


class DemoConfig(Section):
    """`tunelab demo`: generate the demo world, train its tokenizer, pretrain the tiny model."""

    name: RunName = "demo"
    seed: int = Field(0, ge=0)
    out_dir: str = "runs"
    data_scale: float = Field(1.0, gt=0, le=10)  # size of the generated corpus (1.0 = about 1.6 MB of text)
    vocab_size: int = Field(4096, ge=300)
    preset: Literal["micro", "tiny", "small"] = "tiny"
    arch: Literal["llama", "qwen2"] = "llama"
    seq_len: int = Field(128, ge=8)
    samples: int = Field(6, ge=0)  # fact prompts shown before and after pretraining
    sample_tokens: int = Field(12, ge=1)
    train: TrainSection = TrainSection(steps=600, micro_batch_size=16, lr=3e-3, warmup_steps=20,
                                       eval_every=200, eval_batches=8, log_every=20)
    # then: supervised fine-tuning of the pretrained model on the instruction tasks
    method: MethodSection = MethodSection(r=16, alpha=32, dropout=0.0)
    finetune: FinetuneTrain = FinetuneTrain(steps=800, micro_batch_size=16, lr=3e-3, warmup_steps=20,
                                            eval_every=200, eval_batches=4, log_every=20)
    answer_tokens: int = Field(12, ge=1)  # tokens generated per held-out instruction


class DemoRealConfig(Section):
    """`tunelab demo-real`: LoRA teaches a real pretrained model (SmolLM2-135M-Instruct) the demo world's facts."""

    name: RunName = "demo-real"
    seed: int = Field(0, ge=0)
    out_dir: str = "runs"
    model: str = "smollm2-135m-instruct"  # a name `tunelab models list` shows, or a local HF model directory
    questions: int = Field(40, ge=1)  # held-out fact questions answered before and after
    method: MethodSection = MethodSection(r=16, alpha=32, dropout=0.0)
    finetune: FinetuneTrain = FinetuneTrain(steps=60, micro_batch_size=8, lr=2e-3, warmup_steps=6, eval_every=0,
                                            eval_batches=4, log_every=10)
    max_len: int = Field(96, ge=8)  # the longest fact task with SmolLM2's template is 79 tokens
    answer_tokens: int = Field(12, ge=1)


# ---------------------------------------------------------------------------------------------------------
# `tunelab eval`: a suite of tasks, each a section with a `type` (see tunelab/evaluate/)


class PerplexityTask(Section):
    """Perplexity and bits per byte of text files (.txt/.jsonl/.json), HF sliding window."""

    type: Literal["perplexity"]
    name: str | None = None  # default: the type, numbered when repeated
    path: str  # a file, a directory or a glob
    text_key: str = "text"
    max_length: int | None = Field(None, ge=2)  # window in tokens; default: the model's context
    stride: int | None = Field(None, ge=1)  # default: max_length // 2; max_length = disjoint windows
    batch_size: int = Field(4, ge=1)


class ChoiceTask(Section):
    """Multiple choice, k-shot: CMMLU/C-Eval or MMLU CSV folders (dev/, test/) or JSONL."""

    type: Literal["choice"]
    name: str | None = None
    path: str  # a directory with <split>/ and <fewshot_split>/ folders of one file per subject, or one file
    split: str = "test"
    fewshot_split: str = "dev"
    k: int = Field(5, ge=0)  # few-shot examples from the fewshot split (fewer when a prompt does not fit)
    subjects: list[str] = []  # empty: every subject
    limit: int | None = Field(None, ge=1)  # at most this many questions per subject
    prompt: Literal["ceval", "mmlu"] = "ceval"  # Chinese header and 答案： / English header and Answer:
    subject_names: dict[str, str] = {}  # display names in the header (default: the file name, _ as space)
    chat_template: str | None = None  # wrap each prompt as a user turn: "chatml", "plain", a .jinja file, "auto"
    max_length: int | None = Field(None, ge=8)  # context in tokens; default: the model's
    batch_size: int = Field(8, ge=1)


class GenerationTask(Section):
    """Greedy generation and answer extraction: strict accuracy on JSONL prompts with references."""

    type: Literal["generation"]
    name: str | None = None
    path: str  # .jsonl/.json: {instruction, input?, output} | {question|prompt, answer} | {messages}
    extract: Literal["exact", "regex", "numeric"] = "exact"
    pattern: str | None = None  # regex mode: the first group (or the whole match) is the answer
    tolerance: float = Field(1e-6, ge=0)  # numeric mode: |reply - reference| <= tolerance
    group_by: str = "task"  # per-group accuracy by this record key, when records have it
    chat_template: str | None = "auto"  # "auto" (the tokenizer's), "chatml", "plain", a .jinja file; null: raw
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(32, ge=1)
    limit: int | None = Field(None, ge=1)


class JudgeTask(Section):
    """LLM-as-judge: pairwise (each model against the first, order swapped) or single 1-10 grading."""

    type: Literal["judge"]
    name: str | None = None
    path: str  # prompts, in any format the generation task reads (references are not used)
    mode: Literal["pairwise", "single"] = "pairwise"
    judge: str | None = None  # a local model (or adapter) directory
    judge_url: str | None = None  # or an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    judge_model: str = "judge"  # the model name sent to the endpoint
    api_key_env: str | None = None  # name of an environment variable holding the endpoint's key
    timeout: float = Field(120.0, gt=0)  # seconds per judge request
    judge_max_tokens: int = Field(256, ge=1)
    chat_template: str | None = "auto"  # for the evaluated models' answers
    max_new_tokens: int = Field(128, ge=1)  # answer length
    batch_size: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_judge(self) -> JudgeTask:
        if (self.judge is None) == (self.judge_url is None):
            raise ValueError("a judge task needs exactly one of judge (a local model directory) or judge_url "
                             "(an OpenAI-compatible endpoint, also --judge-url)")
        return self


EvalTask = Annotated[PerplexityTask | ChoiceTask | GenerationTask | JudgeTask, Field(discriminator="type")]
TASK_TYPES = {"perplexity": PerplexityTask, "choice": ChoiceTask, "generation": GenerationTask, "judge": JudgeTask}


class EvalConfig(Section):
    """`tunelab eval`: run a suite of tasks on one or more models; results.json and report.html."""

    name: RunName = "eval"
    seed: int = Field(0, ge=0)
    out_dir: str = "runs"  # writes <out_dir>/<name>/results.json, report.html, events.jsonl
    models: list[str] = []  # "dir" or "label=dir"; a dir may be an adapter; --models overrides
    precision: Precision = "auto"  # auto: bf16 on a GPU that supports it or a CPU with AMX, else fp32
    tasks: list[EvalTask] = Field(min_length=1)


# ---------------------------------------------------------------------------------------------------------
# `tunelab compare`: several methods on one base model, data, budget and seed (see tunelab/compare.py)


class CompareMethod(Section):
    """One entry of `methods:`: a `label`, the keys of a fine-tuning recipe's `method:` section (name, r, ...)
    and optional `train:` overrides (e.g. lr). The method keys are checked when the comparison starts; a bad
    entry fails that method only and the others still run."""

    model_config = ConfigDict(extra="allow")  # the method's settings, validated per entry as a MethodSection
    label: RunName  # the method's row and its run directory, <out_dir>/<name>/runs/<label>/
    train: dict[str, Any] = {}  # train keys that differ for this method (never the budget: steps, epochs, batch)


class ComparePretrain(Section):
    """Make the base model first: a byte-level BPE tokenizer and a `preset` pretrained on the text of the
    training examples (the held-out examples excluded); run once and reused while it and the data are unchanged."""

    preset: Literal["micro", "tiny", "small"] = "tiny"
    arch: Literal["llama", "qwen2"] = "llama"
    vocab_size: int = Field(8000, ge=300)
    split_cjk: bool = True  # at most one Chinese/Japanese/Korean character per token (small corpora)
    seq_len: int = Field(256, ge=8)
    eval_fraction: float = Field(0.02, ge=0, lt=1)  # of the pretraining text, for pretraining's own eval loss
    train: TrainSection = TrainSection()


class GeneralEval(Section):
    """General skill outside the tuned domain: token loss on other instruction data (e.g. the Self-Instruct seed
    tasks), measured on the base model and on every tuned model, so that forgetting shows."""

    path: list[str] = Field(min_length=1)  # files, directories or globs, in any format data.train reads
    format: Literal["auto", "alpaca", "messages", "sharegpt", "seed", "text"] = "auto"
    limit: int | None = Field(None, ge=1)  # the first `limit` examples
    max_len: int | None = Field(None, ge=8)  # default: data.max_len


class CompareConfig(Section):
    """`tunelab compare`: fine-tune several methods on the same base, data, budget and seed; one table."""

    name: RunName = "compare"
    seed: int = Field(0, ge=0)
    out_dir: str = "runs"  # writes <out_dir>/<name>/results.json, results.csv, report.html and runs/<label>/
    model: ModelSection | None = None  # model.base: the local model every method starts from
    pretrain: ComparePretrain | None = None  # or: make that model first (instead of model:)
    data: SFTData
    train: FinetuneTrain = FinetuneTrain()  # shared by every method: the same steps, batch and max_len
    methods: list[CompareMethod] = Field(min_length=1)
    baseline: str | None = None  # label the tokens/s and memory ratios are relative to; default: the first
    eval: GenerationTask | None = None  # held-out prompts with answers: strict accuracy of each tuned model
    general: GeneralEval | None = None  # general skill before and after: loss on other data (forgetting)
    final_loss_steps: int | None = Field(None, ge=1)  # final train loss = mean of the last N steps (default 10%)
    smooth_steps: int | None = Field(None, ge=1)  # moving average of the plotted loss curves (default steps/25)

    @model_validator(mode="before")
    @classmethod
    def _eval_is_generation(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("eval"), dict) and "type" not in data["eval"]:
            data = {**data, "eval": {"type": "generation", **data["eval"]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        if (self.model is None) == (self.pretrain is None):
            raise ValueError("set exactly one of model.base (the local model every method starts from) or a "
                             "pretrain: section (make that model first from the training data)")
        if self.model is not None and self.model.base is None:
            raise ValueError("model.preset: a comparison fine-tunes an existing model; set model.base to a local "
                             "HF model directory, or replace model: by a pretrain: section")
        seen: dict[str, int] = {}
        for i, m in enumerate(self.methods):
            if m.label in seen:
                raise ValueError(f"methods.{i}.label: {m.label!r} is also the label of methods.{seen[m.label]}; "
                                 f"give each method its own label")
            seen[m.label] = i
        if self.baseline is not None and self.baseline not in seen:
            raise ValueError(f"baseline: {self.baseline!r} is not a method label; use one of {', '.join(seen)}")
        return self


# ---------------------------------------------------------------------------------------------------------
# loading, overrides, error messages


def load_config(cls: type[Section], path: str | Path | None = None, overrides: list[str] = ()) -> Section:
    """Read a YAML recipe (or start empty), apply `key=value` overrides and validate it as `cls`."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    return validate(cls, raw, source=str(path) if path else "command line", overrides=overrides)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (safe_load keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first set at line {seen[key]}); keep one of them",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML file into a mapping; syntax errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: recipe file not found (give the path of a YAML file, e.g. examples/demo.yaml)")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a safe loader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if problem.startswith("duplicate key"):
            raise ConfigError(f"{where}: {problem}") from None
        raise ConfigError(f"{where}: malformed YAML ({problem}); fix the syntax at that line") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file; save the recipe as UTF-8 YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a YAML mapping of sections (model:, data:, train:), "
                          f"got a {type(data).__name__}")
    return data


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set one dotted `a.b.c=value` override in `raw`; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}': expected key=value, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{item}': '{'.'.join(parts[:i])}' is a list of {len(node)}; "
                                  f"use an index 0..{len(node) - 1}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{'.'.join(parts[:i])}' is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]


def validate(cls: type[Section], raw: dict[str, Any], source: str = "recipe", overrides: list[str] = ()) -> Section:
    """Validate `raw` as `cls`, turning pydantic's report into one clear line per problem.

    A problem at (or under) the key of one of `overrides` is blamed on that override, not on `source`.
    """
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        parts: list[tuple[str, str]] = []
        for err in e.errors():
            where = _override_at(_loc(err), overrides) or source
            line = _describe(cls, err)
            if parts and parts[-1][0] == where:
                parts[-1] = (where, f"{parts[-1][1]}; {line}")
            else:
                parts.append((where, line))
        raise ConfigError("; ".join(f"{where}: {line}" for where, line in parts)) from None


def _override_at(loc: list[str], overrides: list[str]) -> str | None:
    """The last override (the one that took effect) whose key is `loc` or a section above it, quoted."""
    for item in reversed(list(overrides)):
        key = [k.strip() for k in item.partition("=")[0].strip().split(".")]
        if loc[:len(key)] == key:
            return f"override '{item}'"
    return None


# Names other toolkits use for our keys, so "did you mean" can point across vocabularies.
SYNONYMS = {"learning_rate": "lr", "max_steps": "steps", "batch_size": "micro_batch_size",
            "per_device_train_batch_size": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
            "max_grad_norm": "grad_clip", "block_size": "seq_len", "max_seq_length": "seq_len",
            "warmup": "warmup_steps", "model_name_or_path": "base", "dtype": "precision"}


def _closest(key: str, valid: list[str]) -> str | None:
    """The valid key a mistyped `key` most likely means, directly or through a known synonym."""
    names = valid + [k for k, v in SYNONYMS.items() if v in valid]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return SYNONYMS.get(close[0], close[0]) if close else None


def _loc(err: dict[str, Any]) -> list[str]:
    """An error's location as recipe keys (pydantic puts a task's type after its list index: tasks.0.choice.k)."""
    raw_loc = err["loc"]
    return [str(x) for i, x in enumerate(raw_loc) if not (i and isinstance(raw_loc[i - 1], int) and x in TASK_TYPES)]


def _describe(cls: type[BaseModel], err: dict[str, Any]) -> str:
    loc = _loc(err)
    key = ".".join(loc) or "(top level)"
    if err["type"] in {"union_tag_invalid", "union_tag_not_found"}:
        ctx = err.get("ctx", {})
        got = f"unknown type {ctx['tag']!r}" if "tag" in ctx else "no 'type' key"
        return f"{key}: {got}; set type to one of {', '.join(TASK_TYPES)}"
    if err["type"] == "extra_forbidden":
        valid = _fields_at(cls, err["loc"][:-1])
        close = _closest(loc[-1], valid)
        hint = f"did you mean '{'.'.join(loc[:-1] + [close])}'?" if close else f"valid keys: {', '.join(valid)}"
        return f"unknown key '{key}' ({hint})"
    if err["type"] == "string_pattern_mismatch":  # only run names have a pattern
        return f"{key}: must be one directory name of letters, digits, '_', '.' or '-' (got {err.get('input')!r})"
    if err["type"] == "missing":
        return f"missing required key '{key}'"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in {"value_error", "assertion_error"} and not loc:
        return msg
    return f"{key}: {msg} (got {err.get('input')!r})"


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys of the section at `loc` (list indices skipped), for 'did you mean' hints."""
    model: Any = cls
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        if part in TASK_TYPES and part not in model.model_fields:  # the tag of a discriminated task
            model = TASK_TYPES[part]
            continue
        field = model.model_fields.get(part)
        model = _section_type(field.annotation) if field else None
    return sorted(model.model_fields) if model else []


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _section_type(arg)
            if found:
                return found
    return None


def dump_config(cfg: Section) -> dict[str, Any]:
    """The fully resolved recipe as plain data (written next to every run)."""
    return cfg.model_dump(mode="json")
