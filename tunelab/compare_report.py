"""The outputs of `tunelab compare` (`compare.py`): results.json, results.csv and a self-contained report.html.

The report is one page with inline CSS and inline SVG (no scripts, no external assets): the table with the best
value of each column marked, the winner with its margin, every method's training-loss curve on one chart, and eval
loss against trainable parameters (log scale). Everything here reads the results dict only, so a report can be
regenerated from `results.json`.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path

from tunelab.evaluate.report import CSS, _table
from tunelab.io import atomic_write_json, atomic_write_text

CSV_COLUMNS = ["label", "method", "status", "error", "reused", "settings", "train_overrides", "lr",
               "trainable_parameters", "trainable_pct", "parameters", "train_loss_first", "final_train_loss",
               "final_loss_steps", "eval_loss", "eval_loss_before", "accuracy", "general_loss",
               "general_loss_delta", "tokens_per_s", "tokens_per_s_ratio",
               "peak_memory_mb", "peak_memory_ratio", "train_wall_s", "wall_s", "steps", "run_dir"]


def write_results(results: dict, out: str | Path) -> dict[str, str]:
    """results.json, results.csv and report.html in `out`, each written atomically."""
    out = Path(out)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.csv", to_csv(results))
    atomic_write_text(out / "report.html", render_html(results))
    return {"results_path": str(out / "results.json"), "csv_path": str(out / "results.csv"),
            "report_path": str(out / "report.html")}


def to_csv(results: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in results["methods"]:
        writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, dict) else v
                         for k, v in r.items() if k in CSV_COLUMNS})
    return buf.getvalue()


# (key, header, lower is better, format); the best value of each column among the finished methods is marked
COLUMNS = [
    ("trainable_parameters", "trainable params", True, lambda r: f"{r['trainable_parameters']:,}"),
    ("trainable_pct", "% of model", True, lambda r: _pct(r["trainable_pct"])),
    ("final_train_loss", "train loss", True, lambda r: f"{r['final_train_loss']:.4f}"),
    ("eval_loss", "eval loss", True, lambda r: f"{r['eval_loss']:.4f}"),
    ("accuracy", "accuracy", False, lambda r: f"{100 * r['accuracy']:.1f}%"),
    ("general_loss", "general loss", True, lambda r: f"{r['general_loss']:.4f}" + _delta(r.get("general_loss_delta"))),
    ("tokens_per_s", "tokens/s", False, lambda r: f"{r['tokens_per_s']:,.0f}" + _ratio(r.get("tokens_per_s_ratio"))),
    ("peak_memory_mb", "peak MB", True, lambda r: f"{r['peak_memory_mb']:,.0f}" + _ratio(r.get("peak_memory_ratio"))),
    ("train_wall_s", "train s", True, lambda r: f"{r['train_wall_s']:.1f}"),
    ("wall_s", "total s", True, lambda r: f"{r['wall_s']:.1f}"),
]
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
EXTRA_CSS = """
td.best{background:#e3f4e8;font-weight:600}tr.failed td{color:#c0262d}.winner{font-size:1.1em;padding:.6em 1em;
background:#f3f8ff;border-left:4px solid #1f77b4}svg{background:#fff;border:1px solid #eee}
"""


def _pct(v: float) -> str:
    return f"{v:.3g}%" if v < 10 else f"{v:.1f}%"


def _delta(v: float | None) -> str:
    return f" ({v:+.3f})" if v is not None else ""


def _ratio(v: float | None) -> str:
    return f" ({v:.2f}x)" if v is not None else ""


def _e(value: object) -> str:
    return html.escape(str(value))


def winner_sentence(results: dict) -> str:
    """The winner, its margin over the runner-up and its parameter count, in one plain sentence."""
    w = results["winner"]
    if w is None:
        return "No method finished."
    what = {"accuracy": "held-out accuracy", "eval_loss": "held-out eval loss",
            "final_train_loss": "final train loss (there is no held-out data)"}[w["by"]]
    value = f"{100 * w['value']:.1f}%" if w["by"] == "accuracy" else f"{w['value']:.4f}"
    text = f"Winner by {what}: {w['label']}, {value}"
    if w["runner_up"] is not None:
        if w["by"] == "accuracy":
            n = (results.get("eval") or {}).get("examples")
            prompts = f" ({round(w['margin'] * n)} of {n} prompts)" if n else ""
            text += (f", {100 * w['margin']:.1f} points{prompts} above {w['runner_up']} "
                     f"({100 * w['runner_up_value']:.1f}%)")
            if "tie_break" in w:
                text += " (tied on accuracy; the lower eval loss decides)"
        else:
            rel = 100 * w["margin"] / w["runner_up_value"] if w["runner_up_value"] else 0.0
            text += f", {w['margin']:.4f} ({rel:.1f}%) below {w['runner_up']} ({w['runner_up_value']:.4f})"
    return text + f"; {w['trainable_parameters']:,} trainable parameters ({_pct(w['trainable_pct'])} of the model)."


def render_html(results: dict) -> str:
    """The report as one self-contained page: inline CSS and SVG, no scripts, no external assets."""
    rows, b = results["methods"], results["budget"]
    ok = [r for r in rows if r["status"] == "ok"]
    shown = {k for k in ("accuracy", "general_loss") if any(r.get(k) is not None for r in ok)}
    columns = [c for c in COLUMNS if c[0] not in ("accuracy", "general_loss") or c[0] in shown]
    best = {}
    for key, _, lower, _ in columns:
        values = [r[key] for r in ok if r.get(key) is not None]
        if len(values) > 1:
            best[key] = min(values) if lower else max(values)
    overrides = any(r["train_overrides"] for r in rows)
    head = ["label", "method", "lr"] + [h + (" ↓" if lower else " ↑") for _, h, lower, _ in columns] + ["status"]
    body = []
    for r in rows:
        cells = [f"<td class='l'>{_e(r['label'])}</td>", f"<td class='l'>{_e(_settings_text(r))}</td>",
                 f"<td>{_e(_lr_text(r))}{' †' if r['train_overrides'] else ''}</td>"]
        for key, _, _, show in columns:
            if r["status"] != "ok" or r.get(key) is None:
                cells.append("<td class='muted'>–</td>")
            else:
                mark = " class='best'" if key in best and r[key] == best[key] else ""
                cells.append(f"<td{mark}>{_e(show(r))}</td>")
        status = ("reused" if r.get("reused") else "ok") if r["status"] == "ok" else f"failed: {r['error']}"
        cells.append(f"<td class='l'>{_e(status)}</td>")
        cls = " class='failed'" if r["status"] != "ok" else ""
        body.append(f"<tr data-label='{_e(r['label'])}'{cls}>{''.join(cells)}</tr>")
    th = "".join(f"<th class='{'l' if i < 2 or i == len(head) - 1 else ''}'>{_e(h)}</th>" for i, h in enumerate(head))
    table = f"<table id='results'><tr>{th}</tr>{''.join(body)}</table>"
    n_final = sorted({r["final_loss_steps"] for r in ok})
    notes = [
        f"Every method: the same base model, data, seed and budget: {b['steps']} steps × {b['micro_batch_size']} "
        f"examples × {b['grad_accum']} accumulation, max_len {b['max_len']}, shared lr {b['lr']:g}"
        + ("; † marks a per-method override of the shared train: section, which changes the comparison" if overrides
           else "") + ".",
        "train loss: the mean of the last " + "/".join(map(str, n_final or [0])) + " steps' losses. eval loss: token "
        "loss on the held-out examples after training" + (
            f" (the base model before tuning: {results['eval_loss_before']:.4f})"
            if results.get("eval_loss_before") is not None else "") + ".",
        f"tokens/s: trained (loss-carrying) tokens per second of training, with the ratio to {results['baseline']}; "
        "peak MB: the method's process peak resident memory on CPU (allocated memory on a GPU), ratio to the "
        "baseline. Each method runs in its own process. train s: the training loop; total s: the fine-tuning run "
        "(training, evaluations, saving) plus the accuracy evaluation.",
    ]
    if results.get("eval"):
        e = results["eval"]
        notes.append(f"accuracy: strict ({e['extract']}) accuracy of greedy replies (up to {e['max_new_tokens']} "
                     f"tokens) to the {e['examples']} prompts of {e['path']}, by the saved model loaded back "
                     f"from disk" + (f"; the base model before tuning: {100 * results['accuracy_before']:.1f}%"
                                      if results.get("accuracy_before") is not None else "") + ".")
    if results.get("general"):
        g = results["general"]
        notes.append("general loss: token loss on the answers of " + ", ".join(g["path"]) + f" ({g['examples']} "
                     "examples outside the tuned data), with the change from the base model in brackets: a rise is "
                     "forgetting" + (f"; the base model before tuning: {results['general_loss_before']:.4f}"
                                     if results.get("general_loss_before") is not None else "") + ".")
    if results["reused"]:
        notes.append("Reused finished runs (same recipe, data and base model): " + ", ".join(results["reused"]) + ".")
    parts = [f"<h1>tunelab compare: {_e(results['name'])}</h1>",
             f"<p class='muted'>{_e(results['created'])} · tunelab {_e(results['tunelab'])} · "
             f"{_e(results.get('device') or '')} · base {_e(results['base'])}"
             + (f" ({results['base_parameters']:,} parameters)" if results.get("base_parameters") else "")
             + f" · {_e(results['wall_s'])} s in all</p>",
             f"<p class='winner'>{_e(winner_sentence(results))}</p>", "<h2>Results</h2>", table]
    parts += [f"<p class='muted'>{_e(n)}</p>" for n in notes]
    colours = {r["label"]: PALETTE[i % len(PALETTE)] for i, r in enumerate(ok)}  # one colour a method, both charts
    curves = [(r["label"], r["losses"]) for r in ok if r.get("losses")]
    if curves:
        s = results["smooth_steps"]
        parts += ["<h2>Training loss</h2>", loss_chart(curves, s, colours),
                  "<p class='muted'>Per-step training loss from each run's events.jsonl"
                  + (f", moving average over {s} steps" if s > 1 else "") + "; log scale.</p>"]
    points = [(r["label"], r["trainable_parameters"], r["eval_loss"]) for r in ok if r.get("eval_loss") is not None]
    if points:
        parts += ["<h2>Eval loss against trainable parameters</h2>", scatter_chart(points, colours),
                  "<p class='muted'>Held-out eval loss after training (lower is better); trainable parameters on a "
                  "log scale.</p>"]
    groups = sorted({g for r in ok for g in (r.get("accuracy_per_group") or {})})
    if groups:
        parts += ["<h2>Accuracy per group</h2>", _table(["label"] + [_e(g) for g in groups], [
            [_e(r["label"])] + [_e(f"{100 * r['accuracy_per_group'][g]:.1f}%") if g in r["accuracy_per_group"]
                                else "–" for g in groups] for r in ok if r.get("accuracy_per_group")])]
    parts.append("<h2>Runs</h2>" + _table(["label", "run directory", "output"], [
        [_e(r["label"]), f"<code>{_e(r.get('run_dir') or '')}</code>", f"<code>{_e(r.get('output_dir') or '')}</code>"]
        for r in rows], left=3))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>tunelab compare: {_e(results['name'])}"
            f"</title><style>{CSS}{EXTRA_CSS}</style></head><body>" + "".join(parts) + "</body></html>\n")


def _settings_text(r: dict) -> str:
    s = {k: v for k, v in r["settings"].items() if k != "name"}
    return r["method"] + (" " + ", ".join(f"{k}={v}" for k, v in s.items()) if s else "")


def _lr_text(r: dict) -> str:
    lr = r["train_overrides"].get("lr", r.get("lr"))
    return f"{lr:g}" if isinstance(lr, (int, float)) else ("" if lr is None else str(lr))


# ---------------------------------------------------------------------------------------------------------
# inline SVG charts

W, H, LEFT, TOP, BOTTOM = 760, 340, 60, 12, 40
SVG_FONT = "font-family='system-ui,sans-serif' font-size='11' fill='#333'"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] on a linear axis."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks (or every integer multiple for narrow ranges) between lo and hi on a log axis."""
    for mults in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in mults if lo <= m * 10 ** e <= hi]
        if len(ticks) >= 3:
            return ticks
    return _nice_ticks(lo, hi, 4)


