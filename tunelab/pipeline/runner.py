"""`tunelab pipeline`'s runner: each stage's fingerprint, state.json, reuse and resume, the suite after each
training stage, and the report at the end (`run_pipeline`)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.config import EvalConfig
from tunelab.errors import DataError, TunelabError
from tunelab.io import atomic_write_json, clear_outputs
from tunelab.outputs import check_run_dir, open_run_dir
from tunelab.pipeline.plan import plan_pipeline
from tunelab.pipeline.recipe import (
    BASE_EVAL,
    FREE_KEYS,
    REPORT_HTML,
    REPORT_JSON,
    RUN_KIND,
    STATE,
    PipelineConfig,
    PipelineError,
    Plan,
    Stage,
)

# ---------------------------------------------------------------------------------------------------------
# fingerprints


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def _paths(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | Path):
        return [str(value)] if str(value) else []
    return [str(v) for v in value if v]


def _external(plan: Plan, inputs: dict[str, Any], s: Stage | None = None) -> list[str]:
    """The paths among `inputs` that are not outputs of the stages `s` reads (or, for the suite, of any stage):
    the user's own files, which no output may touch and whose contents are fingerprinted."""
    upstream = [plan.by_name[r].dir.resolve() for r in ((s.refs + [s.model_stage] if s.model_stage else s.refs)
                                                         if s is not None else plan.by_name)]
    return sorted({p for v in inputs.values() for p in _paths(v)
                   if not any(d == Path(p).resolve() or d in Path(p).resolve().parents for d in upstream)})


def _settings_key(s: Stage) -> dict[str, Any]:
    """A stage's settings as written, less those that change nothing it computes."""
    raw = json.loads(json.dumps(s.settings, default=str))
    for section, keys in FREE_KEYS.items():
        if isinstance(raw.get(section), dict):
            for k in keys:
                raw[section].pop(k, None)
    return raw


def fingerprint_stages(plan: Plan) -> None:
    """Each stage's key: its command, settings, seed, model input, input files (content) and upstream keys."""
    from tunelab.train.checkpoint import fingerprint

    for s in plan.stages:
        model = plan.cfg.stages[s.name].get("model")
        upstream = {r: plan.by_name[r].key for r in sorted(set(s.refs + ([s.model_stage] if s.model_stage else [])))}
        s.key = _digest({"run": s.run, "settings": _settings_key(s), "model": model, "seed": plan.cfg.seed,
                         "model_path": s.model_path, "files": fingerprint(_external(plan, s.kind.inputs(s), s)),
                         "upstream": upstream})


def _eval_key(plan: Plan, model_key: str) -> str | None:
    from tunelab.train.checkpoint import fingerprint

    if plan.cfg.eval is None:
        return None
    tasks = [t.model_dump(mode="json") for t in plan.tasks]
    files = fingerprint([p for t in plan.tasks for p in _paths(getattr(t, "path", None))
                         + _paths(getattr(t, "judge", None))])
    return _digest({"tasks": tasks, "files": files, "precision": plan.cfg.eval.precision, "seed": plan.cfg.seed,
                    "model": model_key})


# ---------------------------------------------------------------------------------------------------------
# running


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"stages": {}}
    return state if isinstance(state, dict) and isinstance(state.get("stages"), dict) else {"stages": {}}


def _check_inputs_exist(plan: Plan) -> None:
    """Every file or directory a stage reads from outside the pipeline exists (before anything runs)."""
    import glob

    for s in plan.stages:
        for kind, value in s.kind.inputs(s).items():
            for p in _external(plan, {kind: value}, s):
                if not (Path(p).exists() or (glob.has_magic(p) and glob.glob(p, recursive=True))):
                    raise DataError(f"{s.where}: the {kind} {p} does not exist; fix the path (relative paths are "
                                    f"relative to {Path.cwd()})")
    for t in plan.tasks:
        for p in _external(plan, {"data": getattr(t, "path", None)}):
            if not (Path(p).exists() or glob.glob(p, recursive=True)):
                raise DataError(f"{plan.source}: eval: task {t.name or t.type!r}: {p} does not exist; fix the path")


