"""The serving engine: a batch that mixes adapters (ranks, scalings, rsLoRA, rank patterns, DoRA) gives, greedy in
fp32, the tokens each request gets alone and the tokens transformers + PEFT generate with that adapter; requests
join a running batch and leave it as they finish; the bank holds at most max_loaded adapters (LRU)."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import random_lora_adapter

from tunelab.models import load_model, load_tokenizer
from tunelab.serve import lora_bank
from tunelab.serve.adapters import AdapterRegistry, ServeError, read_lora_weights
from tunelab.serve.engine import Engine, Request, Sampling, _safe_prefix

peft = pytest.importorskip("peft")

PROMPTS = ["river stone lantern", "copper violet orchard tailor falcon willow meadow", "山河", "baker"]


def peft_adapter(base_dir, out, seed: int, **config):
    """A PEFT-written LoRA adapter with random A and B (init_lora_weights=False); for DoRA, a perturbed magnitude."""
    model = load_model(base_dir)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(base_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-adapters")
    return {
        "lora2": random_lora_adapter(base_model_dir, d / "lora2", r=2, seed=1),
        "rs8": peft_adapter(base_model_dir, d / "rs8", 2, r=8, lora_alpha=4, use_rslora=True,
                            target_modules="all-linear", rank_pattern={"o_proj": 4}, alpha_pattern={"down_proj": 16}),
        "dora4": peft_adapter(base_model_dir, d / "dora4", 3, r=4, lora_alpha=8, use_dora=True,
                              target_modules=["q_proj", "k_proj", "gate_proj"]),
    }


@pytest.fixture(scope="module")
def engine(base_model_dir, adapters):
    model, tok = load_model(base_model_dir).eval(), load_tokenizer(base_model_dir)
    registry = AdapterRegistry(model, tok, "base")
    for name, path in adapters.items():
        registry.load(name, path)
    eng = Engine(model, tok, lambda info: read_lora_weights(info.path, model), max_loaded=2, max_batch=16).start()
    eng.registry = registry
    yield eng
    eng.stop()


def run(engine, jobs, wait_first: bool = False):
    """Submit (prompt, adapter name or None, max_tokens) jobs; (text, finish, completion tokens) of each, and the
    order they finished in. With `wait_first`, the later jobs are submitted once the first has sent text."""
    tok = engine.tokenizer
    results, order, done = [None] * len(jobs), [], [threading.Event() for _ in jobs]
    started = threading.Event()

    def submit(i):
        prompt, adapter, max_tokens = jobs[i]
        text = []

        def emit(event):
            if event[0] == "text":
                text.append(event[1])
                started.set()
            else:
                results[i] = ("".join(text), event[1], event[3]) if event[0] == "done" else event
                order.append(i)
                done[i].set()

        info = None if adapter is None else engine.registry.resolve(adapter)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        engine.submit(Request(ids, info, Sampling(max_tokens, stop_ids={tok.eos_token_id}), emit))

    submit(0)
    if wait_first:
        assert started.wait(30)
    for i in range(1, len(jobs)):
        submit(i)
    for d in done:
        assert d.wait(60)
    return results, order


def peft_greedy(base_model_dir, adapters, jobs):
    model, tok = load_model(base_model_dir).eval(), load_tokenizer(base_model_dir)
    names = list(adapters)
    pm = peft.PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(adapters[name], adapter_name=name)
    out = []
    for prompt, adapter, max_tokens in jobs:
        enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
        kw = dict(max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
        if adapter is None:
            with pm.disable_adapter():
                ids = pm.generate(**enc, **kw)
        else:
            pm.set_adapter(adapter)
            ids = pm.generate(**enc, **kw)
        new = ids[0, enc["input_ids"].shape[1]:].tolist()
        n = len(new)
        if new and new[-1] == tok.eos_token_id:
            new = new[:-1]
        out.append((tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False), n))
    return out


@pytest.mark.parametrize("path", ["dense", "gather"])
def test_mixed_batch_equals_alone_and_peft(engine, adapters, base_model_dir, path, monkeypatch):
    monkeypatch.setattr(lora_bank, "DENSE_SLOTS", 16 if path == "dense" else 0)
    names = [None, *adapters]
    jobs = [(p, names[(i + k) % len(names)], 4 + k) for k, p in enumerate(PROMPTS[:3]) for i in range(len(names))]
    steps = engine.steps
    mixed, _ = run(engine, jobs)
    assert engine.steps - steps < sum(j[2] for j in jobs) / 2  # the rows really were decoded together
    alone = [run(engine, [job])[0][0] for job in jobs]
    assert mixed == alone
    expected = peft_greedy(base_model_dir, adapters, jobs)
    assert [(text, n) for text, _, n in mixed] == expected
    replies = {(prompt, adapter): text for (prompt, adapter, _), (text, _, _) in zip(jobs, mixed)}
    for name in adapters:  # every adapter changes some reply of the base model
        assert any(replies[p, name] != replies[p, None] for p in PROMPTS[:3])


def test_requests_join_and_leave_a_running_batch(engine, adapters):
    jobs = [(PROMPTS[0], "rs8", 24), (PROMPTS[1], "lora2", 3), (PROMPTS[2], None, 5), (PROMPTS[3], "dora4", 4)]
    joined, order = run(engine, jobs, wait_first=True)
    assert order[-1] == 0  # the long reply did not hold up the short ones
    assert joined == [run(engine, [job])[0][0] for job in jobs]
    assert engine.running == 0 and all(r == 0 for r in engine.bank.refs)


def test_bank_keeps_at_most_max_loaded_lru(engine):
    run(engine, [(PROMPTS[0], "lora2", 2)])
    run(engine, [(PROMPTS[0], "rs8", 2)])
    run(engine, [(PROMPTS[0], "dora4", 2)])  # evicts lora2, the least recently used
    assert [key[0] for key in engine.bank.resident] == ["rs8", "dora4"]
    assert len(engine.bank.resident) <= engine.bank.slots == 2


def test_sampling_with_a_seed_repeats(engine):
    tok = engine.tokenizer
    outs = []
    for _ in range(2):
        got, ev = [], threading.Event()
        req = Request(tok("river", add_special_tokens=False)["input_ids"], engine.registry.resolve("rs8"),
                      Sampling(12, temperature=1.0, top_p=0.9, seed=7),
                      lambda e, got=got, ev=ev: got.append(e) if e[0] == "text" else ev.set())
        engine.submit(req)
        assert ev.wait(30)
        outs.append("".join(t for _, t in got))
    assert outs[0] == outs[1]


def test_min_tokens_keeps_stop_ids_out(engine):
    from tunelab.serve.engine import _Row

    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    rows = [_Row(Request([1], None, Sampling(4, stop_ids={1}, min_tokens=2), print), 0),
            _Row(Request([1], None, Sampling(4, stop_ids={1}, min_tokens=0), print), 0)]
    assert engine._sample(logits.clone(), rows) == [2, 1]
    rows[0].generated = [2, 2]
    assert engine._sample(logits.clone(), rows) == [1, 1]


def test_unservable_adapters_are_refused(base_model_dir, tmp_path):
    import json

    model = load_model(base_model_dir)
    for kind, what in (("TUNELAB_ADAPTION_PROMPT", "LLaMA-Adapter"), ("TUNELAB_QTHA", "QTHA")):
        d = tmp_path / kind
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": kind}))
        with pytest.raises(ServeError, match=f"{what}.*cannot share a batch"):
            read_lora_weights(d, model)
    d = random_lora_adapter(base_model_dir, tmp_path / "mts", r=2)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ServeError, match="modules_to_save"):
        read_lora_weights(d, model)
    for extra in ({"trainable_token_indices": [5, 6]}, {"peft_type": "TRAINABLE_TOKENS"}):  # vocab extend's rows
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **extra}))
        with pytest.raises(ServeError, match="trains embedding rows.*tunelab export"):
            read_lora_weights(d, model)


def test_stop_string_hold_back():
    assert _safe_prefix("hello wor", ["world"]) == 6
    assert _safe_prefix("hello", ["xyz"]) == 5
    assert _safe_prefix("ab\ufffd", []) == 2
    assert _safe_prefix("abc", ["cd", "bcx"]) == 1


# What vLLM's LoRA loader requires of an adapter directory (read in vllm/lora/peft_helper.py, lora_model.py and
# utils.py): adapter_config.json with r, lora_alpha and target_modules; bias "none"; no modules_to_save; no DoRA;
# r at most --max-lora-rank (one of these values); adapter_model.safetensors whose keys are
# base_model.model.<module>.lora_A.weight / .lora_B.weight, the module's last name one vLLM's Llama supports.
VLLM_RANKS = {1, 8, 16, 32, 64, 128, 256, 320, 512}
VLLM_LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_adapter_files_meet_vllms_loader_rules(base_model_dir, tmp_path):
    import json

    from safetensors import safe_open

    from tunelab.methods import LoRA, save_lora_adapter

    model, tok = load_model(base_model_dir), load_tokenizer(base_model_dir)
    method = LoRA(r=16, alpha=32, target_modules="all-linear")
    method.inject(model)
    d = save_lora_adapter(method, tmp_path / "a", str(base_model_dir), tok)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert {"r", "lora_alpha", "target_modules"} <= set(cfg)
    assert cfg["bias"] == "none" and not cfg["modules_to_save"] and cfg["use_dora"] is False
    assert any(v >= cfg["r"] for v in VLLM_RANKS)  # serve with --max-lora-rank at least r
    with safe_open(str(d / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    for key in keys:
        parts = key.split(".")
        assert parts[:2] == ["base_model", "model"] and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B")
        assert parts[-3] in VLLM_LLAMA_MODULES, key
    assert len(keys) == 2 * len(method.layers)
