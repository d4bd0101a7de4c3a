"""Defects a new user hit (issue 19, items 4, 5, 6, 11, 12): argument order, moved projects, crashes on odd input,
silent surprises and messages that named the wrong thing. Each test failed before its fix."""

from __future__ import annotations

import ast
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import random_lora_adapter

from tunelab.cli import build_parser, main, parse_args
from tunelab.config import FinetuneConfig, load_config
from tunelab.methods import read_adapter_config
from tunelab.models import load_model
from tunelab.serve.generate import resolve_base

ROOT = Path(__file__).resolve().parents[1]


def one_error(capsys, *fragments: str, absent: tuple[str, ...] = ()) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]
    for f in absent:
        assert f not in lines[0], lines[0]
    return lines[0]


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


@pytest.fixture(scope="module")
def choice_data(tmp_path_factory):
    """A CMMLU-layout folder: one subject, 2 dev and 3 test questions."""
    root = tmp_path_factory.mktemp("choice") / "choice"
    for split, n in (("dev", 2), ("test", 3)):
        (root / split).mkdir(parents=True)
        rows = "".join(f'{i},"colour of river {i}?",red,blue,green,violet,{"ABCD"[i]}\n' for i in range(n))
        (root / split / "colours.csv").write_text(",Question,A,B,C,D,Answer\n" + rows, encoding="utf-8")
    return root


# --- 4. options and key=value overrides in any order ---------------------------------------------------------------

@pytest.mark.parametrize("argv, config, overrides, options", [
    (["pretrain", "r.yaml", "--resume", "train.steps=5", "name=x"], "r.yaml", ["train.steps=5", "name=x"],
     {"resume": True}),
    (["pretrain", "train.steps=5", "--force-resume", "r.yaml"], "r.yaml", ["train.steps=5"], {"force_resume": True}),
    (["demo", "train.steps=5", "--debug", "finetune.steps=3"], None, ["train.steps=5", "finetune.steps=3"],
     {"debug": True}),
    (["demo", "r.yaml", "seed=3"], "r.yaml", ["seed=3"], {}),
    (["finetune", "r.yaml", "--resume", "name=k9"], "r.yaml", ["name=k9"], {"resume": True}),
    (["finetune", "--resume", "model.base=m", "data.train=[a.jsonl]"], None, ["model.base=m", "data.train=[a.jsonl]"],
     {"resume": True}),
    (["eval", "recipe.yaml", "--models", "base=a,tuned=b", "tasks.0.limit=20"], "recipe.yaml", ["tasks.0.limit=20"],
     {"models": "base=a,tuned=b"}),
    (["eval", "tasks.0.k=0", "--task", "choice:x", "recipe.yaml", "--judge-url", "http://h/v1", "name=e"],
     "recipe.yaml", ["tasks.0.k=0", "name=e"], {"task": ["choice:x"], "judge_url": "http://h/v1"}),
    (["compare", "r.yaml", "--only", "lora-r8", "train.steps=5"], "r.yaml", ["train.steps=5"], {"only": "lora-r8"}),
    (["compare", "train.steps=5", "--rerun", "r.yaml", "seed=1"], "r.yaml", ["train.steps=5", "seed=1"],
     {"rerun": True}),
])
def test_options_and_overrides_in_any_order(argv, config, overrides, options):
    args = parse_args(argv)
    assert (args.config, args.overrides) == (config, overrides)
    for key, value in options.items():
        assert getattr(args, key) == value


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "a.yaml", "--resume", "b.yaml"], "more than one recipe (a.yaml, b.yaml)"),
    (["compare", "train.steps=5", "--rerun"], "a recipe is required"),
    (["finetune", "r.yaml", "name=x", "--nope"], "unrecognized arguments: --nope"),
])
def test_bad_positionals_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_eval_and_finetune_run_with_overrides_after_options(tmp_path, base_model_dir, chat_file, choice_data, capsys):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(yaml.safe_dump({"tasks": [{"type": "choice", "path": str(choice_data), "k": 0}]}))
    assert main(["eval", str(recipe), "--models", f"base={base_model_dir}", "tasks.0.limit=2", f"out_dir={tmp_path}",
                 "name=ev"]) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "ev/results.json").read_text())
    assert results["models"][0]["tasks"]["choice"]["questions"] == 2  # tasks.0.limit=2 came after --models

    recipe = tmp_path / "ft.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"base": str(base_model_dir)}, "data": {"train": [str(chat_file)]},
                                      "out_dir": str(tmp_path / "runs"), "train": {"steps": 1}}))
    assert main(["finetune", str(recipe), "--resume", "name=k9"]) == 2  # --resume and name=k9 both taken
    one_error(capsys, "k9: no complete checkpoint to resume from")


