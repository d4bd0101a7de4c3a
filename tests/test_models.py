import json
import os
import subprocess
import sys

import pytest
import torch

from tunelab.errors import ModelError
from tunelab.models import PRESETS, count_parameters, create_model, load_model, load_tokenizer, save_model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_saved_model_loads_in_plain_transformers_with_identical_logits(tmp_path, tokenizer_dir, arch):
    tok = load_tokenizer(tokenizer_dir)
    model = create_model("micro", arch, tok, seed=1)
    out = save_model(model, tok, tmp_path / "m")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(os.listdir(out))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary leftovers
    ids = tok("river stone 山河", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model.eval()(ids).logits
    # a separate interpreter that never imports tunelab
    code = ("import sys, torch, transformers as t; m = t.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval();"
            "tk = t.AutoTokenizer.from_pretrained(sys.argv[1]); ids = tk('river stone 山河', return_tensors='pt')"
            "['input_ids']; torch.save(m(ids).logits.detach(), sys.argv[2]); assert 'tunelab' not in sys.modules")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "logits.pt")], check=True, env=env)
    theirs = torch.load(tmp_path / "logits.pt")
    assert torch.equal(ours, theirs)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["eos_token_id"] == tok.eos_token_id
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_presets_sizes(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert count_parameters(create_model("micro", "llama", tok)) < 200_000
    assert set(PRESETS) == {"micro", "tiny", "small"}
    model = create_model("micro", "llama", tok)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    # "small" is ~100M parameters with a 32k vocabulary: count without allocating it
    p = PRESETS["small"]
    h, inter, L = p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"]
    kv = h // p["num_attention_heads"] * p["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    assert 90e6 < 32000 * h + L * per_layer + h < 110e6


def test_non_local_references_are_refused(tmp_path):
    with pytest.raises(ModelError, match="not a local directory: tunelab works from local directories"):
        load_model("Qwen/Qwen2.5-0.5B")
    with pytest.raises(ModelError, match="tokenizer 'meta-llama/Llama-3.2-1B' is not a local directory"):
        load_tokenizer("meta-llama/Llama-3.2-1B")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)


def test_importing_tunelab_switches_hugging_face_offline():
    code = "import os; os.environ['HF_HUB_OFFLINE'] = '0'; import tunelab; print(os.environ['HF_HUB_OFFLINE'], " \
           "os.environ['TRANSFORMERS_OFFLINE'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1"]