def _tick_label(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:.4g}"


def _axis_frame(xt: list[tuple[float, str]], yt: list[tuple[float, str]], right: int, x_label: str,
                y_label: str) -> list[str]:
    """Grid lines, tick labels and axis titles (positions already in pixels)."""
    pw_end, ph_end = W - right, H - BOTTOM
    out = []
    for x, text in xt:
        out.append(f"<line stroke='#eee' x1='{x:.1f}' y1='{TOP}' x2='{x:.1f}' y2='{ph_end}'/>"
                   f"<text x='{x:.1f}' y='{ph_end + 14}' text-anchor='middle'>{_e(text)}</text>")
    for y, text in yt:
        out.append(f"<line stroke='#eee' x1='{LEFT}' y1='{y:.1f}' x2='{pw_end}' y2='{y:.1f}'/>"
                   f"<text x='{LEFT - 5}' y='{y + 4:.1f}' text-anchor='end'>{_e(text)}</text>")
    out.append(f"<rect stroke='#999' x='{LEFT}' y='{TOP}' width='{pw_end - LEFT}' height='{ph_end - TOP}' "
               f"fill='none'/>")
    out.append(f"<text x='{(LEFT + pw_end) / 2:.0f}' y='{H - 6}' text-anchor='middle'>{_e(x_label)}</text>")
    out.append(f"<text x='14' y='{(TOP + ph_end) / 2:.0f}' text-anchor='middle' "
               f"transform='rotate(-90 14 {(TOP + ph_end) / 2:.0f})'>{_e(y_label)}</text>")
    return out


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` values (the first values average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_chart(series: list[tuple[str, list[float]]], window: int = 1, colours: dict[str, str] | None = None) -> str:
    """Every method's training loss against the step on one log-scale plot, with a legend; one polyline each."""
    right = 170
    curves = [(label, smooth(losses, window)) for label, losses in series]
    values = [max(v, 1e-6) for _, ys in curves for v in ys]
    lo, hi = min(values), max(values)
    pad = max(hi / lo, 1.02) ** 0.04  # a little room above and below the curves (log scale)
    lo, hi = lo / pad, hi * pad
    n = max(len(ys) for _, ys in curves)
    pw, ph = W - right - LEFT, H - BOTTOM - TOP

    def px(step: float) -> float:
        return LEFT + (step - 1) / max(n - 1, 1) * pw

    def py(v: float) -> float:
        return TOP + (1 - (math.log10(max(v, 1e-6)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))) * ph

    parts = _axis_frame([(px(t), _tick_label(t)) for t in _nice_ticks(1, n) if t >= 1],
                        [(py(t), _tick_label(t)) for t in _log_ticks(lo, hi)], right, "step", "training loss")
    for i, (label, ys) in enumerate(curves):
        colour = (colours or {}).get(label, PALETTE[i % len(PALETTE)])
        every = max(1, len(ys) // 400)  # at most ~400 points a curve
        pts = " ".join(f"{px(k + 1):.1f},{py(y):.1f}" for k, y in enumerate(ys) if k % every == 0 or k == len(ys) - 1)
        parts.append(f"<polyline class='series' data-label='{_e(label)}' fill='none' stroke='{colour}' "
                     f"stroke-width='1.6' points='{pts}'><title>{_e(label)}: {ys[-1]:.4f} at step {len(ys)}</title>"
                     f"</polyline>")
        y = TOP + 8 + 16 * i
        parts.append(f"<line x1='{W - right + 12}' y1='{y}' x2='{W - right + 34}' y2='{y}' stroke='{colour}' "
                     f"stroke-width='3'/><text x='{W - right + 40}' y='{y + 4}'>{_e(label)}</text>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' {SVG_FONT} class='loss-curves'>"
            f"{''.join(parts)}</svg>")


def scatter_chart(points: list[tuple[str, int, float]], colours: dict[str, str] | None = None) -> str:
    """Eval loss (linear) against trainable parameters (log scale), one labelled point per method."""
    right = 30
    xs, ys = [max(x, 1) for _, x, _ in points], [y for _, _, y in points]
    xlo, xhi = min(xs) / 2, max(xs) * 2
    pad = (max(ys) - min(ys)) * 0.1 or max(abs(ys[0]) * 0.05, 0.01)
    ylo, yhi = min(ys) - pad, max(ys) + pad
    pw, ph = W - right - LEFT, H - BOTTOM - TOP

    def px(x: float) -> float:
        return LEFT + (math.log10(x) - math.log10(xlo)) / (math.log10(xhi) - math.log10(xlo)) * pw

    def py(y: float) -> float:
        return TOP + (1 - (y - ylo) / (yhi - ylo)) * ph

    parts = _axis_frame([(px(t), _tick_label(t)) for t in _log_ticks(xlo, xhi)],
                        [(py(t), f"{t:.4g}") for t in _nice_ticks(ylo, yhi, 6)], right,
                        "trainable parameters (log scale)", "eval loss")
    best = min(ys)
    centres = [(px(max(x, 1)), py(y)) for _, x, y in points]
    taken = [(cx - 6, cy - 6, cx + 6, cy + 6) for cx, cy in centres]  # label boxes must not cover a point
    labels = []
    for i, (label, x, y) in enumerate(points):
        cx, cy = centres[i]
        colour = (colours or {}).get(label, PALETTE[i % len(PALETTE)])
        ring = "r='6' stroke='#222' stroke-width='1.5'" if y == best else "r='4.5'"
        parts.append(f"<circle class='point' data-label='{_e(label)}' cx='{cx:.1f}' cy='{cy:.1f}' {ring} "
                     f"fill='{colour}'><title>{_e(label)}: {x:,} trainable, eval loss {y:.4f}</title></circle>")
        width, left = 6.5 * len(label), cx > LEFT + 0.75 * pw  # labels near the right edge go left of the point
        for dy in (-6, 14, -18, 26, -30, 38, -42, 50, -54):  # the first place that covers no point or label
            x0 = cx - 8 - width if left else cx + 8
            box = (x0, cy + dy - 10, x0 + width, cy + dy + 2)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                break
        taken.append(box)
        labels.append(f"<text x='{cx + (-8 if left else 8):.1f}' y='{cy + dy:.1f}' "
                      f"text-anchor='{'end' if left else 'start'}'>{_e(label)}</text>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' {SVG_FONT} class='scatter'>"
            f"{''.join(parts + labels)}</svg>")