# --- 5. a moved project keeps its adapters; hints name flags that exist ----------------------------------------------

def test_adapter_finds_its_base_after_the_project_moves(tmp_path, base_model_dir, capsys):
    project = tmp_path / "project"
    shutil.copytree(base_model_dir, project / "runs/pt/model")
    adapter = random_lora_adapter(project / "runs/pt/model", project / "runs/ft/adapter")
    assert read_adapter_config(adapter)["base_model_name_or_path"] == str((project / "runs/pt/model").resolve())
    moved = tmp_path / "elsewhere/project2"
    shutil.move(project, moved)
    adapter = moved / "runs/ft/adapter"
    base, found_adapter = resolve_base(adapter, None)
    assert base.resolve() == (moved / "runs/pt/model").resolve() and found_adapter == adapter
    assert main(["generate", str(adapter), "colour of", "--max-tokens", "2"]) == 0, capsys.readouterr().err

    peft = pytest.importorskip("peft")  # PEFT still reads the adapter as before, without a warning about our files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(load_model(base), str(adapter))
    assert not [w for w in caught if "nexpected" in str(w.message)], [str(w.message) for w in caught]


def test_orphaned_adapter_says_how_to_name_the_base(tmp_path, base_model_dir, capsys):
    shutil.copytree(base_model_dir, tmp_path / "base")
    adapter = random_lora_adapter(tmp_path / "base", tmp_path / "adapter")
    shutil.rmtree(tmp_path / "base")
    assert main(["generate", str(adapter), "colour of", "--max-tokens", "2"]) == 2
    line = one_error(capsys, "is not a local directory here", f"--adapter {adapter}")
    check_hint_flags(line, "generate")
    assert main(["chat", str(adapter)]) == 2
    check_hint_flags(one_error(capsys, "is not a local directory here"), "chat")
    assert main(["generate", str(base_model_dir), "colour of", "--adapter", str(adapter), "--max-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "base"), "--out", str(tmp_path / "merged")]) == 2
    check_hint_flags(one_error(capsys, "is not a local directory"), "export")
    check_hint_flags("x: names base model 'b', which is not a local directory here; pass the base model directory "
                     "and the adapter separately (--base <dir>)", "export")  # the old hint was right for export only
    with pytest.raises(AssertionError, match="`tunelab generate` has no --base"):
        check_hint_flags("x: names base model 'b', which is not a local directory here; pass the base model "
                         "directory and the adapter separately (--base <dir>)", "generate")


def parser_flags() -> dict[str, set[str]]:
    """Every sub-command ("data lint" for nested ones) and its option strings."""
    flags: dict[str, set[str]] = {}

    def walk(parser, prefix):
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
        if prefix:
            flags[prefix] = {s for a in parser._actions for s in a.option_strings}
    walk(build_parser(), "")
    return flags


EXTERNAL = r"(?:hf download|huggingface-cli|pip install|pip|torchrun|llama\.cpp|ollama)\b[^;`)]*"  # not tunelab's


def check_hint_flags(message: str, command: str | None = None) -> None:
    """Every `--flag` in `message` exists on some tunelab command, and on the one it names (`tunelab generate/chat
    ... --adapter`), when it names one; the flags outside such a command line exist on `command` (the one run)."""
    flag_re = r"(?<![\w-])--[a-z][a-z-]*"
    message = re.sub(EXTERNAL, "", message)  # `hf download <id> --local-dir ...`: another tool's flags
    flags = parser_flags()
    every = set().union(*flags.values())
    for flag in set(re.findall(flag_re, message)):
        assert flag in every, f"{flag} is no tunelab flag: {message}"
    named = r"tunelab ((?:[a-z]+/)*[a-z]+)((?: [a-z][a-z-]*)?[^;`)]*)"
    for names, rest in re.findall(named, message):
        for name in names.split("/"):
            sub = re.match(r" ([a-z][a-z-]*)", rest)  # a command group's action: `tunelab data self-instruct`
            cmd = f"{name} {sub.group(1)}" if sub and f"{name} {sub.group(1)}" in flags else name
            if cmd in flags:
                for flag in re.findall(flag_re, rest):
                    assert flag in flags[cmd], f"`tunelab {cmd}` has no {flag}: {message}"
    if command is not None:
        for flag in set(re.findall(flag_re, re.sub(named, "", message))):
            assert flag in flags[command], f"`tunelab {command}` has no {flag}: {message}"


def raised_messages() -> list[tuple[str, str]]:
    """(file:line, message text with {…} for the f-string parts) of every `raise SomethingError(...)` in tunelab."""
    out = []
    for path in sorted((ROOT / "tunelab").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                text = ""
                for arg in node.exc.args:
                    for part in ast.walk(arg):
                        if isinstance(part, ast.Constant) and isinstance(part.value, str):
                            text += part.value
                        elif isinstance(part, ast.FormattedValue):
                            text += "{…}"
                if "--" in text:
                    out.append((f"{path.relative_to(ROOT)}:{node.lineno}", text))
    return out


def test_every_error_hint_names_flags_that_exist():
    messages = raised_messages()
    assert len(messages) > 10  # the scan finds the hints (a scan that finds nothing cannot fail)
    for where, text in messages:
        try:
            check_hint_flags(text)
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from None


# --- 6. odd input that crashed -------------------------------------------------------------------------------------

def test_empty_prompt_and_non_utf8_template_are_one_line_errors(tmp_path, base_model_dir, capsys):
    assert main(["generate", str(base_model_dir), ""]) == 2
    one_error(capsys, "prompt 1 is empty")
    assert main(["generate", str(base_model_dir), "colour of", "", "--max-tokens", "1"]) == 2
    one_error(capsys, "prompt 2 is empty")
    bad = tmp_path / "template.jinja"
    bad.write_bytes("{{ messages }} caf\u00e9".encode("latin-1"))
    assert main(["generate", str(base_model_dir), "--chat", "hi", "--chat-template", str(bad)]) == 2
    one_error(capsys, "template.jinja", "not UTF-8")
    assert main(["chat", str(base_model_dir), "--chat-template", str(bad)]) == 2
    one_error(capsys, "not UTF-8")


# --- 11. silent surprises ------------------------------------------------------------------------------------------

def finetune_cfg(base, chat_file, *extra):
    return load_config(FinetuneConfig, None, [f"model.base={base}", f"data.train=[{chat_file}]", *extra])


def test_steps_ignored_under_epochs_is_a_warning(base_model_dir, chat_file, capsys):
    from tunelab.train.finetune import resolve_steps

    assert resolve_steps(finetune_cfg(base_model_dir, chat_file, "train.epochs=1", "train.steps=5",
                                      "train.micro_batch_size=10"), 100) == 10
    assert warnings_in(capsys.readouterr().err) == [
        "warning: train.epochs=1 decides the number of steps (10), so train.steps=5 is ignored; set only one of "
        "them (train.epochs=null to train 5 steps)"]
    assert resolve_steps(finetune_cfg(base_model_dir, chat_file, "train.epochs=2"), 100) == 25
    assert resolve_steps(finetune_cfg(base_model_dir, chat_file, "train.steps=7"), 100) == 7
    assert warnings_in(capsys.readouterr().err) == []


def test_compare_entries_keep_what_the_recipe_set(tmp_path, base_model_dir, chat_file):
    """A comparison's per-method train section does not mark train.steps as set when the recipe gave epochs."""
    from tunelab.compare import _plan
    from tunelab.config import CompareConfig

    cfg = load_config(CompareConfig, None, [f"model.base={base_model_dir}", f"data.train=[{chat_file}]",
                                            "train.epochs=1", "methods=[{label: a, name: lora, train: {lr: 0.01}}]"])
    plan = _plan(cfg, 0, cfg.methods[0], str(base_model_dir), tmp_path, "r.yaml", {}, [])
    assert plan.error is None and plan.cfg.train.lr == 0.01
    assert "steps" not in plan.cfg.train.model_fields_set


def test_warmup_longer_than_the_run_is_a_warning(tmp_path, corpus_file, tokenizer_dir, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"preset": "micro", "tokenizer": str(tokenizer_dir)},
                                      "data": {"sources": [{"path": str(corpus_file)}], "seq_len": 16},
                                      "out_dir": str(tmp_path / "runs"),
                                      "train": {"micro_batch_size": 2, "eval_batches": 1, "eval_every": 0}}))
    assert main(["pretrain", str(recipe), "train.steps=2", "train.warmup_steps=4"]) == 0
    assert warnings_in(capsys.readouterr().err) == [
        "warning: train.warmup_steps=4 is more than the run's 2 steps: the learning rate never reaches train.lr "
        "(it peaks at 50% of it); lower train.warmup_steps"]


