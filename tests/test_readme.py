"""The README's commands, as a user copies them: each parses with the flags that exist, every example recipe it
names is there and validates, and the run names it relies on are the recipes' own."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tunelab.cli import parse_args
from tunelab.config import CompareConfig, FinetuneConfig, PretrainConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def commands() -> list[str]:
    """Every `tunelab ...` command in the README's bash blocks (comments and `[optional]` parts removed)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("#"):
                continue
            for part in line.split("&&"):
                words = re.sub(r"\[--[^\]]*\]", "", part).strip()
                if words.startswith("tunelab "):
                    found.append(words)
                elif " -m tunelab " in words:
                    found.append("tunelab " + words.split(" -m tunelab ", 1)[1])
    return found


def test_the_readme_has_commands():
    assert len(commands()) > 25


@pytest.mark.parametrize("command", commands())
def test_readme_command_parses(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths as a user in the clone has them
    argv = shlex.split(command)[1:]
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse's usage error
        pytest.fail(f"{command!r}: does not parse (exit {e.code})")
    recipe = getattr(args, "config", None)
    if recipe and recipe.startswith("examples/"):
        assert (ROOT / recipe).is_file(), f"{command!r}: {recipe} is not in the repository"
        cls = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "compare": CompareConfig}.get(args.command)
        if cls is not None:
            load_config(cls, ROOT / recipe, args.overrides)


def test_run_names_the_readme_relies_on():
    recipe = yaml.safe_load((ROOT / "examples" / "finetune_chat.yaml").read_text(encoding="utf-8"))
    assert "runs/chat-lora/adapter" in README
    assert recipe["name"] == "chat-lora" and recipe.get("out_dir", "runs") == "runs"
    cfg = load_config(CompareConfig, ROOT / "examples" / "compare_demo.yaml")
    assert "runs/compare-demo/report.html" in README and cfg.name == "compare-demo" and cfg.out_dir == "runs"
