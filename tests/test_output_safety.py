"""No command destroys a user's model or data: every writing command against every kind of input it reads.

The rule (tunelab/outputs.py): an output may not be, contain or lie inside an input of the same command, and an
existing directory is replaced only when tunelab marked it as its own earlier output of the same kind. Each
refusal is one line, exit 2, and leaves the input byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main
from tunelab.outputs import MARKER, OutputError, check_outputs, read_marker


def digest(path: Path) -> str:
    """A checksum of a file or of every file under a directory (names and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def refused(capsys, argv: list, *fragments: str) -> str:
    """Run the CLI; it must exit 2 with one `error:` line holding every fragment."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert str(f) in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def model(tmp_path, base_model_dir):
    """A private copy of the micro base model (the tests try to destroy it)."""
    dst = tmp_path / "models" / "base"
    shutil.copytree(base_model_dir, dst)
    return dst


def ft_args(base, data, out_dir, name, *extra):
    return ["finetune", f"model.base={base}", f"data.train=[{data}]", f"out_dir={out_dir}", f"name={name}",
            "train.steps=2", "train.micro_batch_size=2", "train.warmup_steps=0", "data.eval_fraction=0",
            "data.chat_template=plain", *extra]


@pytest.fixture()
def adapter(tmp_path, model, chat_file, capsys):
    """A LoRA adapter of `model`, trained by the CLI."""
    assert main(ft_args(model, chat_file, tmp_path / "runs", "lora")) == 0
    capsys.readouterr()
    return tmp_path / "runs" / "lora" / "adapter"


# -- the rule itself -----------------------------------------------------------------------------------------

def test_check_outputs_is_contains_and_inside(tmp_path):
    data = tmp_path / "d" / "x.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    for out, rel in ((data, "is"), (tmp_path / "d", "contains"), (tmp_path, "contains")):
        with pytest.raises(OutputError, match=rel):
            check_outputs([out], {"data": [str(data)]})
    model = tmp_path / "m"
    model.mkdir()
    with pytest.raises(OutputError, match="lies inside the base model"):
        check_outputs([model / "sub" / "out"], {"base model": model})
    with pytest.raises(OutputError, match="is the data"):  # globs are expanded as the readers expand them
        check_outputs([data], {"data": str(tmp_path / "d" / "*.jsonl")})
    check_outputs([tmp_path / "elsewhere"], {"data": [str(data)], "base model": model, "recipe": None})


# -- export --------------------------------------------------------------------------------------------------

def test_export_onto_the_adapters_own_base_is_refused(tmp_path, model, adapter, capsys):
    before = digest(model)
    refused(capsys, ["export", adapter, "--out", model], str(model), "base model")
    assert digest(model) == before
    refused(capsys, ["export", adapter, "--out", adapter], "is the adapter")
    refused(capsys, ["export", adapter, "--out", adapter / "merged"], "lies inside the adapter")
    refused(capsys, ["export", adapter, "--out", model.parent], "contains the base model")
    assert digest(model) == before


def test_export_replaces_only_its_own_earlier_export(tmp_path, adapter, tokenizer_dir, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(adapter), "--out", str(out)]) == 0
    assert read_marker(out)["kind"] == "merged model"
    assert main(["export", str(adapter), "--out", str(out)]) == 0  # its own earlier output: replaced
    capsys.readouterr()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "config.json").write_text("{}")  # an HF-looking directory tunelab did not write
    refused(capsys, ["export", adapter, "--out", other], "was not written by tunelab", MARKER)
    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    refused(capsys, ["export", adapter, "--out", tok], "is a tunelab tokenizer, not a merged model")
    assert (other / "config.json").read_text() == "{}"


# -- tokenizer train -----------------------------------------------------------------------------------------

def test_tokenizer_train_onto_a_model_directory_is_refused(tmp_path, model, corpus_file, capsys):
    before = digest(model)
    refused(capsys, ["tokenizer", "train", corpus_file, "--out", model, "--vocab-size", "300"],
            "is a tunelab model, not a tokenizer")
    assert digest(model) == before
    unmarked = tmp_path / "hf-model"
    shutil.copytree(model, unmarked)
    (unmarked / MARKER).unlink()  # a model another tool wrote
    before = digest(unmarked)
    refused(capsys, ["tokenizer", "train", corpus_file, "--out", unmarked, "--vocab-size", "300"],
            "was not written by tunelab")
    assert digest(unmarked) == before


def test_tokenizer_train_around_its_corpus_is_refused_and_retrain_is_allowed(tmp_path, corpus_file, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(corpus_file, corpus / "c.jsonl")
    refused(capsys, ["tokenizer", "train", corpus / "c.jsonl", "--out", corpus, "--vocab-size", "300"],
            "contains the corpus")
    refused(capsys, ["tokenizer", "train", corpus, "--out", corpus / "tok", "--vocab-size", "300"],
            "lies inside the corpus")
    out = tmp_path / "tok"
    for _ in range(2):  # the second run replaces its own earlier tokenizer
        assert main(["tokenizer", "train", str(corpus), "--out", str(out), "--vocab-size", "300"]) == 0
    assert read_marker(out)["kind"] == "tokenizer"


# -- finetune ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_whose_run_dir_holds_its_base_is_refused(tmp_path, model, chat_file, capsys, method):
    runs = tmp_path / "runs"
    (runs / "pt2").mkdir(parents=True)
    base = runs / "pt2" / "model"
    shutil.move(str(model), base)
    before = digest(base)
    refused(capsys, ft_args(base, chat_file, runs, "pt2", f"method.name={method}"), str(base), "base model")
    assert digest(base) == before


def test_finetune_against_each_input_kind(tmp_path, model, chat_file, tokenizer_dir, capsys):
    runs = tmp_path / "runs"
    data = runs / "x" / "checkpoints" / "chats.jsonl"  # data kept where the run would delete it
    data.parent.mkdir(parents=True)
    shutil.copy(chat_file, data)
    refused(capsys, ft_args(model, data, runs, "x"), "contains the data")
    assert data.is_file()
    refused(capsys, ft_args(model, chat_file, model, "run"), "lies inside the base model")
    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    refused(capsys, ft_args(model, chat_file, tok, "run", f"model.tokenizer={tok}"), "lies inside the tokenizer")
    template = tmp_path / "t" / "adapter" / "chat.jinja"
    template.parent.mkdir(parents=True)
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    refused(capsys, ft_args(model, chat_file, tmp_path, "t", f"data.chat_template={template}"),
            "contains the chat template")
    # a recipe kept as the run's own config.json would be overwritten by the run
    run = runs / "y"
    run.mkdir()
    recipe = run / "config.json"
    recipe.write_text(json.dumps({"model": {"base": str(model)}, "data": {"train": [str(chat_file)]},
                                  "out_dir": str(runs), "name": "y"}))
    refused(capsys, ["finetune", recipe], "is the recipe")
    assert json.loads(recipe.read_text())["name"] == "y"


def test_finetune_refuses_a_directory_that_is_not_its_own_run(tmp_path, model, chat_file, capsys):
    runs = tmp_path / "runs"
    (runs / "mine").mkdir(parents=True)
    keep = runs / "mine" / "adapter" / "notes.txt"  # a user's directory that happens to have an adapter/
    keep.parent.mkdir()
    keep.write_text("keep me")
    refused(capsys, ft_args(model, chat_file, runs, "mine"), "was not written by tunelab as a finetune run")
    assert keep.read_text() == "keep me"
    assert main(ft_args(model, chat_file, runs, "ok")) == 0
    assert main(ft_args(model, chat_file, runs, "ok")) == 0  # its own earlier run: reused
    capsys.readouterr()
    assert read_marker(runs / "ok")["kind"] == "finetune run"


def test_a_failed_start_leaves_no_empty_run_directory(tmp_path, model, capsys):
    refused(capsys, ft_args(model, tmp_path / "missing.jsonl", tmp_path / "runs", "nothing"), "missing.jsonl")
    assert not (tmp_path / "runs" / "nothing").exists()


# -- pretrain ------------------------------------------------------------------------------------------------

def pt_args(out_dir, name, tokenizer, data, *extra):
    """`tunelab pretrain <recipe> overrides...`; the caller puts a recipe file at index 1."""
    return ["pretrain", None, f"out_dir={out_dir}", f"name={name}", "model.preset=micro",
            f"model.tokenizer={tokenizer}", f"data.sources=[{{path: {data}}}]", "data.seq_len=32",
            "train.steps=2", "train.micro_batch_size=2", "train.warmup_steps=0", *extra]


@pytest.fixture()
def empty_recipe(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("{}\n")
    return p


def test_pretrain_against_each_input_kind(tmp_path, model, corpus_file, tokenizer_dir, empty_recipe, capsys):
    def args(out_dir, name, tok=tokenizer_dir, data=corpus_file, *extra):
        a = pt_args(out_dir, name, tok, data, *extra)
        a[1] = empty_recipe
        return a

    runs = tmp_path / "runs"
    # continue pretraining a model that lives at the run's own model/
    (runs / "cp").mkdir(parents=True)
    shutil.move(str(model), runs / "cp" / "model")
    before = digest(runs / "cp" / "model")
    a = args(runs, "cp")
    a = [x for x in a if not str(x).startswith(("model.preset", "model.tokenizer"))]
    refused(capsys, a + [f"model.base={runs / 'cp' / 'model'}"], "is the base model")
    assert digest(runs / "cp" / "model") == before
    refused(capsys, args(tokenizer_dir, "run"), "lies inside the tokenizer")
    data = runs / "d" / "model" / "text.jsonl"
    data.parent.mkdir(parents=True)
    shutil.copy(corpus_file, data)
    refused(capsys, args(runs, "d", data=data), "contains the data")
    assert data.is_file()
    recipe = runs / "r" / "config.json"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({"name": "r"}))
    refused(capsys, ["pretrain", recipe] + args(runs, "r")[2:], "is the recipe")
    assert recipe.is_file()


def test_pretrain_then_finetune_in_the_same_run_directory_is_refused(tmp_path, model, corpus_file, tokenizer_dir,
                                                                     chat_file, empty_recipe, capsys):
    a = pt_args(tmp_path, "shared", tokenizer_dir, corpus_file)
    a[1] = empty_recipe
    assert main([str(x) for x in a]) == 0
    capsys.readouterr()
    model_dir = tmp_path / "shared" / "model"
    before = digest(model_dir)
    refused(capsys, ft_args(model, chat_file, tmp_path, "shared"), "is a tunelab pretrain run, not a finetune run")
    assert digest(model_dir) == before


# -- eval, compare, demo, data lint --------------------------------------------------------------------------

def test_eval_against_each_input_kind(tmp_path, model, adapter, capsys):
    text = tmp_path / "held" / "t.txt"
    text.parent.mkdir()
    text.write_text("river stone lantern.\n\nbaker harbour meadow.\n")
    task = f"perplexity:{text}"
    refused(capsys, ["eval", "--models", model, "--task", task, f"out_dir={model}"], "lies inside the model")
    refused(capsys, ["eval", "--models", adapter, "--task", task, f"out_dir={model.parent}", "name=base"],
            "the model")  # base of the adapter
    ev = tmp_path / "ev"
    (ev / "results.json").mkdir(parents=True)
    keep = ev / "results.json" / "t.txt"
    keep.write_text("river.\n")
    refused(capsys, ["eval", "--models", model, "--task", f"perplexity:{keep}", f"out_dir={tmp_path}", "name=ev"],
            "task data")
    assert keep.is_file()


def test_eval_keeps_old_results_until_new_ones_are_complete(tmp_path, model, capsys):
    text = tmp_path / "t.txt"
    text.write_text("river stone lantern.\n\nbaker harbour meadow.\n")
    argv = ["eval", "--models", str(model), "--task", f"perplexity:{text}", f"out_dir={tmp_path}", "name=ev"]
    assert main(argv) == 0
    old = (tmp_path / "ev" / "results.json").read_text()
    refused(capsys, argv[:5] + ["--task", f"generation:{tmp_path / 'missing.jsonl'}"] + argv[5:], "missing.jsonl")
    assert (tmp_path / "ev" / "results.json").read_text() == old
    assert (tmp_path / "ev" / "report.html").is_file()


def test_compare_against_its_inputs(tmp_path, model, chat_file, capsys):
    recipe = tmp_path / "cmp.yaml"
    recipe.write_text(yaml.safe_dump({"name": "c", "out_dir": str(model), "model": {"base": str(model)},
                                      "data": {"train": [str(chat_file)]}, "methods": [{"label": "l", "r": 2}]}))
    refused(capsys, ["compare", recipe], "lies inside the base model")
    runs = tmp_path / "c" / "runs"
    runs.mkdir(parents=True)
    shutil.copy(chat_file, runs / "d.jsonl")
    refused(capsys, ["compare", recipe, f"out_dir={tmp_path}", f"data.train=[{runs / 'd.jsonl'}]"],
            "contains the data")
    assert (runs / "d.jsonl").is_file()


def test_demo_refuses_a_directory_it_did_not_write(tmp_path, model, capsys):
    before = digest(model)
    refused(capsys, ["demo", f"out_dir={model.parent}", f"name={model.name}"], "is a tunelab model, not a demo run")
    assert digest(model) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data").mkdir()
    refused(capsys, ["demo", f"out_dir={tmp_path}", "name=mine"], "was not written by tunelab")
    assert (tmp_path / "mine" / "data").is_dir()


def test_data_lint_json_never_overwrites_its_data(tmp_path, chat_file, tokenizer_dir, capsys):
    data = tmp_path / "chats.jsonl"
    shutil.copy(chat_file, data)
    before = digest(data)
    refused(capsys, ["data", "lint", data, "--tokenizer", tokenizer_dir, "--json", data], "is the data")
    assert digest(data) == before
    refused(capsys, ["data", "lint", data, "--tokenizer", tokenizer_dir, "--json", tokenizer_dir / "tokenizer.json"],
            "lies inside the tokenizer")


def test_data_demo_writes_only_its_own_directory(tmp_path, model, capsys):
    before = digest(model)
    refused(capsys, ["data", "demo", "--out", model], "is a tunelab model, not a demo data directory")
    assert digest(model) == before
    out = tmp_path / "world"
    for _ in range(2):  # its own earlier output is replaced
        assert main(["data", "demo", "--out", str(out)]) == 0
    assert (out / "instructions" / "train.jsonl").is_file() and read_marker(out)["kind"] == "demo data directory"


def test_import_never_writes_around_its_gguf_file(tmp_path, capsys):
    src = tmp_path / "downloads" / "model.gguf"
    src.parent.mkdir()
    src.write_bytes(b"GGUF" + bytes(60))  # checked before the file is even read
    refused(capsys, ["import", src, "--out", src.parent], "contains the gguf file")
    refused(capsys, ["import", src, "--out", src], "is the gguf file")
    assert src.read_bytes() == b"GGUF" + bytes(60)


def test_gguf_export_against_its_inputs(tmp_path, model, adapter, capsys):
    before = digest(model)
    refused(capsys, ["export", adapter, "--format", "gguf", "--out", model], "is the model")
    refused(capsys, ["export", adapter, "--format", "gguf", "--out", adapter / "gguf"], "lies inside the adapter")
    assert digest(model) == before


def test_demo_real_never_writes_inside_its_model(tmp_path, model, capsys):
    before = digest(model)
    refused(capsys, ["demo-real", f"model={model}", f"out_dir={model}"], "lies inside the model")
    assert digest(model) == before


def test_pipeline_against_its_inputs(tmp_path, model, chat_file, capsys):
    stages = {"tune": {"run": "finetune", "data": {"train": [str(chat_file)]}}}
    recipe = tmp_path / "p.yaml"
    recipe.write_text(yaml.safe_dump({"name": "p", "out_dir": str(model), "base": str(model), "stages": stages}))
    before = digest(model)
    refused(capsys, ["pipeline", recipe], "lies inside the base model")
    data = tmp_path / "p" / "tune" / "chats.jsonl"  # the data inside a stage's directory
    data.parent.mkdir(parents=True)
    shutil.copy(chat_file, data)
    refused(capsys, ["pipeline", recipe, f"out_dir={tmp_path}", f"stages.tune.data.train=[{data}]"],
            "contains the data")
    shutil.copytree(model, tmp_path / "other")  # another model, not this pipeline's output
    refused(capsys, ["pipeline", recipe, f"out_dir={tmp_path}", "name=other"], "is a tunelab model, not a pipeline run")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    refused(capsys, ["pipeline", recipe, f"out_dir={tmp_path}", "name=mine"], "was not written by tunelab")
    assert digest(model) == before and data.is_file() and (tmp_path / "mine" / "notes.txt").read_text() == "keep"



@pytest.mark.parametrize("action, kind", [("clean", "cleaned data"), ("dedup", "deduplicated data")])
def test_data_clean_and_dedup_against_their_inputs(tmp_path, model, action, kind, capsys):
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(json.dumps({"text": f"document number {i} of the corpus."}) + "\n"
                                          for i in range(5)), encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("text_key: text\n", encoding="utf-8")
    before, before_model = digest(data), digest(model)
    refused(capsys, ["data", action, data, "--out", data], "is the data")
    refused(capsys, ["data", action, data, "--out", data / "out"], "lies inside the data")
    refused(capsys, ["data", action, data / "a.jsonl", "--out", tmp_path], "contains the data")
    refused(capsys, ["data", action, data, recipe, "--out", recipe], "is the recipe")
    refused(capsys, ["data", action, data, "--out", model], f"is a tunelab model, not {kind};")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep", encoding="utf-8")
    refused(capsys, ["data", action, data, "--out", tmp_path / "mine"], "was not written by tunelab")
    assert digest(data) == before and digest(model) == before_model
    assert (tmp_path / "mine" / "notes.txt").read_text(encoding="utf-8") == "keep"
    out = tmp_path / "out"
    for _ in range(2):  # its own earlier output is reused
        assert main(["data", action, str(data), "--out", str(out)]) == 0
    assert read_marker(out)["kind"] == kind
    other = "dedup" if action == "clean" else "clean"
    refused(capsys, ["data", other, data, "--out", out], f"is a tunelab {kind}")


# -- checkpoint export ----------------------------------------------------------------------------------------

def test_checkpoint_export_against_its_inputs(tmp_path, model, chat_file, capsys):
    runs = tmp_path / "runs"
    assert main(ft_args(model, chat_file, runs, "ck", "train.checkpoint_format=sharded")) == 0
    capsys.readouterr()
    ckpt = runs / "ck" / "checkpoints" / "step-000002"
    before = digest(model), digest(ckpt)
    refused(capsys, ["checkpoint", "export", ckpt, "--out", model], "is the base model")
    refused(capsys, ["checkpoint", "export", ckpt, "--out", model / "sub"], "lies inside the base model")
    refused(capsys, ["checkpoint", "export", ckpt, "--out", ckpt], "is the checkpoint")
    refused(capsys, ["checkpoint", "export", ckpt, "--out", ckpt / "dcp"], "lies inside the checkpoint")
    refused(capsys, ["checkpoint", "export", ckpt, "--out", runs], "contains the checkpoint")
    refused(capsys, ["checkpoint", "export", ckpt, "--out", ckpt.parent / "mine"], "lies inside the run's checkpoints")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep", encoding="utf-8")
    refused(capsys, ["checkpoint", "export", ckpt, "--out", tmp_path / "mine"], "was not written by tunelab")
    assert (digest(model), digest(ckpt)) == before
    assert (tmp_path / "mine" / "notes.txt").read_text(encoding="utf-8") == "keep"
    out = tmp_path / "exported"
    for _ in range(2):  # its own earlier output is replaced
        assert main(["checkpoint", "export", str(ckpt), "--out", str(out)]) == 0
    assert read_marker(out)["kind"] == "adapter"
    refused(capsys, ["checkpoint", "export", ckpt, "--out", runs / "ck"], "contains the checkpoint")  # its run


# -- vocab extend --------------------------------------------------------------------------------------------

def test_vocab_extend_against_its_inputs(tmp_path, model, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "zh.txt").write_text("\n\n".join(["我们是朋友，我们一起学习。"] * 30), encoding="utf-8")
    before = digest(model)
    args = ["vocab", "extend", model, corpus, "--add", "5", "--model"]
    refused(capsys, [*args, "--out", model], "is the base")
    refused(capsys, [*args, "--out", model / "ext"], "lies inside the base")
    refused(capsys, [*args, "--out", corpus], "is the corpus")
    refused(capsys, [*args, "--out", tmp_path], "contains the base")
    assert digest(model) == before
    out = tmp_path / "ext"
    for _ in range(2):  # the second run replaces its own earlier output
        assert main([str(a) for a in [*args, "--out", out]]) == 0
    assert read_marker(out)["kind"] == "extended model"
    capsys.readouterr()
    refused(capsys, ["vocab", "extend", model, corpus, "--add", "5", "--out", out], "is a tunelab extended model, "
            "not an extended tokenizer")
    refused(capsys, [*args, "--out", model.parent], "contains the base")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    refused(capsys, [*args, "--out", other], "was not written by tunelab")
    assert digest(model) == before and (other / "keep.txt").read_text() == "keep"


# -- data self-instruct --------------------------------------------------------------------------------------

def test_data_self_instruct_against_its_inputs(tmp_path, model, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "Name three colours.", "instances": [{"input": "", "output": "Red, "
                                                                                      "blue, green."}]}) + "\n")
    before, seed_text = digest(model), seeds.read_text()
    args = ["data", "self-instruct", "--seed-tasks", seeds, "--generator", model, "--num", "1"]
    refused(capsys, [*args, "--out", model / "tasks.jsonl"], "lies inside the generator model")
    refused(capsys, [*args, "--out", tmp_path / "o.jsonl", "--report", seeds], "is the seed tasks")
    refused(capsys, [*args, "--out", tmp_path / "o.jsonl", "--report", tmp_path / "o.jsonl"], "the same file")
    refused(capsys, [*args, "--out", tmp_path / "o.jsonl", "--report", model / "r.json"], "lies inside the generator")
    mine = tmp_path / "mine.jsonl"  # a data file tunelab did not write: never appended to
    mine.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    refused(capsys, [*args, "--out", mine], "was not written by tunelab data self-instruct")
    report = tmp_path / "notes.json"  # a report path that is someone else's file: never replaced
    report.write_text('{"keep": true}')
    refused(capsys, [*args, "--out", tmp_path / "o.jsonl", "--report", report], "not a tunelab self-instruct report")
    assert digest(model) == before and seeds.read_text() == seed_text and report.read_text() == '{"keep": true}'
    assert mine.read_text() == '{"instruction": "a", "input": "", "output": "b"}\n'
