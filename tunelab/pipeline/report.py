"""The report of `tunelab pipeline` (tunelab/pipeline/): pipeline_report.json and a self-contained HTML page.

Rows are the base model (when the suite measured one) and each training stage, in order; every metric of the
suite is shown for each row with its delta from the previous row and from the first. For each training stage:
the gain on its target (the tasks, or task/metric, `target:` names) and the forgetting on every other task (its
primary metric: the first one the task reports), both against the previous row and against the first.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from tunelab import __version__
from tunelab.evaluate.report import CSS, LOWER_IS_BETTER, _e, _table, fmt, fmt_delta
from tunelab.io import atomic_write_json, atomic_write_text


def _lower(metric: str) -> bool:
    return metric.split("/")[0] in LOWER_IS_BETTER


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _better(metric: str, delta: float | None) -> bool | None:
    if delta is None or delta == 0:
        return None
    return delta < 0 if _lower(metric) else delta > 0


def build_report(plan, state: dict, status: dict[str, str], base_eval: dict | None, error: str | None,
                 wall_s: float) -> dict[str, Any]:
    """The report's data: the stages, the metric table and each training stage's gain and forgetting."""
    from tunelab.evaluate.suite import task_names

    records = state.get("stages", {})
    stages = []
    for s in plan.stages:
        rec = records.get(s.name) or {}
        st = status.get(s.name, "not run")
        stages.append({"name": s.name, "run": s.run, "status": st, "dir": str(s.dir),
                       "output": str(s.kind.output(s)), "model_from": s.model_stage or s.model_path,
                       "target": s.targets, "wall_s": rec.get("wall_s") if st != "not run" else None,
                       "summary": _brief(rec.get("summary") or {}) if st not in ("not run", "failed") else None})
    rows = []
    if base_eval is not None:
        ev = base_eval["eval"]
        rows.append({"label": "base", "stage": None, "model": base_eval["model"], "metrics": ev["metrics"],
                     "results_path": ev["results_path"]})
    for s in plan.stages:
        rec = records.get(s.name) or {}
        if s.kind.trains and status.get(s.name) in ("ran", "reused", "reevaluated") and rec.get("eval"):
            rows.append({"label": s.name, "stage": s.name, "model": str(s.kind.output(s)), "targets": s.targets,
                         "metrics": rec["eval"]["metrics"], "results_path": rec["eval"]["results_path"]})
    names = task_names(plan.tasks) if plan.tasks else []
    table = _metric_table(names, rows)
    return {"name": plan.cfg.name, "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "tunelab": __version__, "seed": plan.cfg.seed, "status": "failed" if error else "finished",
            "error": error, "wall_s": round(wall_s, 1), "stages": stages,
            "rows": [{k: v for k, v in r.items() if k != "metrics"} for r in rows], "tasks": names,
            "metrics": table, "changes": _changes(names, rows, table)}


def _metric_table(names: list[str], rows: list[dict]) -> list[dict]:
    """One entry per (task, metric): the value of each row, its delta from the previous row and from the first."""
    out = []
    for task in names:
        metrics: list[str] = []
        for r in rows:
            for m in r["metrics"].get(task, {}):
                if m not in metrics:
                    metrics.append(m)
        for i, m in enumerate(metrics):
            values = [r["metrics"].get(task, {}).get(m) for r in rows]
            out.append({"task": task, "metric": m, "primary": i == 0, "lower_is_better": _lower(m), "values": values,
                        "delta_prev": [None] + [_delta(a, b) for a, b in zip(values, values[1:])],
                        "delta_first": [None] + [_delta(values[0], v) for v in values[1:]]})
    return out


def _changes(names: list[str], rows: list[dict], table: list[dict]) -> list[dict]:
    """For each training stage: the gain on its target and the forgetting on the other tasks."""
    out = []
    primary = {e["task"]: e for e in table if e["primary"]}
    by_id = {(e["task"], e["metric"]): e for e in table}
    for i, r in enumerate(rows):
        if r["stage"] is None or i == 0:  # the base, or a first stage with nothing before it
            continue
        targets = r.get("targets") or []
        target_ids = [tuple(t.split("/", 1)) if "/" in t else (t, primary[t]["metric"]) for t in targets
                      if t.split("/")[0] in primary]
        target_tasks = {t for t, _ in target_ids}

        def entry(task: str, metric: str, i: int = i) -> dict:
            e = by_id.get((task, metric))
            if e is None:
                return {"task": task, "metric": metric, "value": None, "vs_previous": None, "vs_first": None}
            dp, df = e["delta_prev"][i], e["delta_first"][i]
            return {"task": task, "metric": metric, "value": e["values"][i], "vs_previous": dp, "vs_first": df,
                    "better_than_previous": _better(metric, dp), "better_than_first": _better(metric, df)}

        out.append({"stage": r["stage"], "previous": rows[i - 1]["label"] if i else None, "first": rows[0]["label"],
                    "gain": [entry(t, m) for t, m in target_ids],
                    "forgetting": [entry(t, primary[t]["metric"]) for t in names
                                   if t not in target_tasks and t in primary]})
    return out


def _brief(summary: dict) -> dict:
    """The figures of a stage's own summary worth a column: steps, losses, wall time, counts."""
    keys = ("steps", "train_loss_last", "tokens", "train_wall_s", "selected", "read", "tokens_per_s",
            "max_abs_logit_diff")
    out = {k: summary[k] for k in keys if k in summary}
    ev = summary.get("eval_after") or {}
    if "eval_loss" in ev:
        out["eval_loss"] = ev["eval_loss"]
    if "tokens" in summary and "selected" not in summary and "steps" not in summary:
        out.pop("tokens")
    return out


