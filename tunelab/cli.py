"""The `tunelab` command: one sub-command per stage. It parses, validates, calls a stage, shows the result.

Errors a user can cause print as one line (`error: ...`) with exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunelab import __version__
from tunelab.errors import TunelabError

console = Console()


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from tunelab.config import PretrainConfig, load_config
    from tunelab.train.pretrain import run_pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    summary = run_pretrain(cfg)
    show_pretrain_summary(summary)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tunelab.config import DemoConfig, load_config
    from tunelab.demo import run_demo

    cfg = load_config(DemoConfig, args.config, args.overrides)
    summary = run_demo(cfg)
    show_pretrain_summary(summary["pretrain"])
    table = Table(title="sample completions (greedy)", show_lines=True)
    for col in ("prompt", "expected", "before", "after"):
        table.add_column(col, overflow="fold")
    for s in summary["samples"]:
        table.add_row(s["prompt"], s["expected"], s["before"], s["after"])
    console.print(table)
    r = summary["fact_recall"]
    console.print(f"fact recall (greedy completion of a prompt for each of the world's {r['facts']} facts): "
                  f"{r['before']:.0%} before -> {r['after']:.0%} after pretraining")
    console.print(f"demo finished in {summary['wall_s']:.0f}s; everything is in {summary['run_dir']}/ "
                  f"(summary.json, data/, tokenizer/, pretrain/events.jsonl, pretrain/model/)")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from tunelab.vocab.train import train_tokenizer_files

    tok = train_tokenizer_files(args.files, args.out, vocab_size=args.vocab_size,
                                min_frequency=args.min_frequency, text_key=args.text_key,
                                extra_special_tokens=args.special_tokens, split_cjk=args.split_cjk)
    console.print(f"tokenizer with {len(tok)} tokens written to {args.out} "
                  f"(load it with transformers.AutoTokenizer.from_pretrained)")
    return 0


def show_pretrain_summary(s: dict) -> None:
    """One screen: data, loss and perplexity before → after, throughput, where the model is."""
    table = Table(title=f"pretraining summary: {s['run_dir']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    before, after = s.get("eval_before", {}), s.get("eval_after", {})
    if before and after:
        table.add_row("eval loss", f"{before['eval_loss']:.4f} -> {after['eval_loss']:.4f}")
        table.add_row("eval perplexity", f"{before['eval_ppl']:.2f} -> {after['eval_ppl']:.2f}")
    table.add_row("train loss", f"{s['train_loss_first']:.4f} (step 1) -> {s['train_loss_last']:.4f} "
                                f"(step {s['steps']})")
    for r in s["sources"]:
        table.add_row(f"source {Path(r['path']).name}", f"share {r['share']:.2f}, {r['effective_epochs']:.2f} epochs, "
                                             f"packing efficiency {r['packing_efficiency']:.2%}")
    table.add_row("throughput", f"{s['tokens']:,} tokens in {s['train_wall_s']:.0f}s "
                                f"({s['tokens_per_s']:,.0f} tok/s), peak memory {s['peak_memory_mb']:,.0f} MB")
    table.add_row("model", s["model_dir"])
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("pretrain", help="pretrain a preset from scratch or continue pretraining a local model")
    p.add_argument("config", help="YAML recipe, e.g. examples/pretrain_text.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 data.seq_len=512")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("demo", help="the whole lifecycle on generated demo data (minutes on a laptop CPU)")
    p.add_argument("config", nargs="?", help="YAML recipe (default: built-in, same as examples/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    p.set_defaults(func=_cmd_demo)

    tok = sub.add_parser("tokenizer", help="train tokenizers").add_subparsers(dest="action", required=True,
                                                                              metavar="action")
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    p.add_argument("files", nargs="+", help=".txt (blank-line separated documents), .jsonl or .json files")
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--text-key", default="text", help="key of the text in .jsonl/.json records")
    p.add_argument("--special-tokens", nargs="*", default=[], help="extra special tokens to reserve")
    p.add_argument("--split-cjk", action="store_true",
                   help="at most one Chinese/Japanese/Korean character per token (for small corpora)")
    p.set_defaults(func=_cmd_tokenizer_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo" and args.config and "=" in args.config:
        args.overrides.insert(0, args.config)  # `tunelab demo train.steps=50`: an override, not a recipe
        args.config = None
    try:
        return args.func(args)
    except TunelabError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
