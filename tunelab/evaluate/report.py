"""Before/after reports: each task's metrics side by side per model with the delta from the first model.

`comparison(results)` lists (task, metric, values, deltas) rows; `write_report` writes them, with every
detail, as `results.json` and as `report.html`, a single self-contained page (inline CSS, no scripts, no
external assets) that any browser opens offline. Accuracy-like metrics are shown in percent and their deltas
in points; for perplexity, bits per byte and NLL lower is better, and colours follow that.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from tunelab.io import atomic_write_json, atomic_write_text

LOWER_IS_BETTER = {"ppl", "bits_per_byte", "nll", "losses", "unparseable"}
COUNTS = {"wins", "ties", "losses", "unparseable"}


def is_rate(metric: str) -> bool:
    """Metrics shown in percent: accuracies, win rates, consistency."""
    return any(w in metric for w in ("acc", "rate", "consistency")) and metric not in COUNTS


def fmt(metric: str, value: float | int | None) -> str:
    """A metric's value for display."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if metric.split("/")[0] in COUNTS:
        return str(int(value))
    if is_rate(metric):
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def fmt_delta(metric: str, delta: float | None) -> str:
    """A delta for display: percentage points for rates, plain difference otherwise."""
    if delta is None:
        return ""
    if metric.split("/")[0] in COUNTS:
        return f"{int(delta):+d}"
    return f"{100 * delta:+.1f} pt" if is_rate(metric) else f"{delta:+.4g}"


def comparison(results: dict) -> list[dict]:
    """One row per (task, metric): values per model and deltas from the first model (None where undefined)."""
    rows = []
    for task in results["tasks"]:
        name = task["name"]
        metrics: list[str] = []
        for m in results["models"]:
            for key in m["tasks"].get(name, {}).get("metrics", {}):
                if key not in metrics:
                    metrics.append(key)
        for key in metrics:
            values = [m["tasks"].get(name, {}).get("metrics", {}).get(key) for m in results["models"]]
            first = values[0]
            deltas = [None if first is None or v is None else v - first for v in values]
            deltas[0] = None
            ci95 = [m["tasks"].get(name, {}).get("ci95", {}).get(key) for m in results["models"]]
            rows.append({"task": name, "type": task["type"], "metric": key, "values": values, "deltas": deltas,
                         "lower_is_better": key.split("/")[0] in LOWER_IS_BETTER,
                         **({"ci95": ci95} if any(ci95) else {})})
    return rows


