"""Evaluation: perplexity, multiple choice, generation accuracy and LLM-as-judge, alone or as a suite.

- `perplexity.py`: token NLL, perplexity and bits per byte of text files (HF sliding window with stride).
- `choice.py`: k-shot multiple choice on CMMLU/C-Eval/MMLU CSV folders or JSONL, letter and log-likelihood
  scoring, per-subject and averaged accuracy.
- `generation.py`: batched greedy replies, answer extraction (exact, regex, numeric), strict accuracy.
- `judge.py`: pairwise (order swapped) and single-answer grading by an OpenAI-compatible endpoint or a
  local model.
- `suite.py`: runs a recipe's tasks on several models; `report.py` writes results.json and report.html with
  the deltas from the first model.
This package imports data/, models and serve/, never the CLI or train/.
"""

from tunelab.evaluate.suite import load_eval_config, parse_models, run_eval, run_task

__all__ = ["load_eval_config", "parse_models", "run_eval", "run_task"]
