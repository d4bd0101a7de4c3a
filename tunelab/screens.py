"""What the command line prints: one function per result (rich tables on the terminal, plain lines in a log)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def show_finetune_summary(s: dict) -> None:
    """One screen: method, trainable share, loss before → after, throughput, where the output is."""
    table = Table(title=f"fine-tuning summary: {s['run_dir']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("method", f"{s['method']}: {s['trainable_parameters']:,} trainable of {s['parameters']:,} "
                            f"({s['trainable_parameters'] / s['parameters']:.3%})")
    before, after = s.get("eval_before", {}), s.get("eval_after", {})
    if before and after:
        table.add_row("eval loss", f"{before['eval_loss']:.4f} -> {after['eval_loss']:.4f} "
                                   f"({s['eval_examples']} held-out examples)")
    table.add_row("train loss", f"{s['train_loss_first']:.4f} (step 1) -> {s['train_loss_last']:.4f} "
                                f"(step {s['steps']})")
    table.add_row("throughput", f"{s['tokens']:,} trained tokens in {s['train_wall_s']:.0f}s "
                                f"({s['tokens_per_s']:,.0f} tok/s), peak memory {s['peak_memory_mb']:,.0f} MB")
    table.add_row("output", s["output_dir"])
    console.print(table)


def show_import_record(r: dict) -> None:
    q = r["quantisation"]
    console.print(f"imported {r['source']} ({r['architecture']}, {r['parameters'] / 1e6:,.0f}M parameters, "
                  f"{q['file_type']}) -> {r['out_dir']} in {r['import_s']:.0f}s; check against transformers' GGUF "
                  f"load: max |logit difference| {r['max_abs_logit_diff']:.2e} over {r['probes']} probe inputs "
                  f"(tolerance {r['tolerance']:g}): passed", highlight=False, markup=False, soft_wrap=True)
    for change in r["config_fixes"]:
        console.print(f"  config: {change}", highlight=False, markup=False, soft_wrap=True)


def show_eval_results(results: dict, details: bool = True) -> None:
    """Per-subject accuracy of choice tasks (`details`), unparseable judge outputs, every metric and its delta."""
    from tunelab.evaluate.report import fmt, fmt_delta

    models = results["models"]
    labels = [m["label"] for m in models]
    for task in results["tasks"]:
        name = task["name"]
        if task["type"] == "choice" and details:
            for m in models:
                r = m["tasks"][name]
                table = Table(title=f"{m['label']} · {name}: accuracy per subject")
                table.add_column("subject", no_wrap=True, max_width=40)
                for col in ("n", "letter", "loglik", "ll norm"):
                    table.add_column(col, justify="right", no_wrap=True)
                for subject, row in r["subjects"].items():
                    table.add_row(subject, str(row["questions"]),
                                  *[fmt("acc", row[k]) for k in ("letter_acc", "ll_acc", "ll_acc_norm")])
                for avg, suffix in (("average over subjects", ""), ("average over questions", "_micro")):
                    table.add_row(avg, str(r["questions"]), *[fmt("acc", r["metrics"][k + suffix])
                                  for k in ("letter_acc", "ll_acc", "ll_acc_norm")], style="bold")
                console.print(table)
                console.print(f"{m['label']}: {r['questions']} questions, {r['k']}-shot, context {r['context']} "
                              f"tokens; {r['truncated']} prompts truncated (fewer examples), {r['cut']} cut; "
                              f"{r['wall_s']:.1f}s, {r['questions_per_s']:.2f} questions/s", highlight=False)
        for m in models:
            bad = m["tasks"][name].get("unparseable_outputs")
            if bad:
                console.print(f"{m['label']} · {name}: {len(bad)} unparseable judge outputs, e.g. {bad[0][:160]!r}",
                              highlight=False)
    table = Table(title=f"evaluation: {results['name']} (delta vs {labels[0]})")
    for col in ["task", "metric"] + labels:
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for r in results["comparison"]:
        cells = [fmt(r["metric"], v) + (f" ({fmt_delta(r['metric'], d)})" if d is not None else "")
                 for v, d in zip(r["values"], r["deltas"])]
        table.add_row(r["task"], r["metric"] + (" ↓" if r["lower_is_better"] else ""), *cells)
    console.print(table)
    console.print(f"results: {results['results_path']}, report: {results['report_path']}", highlight=False)


def show_compare_results(results: dict) -> None:
    """The comparison table, the winner and where the files are; failed methods with their errors."""
    from rich.markup import escape

    from tunelab.compare_report import winner_sentence

    rows = results["methods"]
    has_acc = any(r.get("accuracy") is not None for r in rows)
    has_gen = any(r.get("general_loss") is not None for r in rows)
    table = Table(title=f"comparison: {results['name']} ({results['budget']['steps']} steps x "
                        f"{results['budget']['examples_per_step']} examples each)")
    for col in ["label", "method", "lr", "trainable", "train loss", "eval loss"] + (["accuracy"] if has_acc else []) \
            + (["general loss"] if has_gen else []) + ["tokens/s", "peak MB", "total s", "status"]:
        table.add_column(col, justify="left" if col in ("label", "method", "status") else "right",
                         overflow="fold")
    for r in rows:
        lr = f"{r['lr']:g}" + (" *" if "lr" in r["train_overrides"] else "") if r.get("lr") is not None else ""
        method = escape(r["method"])
        if r["status"] != "ok":
            table.add_row(r["label"], method, lr, *[""] * (6 + has_acc + has_gen), "failed", style="red")
            continue
        table.add_row(r["label"], method, lr, f"{r['trainable_parameters']:,}",
                      f"{r['final_train_loss']:.4f}",
                      f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "",
                      *([f"{100 * r['accuracy']:.1f}%"] if has_acc else []),
                      *([f"{r['general_loss']:.4f} ({r['general_loss_delta']:+.3f})"
                         if r.get("general_loss_delta") is not None else ""] if has_gen else []),
                      f"{r['tokens_per_s']:,.0f}", f"{r['peak_memory_mb']:,.0f}", f"{r['wall_s']:.0f}",
                      "reused" if r.get("reused") else "ok")
    (console if console.is_terminal else Console(width=160)).print(table)  # a log file gets the whole table
    before = [f"accuracy {100 * results['accuracy_before']:.1f}%" if results.get("accuracy_before") is not None
              else "", f"general loss {results['general_loss_before']:.4f}"
              if results.get("general_loss_before") is not None else ""]
    if any(before):
        console.print("the base model before tuning: " + ", ".join(b for b in before if b)
                      + (" (general loss in brackets: the change from it; a rise is forgetting)" if has_gen else ""),
                      highlight=False, markup=False, soft_wrap=True)
    console.print(winner_sentence(results), highlight=False, markup=False, soft_wrap=True)
    if any(r["train_overrides"] for r in rows):
        console.print("* per-method train override (changes the comparison)", highlight=False)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        console.print(f"{len(failed)} of {len(rows)} method(s) failed:", highlight=False)
        for r in failed:
            console.print(f"  {r['label']}: {r['error']}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"results: {results['results_path']}, {results['csv_path']}; report: {results['report_path']} "
                  f"({results['wall_s']:.0f}s)", highlight=False, markup=False, soft_wrap=True)


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


def show_pipeline_report(r: dict) -> None:
    """The stages with their status, every metric stage by stage (change from the previous row), where it all is."""
    from tunelab.evaluate.report import fmt, fmt_delta

    out = console if console.is_terminal else Console(width=160)  # a log file gets the whole table
    stages = Table(title=f"pipeline: {r['name']}")
    for col in ("stage", "command", "status", "model from", "s"):
        stages.add_column(col, justify="right" if col == "s" else "left", overflow="fold")
    for s in r["stages"]:
        stages.add_row(s["name"], s["run"], s["status"], s["model_from"] or "",
                       f"{s['wall_s']:.0f}" if s["wall_s"] is not None else "")
    out.print(stages)
    if r["rows"]:
        table = Table(title="every metric, stage by stage (change from the previous row)")
        for col in ["task", "metric"] + [row["label"] for row in r["rows"]]:
            table.add_column(col, justify="left" if col in ("task", "metric") else "right", overflow="fold")
        for e in r["metrics"]:
            cells = [fmt(e["metric"], v) + (f" ({fmt_delta(e['metric'], d)})" if d is not None else "")
                     for v, d in zip(e["values"], e["delta_prev"])]
            table.add_row(e["task"], e["metric"] + (" ↓" if e["lower_is_better"] else ""), *cells)
        out.print(table)
    for c in r["changes"]:
        gain = ", ".join(f"{x['task']} {x['metric']} {fmt_delta(x['metric'], x['vs_previous'])}" for x in c["gain"]
                         if x["vs_previous"] is not None)
        lost = ", ".join(f"{x['task']} {x['metric']} {fmt_delta(x['metric'], x['vs_previous'])}"
                         for x in c["forgetting"] if x["vs_previous"] is not None)
        console.print(f"{c['stage']} vs {c['previous']}: gain on its target: {gain or '-'}; on the others: "
                      f"{lost or '-'}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"report: {r['report_path']}, {r['report_json']} ({r['wall_s']:.0f}s)", highlight=False,
                  markup=False, soft_wrap=True)