def test_export_tolerance_must_be_non_negative(tmp_path, capsys):
    for value in ("-1", "nan"):
        assert main(["export", str(tmp_path), "--out", str(tmp_path / "m"), "--tolerance", value]) == 2
        one_error(capsys, "--tolerance must be >= 0")


def test_system_without_chat_is_an_error(base_model_dir, capsys):
    assert main(["generate", str(base_model_dir), "hi", "--system", "be brief"]) == 2
    one_error(capsys, "--system needs --chat")


def test_k_beyond_the_few_shot_pool_reports_the_k_used(tmp_path, base_model_dir, choice_data, capsys):
    assert main(["eval", "--models", str(base_model_dir), "--task", f"choice:{choice_data}", "tasks.0.k=99",
                 "tasks.0.limit=1", f"out_dir={tmp_path}", "name=k"]) == 0
    captured = capsys.readouterr()
    assert any("k=99, but 1 of 1 subject(s) have fewer few-shot examples in dev/ (e.g. colours: 2)" in w
               for w in warnings_in(captured.err)), captured.err
    assert "2-shot" in captured.out and "99-shot" not in captured.out
    r = json.loads((tmp_path / "k/results.json").read_text())["models"][0]["tasks"]["choice"]
    assert (r["k"], r["k_requested"]) == (2, 99)


