"""Cleaning and deduplication of text corpora: `run_clean(inputs, out, cfg)` and `run_dedup(inputs, out, cfg)`.

One filter family per module (unicode, lines, quality, language, pii), MinHash in minhash.py, the two stages in
clean.py and dedup.py, the engines (process pool, Ray) in engine.py. The recipes are in config.py.
"""

from tunelab.clean.clean import run_clean
from tunelab.clean.config import CleanConfig, DedupConfig
from tunelab.clean.dedup import run_dedup

__all__ = ["CleanConfig", "DedupConfig", "run_clean", "run_dedup"]
