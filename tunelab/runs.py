"""`tunelab runs`: the training runs under an output directory, their status and how to resume each.

A run directory is one `tunelab pretrain` or `tunelab finetune` wrote (its `.tunelab-output.json` marker, or a
`config.json` with an `events.jsonl`). Its status: `finished` (it wrote `summary.json`), `failed` (its last event
is `failed`, with the error), else `interrupted` (Ctrl-C, or killed, or still running). The resume command is the
command line the run was started with (recorded in its `start` event) plus `--resume`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.outputs import read_marker
from tunelab.train.checkpoint import latest_checkpoint
from tunelab.train.events import read_events

STAGES = {"pretrain run": "pretrain", "finetune run": "finetune"}


def run_stage(run_dir: Path) -> str | None:
    """"pretrain" or "finetune" for a training run directory, else None."""
    kind = (read_marker(run_dir) or {}).get("kind")
    if kind in STAGES:
        return STAGES[kind]
    if kind is None and (run_dir / "config.json").is_file() and (run_dir / "events.jsonl").is_file():
        try:
            config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(config, dict) and "train" in config:
            return "finetune" if "method" in config else "pretrain"
    return None


def resume_command(stage: str, events: list[dict[str, Any]]) -> str:
    """The command that resumes the run: the one that started it, with `--resume`."""
    start = next((e for e in events if e.get("event") == "start"), {})
    command = start.get("command")
    if not command:
        return f"tunelab {stage} <the run's recipe and overrides> --resume"
    words = shlex.split(command)
    return command if "--resume" in words or "--force-resume" in words else command + " --resume"


def describe_run(run_dir: str | Path) -> dict[str, Any] | None:
    """Status, steps, last checkpoint and resume command of one run directory (None: not a training run)."""
    d = Path(run_dir)
    stage = run_stage(d)
    if stage is None:
        return None
    events = read_events(d / "events.jsonl") if (d / "events.jsonl").is_file() else []
    steps = [e["step"] for e in events if e.get("event") == "step"]
    config = json.loads((d / "config.json").read_text(encoding="utf-8")) if (d / "config.json").is_file() else {}
    start = next((e for e in events if e.get("event") == "start"), {})
    total = start.get("steps") or config.get("train", {}).get("steps")
    last = events[-1]["event"] if events else None
    status = "finished" if (d / "summary.json").is_file() else "failed" if last == "failed" else "interrupted"
    checkpoint = latest_checkpoint(d)
    out = {"run_dir": str(d), "stage": stage, "status": status, "step": steps[-1] if steps else 0,
           "steps": total, "checkpoint": str(checkpoint) if checkpoint else None,
           "checkpoint_step": int(checkpoint.name.split("-")[-1]) if checkpoint else None}
    if status == "failed":
        out["error"] = events[-1].get("error")
    if status != "finished":
        out["resume"] = resume_command(stage, events) if checkpoint else None
    return out


def list_runs(out_dir: str | Path = "runs") -> list[dict[str, Any]]:
    """Every training run directly under `out_dir` (sorted by name)."""
    root = Path(out_dir)
    if not root.is_dir():
        raise TunelabError(f"{root}: no such directory; give the out_dir your runs are in (default: runs)")
    return [r for d in sorted(root.iterdir()) if d.is_dir() and (r := describe_run(d)) is not None]


def interrupted_hint(run_dir: str | Path, stage: str, command: str | None) -> str:
    """What Ctrl-C during training tells the user: the last checkpoint and the command that resumes from it."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return (f"interrupted before the first checkpoint of {run_dir} (train.save_every sets how often one is "
                f"written): nothing to resume, a rerun starts over")
    events = [{"event": "start", "command": command}] if command else []
    return f"interrupted; {checkpoint} is the last checkpoint; resume with: {resume_command(stage, events)}"
