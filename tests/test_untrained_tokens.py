"""Fine-tuning warns when the chat template's special tokens have never-trained embeddings that stay frozen."""

from pathlib import Path

import pytest
import yaml

from tunelab.config import FinetuneConfig, PretrainConfig, load_config, validate
from tunelab.data.chat import chat_template_for, template_special_ids
from tunelab.models import load_model, load_tokenizer, untrained_rows
from tunelab.train.finetune import run_finetune
from tunelab.train.pretrain import run_pretrain


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus_file, tokenizer_dir):
    """A micro model pretrained (AdamW, weight decay, tied embeddings) on text without any ChatML token."""
    out = tmp_path_factory.mktemp("pt")
    cfg = load_config(PretrainConfig, None, [
        "model.preset=micro", f"model.tokenizer={tokenizer_dir}", f"out_dir={out}", "name=run",
        f"data.sources=[{{path: '{corpus_file}'}}]", "data.seq_len=64", "train.steps=60", "train.micro_batch_size=8",
        "train.lr=3e-3", "train.weight_decay=0.1", "train.eval_every=0"])
    return run_pretrain(cfg, device="cpu")["model_dir"]


def test_chatml_tokens_of_a_text_pretrained_base_are_untrained_and_eos_is_not(pretrained):
    model, tok = load_model(pretrained), load_tokenizer(pretrained)
    chatml = template_special_ids(tok, chat_template_for(tok, "chatml"))
    assert tok.convert_ids_to_tokens(chatml) == ["<|im_start|>", "<|im_end|>"]
    assert untrained_rows(model, chatml, len(tok)) == chatml
    plain = template_special_ids(tok, chat_template_for(tok, "plain"))
    assert plain == [tok.eos_token_id] and untrained_rows(model, plain, len(tok)) == []  # EOS ends every document


@pytest.mark.parametrize("template, method, warns", [("chatml", "lora", True), ("plain", "lora", False),
                                                     ("chatml", "full", False)])
def test_finetune_warns_only_when_frozen_embeddings_meet_untrained_template_tokens(pretrained, tmp_path, chat_file,
                                                                                  capsys, template, method, warns):
    cfg = validate(FinetuneConfig, {"name": "ft", "out_dir": str(tmp_path), "model": {"base": pretrained},
                                    "data": {"train": [str(chat_file)], "max_len": 64, "chat_template": template},
                                    "method": {"name": method}, "train": {"steps": 1, "micro_batch_size": 2}})
    run_finetune(cfg, device="cpu")
    err = capsys.readouterr().err
    assert ("the chat template's <|im_start|>, <|im_end|> look never trained" in err) == warns
    if warns:
        assert "use data.chat_template=plain" in err


def test_the_readme_recipe_trains_the_demo_base_on_the_plain_template():
    recipe = yaml.safe_load((Path(__file__).parents[1] / "examples" / "finetune_chat.yaml").read_text(encoding="utf-8"))
    assert recipe["model"]["base"] == "runs/demo/pretrain/model" and recipe["data"]["chat_template"] == "plain"
