"""`tunelab demo`, the main job: the lifecycle on a generated world, in minutes on a laptop CPU.

1. generate the demo world's data (English + Chinese corpus, instruction tasks, multiple choice);
2. train a byte-level BPE tokenizer on the corpus;
3. pretrain the tiny preset on the two corpora mixed by weight, with held-out eval loss;
4. show eval loss and perplexity before → after, and fact recall: greedy completions of a prompt for
   every fact of the world ("Kolu Fenby works as a" → "fisher"), scored against the world's truth;
5. fine-tune the pretrained model with LoRA on the instruction tasks (chat template, loss on the
   answers only) and show strict accuracy on the held-out tasks before → after, per task.
Everything lands in `<out_dir>/<name>/` with a `summary.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tunelab.config import DemoConfig, FinetuneConfig, ModelSection, PretrainConfig, PretrainData, SFTData, Source
from tunelab.data.chat import chat_template_for
from tunelab.data.demo import fact_completion_pairs, generate_demo_data
from tunelab.io import atomic_write_json, clear_outputs, ensure_writable_dir
from tunelab.models import load_model
from tunelab.serve.generate import answer_chats, complete, load_tuned
from tunelab.train.finetune import run_finetune
from tunelab.train.pretrain import build_model, run_pretrain
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


def task_accuracy(model, tokenizer, records: list[dict], max_new_tokens: int, template: str) -> dict[str, Any]:
    """Strict accuracy (the whole reply equals the answer) of greedy replies to Alpaca records, per task."""
    chats = [[{"role": "user", "content": r["instruction"]}] for r in records]
    replies = answer_chats(model, tokenizer, chats, template, max_new_tokens=max_new_tokens)
    correct = [reply.strip() == r["output"].strip() for reply, r in zip(replies, records)]
    tasks = sorted({r["task"] for r in records})
    per_task = {t: sum(c for c, r in zip(correct, records) if r["task"] == t) / sum(r["task"] == t for r in records)
                for t in tasks}
    return {"accuracy": sum(correct) / max(1, len(records)), "per_task": per_task, "replies": replies}


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo end to end; returns (and writes) its summary."""
    started = time.time()
    run_dir = ensure_writable_dir(Path(cfg.out_dir) / cfg.name, "run directory")
    clear_outputs(run_dir, ["summary.json"])
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

    test_path = run_dir / "data" / "instructions" / "test.jsonl"
    tests = [json.loads(line) for line in test_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    fcfg = finetune_config(cfg, run_dir, pretrain["model_dir"])
    template = chat_template_for(tokenizer, fcfg.data.chat_template)
    tasks_before = task_accuracy(trained, tokenizer, tests, cfg.answer_tokens, template)
    del trained
    finetune = run_finetune(fcfg)
    tuned, tuned_tokenizer, _ = load_tuned(finetune["output_dir"])  # its tokenizer carries the template
    tasks_after = task_accuracy(tuned, tuned_tokenizer, tests, cfg.answer_tokens, template)
    answers = [{"instruction": r["instruction"], "task": r["task"], "expected": r["output"], "before": b, "after": a}
               for r, b, a in zip(tests, tasks_before.pop("replies"), tasks_after.pop("replies"))]
    summary = {"run_dir": str(run_dir), "data": manifest, "pretrain": pretrain,
               "fact_recall": {"facts": len(pairs), "before": recall(samples, "before"),
                               "after": recall(samples, "after")},
               "samples": samples[: cfg.samples], "finetune": finetune,
               "task_accuracy": {"examples": len(tests), "before": tasks_before, "after": tasks_after},
               "answers": _spread(answers, cfg.samples), "wall_s": round(time.time() - started, 1)}
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _spread(answers: list[dict], n: int) -> list[dict]:
    """Up to `n` answers, taking the tasks in turn so every task is shown."""
    by_task: dict[str, list[dict]] = {}
    for a in answers:
        by_task.setdefault(a["task"], []).append(a)
    picked = [a for group in zip(*by_task.values()) for a in group] if by_task else []
    return picked[:n]