def write_report(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """results.json and report.html in `out_dir`, each written atomically."""
    out = Path(out_dir)
    results = {**results, "comparison": results.get("comparison") or comparison(results)}
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.html", render_html(results))
    return out / "results.json", out / "report.html"


# ---------------------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1em}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{padding:3px 10px;border-bottom:1px solid #eee;
text-align:right;vertical-align:top}th{background:#f6f6f6}td.l,th.l{text-align:left}
.good{color:#17803d}.bad{color:#c0262d}.muted{color:#777}code,pre{font-size:12px;background:#f6f6f6}
pre{white-space:pre-wrap;padding:.5em;max-height:20em;overflow:auto}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _delta_cell(row: dict, i: int) -> str:
    d = row["deltas"][i]
    if d is None:
        return ""
    better = d < 0 if row["lower_is_better"] else d > 0
    cls = "good" if better and d else ("bad" if d else "muted")
    return f' <span class="{cls}">({_e(fmt_delta(row["metric"], d))})</span>'


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table; cells are already escaped; the first `left` columns are left-aligned."""
    th = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render_html(results: dict) -> str:
    """The whole report as one HTML page."""
    labels = [m["label"] for m in results["models"]]
    parts = [f"<h1>tunelab eval: {_e(results['name'])}</h1>",
             f'<p class="muted">{_e(results.get("created", ""))} · seed {_e(results.get("seed", 0))} · '
             f'{_e(results.get("wall_s", ""))} s</p>',
             _table(["model", "directory", "adapter"],
                    [[_e(m["label"]), f"<code>{_e(m['base'])}</code>", f"<code>{_e(m.get('adapter') or '')}</code>"]
                     for m in results["models"]], left=3),
             "<h2>Summary</h2>"]
    rows = results.get("comparison") or comparison(results)
    head = ["task", "metric"] + [_e(x) + (" (Δ vs " + _e(labels[0]) + ")" if i else "") for i, x in enumerate(labels)]
    parts.append(_table(head, [[_e(r["task"]), _e(r["metric"] + (" ↓" if r["lower_is_better"] else ""))]
                               + [_e(fmt(r["metric"], v)) + _delta_cell(r, i) + _ci(r.get("ci95", {i: None})[i])
                                  for i, v in enumerate(r["values"])]
                               for r in rows], left=2))
    parts.append('<p class="muted">[a–b]: 95% confidence interval of an accuracy (Wilson score interval over its '
                 'questions or prompts), shown where the metric is a plain share of items.</p>')
    for task in results["tasks"]:
        parts.append(f"<h2>{_e(task['name'])} <span class='muted'>({_e(task['type'])})</span></h2>")
        parts.append(_details(task, results["models"]))
    parts.append(_legend(rows))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>tunelab eval: " + _e(results["name"])
            + f"</title><style>{CSS}</style></head><body>" + "".join(parts) + "</body></html>\n")


def _ci(interval: list[float] | None) -> str:
    """A 95% interval under a value, in percent; nothing when there is none."""
    if not interval:
        return ""
    return f' <span class="muted ci">[{100 * interval[0]:.1f}–{100 * interval[1]:.1f}]</span>'


# What each metric name means, for the report's legend (a name's part before "/" is looked up: accuracy/task).
LEGEND = {
    "ppl": "perplexity: exp(mean negative log-likelihood per token) of the text; lower is better; depends on the "
           "tokenizer",
    "bits_per_byte": "total negative log-likelihood / ln 2 / UTF-8 bytes of the text; lower is better; compares "
                     "models with different tokenizers",
    "nll": "mean negative log-likelihood per scored token, in nats; lower is better",
    "letter_acc": "multiple choice, letter scoring: the option whose letter (A/B/C/D) gets the highest next-token "
                  "probability after the prompt; averaged over subjects",
    "ll_acc": "multiple choice, log-likelihood scoring: the option whose text has the highest summed log-probability "
              "after the prompt; averaged over subjects",
    "ll_acc_norm": "as ll_acc, with each option's log-probability divided by its length in characters "
                   "(lm-eval's acc_norm); averaged over subjects",
    "accuracy": "generation: share of prompts whose extracted answer equals the reference (accuracy/<group>: per "
                "group, e.g. per task)",
    "win_rate": "pairwise judge: (wins + ties / 2) / decided pairs against the first model; 50% is a draw",
    "position_consistency": "pairwise judge: share of parsed pairs whose two verdicts (answers in both orders) agree",
    "wins": "pairwise judge: pairs won in both orders", "ties": "pairwise judge: pairs tied, or whose two verdicts "
    "disagree", "losses": "pairwise judge: pairs lost in both orders",
    "unparseable": "judge outputs with no verdict or rating (counted, never dropped)",
    "mean_rating": "single-answer judge: mean 1-10 rating of the parsed ratings",
}


def _legend(rows: list[dict]) -> str:
    """Definitions of the metric names the report shows (`_micro`: averaged over questions, not subjects)."""
    seen: list[str] = []
    for r in rows:
        base = r["metric"].split("/")[0].removesuffix("_micro")
        if base not in seen:
            seen.append(base)
    items = [f"<tr><td class='l'><code>{_e(m)}</code></td><td class='l'>{_e(LEGEND[m])}</td></tr>"
             for m in seen if m in LEGEND]
    if any(r["metric"].endswith("_micro") for r in rows):
        items.append("<tr><td class='l'><code>…_micro</code></td><td class='l'>the same accuracy over all questions "
                     "together instead of the mean of the subjects' accuracies</td></tr>")
    return "<h2>Metrics</h2><table>" + "".join(items) + "</table>" if items else ""


def _details(task: dict, models: list[dict]) -> str:
    per_model = [m["tasks"].get(task["name"], {}) for m in models]
    labels = [_e(m["label"]) for m in models]
    kind = task["type"]
    if kind == "choice":
        return _choice_details(per_model, labels)
    if kind == "perplexity":
        rows = [[labels[i], _e(f["path"]), _e(f["tokens"]), _e(f["bytes"]), _e(fmt("nll", f["nll"])),
                 _e(fmt("ppl", f["ppl"])), _e(fmt("bits_per_byte", f["bits_per_byte"]))]
                for i, r in enumerate(per_model) for f in r.get("files", [])]
        return _table(["model", "file", "tokens", "bytes", "nll", "ppl", "bits/byte"], rows, left=2)
    if kind == "generation":
        return _generation_details(per_model, labels)
    return _judge_details(per_model, labels)


def _choice_details(per_model: list[dict], labels: list[str]) -> str:
    first = per_model[0]
    info = "".join(f"<p>{lab}: {_e(r.get('questions'))} questions, k = {_e(r.get('k'))}, context {_e(r.get('context'))}"
                   f" tokens, {_e(r.get('truncated'))} prompts truncated (fewer examples), {_e(r.get('cut'))} cut, "
                   f"{_e(r.get('questions_per_s'))} questions/s</p>" for lab, r in zip(labels, per_model))
    head = ["subject", "n"] + [f"{lab} {k}" for lab in labels for k in ("letter", "ll", "ll norm")]
    rows = []
    for subject, s in first.get("subjects", {}).items():
        cells = [_e(subject), _e(s["questions"])]
        for r in per_model:
            v = r.get("subjects", {}).get(subject, {})
            cells += [_e(fmt("acc", v.get(k))) + _ci(v.get("ci95", {}).get(k))
                      for k in ("letter_acc", "ll_acc", "ll_acc_norm")]
        rows.append(cells)
    prompt = first.get("example_prompt")
    example = f"<h3>First prompt ({labels[0]})</h3><pre>{_e(prompt)}</pre>" if prompt else ""
    return info + _table(head, rows) + example


def _generation_details(per_model: list[dict], labels: list[str], n: int = 20) -> str:
    info = "".join(f"<p>{lab}: {_e(r.get('examples'))} prompts, {_e(r.get('no_answer'))} replies with nothing to "
                   f"extract ({_e(r.get('extract'))})</p>" for lab, r in zip(labels, per_model))
    samples = [r.get("samples", []) for r in per_model]
    rows = []
    for i, s in enumerate(samples[0][:n]):
        cells = [_e(s["prompt"]), _e(s["reference"])]
        for other in samples:
            o = other[i] if i < len(other) else {}
            mark = "good" if o.get("correct") else "bad"
            cells.append(f'<span class="{mark}">{_e(o.get("reply", ""))}</span>')
        rows.append(cells)
    return info + f"<h3>First {min(n, len(samples[0]))} prompts</h3>" + _table(["prompt", "reference"] + labels,
                                                                                rows, left=2 + len(labels))


def _judge_details(per_model: list[dict], labels: list[str]) -> str:
    parts = []
    for lab, r in zip(labels, per_model):
        if r.get("baseline"):
            parts.append(f"<p>{lab}: the baseline of the pairwise comparisons</p>")
            continue
        bad = r.get("unparseable_outputs", [])
        parts.append(f"<p>{lab}: {_e(r.get('pairs', r.get('graded', '')))} judged; {len(bad)} unparseable judge "
                     f"outputs{' (shown below)' if bad else ''}</p>")
        parts += [f"<pre>{_e(o)}</pre>" for o in bad[:10]]
    return "".join(parts)
