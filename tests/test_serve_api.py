"""`tunelab serve` against the official `openai` client, on a server each test module starts on a free local port:
three adapters in their own voices, chat and completions, streamed and not, stop strings, usage, replies equal to
transformers + PEFT; every bad input a 4xx with OpenAI's error object; adapter names never paths; the API key;
the body size limit; a client that leaves mid-stream frees its slot; runtime load/unload; 200 concurrent requests."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import random_lora_adapter, serving

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from tunelab.cli import main  # noqa: E402
from tunelab.data.chat import end_of_turn_ids, prompt_for_generation  # noqa: E402
from tunelab.serve.api import create_app, encode_text  # noqa: E402
from tunelab.serve.server import build_state  # noqa: E402

KEY = "sk-test-key"
LIMIT = 64 * 1024


@contextmanager
def running(state, **kw):
    """The app over `state` served by uvicorn in a thread on a free port of 127.0.0.1; yields (host, port)."""
    lifespan = kw.pop("lifespan", "on")
    with serving(create_app(state, max_body_bytes=LIMIT, **kw), lifespan=lifespan) as address:
        yield address


def voice_adapter(base_dir, out, word: str, seed: int = 0, steps: int = 16):
    """A LoRA adapter (r 4, all linear layers) trained for a few steps to start every chat reply with `word`."""
    import torch

    from tunelab.data.chat import chat_template_for
    from tunelab.methods import LoRA, save_lora_adapter
    from tunelab.models import load_model, load_tokenizer

    model, tok = load_model(base_dir), load_tokenizer(base_dir)
    template = chat_template_for(tok)
    torch.manual_seed(seed)
    method = LoRA(r=4, alpha=8, target_modules="all-linear")
    method.inject(model)
    answer = tok(word, add_special_tokens=False)["input_ids"]
    rows = [encode_text(tok, prompt_for_generation([{"role": "user", "content": q}], tok, template)) + answer
            for q in ("colour of river?", "hello", "who are you?", "colour of falcon?")]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    labels = torch.full_like(ids, -100)
    labels[:, -len(answer):] = ids[:, -len(answer):]
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=5e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                     labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_lora_adapter(method, out, str(Path(base_dir).resolve()), tok)


VOICES = {"alice": "river", "bob": "copper", "carol": "falcon"}


@pytest.fixture(scope="module")
def adapters(base_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("voices")
    return {name: voice_adapter(base_model_dir, d / name, word, seed=i)
            for i, (name, word) in enumerate(VOICES.items())}


@pytest.fixture(scope="module")
def hub(base_model_dir, tmp_path_factory):
    """An adapters directory: d1 (an adapter), alias (a symlink to d1, inside), escape (a symlink to an adapter
    outside the directory), prompty (a LLaMA-Adapter config)."""
    root = tmp_path_factory.mktemp("hub")
    outside = tmp_path_factory.mktemp("outside")
    random_lora_adapter(base_model_dir, root / "d1", r=2, seed=4)
    random_lora_adapter(base_model_dir, outside / "secret", r=2, seed=5)
    (root / "alias").symlink_to(root / "d1")
    (root / "escape").symlink_to(outside / "secret")
    (root / "prompty").mkdir()
    (root / "prompty" / "adapter_config.json").write_text(json.dumps({"peft_type": "TUNELAB_ADAPTION_PROMPT"}))
    return root


@pytest.fixture(scope="module")
def state(base_model_dir, adapters, hub):
    return build_state(base_model_dir, adapters, hub, max_loaded=3, max_batch=64, precision=None)


@pytest.fixture(scope="module")
def server(state):
    with running(state, api_key=KEY, allow_runtime_lora=True) as addr:
        yield addr


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://{server[0]}:{server[1]}/v1", api_key=KEY, max_retries=0, timeout=60)


def raw(addr, method: str, path: str, body: bytes | dict | None = None, key: str | None = KEY,
        headers: dict | None = None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection(*addr, timeout=30)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers=h)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


def test_models_lists_the_base_and_every_adapter(client, state):
    cards = {m.id: m for m in client.models.list().data}
    assert {state.base_name, "alice", "bob", "carol", "d1", "alias", "prompty"} <= set(cards)
    assert "escape" not in cards  # it leaves the adapters directory
    assert cards["alice"].model_extra["parent"] == state.base_name
    assert client.models.retrieve("bob").id == "bob" and client.models.retrieve(state.base_name).parent is None
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nobody")


def test_three_voices_chat_streamed_and_not(client, state):
    messages = [{"role": "user", "content": "colour of meadow?"}]
    replies = {}
    for name in ("alice", "bob", "carol", state.base_name):
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
        replies[name] = r.choices[0].message.content
        assert r.model == name and r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        ids = encode_text(state.tokenizer, prompt_for_generation(messages, state.tokenizer,
                                                                 state.registry.base_template))
        assert r.usage.prompt_tokens == len(ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == replies[name]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    for name, word in VOICES.items():  # each adapter in its own voice
        assert replies[name].startswith(word) and not replies[state.base_name].startswith(word), replies


def test_replies_equal_transformers_and_peft(client, state, base_model_dir, adapters):
    import torch
    from peft import PeftModel

    from tunelab.models import load_model

    tok = state.tokenizer
    pm = PeftModel.from_pretrained(load_model(base_model_dir).eval(), adapters["bob"])
    prompt, messages = "copper violet orchard", [{"role": "user", "content": "colour of falcon?"}]
    chat_ids = encode_text(tok, prompt_for_generation(messages, tok, state.registry.base_template))
    for ids, stops, got in (
            (encode_text(tok, prompt), [tok.eos_token_id],
             client.completions.create(model="bob", prompt=prompt, max_tokens=10, temperature=0).choices[0].text),
            (chat_ids, end_of_turn_ids(tok, state.registry.base_template),
             client.chat.completions.create(model="bob", messages=messages, max_tokens=10,
                                            temperature=0).choices[0].message.content)):
        out = pm.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=10, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False) == got


def test_completions_stop_strings_and_usage(client):
    full = client.completions.create(model="carol", prompt="meadow", max_tokens=12, temperature=0)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    stop = text.strip()[2:5]
    assert stop
    cut = client.completions.create(model="carol", prompt="meadow", max_tokens=12, temperature=0, stop=[stop, "§"])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="carol", prompt="meadow", max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    two = client.completions.create(model="carol", prompt=["meadow", "baker"], max_tokens=4, temperature=0)
    assert two.choices[0].text == client.completions.create(model="carol", prompt="meadow", max_tokens=4,
                                                            temperature=0).choices[0].text
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model="alice", messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=3, temperature=0, n=2, stream=True))
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) for i in (0, 1)]
    assert texts[0] == texts[1] == client.chat.completions.create(
        model="alice", messages=[{"role": "user", "content": "hello"}], max_tokens=3,
        temperature=0).choices[0].message.content


def test_raw_stream_is_sse_ending_with_done(server):
    conn = http.client.HTTPConnection(*server, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "alice", "prompt": "river", "max_tokens": 3,
                                                             "stream": True}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


BAD = [  # (path, body, status, param)
    ("/v1/completions", b'{"model": "alice", "prompt": ', 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "alice"}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "alice"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "alice", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "alice", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "alice", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role"),
    ("/v1/completions", {"model": "alice", "prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "alice", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "alice", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": "alice", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "alice", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": "alice", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "alice", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "alice", "prompt": "x", "n": 100}, 400, "n"),
    ("/v1/completions", {"model": "alice", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "alice", "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"model": "alice", "prompt": [10 ** 9]}, 400, "prompt"),
    ("/v1/completions", {"model": "alice", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "alice", "prompt": "word " * 600}, 400, "prompt"),
    ("/v1/completions", {"model": "nobody", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": 7, "prompt": "x"}, 400, "model"),
    ("/v1/nowhere", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_with_an_openai_error(server, path, body, status, param):
    got, err = raw(server, "POST", path, body)
    assert got == status, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    assert err["error"]["param"] == param


def test_bad_inputs_leave_the_server_serving(client, server):
    for path, body, _, _ in BAD[:5]:
        raw(server, "POST", path, body)
    assert client.completions.create(model="alice", prompt="river", max_tokens=2).usage.completion_tokens == 2


def test_adapter_names_are_identifiers_never_paths(client):
    for name, status, words in (("../alice", 400, "not an adapter name"), ("/etc/passwd", 400, "never paths"),
                                ("a/b", 400, "identifiers"), ("escape", 403, "outside the adapters directory"),
                                ("prompty", 400, "LLaMA-Adapter")):
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=name, prompt="x", max_tokens=1)
        assert e.value.status_code == status and words in e.value.message, e.value.message
    a = client.completions.create(model="alias", prompt="river", max_tokens=5, temperature=0).choices[0].text
    assert a == client.completions.create(model="d1", prompt="river", max_tokens=5, temperature=0).choices[0].text


def test_api_key_guards_every_route_but_health(server):
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/completions", {"model": "alice"}),
                               ("POST", "/v1/load_lora_adapter", {}), ("GET", "/v1/nowhere", None)):
        for key in (None, "wrong"):
            status, err = raw(server, method, path, body, key=key)
            assert status == 401 and err["error"]["type"] == "authentication_error"
    assert raw(server, "GET", "/health", key=None)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://{server[0]}:{server[1]}/v1", api_key="wrong", max_retries=0).models.list()


def test_request_size_limit(server):
    big = json.dumps({"model": "alice", "prompt": "x" * (LIMIT + 10)}).encode()
    status, err = raw(server, "POST", "/v1/completions", big)
    assert status == 413 and "larger than" in err["error"]["message"]
    conn = http.client.HTTPConnection(*server, timeout=30)  # chunked: no Content-Length to refuse early
    conn.request("POST", "/v1/completions", body=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()


def test_client_leaving_mid_stream_frees_its_slot(server, state):
    steps = state.engine.steps
    s = socket.create_connection(server, timeout=30)
    body = json.dumps({"model": "bob", "prompt": "river", "max_tokens": 400, "stream": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    seen = b""
    while seen.count(b"data: ") < 3:
        seen += s.recv(4096)
    s.close()
    deadline = time.time() + 20
    while state.engine.running or state.engine.pending:
        assert time.time() < deadline, "the engine still decodes for a client that left"
        time.sleep(0.05)
    assert state.engine.steps - steps < 200
    assert all(r == 0 for r in state.engine.bank.refs)


def test_runtime_load_and_unload(server, client, base_model_dir, tmp_path):
    late = random_lora_adapter(base_model_dir, tmp_path / "late", r=2, seed=9)
    assert raw(server, "POST", "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(late)}) == \
        (200, "Success: LoRA adapter 'late' added successfully.")
    assert client.completions.create(model="late", prompt="river", max_tokens=2).usage.completion_tokens == 2
    for body, status, param in (({"lora_name": "late", "lora_path": str(late)}, 400, "lora_name"),
                                ({"lora_name": "../x", "lora_path": str(late)}, 400, "lora_name"),
                                ({"lora_name": "new", "lora_path": str(tmp_path / "none")}, 400, "lora_path"),
                                ({"lora_name": "new"}, 400, "lora_path")):
        status_got, err = raw(server, "POST", "/v1/load_lora_adapter", body)
        assert (status_got, err["error"]["param"]) == (status, param), err
    assert raw(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "late"})[0] == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="river", max_tokens=2)
    assert raw(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "late"})[0] == 404


def test_runtime_routes_are_off_unless_allowed(state):
    with running(state, lifespan="off") as addr:  # a second app on the same (running) engine
        status, err = raw(addr, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}, key=None)
        assert status == 403 and "--allow-runtime-lora" in err["error"]["message"]


def test_200_concurrent_requests_over_several_adapters(server, client, state):
    models = ["alice", "bob", "carol", "d1", state.base_name]
    prompts = ["river", "copper violet", "山河", "baker tailor"]
    expected = {(m, p): client.completions.create(model=m, prompt=p, max_tokens=5, temperature=0).choices[0].text
                for m in models for p in prompts}
    aclient = openai.AsyncOpenAI(base_url=f"http://{server[0]}:{server[1]}/v1", api_key=KEY, max_retries=0,
                                 timeout=120)
    jobs = [(models[i % len(models)], prompts[(i // len(models)) % len(prompts)]) for i in range(200)]

    async def one(m, p):
        r = await aclient.completions.create(model=m, prompt=p, max_tokens=5, temperature=0)
        return r.choices[0].text

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(m, p) for m, p in jobs))
        finally:
            await aclient.close()

    got = asyncio.run(all_of_them())
    assert got == [expected[j] for j in jobs]
    assert raw(server, "GET", "/health")[1]["status"] == "ok" and state.engine.running == 0


def test_cli_serve_in_a_subprocess(base_model_dir, adapters, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TUNELAB_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(base_model_dir), "--adapter",
                             f"alice={adapters['alice']}", "--port", str(port), "--precision", "fp32"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                if raw(("127.0.0.1", port), "GET", "/health", key=None)[0] == 200:
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "tunelab serve did not start"
                time.sleep(0.2)
        assert raw(("127.0.0.1", port), "GET", "/v1/models", key=None)[0] == 401
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        assert c.completions.create(model="alice", prompt="river", max_tokens=3).usage.completion_tokens == 3
    finally:
        proc.terminate()
        proc.wait(30)


def test_cli_serve_refuses_bad_adapters(base_model_dir, tmp_path, capsys):
    assert main(["serve", str(base_model_dir), "--adapter", "noequals"]) == 2
    assert main(["serve", str(base_model_dir), "--adapter", f"x={tmp_path}"]) == 2
    bad = Path(tmp_path / "prompty")
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "TUNELAB_QTHA"}))
    assert main(["serve", str(base_model_dir), "--adapter", f"q={bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "NAME=DIR" in err[0] and "not an adapter directory" in err[1] and "QTHA" in err[2]
    assert f"--adapter x={tmp_path}" in err[1] and f"--adapter q={bad}" in err[2]
    # a full model directory given as an adapter says what it is and how to serve it
    assert main(["serve", str(base_model_dir), "--adapter", f"full={base_model_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "full model directory" in err[0] and f"tunelab serve {base_model_dir}" in err[0]


def test_cli_serve_refuses_a_port_in_use_before_loading(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        # the base does not exist: the port is checked first, so the error is the port's
        assert main(["serve", str(tmp_path / "no-model"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--port {port}" in err[0] and "pick a free port" in err[0]
