"""Self-Instruct: a model writes new instruction tasks from seed tasks; filters keep only the well-formed, novel ones.

Each round builds `prompts_per_round` prompts in Alpaca's layout: a short list of rules, then a numbered list of
in-context tasks (`prompt_seed_tasks` sampled from the seed file and `prompt_generated_tasks` from the tasks kept so
far, seeds filling in while few are kept), shuffled, each as `N. Instruction / N. Input / N. Output` between `###`
lines, ending with the next number's `Instruction:` for the model to continue up to `list_length`. The generator
(a local model or adapter directory, batched; or an OpenAI-compatible endpoint) answers each prompt; the reply is
split into tasks, and a task is kept only when it passes, in order:

  truncated        the reply's last block when the reply stopped at the token limit
  malformed        the block has no `Instruction:` ... `Output:` structure
  empty            an empty instruction or output
  output_copies_input    the output repeats the input (as Self-Instruct drops such instances)
  too_short / too_long   instruction words (CJK characters for Chinese) outside [min_words, max_words]
  blacklist        a keyword for what a text model cannot do (image, graph, picture, file, map, draw, plot, go to,
                   video, audio, music, flowchart, diagram; and Chinese equivalents)
  program          starts with "Write a program"
  punctuation_start, non_ascii_start (English only)
  similar          ROUGE-L F against any kept instruction (seeds included) above `threshold` (Self-Instruct's
                   `max > 0.7` rule: a task exactly at the threshold is kept); character-level for Chinese

The output is Alpaca JSONL (`{"instruction", "input", "output"}`, `tunelab finetune` reads it as is). Every kept
task is appended and fsynced at the end of its round, and the report (JSON: settings, per-filter rejection counts
and examples, ROUGE-L work) is rewritten atomically after every round, so a killed run continues from what it
kept: rerun the same command. Round r's randomness comes from (seed, r) alone, so a run resumed after round r
samples the same prompts as one that was never stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import string
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from tunelab.config import Section, read_yaml, validate
from tunelab.data.generators import GeneratorError, Reply
from tunelab.data.rouge import RougeIndex, rouge_tokens
from tunelab.data.text import read_text_file
from tunelab.errors import DataError, TunelabError
from tunelab.io import atomic_write_json
from tunelab.outputs import OutputError, check_outputs

KIND = "self-instruct"
BLACKLIST_EN = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
                "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]
BLACKLIST_ZH = ["图片", "图像", "照片", "画出", "绘制", "画一", "视频", "音频", "音乐", "流程图", "图表", "地图",
                "文件"]
FILTERS = ("truncated", "malformed", "empty", "output_copies_input", "too_short", "too_long", "blacklist", "program",
           "punctuation_start", "non_ascii_start", "similar")
STRICT = ("seed_tasks_sha256", "threshold", "min_words", "max_words", "blacklist", "language", "seed")
EXAMPLES = 3  # examples kept in the report per filter


class SelfInstructConfig(Section):
    """`tunelab data self-instruct`: the recipe keys (the command's flags set the first ones)."""

    seed_tasks: str
    out: str  # the Alpaca JSONL written (.jsonl)
    num: int = Field(ge=1)  # generated tasks to keep (seed tasks are not counted or written)
    generator: str | None = None  # a local model or adapter directory
    generator_url: str | None = None  # an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    generator_model: str | None = None  # the endpoint's model name (default: the first it lists)
    api_key_env: str | None = None  # environment variable holding the endpoint's key
    report: str | None = None  # default: the output's name with .report.json
    seed: int = 0
    language: Literal["auto", "en", "zh"] = "auto"  # auto: zh when most seed instructions hold CJK characters
    prompt_seed_tasks: int = Field(3, ge=0)
    prompt_generated_tasks: int = Field(2, ge=0)
    list_length: int = Field(20, ge=2)  # the numbered list the model continues (Alpaca: 20)
    prompts_per_round: int = Field(5, ge=1)
    max_tokens: int = Field(2048, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    timeout: float = Field(120.0, gt=0)  # seconds per endpoint request
    retries: int = Field(3, ge=0)  # endpoint retries on connection errors, timeouts, 429 and 5xx
    workers: int = Field(1, ge=1)  # endpoint requests in flight at once (replies are used in prompt order)
    threshold: float = Field(0.7, ge=0, le=1)
    min_words: int = Field(4, ge=1)
    max_words: int = Field(150, ge=1)
    blacklist: list[str] | None = None  # default: BLACKLIST_EN (en) or BLACKLIST_ZH + BLACKLIST_EN (zh)
    patience: int = Field(20, ge=1)  # stop after this many rounds in a row that keep nothing
    max_rounds: int | None = Field(None, ge=1)  # stop after this many rounds (all runs together)

    @model_validator(mode="after")
    def _one_generator(self) -> SelfInstructConfig:
        if (self.generator is None) == (self.generator_url is None):
            raise ValueError("give exactly one of generator (--generator MODEL_DIR, a local model or adapter "
                             "directory) or generator_url (--generator-url URL, an OpenAI-compatible endpoint)")
        if self.prompt_seed_tasks + self.prompt_generated_tasks == 0:
            raise ValueError("prompt_seed_tasks + prompt_generated_tasks must be at least 1")
        if self.prompt_seed_tasks + self.prompt_generated_tasks >= self.list_length:
            raise ValueError(f"list_length ({self.list_length}) must exceed the in-context tasks "
                             f"({self.prompt_seed_tasks} + {self.prompt_generated_tasks})")
        if not self.out.endswith(".jsonl"):
            raise ValueError(f"out {self.out!r}: the output is Alpaca JSONL; give a name ending in .jsonl")
        return self


def load_self_instruct_config(recipe: str | None = None, overrides: list[str] = (),
                              **flags: Any) -> SelfInstructConfig:
    """A recipe (optional), the command's flags (those not None) and `key=value` overrides, validated."""
    raw: dict[str, Any] = read_yaml(recipe) if recipe else {}
    raw.update({k: v for k, v in flags.items() if v is not None})
    from tunelab.config import apply_override

    for item in overrides:
        apply_override(raw, item)
    missing = [k for k in ("seed_tasks", "num", "out") if k not in raw]
    if missing:
        from tunelab.errors import ConfigError

        raise ConfigError("missing " + ", ".join(f"--{k.replace('_', '-')} ({k}: in a recipe)" for k in missing)
                          + "; e.g. tunelab data self-instruct --seed-tasks seeds.jsonl --generator MODEL_DIR "
                            "--num 100 --out tasks.jsonl")
    return validate(SelfInstructConfig, raw, source=recipe or "command line", overrides=list(overrides))


# ------------------------------------------------------------------------------------------------ seed tasks

def read_seed_tasks(path: str | Path) -> list[dict[str, str]]:
    """Seed tasks as {"instruction", "input", "output"}: Self-Instruct's JSONL (`instruction` + `instances`, the
    first instance taken, as Alpaca does) or Alpaca records; a wrong record is a DataError naming file:line."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p} is a directory; give the seed task file (.jsonl) in it")
    if not p.is_file():
        raise DataError(f"{p}: seed task file not found; give a JSONL file of {{\"instruction\", \"instances\": "
                        f"[{{\"input\", \"output\"}}]}} records (e.g. ../shared/data/alpaca_seed_tasks.jsonl)")
    if p.suffix != ".jsonl":
        raise DataError(f"{p}: seed tasks must be a .jsonl file (one JSON object a line)")
    tasks = []
    for n, line in enumerate(read_text_file(p).splitlines(), 1):
        if line.strip():
            tasks.append(_seed_task(line, f"{p}:{n}"))
    if not tasks:
        raise DataError(f"{p}: no seed tasks (the file is empty)")
    return tasks


def _seed_task(line: str, where: str) -> dict[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); one seed task per line") from None
    expected = "expected {\"instruction\": str, \"instances\": [{\"input\": str, \"output\": str}]} or " \
               "{\"instruction\", \"input\", \"output\"}"
    if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) \
            or not record["instruction"].strip():
        raise DataError(f"{where}: not a seed task (no 'instruction' string); {expected}")
    if "instances" in record:
        instances = record["instances"]
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise DataError(f"{where}: 'instances' must be a non-empty list of {{\"input\", \"output\"}}; {expected}")
        record = {"instruction": record["instruction"], **instances[0]}
    elif "output" not in record:
        raise DataError(f"{where}: a seed task needs 'instances' (or 'output'); found keys "
                        f"{', '.join(record)}; {expected}")
    task = {"instruction": record["instruction"].strip(), "input": record.get("input") or "",
            "output": record.get("output")}
    for key in ("input", "output"):
        if not isinstance(task[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(task[key]).__name__}; {expected}")
    task["input"], task["output"] = task["input"].strip(), task["output"].strip()
    return task


def has_cjk(text: str) -> bool:
    return any(len(t) == 1 and not t.isascii() for t in rouge_tokens(text))


def detect_language(tasks: list[dict[str, str]]) -> str:
    """zh when most seed instructions hold CJK characters, else en."""
    return "zh" if sum(has_cjk(t["instruction"]) for t in tasks) * 2 > len(tasks) else "en"


# ---------------------------------------------------------------------------------------------------- prompt

HEADER = {
    "en": ("You are asked to write a list of {n} diverse task instructions for a language model, each with an input "
           "and a good output. Rules:\n"
           "1. Vary the verbs and the kinds of task: questions, classification, rewriting, brainstorming, reasoning, "
           "coding, advice, and so on; mix imperative instructions and questions.\n"
           "2. A text-only model must be able to do the task: no images, audio or files, no actions in the world.\n"
           "3. Write in English; an instruction is one or two sentences.\n"
           "4. Give an input (realistic, under 100 words) when the task needs one; otherwise write <noinput>.\n"
           "5. The output is a correct, complete answer under 100 words.\n\n"
           "List of {n} tasks:\n"),
    "zh": ("请写出 {n} 条多样的任务指令，供语言模型完成，每条带有输入和优质的输出。要求：\n"
           "1. 动词和任务类型要多样：问答、分类、改写、头脑风暴、推理、写作、建议等。\n"
           "2. 纯文本模型必须能完成：不涉及图片、音频或文件，不要求现实中的行动。\n"
           "3. 用中文书写；每条指令一到两句话。\n"
           "4. 任务需要时给出真实的输入（少于 100 字），否则写 <无输入>。\n"
           "5. 输出是正确、完整的回答，少于 100 字。\n\n"
           "{n} 条任务：\n"),
}
LABELS = {"en": ("Instruction", "Input", "Output", "<noinput>"), "zh": ("指令", "输入", "输出", "<无输入>")}


def build_prompt(examples: list[dict[str, str]], lang: str, list_length: int) -> str:
    """Alpaca's layout: the rules, the numbered in-context tasks, and the next number's instruction label."""
    ins, inp, outp, none = LABELS[lang]
    parts = [HEADER[lang].format(n=list_length)]
    for i, t in enumerate(examples, 1):
        parts.append(f"###\n{i}. {ins}: {t['instruction']}\n{i}. {inp}:\n{t['input'] or none}\n"
                     f"{i}. {outp}:\n{t['output']}\n")
    parts.append(f"###\n{len(examples) + 1}. {ins}:")
    return "".join(parts)


def sample_examples(rng: random.Random, seeds: list[dict], generated: list[dict], n_seed: int,
                    n_generated: int) -> list[dict]:
    """`n_generated` kept tasks (as many as there are) and seed tasks for the rest, shuffled."""
    machine = rng.sample(generated, min(n_generated, len(generated)))
    human = rng.sample(seeds, min(len(seeds), n_seed + n_generated - len(machine)))
    examples = machine + human
    rng.shuffle(examples)
    return examples


# ----------------------------------------------------------------------------------------------------- parse

_LABEL = r"(?:\d+\s*[.)]\s*)?(?:{})\s*[:：]"
_INS = _LABEL.format("Instruction|指令")
# after a label, only spaces: a newline there may be an empty field's end, which the next label needs
_TASK = re.compile(rf"^\s*{_INS}[ \t]*(?P<instruction>.*?)\s*"
                   rf"(?:\n\s*{_LABEL.format('Input|输入')}[ \t]*(?P<input>.*?)\s*)?"
                   rf"\n\s*{_LABEL.format('Output|输出')}[ \t]*(?P<output>.*?)\s*$", re.S | re.I)
_STARTS_WITH_TASK = re.compile(rf"^\s*(?:###\s*)?{_INS}", re.I)
_NEXT_TASK = re.compile(r"\n(?=\s*\d+\s*[.)]\s*(?:Instruction|指令)\s*[:：])", re.I)
_NO_INPUT = {"<noinput>", "<no input>", "noinput", "<无输入>", "无输入", "<无>", "无"}


def split_reply(reply: str, next_number: int, lang: str) -> list[str]:
    """The reply's task blocks: the reply continues the prompt's open `N. Instruction:` unless it restarts one."""
    text = reply if _STARTS_WITH_TASK.match(reply) else f"{next_number}. {LABELS[lang][0]}:" + reply
    blocks = [b for chunk in text.split("###") for b in _NEXT_TASK.split(chunk)]
    return [b.strip() for b in blocks if b.strip()]


def parse_task(block: str) -> dict[str, str] | None:
    """{"instruction", "input", "output"} of one block, or None when it has no instruction/output structure."""
    m = _TASK.match(block)
    if m is None:
        return None
    inp = (m["input"] or "").strip()
    if inp.lower() in _NO_INPUT:
        inp = ""
    return {"instruction": m["instruction"].strip(), "input": inp, "output": m["output"].strip()}


# --------------------------------------------------------------------------------------------------- filters

def heuristic_filter(task: dict[str, str], lang: str, cfg: SelfInstructConfig, blacklist: list[str]) -> str | None:
    """The first heuristic filter the task fails (its name), or None."""
    ins = task["instruction"]
    if not ins or not task["output"]:
        return "empty"
    if task["input"] and task["output"].strip().lower() == task["input"].strip().lower():
        return "output_copies_input"
    words = len(rouge_tokens(ins)) if lang == "zh" else len(ins.split())
    if words < cfg.min_words:
        return "too_short"
    if words > cfg.max_words:
        return "too_long"
    low = ins.lower()
    for w in blacklist:
        if (re.search(rf"\b{re.escape(w)}\b", low) if w.isascii() else w in low):
            return "blacklist"
    if low.startswith("write a program"):
        return "program"
    if ins[0] in string.punctuation or unicodedata.category(ins[0]).startswith("P"):
        return "punctuation_start"
    if lang == "en" and not ins[0].isascii():
        return "non_ascii_start"
    return None


def blacklist_for(cfg: SelfInstructConfig, lang: str) -> list[str]:
    if cfg.blacklist is not None:
        return [w.lower() for w in cfg.blacklist]
    return BLACKLIST_EN + (BLACKLIST_ZH if lang == "zh" else [])


# ----------------------------------------------------------------------------------------------------- state

def report_path(cfg: SelfInstructConfig) -> Path:
    return Path(cfg.report) if cfg.report else Path(cfg.out).with_suffix(".report.json")


def settings_of(cfg: SelfInstructConfig, seed_sha: str, lang: str) -> dict[str, Any]:
    s = cfg.model_dump()
    s.update(seed_tasks_sha256=seed_sha, language=lang, report=str(report_path(cfg)))
    return s


def new_report(settings: dict[str, Any]) -> dict[str, Any]:
    return {"kind": KIND, "status": "running", "settings": settings, "rounds": 0, "requests": 0, "candidates": 0,
            "kept": 0, "target": settings["num"], "acceptance_rate": None, "idle_rounds": 0,
            "rejected": dict.fromkeys(FILTERS, 0), "examples": {k: [] for k in ("kept", *FILTERS)},
            "recovered": 0, "rouge": {"pairs": 0, "exact_lcs": 0, "seconds": 0.0}, "generator_seconds": 0.0,
            "wall_s": 0.0, "error": None}


def read_kept(out: Path) -> list[dict[str, str]]:
    """The tasks an earlier run kept; a last line cut by a kill (no newline, not JSON) is dropped from the file."""
    if not out.exists():
        return []
    raw = out.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        try:
            json.loads(raw[cut:])
            raw += b"\n"  # a whole last record without its newline
        except ValueError:
            raw = raw[:cut]
        with open(out, "r+b") as f:
            f.truncate(0)
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
    kept = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            r = None
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("instruction", "input", "output")):
            raise DataError(f"{out}:{n}: not an Alpaca record this command wrote (was the file edited?); fix or "
                            f"remove the line, or give a new --out")
        kept.append(r)
    return kept


def resume_state(cfg: SelfInstructConfig, settings: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """The report to continue (a new one when nothing was started) and the tasks kept so far."""
    out, rp = Path(cfg.out), report_path(cfg)
    if out.resolve() == rp.resolve():
        raise OutputError(f"{out}: the output and the report are the same file; give report= another name")
    for p in (out, rp):
        if p.is_dir():
            raise OutputError(f"{p} is a directory; give the name of a file")
    if not rp.exists():
        if out.exists():
            raise OutputError(f"{out} exists and was not written by tunelab data self-instruct (no report {rp} "
                              f"beside it); refusing to append to it: give a new --out")
        return new_report(settings), []
    try:
        report = json.loads(rp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = None
    if not isinstance(report, dict) or report.get("kind") != KIND:
        raise OutputError(f"{rp} exists and is not a tunelab self-instruct report; refusing to replace it: give "
                          f"another report= (or --out)")
    old = report.get("settings", {})
    for key in STRICT:
        if old.get(key) != settings.get(key):
            raise TunelabError(f"{out} was made with {key}={old.get(key)!r}, now {settings.get(key)!r}: the kept "
                               f"tasks passed other filters; give a new --out, or rerun with the same settings to "
                               f"continue it")
    kept = read_kept(out)
    report["recovered"] = report.get("recovered", 0) + max(0, len(kept) - report.get("kept", 0))
    report.update(settings=settings, target=cfg.num, status="running", error=None, kept=len(kept))
    report["rejected"] = {**dict.fromkeys(FILTERS, 0), **report.get("rejected", {})}  # filters added since
    report["examples"] = {**{k: [] for k in ("kept", *FILTERS)}, **report.get("examples", {})}
    return report, kept


def append_tasks(out: Path, tasks: list[dict[str, str]]) -> None:
    """Append records and fsync, so a kill after this never loses them."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks))
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------------ loop

Generator = Callable[[list[str], int], list[Reply]]


def make_generator(cfg: SelfInstructConfig, api_key: str | None = None):
    """The local model or the endpoint the recipe names."""
    from tunelab.data.generators import EndpointGenerator, LocalGenerator, api_key_from

    stop = [f"\n{cfg.list_length + 1}.", f"{cfg.list_length + 1}. "]
    if cfg.generator_url:
        return EndpointGenerator(cfg.generator_url, cfg.generator_model, api_key_from(api_key, cfg.api_key_env),
                                 timeout=cfg.timeout, retries=cfg.retries, max_tokens=cfg.max_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p, stop=stop, workers=cfg.workers)
    return LocalGenerator(cfg.generator, max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          batch_size=cfg.prompts_per_round)


def run_self_instruct(cfg: SelfInstructConfig, api_key: str | None = None, generator: Generator | None = None,
                      log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Generate until `cfg.num` tasks are kept (or patience / max_rounds run out); returns the report.

    Resumes from `cfg.out` and its report when they exist. `generator` (prompts, seed) -> replies replaces the
    one the recipe names (for tests and for callers that hold a model already)."""
    seed_path = Path(cfg.seed_tasks)
    check_outputs([cfg.out, report_path(cfg)], {"seed tasks": seed_path, "generator model": cfg.generator})
    seeds = read_seed_tasks(seed_path)
    lang = cfg.language if cfg.language != "auto" else detect_language(seeds)
    settings = settings_of(cfg, hashlib.sha256(seed_path.read_bytes()).hexdigest(), lang)
    report, kept = resume_state(cfg, settings)
    index = RougeIndex(cfg.threshold)
    pool = [t["instruction"] for t in seeds + kept]  # every instruction in the index, as written
    for text in pool:
        index.add(rouge_tokens(text))
    if len(kept) < cfg.num and not _out_of_rounds(report, cfg):
        if generator is None:
            generator = make_generator(cfg, api_key)
        desc = generator.describe() if hasattr(generator, "describe") else "generator"
        log(f"self-instruct: {len(seeds)} seed tasks ({lang}) from {seed_path}, {len(kept)}/{cfg.num} kept so far; "
            f"generator: {desc}")
        _loop(cfg, generator, seeds, kept, (index, pool), report, lang, log)
    report["status"] = "finished" if len(kept) >= cfg.num else report["status"]
    report["kept"] = len(kept)
    if not Path(cfg.out).exists():
        append_tasks(Path(cfg.out), [])
    atomic_write_json(report_path(cfg), report)
    return report


def _out_of_rounds(report: dict[str, Any], cfg: SelfInstructConfig) -> bool:
    if cfg.max_rounds is not None and report["rounds"] >= cfg.max_rounds:
        report["status"] = "stopped: max_rounds"
        return True
    if report["idle_rounds"] >= cfg.patience:
        report["status"] = f"stopped: {cfg.patience} rounds in a row kept nothing (patience)"
        return True
    return False


def _loop(cfg, generator, seeds, kept, pool, report, lang, log) -> None:
    out, rp = Path(cfg.out), report_path(cfg)
    blacklist = blacklist_for(cfg, lang)
    start = time.perf_counter()
    wall0 = report["wall_s"]
    while len(kept) < cfg.num and not _out_of_rounds(report, cfg):
        r = report["rounds"]
        rng = random.Random(f"self-instruct/{cfg.seed}/{r}")
        generated = kept  # kept tasks are the generated pool
        prompts, firsts = [], []
        for _ in range(cfg.prompts_per_round):
            examples = sample_examples(rng, seeds, generated, cfg.prompt_seed_tasks, cfg.prompt_generated_tasks)
            prompts.append(build_prompt(examples, lang, cfg.list_length))
            firsts.append(len(examples) + 1)
        t0 = time.perf_counter()
        try:
            replies = generator(prompts, cfg.seed * 1_000_003 + r * cfg.prompts_per_round)
        except GeneratorError as e:
            report.update(status="failed", error=str(e), wall_s=wall0 + time.perf_counter() - start)
            atomic_write_json(rp, report)
            raise GeneratorError(f"{e}; {len(kept)} task(s) kept in {out} stay (report {rp}): rerun the same "
                                 f"command to continue") from None
        report["generator_seconds"] += time.perf_counter() - t0
        accepted = _filter_round(cfg, replies, firsts, lang, blacklist, pool, report, len(kept))
        append_tasks(out, accepted)
        kept.extend(accepted)
        report.update(rounds=r + 1, requests=report["requests"] + len(prompts), kept=len(kept),
                      idle_rounds=0 if accepted else report["idle_rounds"] + 1,
                      wall_s=wall0 + time.perf_counter() - start)
        report["acceptance_rate"] = report["kept"] / report["candidates"] if report["candidates"] else None
        atomic_write_json(rp, report)
        rejected = ", ".join(f"{k} {v}" for k, v in report["rejected"].items() if v)
        log(f"round {r + 1}: {len(accepted)} kept, {len(kept)}/{cfg.num} in all from {report['candidates']} "
            f"candidates ({rejected or 'none rejected'})")


def _filter_round(cfg, replies, firsts, lang, blacklist, pool, report, n_kept) -> list[dict[str, str]]:
    """The round's tasks that pass every filter (each added to the ROUGE index, and its text to the pool's list,
    as it is kept)."""
    index, texts = pool
    accepted: list[dict[str, str]] = []
    for reply, first in zip(replies, firsts):
        blocks = split_reply(reply.text, first, lang)
        for i, block in enumerate(blocks):
            if n_kept + len(accepted) >= cfg.num:
                return accepted
            report["candidates"] += 1
            if reply.truncated and i == len(blocks) - 1:
                _reject(report, "truncated", {"text": block[:300]})
                continue
            task = parse_task(block)
            if task is None:
                _reject(report, "malformed", {"text": block[:300]})
                continue
            reason = heuristic_filter(task, lang, cfg, blacklist)
            if reason is not None:
                _reject(report, reason, {"instruction": task["instruction"][:300]})
                continue
            tokens = rouge_tokens(task["instruction"])
            t0 = time.perf_counter()
            pairs0, exact0 = index.pairs, index.exact_checks
            score, doc = index.most_similar(tokens)
            rouge = report["rouge"]
            rouge["seconds"] += time.perf_counter() - t0
            rouge["pairs"] += index.pairs - pairs0
            rouge["exact_lcs"] += index.exact_checks - exact0
            if doc is not None:
                _reject(report, "similar", {"instruction": task["instruction"][:300], "rouge_l": round(score, 4),
                                            "most_similar": texts[doc][:300]})
                continue
            index.add(tokens)
            texts.append(task["instruction"])
            accepted.append(task)
            if len(report["examples"]["kept"]) < EXAMPLES:
                report["examples"]["kept"].append(task)
    return accepted


def _reject(report: dict[str, Any], reason: str, example: dict[str, Any]) -> None:
    report["rejected"][reason] += 1
    if len(report["examples"][reason]) < EXAMPLES:
        report["examples"][reason].append(example)


# ---------------------------------------------------------------------------------------------------- screen

def format_summary(report: dict[str, Any]) -> list[str]:
    """One screen: what was kept, from how many candidates, what each filter rejected (with an example)."""
    s = report["settings"]
    rate = f"{report['acceptance_rate']:.1%}" if report["acceptance_rate"] is not None else "n/a"
    lines = [f"self-instruct: {report['kept']}/{report['target']} tasks kept in {s['out']} ({report['status']}) from "
             f"{report['candidates']} candidates ({rate} accepted) in {report['rounds']} rounds, "
             f"{report['requests']} requests, {report['wall_s']:.0f}s",
             f"generator: {s['generator'] or s['generator_url']}; seed tasks {s['seed_tasks']} ({s['language']}); "
             f"ROUGE-L threshold {s['threshold']:g}"]
    rejected = {k: v for k, v in report["rejected"].items() if v}
    lines.append("rejected: " + (", ".join(f"{k} {v}" for k, v in rejected.items()) or "none"))
    for k in rejected:
        ex = report["examples"][k][0]
        text = ex.get("instruction", ex.get("text", "")).replace("\n", " ")[:90]
        extra = f"  ~ {ex['most_similar'][:60]!r} ({ex['rouge_l']:.2f})" if k == "similar" else ""
        lines.append(f"  {k}: {text!r}{extra}")
    r = report["rouge"]
    if r["pairs"]:
        lines.append(f"ROUGE-L: {r['exact_lcs']:,} exact LCS for {r['pairs']:,} candidate-kept pairs "
                     f"({r['exact_lcs'] / r['pairs']:.2%}), {r['seconds']:.2f}s")
    if report["recovered"]:
        lines.append(f"{report['recovered']} task(s) recovered from an interrupted round")
    lines.append(f"report: {s['report']}")
    return lines