# --- 12. messages that named the wrong thing -------------------------------------------------------------------------

def test_missing_base_is_reported_as_the_model(tmp_path, chat_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["finetune", "model.base=runs/model", f"data.train=[{chat_file}]", "out_dir=out"]) == 2
    one_error(capsys, "model 'runs/model' is not a local directory", absent=("tokenizer", "hf download"))


def test_adapter_given_as_base_says_it_is_an_adapter(tmp_path, base_model_dir, chat_file, capsys):
    adapter = random_lora_adapter(base_model_dir, tmp_path / "adapter")
    assert main(["finetune", f"model.base={adapter}", f"data.train=[{chat_file}]", f"out_dir={tmp_path}/runs"]) == 2
    one_error(capsys, "this is an adapter directory", f"its base is {base_model_dir.resolve()}",
              absent=("no config.json",))


def test_eval_names_the_missing_path_and_the_empty_model(tmp_path, base_model_dir, choice_data, capsys):
    assert main(["eval", "--models", str(base_model_dir), "--task", "choice:does/not/exist",
                 f"out_dir={tmp_path}"]) == 2
    one_error(capsys, "does/not/exist: no such file or directory", absent=("no 'test/' folder",))
    assert main(["eval", "--models", f"base=,tuned={base_model_dir}", "--task", f"choice:{choice_data}",
                 f"out_dir={tmp_path}"]) == 2
    one_error(capsys, "'base=' names no directory", absent=("config.json",))
