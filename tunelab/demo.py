"""`tunelab demo`, the main job: the lifecycle on a generated world, in minutes on a laptop CPU.

1. generate the demo world's data (English + Chinese corpus, instruction tasks, multiple choice);
2. train a byte-level BPE tokenizer on the corpus;
3. pretrain the tiny preset on the two corpora mixed by weight, with held-out eval loss;
4. show eval loss and perplexity before → after, and fact recall: greedy completions of a prompt for
   every fact of the world ("Kolu Fenby works as a" → "fisher"), scored against the world's truth;
5. fine-tune the pretrained model with LoRA on the instruction tasks (chat template, loss on the
   answers only);
6. evaluate the pretrained model (base) and base + adapter (tuned) with one suite and write a
   before/after report (`eval/results.json`, `eval/report.html`): perplexity and bits per byte on the
   held-out world text, 5-shot multiple choice on the CMMLU-style questions, and strict accuracy on the
   held-out instructions, per task. The suite's recipe is kept as `eval/recipe.yaml` (`tunelab eval
   runs/demo/eval/recipe.yaml` reruns it).
Everything lands in `<out_dir>/<name>/` with a `summary.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import (
    ChoiceTask,
    DemoConfig,
    EvalConfig,
    FinetuneConfig,
    GenerationTask,
    ModelSection,
    PerplexityTask,
    PretrainConfig,
    PretrainData,
    SFTData,
    Source,
    dump_config,
)
from tunelab.data.demo import fact_completion_pairs, generate_demo_data
from tunelab.data.text import read_documents
from tunelab.evaluate import run_eval
from tunelab.evaluate.suite import RUN_KIND as EVAL_KIND
from tunelab.io import atomic_write_json, atomic_write_text, clear_outputs
from tunelab.models import load_model
from tunelab.outputs import check_run_dir, open_run_dir
from tunelab.serve.generate import complete
from tunelab.train.finetune import run_finetune
from tunelab.train.pretrain import build_model, run_pretrain, split_documents
from tunelab.vocab.train import train_tokenizer_files

# English carries most of the world's text; Chinese states the same facts with a smaller share.
SOURCE_WEIGHTS = {"world_en.jsonl": 0.6, "world_zh.jsonl": 0.4}


def pretrain_config(cfg: DemoConfig, run_dir: Path) -> PretrainConfig:
    """The pretraining recipe the demo runs (what a user would write in YAML for their own text)."""
    sources = [Source(path=str(run_dir / "data" / "pretrain" / f), weight=w) for f, w in SOURCE_WEIGHTS.items()]
    return PretrainConfig(
        name="pretrain", seed=cfg.seed, out_dir=str(run_dir),
        model=ModelSection(preset=cfg.preset, arch=cfg.arch, tokenizer=str(run_dir / "tokenizer")),
        data=PretrainData(sources=sources, seq_len=cfg.seq_len, eval_fraction=0.05),
        train=cfg.train,
    )


def recall(samples: list[dict[str, str]], key: str) -> float:
    """Share of facts whose greedy completion starts with the true value."""
    return sum(s[key].strip().startswith(s["expected"]) for s in samples) / max(1, len(samples))


def finetune_config(cfg: DemoConfig, run_dir: Path, base: str) -> FinetuneConfig:
    """The fine-tuning recipe the demo runs: LoRA on the instruction tasks, loss on the answers."""
    return FinetuneConfig(
        name="finetune", seed=cfg.seed, out_dir=str(run_dir), model=ModelSection(base=base),
        # The plain template ends an answer with EOS, a token the pretrained model knows; ChatML's
        # <|im_start|>/<|im_end|> never occur in the demo corpus, and LoRA leaves their embeddings untrained.
        data=SFTData(train=[str(run_dir / "data" / "instructions" / "train.jsonl")], eval_fraction=0.05,
                     max_len=256, chat_template="plain"),
        method=cfg.method, train=cfg.finetune,
    )


def write_heldout_text(pcfg: PretrainConfig, out_dir: Path) -> Path:
    """The documents pretraining held out (the same seeded split), one .jsonl per source, for perplexity."""
    for i, src in enumerate(pcfg.data.sources):
        _, held = split_documents(read_documents(src.path, src.text_key), pcfg.data.eval_fraction, pcfg.seed + i)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / Path(src.path).name,
                          "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in held))
    return out_dir


def eval_config(cfg: DemoConfig, run_dir: Path, base: str, adapter: str) -> EvalConfig:
    """The before/after suite: base = the pretrained model, tuned = base + the LoRA adapter."""
    return EvalConfig(
        name="eval", seed=cfg.seed, out_dir=str(run_dir), models=[f"base={base}", f"tuned={adapter}"],
        # disjoint windows as long as the pretraining blocks, as pretraining's own eval loss
        tasks=[PerplexityTask(type="perplexity", name="world_text", path=str(run_dir / "eval" / "heldout"),
                              max_length=cfg.seq_len, stride=cfg.seq_len, batch_size=16),
               ChoiceTask(type="choice", name="world_choice", path=str(run_dir / "data" / "choice"), k=5,
                          batch_size=16),
               # the template the adapter was trained with (see finetune_config)
               GenerationTask(type="generation", name="instructions", extract="exact", chat_template="plain",
                              path=str(run_dir / "data" / "instructions" / "test.jsonl"),
                              max_new_tokens=cfg.answer_tokens)])


def task_accuracy(results: dict, model: int) -> dict[str, Any]:
    """Strict accuracy overall and per task of one model of the suite (its generation task)."""
    r = results["models"][model]["tasks"]["instructions"]
    return {"accuracy": r["metrics"]["accuracy"], "per_task": r["per_group"],
            "replies": [s["reply"] for s in r["samples"]]}


RUN_KIND = "demo run"
RUN_ENTRIES = ["summary.json", "data", "tokenizer", "pretrain", "finetune", "eval"]


def run_demo(cfg: DemoConfig, recipe: str | Path | None = None) -> dict[str, Any]:
    """Run the demo end to end; returns (and writes) its summary. `recipe`: the YAML it came from, if any."""
    started = time.time()
    run_dir = check_run_dir(Path(cfg.out_dir) / cfg.name, RUN_KIND, RUN_ENTRIES, {"recipe": recipe})
    open_run_dir(run_dir, RUN_KIND)
    clear_outputs(run_dir, ["summary.json", "eval"])
    manifest = generate_demo_data(run_dir / "data", seed=cfg.seed, scale=cfg.data_scale)
    corpus = [run_dir / "data" / "pretrain" / f for f in SOURCE_WEIGHTS]
    train_tokenizer_files(corpus, run_dir / "tokenizer", vocab_size=cfg.vocab_size, split_cjk=True)

    pcfg = pretrain_config(cfg, run_dir)
    pairs = fact_completion_pairs(cfg.seed)
    initial, tokenizer = build_model(pcfg)  # the same seeded initialisation run_pretrain starts from
    before = complete(initial, tokenizer, [p for p, _ in pairs], max_new_tokens=cfg.sample_tokens)
    del initial

    pretrain = run_pretrain(pcfg)
    trained = load_model(pretrain["model_dir"])
    after = complete(trained, tokenizer, [p for p, _ in pairs], max_new_tokens=cfg.sample_tokens)
    samples = [{"prompt": p, "expected": e, "before": b, "after": a}
               for (p, e), b, a in zip(pairs, before, after)]
    del trained

    test_path = run_dir / "data" / "instructions" / "test.jsonl"
    tests = [json.loads(line) for line in test_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    finetune = run_finetune(finetune_config(cfg, run_dir, pretrain["model_dir"]))

    open_run_dir(run_dir / "eval", EVAL_KIND)  # the suite's data and recipe live beside its results
    write_heldout_text(pcfg, run_dir / "eval" / "heldout")
    ecfg = eval_config(cfg, run_dir, pretrain["model_dir"], finetune["output_dir"])
    atomic_write_text(run_dir / "eval" / "recipe.yaml", yaml.safe_dump(dump_config(ecfg), allow_unicode=True,
                                                                         sort_keys=False))
    evaluation = run_eval(ecfg, log=lambda line: None)
    tasks_before, tasks_after = task_accuracy(evaluation, 0), task_accuracy(evaluation, 1)
    answers = [{"instruction": r["instruction"], "task": r["task"], "expected": r["output"], "before": b, "after": a}
               for r, b, a in zip(tests, tasks_before.pop("replies"), tasks_after.pop("replies"))]
    summary = {"run_dir": str(run_dir), "data": manifest, "pretrain": pretrain,
               "fact_recall": {"facts": len(pairs), "before": recall(samples, "before"),
                               "after": recall(samples, "after")},
               "samples": samples[: cfg.samples], "finetune": finetune,
               "task_accuracy": {"examples": len(tests), "before": tasks_before, "after": tasks_after},
               "answers": _spread(answers, cfg.samples),
               "eval": {"results_path": evaluation["results_path"], "report_path": evaluation["report_path"],
                        "wall_s": evaluation["wall_s"], "comparison": evaluation["comparison"]},
               "wall_s": round(time.time() - started, 1)}
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _spread(answers: list[dict], n: int) -> list[dict]:
    """Up to `n` answers, taking the tasks in turn so every task is shown."""
    by_task: dict[str, list[dict]] = {}
    for a in answers:
        by_task.setdefault(a["task"], []).append(a)
    picked = [a for group in zip(*by_task.values()) for a in group] if by_task else []
    return picked[:n]
