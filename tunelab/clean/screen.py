"""What `data clean` / `data dedup` print: a progress bar per stage, and a one-screen summary."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tunelab.config import load_config
from tunelab.errors import ConfigError

OVERRIDE = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*=")  # `quality.min_words=20`, as the other commands take


def split_positionals(tokens: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(inputs, recipe, overrides) from the positionals of `data clean|dedup` (a recipe is a .yaml/.yml file,
    an override is key=value; everything else is an input)."""
    inputs, recipes, overrides = [], [], []
    for t in tokens:
        if t.lower().endswith((".yaml", ".yml")):
            recipes.append(t)
        elif OVERRIDE.match(t) and not Path(t).exists():
            overrides.append(t)
        else:
            inputs.append(t)
    if len(recipes) > 1:
        raise ConfigError(f"more than one recipe ({', '.join(recipes)}): give one YAML recipe")
    if not inputs:
        raise ConfigError("no inputs: give .jsonl, .jsonl.gz, .parquet or .txt files, directories or globs")
    return inputs, (recipes[0] if recipes else None), overrides


def load_recipe(cls, recipe: str | None, overrides: list[str]):
    return load_config(cls, recipe, overrides)


@contextlib.contextmanager
def stage_progress(console: Console) -> Iterator:
    """A `progress(label, done, total)` callback drawing one rich bar per stage (nothing when not a terminal)."""
    if not console.is_terminal:
        yield None
        return
    bars: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        def update(label: str, done: int, total: int) -> None:
            if label not in bars:
                bars[label] = progress.add_task(label, total=total)
            progress.update(bars[label], completed=done)
        yield update


def show_summary(console: Console, title: str, report: dict) -> None:
    """The summary rows, the largest removals (documents and lines), where the output is."""
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in report["summary"].items():
        table.add_row(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    top = sorted(report["removed"].items(), key=lambda kv: -kv[1]["chars"])[:8]
    for rule, r in top:
        parts = [f"{r['documents']:,} documents" if r["documents"] else "", f"{r['lines']:,} lines" if r["lines"]
                 else ""]
        table.add_row(f"removed: {rule}", ", ".join(p for p in parts if p) + f" ({r['chars']:,} chars)")
    if report.get("languages"):
        table.add_row("languages", ", ".join(f"{k} {v:,}" for k, v in list(report["languages"].items())[:6]))
    out = report["out"]
    table.add_row("output", f"{out}/data/ ({report['summary']['shards']} shards), {out}/report.json, "
                            f"{out}/report.html"
                  + (f", {out}/clusters.jsonl" if "clusters" in report else ""))
    console.print(table)