def write_report(report: dict, out: str | Path) -> dict[str, str]:
    """pipeline_report.json and pipeline_report.html in `out`, each written atomically."""
    out = Path(out)
    atomic_write_json(out / "pipeline_report.json", report)
    atomic_write_text(out / "pipeline_report.html", render_html(report))
    return {"report_json": str(out / "pipeline_report.json"), "report_path": str(out / "pipeline_report.html")}


def _signed(metric: str, d: float | None, better: bool | None) -> str:
    if d is None:
        return ""
    cls = "muted" if better is None else ("good" if better else "bad")
    return f'<span class="{cls}">{_e(fmt_delta(metric, d))}</span>'


def render_html(report: dict) -> str:
    """The whole report as one HTML page (inline CSS, no scripts)."""
    parts = [f"<h1>tunelab pipeline: {_e(report['name'])}</h1>",
             f'<p class="muted">{_e(report["created"])} · seed {_e(report["seed"])} · {_e(report["wall_s"])} s · '
             f'{_e(report["status"])}</p>']
    if report.get("error"):
        parts.append(f'<p class="bad">{_e(report["error"])}</p>')
    parts.append("<h2>Stages</h2>")
    parts.append(_table(["stage", "command", "status", "model from", "target", "figures", "s", "output"], [
        [_e(s["name"]), _e(s["run"]), _e(s["status"]), _e(s["model_from"] or ""), _e(", ".join(s["target"])),
         _e(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in (s["summary"] or {}).items())),
         _e(s["wall_s"] if s["wall_s"] is not None else ""), f"<code>{_e(s['output'])}</code>"]
        for s in report["stages"]], left=6))
    rows = report["rows"]
    if rows:
        labels = [r["label"] for r in rows]
        parts.append("<h2>Every metric, stage by stage</h2><p class='muted'>each value with (its change from the "
                     "previous row · from the first row)</p>")
        body = []
        for e in report["metrics"]:
            cells = []
            for i, v in enumerate(e["values"]):
                dp, df = e["delta_prev"][i], e["delta_first"][i]
                m = e["metric"]
                extra = "" if i == 0 else (f" ({_signed(m, dp, _better(m, dp))}"
                                           + ("" if i == 1 else f" · {_signed(m, df, _better(m, df))}") + ")")
                cells.append(_e(fmt(e["metric"], v)) + extra)
            body.append([_e(e["task"]), _e(e["metric"] + (" ↓" if e["lower_is_better"] else ""))] + cells)
        parts.append(_table(["task", "metric"] + [_e(x) for x in labels], body, left=2))
    if report["changes"]:
        parts.append("<h2>Gain on each stage's target, forgetting on the others</h2>")
        body = []
        for c in report["changes"]:
            for what, items in (("gain", c["gain"]), ("forgetting", c["forgetting"])):
                for x in items:
                    body.append([_e(c["stage"]), what, _e(f"{x['task']} {x['metric']}"),
                                 _e(fmt(x["metric"], x["value"])),
                                 _signed(x["metric"], x["vs_previous"], x.get("better_than_previous")),
                                 _signed(x["metric"], x["vs_first"], x.get("better_than_first"))])
        first = report["changes"][0]["first"]
        parts.append(_table(["stage", "", "task metric", "value", "vs previous", f"vs {_e(first)}"], body, left=3))
    parts.append("<p class='muted'>Each row's full results (every sample, per subject) are in its eval report: "
                 + ", ".join(f"<code>{_e(r['results_path'])}</code>" for r in rows) + "</p>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>tunelab pipeline: " + _e(report["name"])
            + f"</title><style>{CSS}</style></head><body>" + "".join(parts) + "</body></html>\n")