def run_pipeline(cfg: PipelineConfig, source: str = "recipe", rerun: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or reuse) every stage in order, evaluate after each training stage, write the report.

    Returns the report (as written to pipeline_report.json) with the paths of the two report files. A stage's
    failure raises `PipelineError` after the report of the stages before it is written."""
    from tunelab.pipeline.report import build_report, write_report
    from tunelab.train.events import EventLog

    started = time.time()
    plan = plan_pipeline(cfg, source)
    inputs = {f"{kind} of stage {s.name}": _external(plan, {kind: v}, s) for s in plan.stages
              for kind, v in s.kind.inputs(s).items()}
    inputs["eval data"] = _external(plan, {"d": [getattr(t, "path", None) for t in plan.tasks]})
    inputs["recipe"] = source if Path(source).is_file() else None
    out = check_run_dir(plan.dir, RUN_KIND, [s.name for s in plan.stages] +
                        [BASE_EVAL, STATE, "events.jsonl", REPORT_JSON, REPORT_HTML], inputs)
    _check_inputs_exist(plan)
    fingerprint_stages(plan)
    open_run_dir(out, RUN_KIND)
    clear_outputs(out, [REPORT_JSON, REPORT_HTML])
    state = _read_state(out / STATE)
    runner = _Runner(plan, state, out / STATE, rerun, log)
    error: str | None = None
    with EventLog(out / "events.jsonl", append=True) as events:
        events.write("start", stages=[s.name for s in plan.stages], rerun=rerun)
        try:
            for s in plan.stages:
                if s.kind.trains and plan.base is not None and runner.base_eval is None and plan.tasks:
                    runner.evaluate_base()
                runner.stage(s)
                events.write("stage", name=s.name, run=s.run, status=runner.status[s.name])
        except Exception as e:  # noqa: BLE001 - any stage's failure stops the pipeline with one line
            what = runner.current if runner.current == BASE_EVAL else \
                f"stages.{runner.current} ({plan.by_name[runner.current].run})"
            text = (str(e).strip().splitlines() or [""])[0]
            error = f"{what} failed: {text if isinstance(e, TunelabError) else f'{type(e).__name__}: {text}'}"
            runner.status[runner.current] = "failed"
            events.write("failed", stage=runner.current, error=error)
        report = build_report(plan, state, runner.status, runner.base_eval, error, time.time() - started)
        paths = write_report(report, out)
        events.write("end", wall_s=report["wall_s"], failed=runner.current if error else None)
    if error is not None:
        done = [n for n, st in runner.status.items() if st in ("ran", "reused", "reevaluated")]
        kept = f"the stages before it ({', '.join(done)}) are finished and kept in {out}" if done else \
            "no stage had finished"
        raise PipelineError(f"{error} ({kept}; the report is {paths['report_path']}); fix it and run the same "
                            f"command again: finished stages are reused")
    return {**report, **paths}


class _Runner:
    """Runs the stages of a plan, keeping their state (key, status, summary, metrics) in state.json."""

    def __init__(self, plan: Plan, state: dict, path: Path, rerun: bool, log: Callable[[str], None]):
        self.plan, self.state, self.path, self.rerun, self.log = plan, state, path, rerun, log
        self.status: dict[str, str] = {}
        self.current: str | None = None
        self.base_eval: dict[str, Any] | None = None

    def save(self) -> None:
        atomic_write_json(self.path, self.state)

    def stage(self, s: Stage) -> None:
        self.current = s.name
        n = len(self.plan.stages)
        tag = f"[{s.index + 1}/{n}] {s.name} ({s.run})"
        records = self.state["stages"]
        rec = records.get(s.name)
        output = s.kind.output(s)
        if not self.rerun and rec and rec.get("status") == "finished" and rec.get("key") == s.key and output.exists():
            self.status[s.name] = "reused"
            self.log(f"{tag}: reused (same settings, inputs and upstream stages): {output}")
        else:
            if rec and rec.get("run") != s.run and s.dir.is_dir():
                shutil.rmtree(s.dir)  # this pipeline's own earlier stage of another command
            resume = bool(rec and rec.get("status") == "started" and rec.get("key") == s.key and not self.rerun)
            records[s.name] = rec = {"run": s.run, "key": s.key, "status": "started"}
            self.save()
            self.log(f"{tag}: {'continuing' if resume else 'running'} -> {s.dir}")
            t0 = time.time()
            summary = s.kind.run(self.plan, s, resume, self.log)
            rec.update(status="finished", summary=_plain(summary), wall_s=round(time.time() - t0, 1),
                       output=str(output))
            self.save()
            self.status[s.name] = "ran"
            self.log(f"{tag}: done in {rec['wall_s']:.0f}s: {output}")
        if s.needs_merge and not (rec.get("merged") and (s.kind.base(s) / "config.json").is_file()):
            self.merge(s, rec, tag)
        if s.kind.trains and self.plan.tasks:
            self.evaluate(s, rec, tag)

    def merge(self, s: Stage, rec: dict, tag: str) -> None:
        from tunelab.export import export_merged

        self.log(f"{tag}: merging the adapter into its base for the next stage -> {s.kind.base(s)}")
        r = export_merged(s.kind.output(s), s.kind.base(s))
        rec["merged"] = {"dir": str(s.kind.base(s)), "max_abs_logit_diff": r["max_abs_logit_diff"]}
        self.save()

    def evaluate(self, s: Stage, rec: dict, tag: str) -> None:
        key = _eval_key(self.plan, s.key)
        results = s.dir / "eval" / "results.json"
        if rec.get("eval_key") == key and results.is_file() and rec.get("eval") is not None:
            return
        self.log(f"{tag}: evaluating {s.kind.output(s)} on the suite")
        rec["eval"] = self._suite(str(s.kind.output(s)), s.name, s.dir, "eval")
        rec["eval_key"] = key
        if self.status.get(s.name) == "reused":
            self.status[s.name] = "reevaluated"
        self.save()

    def evaluate_base(self) -> None:
        base = self.plan.base
        from tunelab.train.checkpoint import fingerprint

        key = _eval_key(self.plan, _digest(fingerprint([base])))
        rec = self.state.get("base") or {}
        if rec.get("key") == key and (self.plan.dir / BASE_EVAL / "results.json").is_file():
            self.base_eval = rec
            return
        self.current = BASE_EVAL
        self.log(f"[base] evaluating the base model {base} on the suite")
        self.state["base"] = self.base_eval = {"key": key, "model": base,
                                               "eval": self._suite(base, "base", self.plan.dir, BASE_EVAL)}
        self.save()

    def _suite(self, model: str, label: str, out_dir: Path, name: str) -> dict[str, dict[str, float]]:
        from tunelab.evaluate.suite import run_eval

        p = self.plan
        ecfg = EvalConfig(name=name, seed=p.cfg.seed, out_dir=str(out_dir), models=[f"{label}={model}"],
                          precision=p.cfg.eval.precision, tasks=p.tasks)
        r = run_eval(ecfg, log=lambda line: self.log(f"  {line}"))
        return {"results_path": r["results_path"],
                "metrics": {k: v.get("metrics", {}) for k, v in r["models"][0]["tasks"].items()}}


def _plain(value: Any) -> Any:
    """A summary as JSON data (paths as strings)."""
    return json.loads(json.dumps(value, default=str))
