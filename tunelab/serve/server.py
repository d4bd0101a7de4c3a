"""`tunelab serve`: one base model, many adapters, an OpenAI-compatible server (api.py over engine.py over
lora_bank.py), bound to 127.0.0.1 unless told otherwise.

`build_state` loads the base once (the GPU when there is one, `precision` as `tunelab generate`), registers the
`--adapter NAME=DIR` adapters (each validated now: a bad one stops the start with its reason), and builds the
engine; `serve` runs the app with uvicorn until Ctrl-C. It writes nothing.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from tunelab.errors import ConfigError, ModelError
from tunelab.models import inference_placement, load_model, load_tokenizer, require_local_dir
from tunelab.serve.adapters import AdapterRegistry, ServeError, check_name, read_lora_weights
from tunelab.serve.api import encode_text, render_chat
from tunelab.serve.engine import Engine


class ServerState:
    """The model, its tokenizer, the adapter registry and the engine, and what the routes ask of them."""

    def __init__(self, model, tokenizer, base_name: str, registry: AdapterRegistry, engine: Engine):
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.registry, self.engine = registry, engine
        self.created = int(time.time())
        self.context = engine.context

    def card(self, name: str | None) -> dict:
        """The /v1/models entry of the base (None) or of an adapter (its parent is the base)."""
        return {"id": name or self.base_name, "object": "model", "created": self.created, "owned_by": "tunelab",
                "root": name or self.base_name, "parent": None if name is None else self.base_name}

    def completion_prompts(self, body, adapter) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            prompts = [encode_text(self.tokenizer, p)]
        elif not p:
            raise ServeError(400, "`prompt` is empty", code="invalid_value", param="prompt")
        elif isinstance(p[0], str):
            prompts = [encode_text(self.tokenizer, x) for x in p]
        elif isinstance(p[0], int):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
        vocab = len(self.tokenizer)
        for ids in prompts:
            if not ids:
                raise ServeError(400, "`prompt` has an empty prompt: there is nothing to complete",
                                 code="invalid_value", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise ServeError(400, f"`prompt` has a token id outside the vocabulary [0, {vocab})",
                                 code="invalid_value", param="prompt")
        return prompts

    def chat_prompt(self, body, adapter) -> list[list[int]]:
        template = self.registry.base_template if adapter is None else adapter.template
        return [encode_text(self.tokenizer, render_chat(self.tokenizer, template, body.messages))]

    def stop_ids(self, adapter, chat: bool) -> list[int]:
        if chat:
            return self.registry.base_stop_ids if adapter is None else adapter.chat_stop_ids
        return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

    def check_length(self, ids: list[int], max_tokens: int | None, default: int | None, param: str) -> int:
        """The reply's token limit: `max_tokens`, else `default`, else the rest of the context; 400 past it."""
        room = self.context - len(ids)
        if room < 1:
            raise ServeError(400, f"the prompt has {len(ids)} tokens; this model's context is {self.context} tokens, "
                                  f"which leaves no room for a reply", code="context_length_exceeded", param=param)
        if max_tokens is None:
            return min(default, room) if default is not None else room
        if max_tokens < 1:
            raise ServeError(400, f"`max_tokens` must be at least 1 (got {max_tokens})", code="invalid_value",
                             param="max_tokens")
        if max_tokens > room:
            raise ServeError(400, f"this model's context is {self.context} tokens; the prompt has {len(ids)}, so "
                                  f"`max_tokens` can be at most {room} (got {max_tokens})",
                             code="context_length_exceeded", param="max_tokens")
        return max_tokens


def parse_adapter_args(items: list[str]) -> dict[str, Path]:
    """`NAME=DIR` pairs of --adapter as {name: dir}; ConfigError naming the bad one."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {item!r}: give NAME=DIR (e.g. --adapter support=runs/support/adapter)")
        try:
            check_name(name, "--adapter")
        except ServeError as e:
            raise ConfigError(f"--adapter {item!r}: {e}") from None
        if name in out:
            raise ConfigError(f"--adapter {name}: given twice")
        out[name] = Path(path)
    return out


def build_state(base_dir: str | Path, adapters: dict[str, Path] | None = None, adapters_dir: str | Path | None = None,
                max_loaded: int = 8, max_batch: int = 32, precision: str | None = "auto") -> ServerState:
    """Load the base model and register the adapters (each validated); the engine is built, not started."""
    if max_loaded < 1 or max_batch < 1:
        raise ConfigError(f"--max-loaded and --max-batch must be at least 1 (got {max_loaded}, {max_batch})")
    base = require_local_dir(base_dir, "base model")
    model = load_model(base)
    if precision is not None:
        device, dtype = inference_placement(precision)
        model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    tokenizer = load_tokenizer(base)
    base_name = base.resolve().name
    if adapters_dir is not None and not Path(adapters_dir).is_dir():
        raise ConfigError(f"--adapters-dir {adapters_dir}: not a directory")
    try:
        registry = AdapterRegistry(model, tokenizer, base_name, adapters_dir=adapters_dir, keep=max(256, max_loaded))
    except ServeError as e:
        raise ModelError(f"{e}") from None
    for name, path in (adapters or {}).items():
        if name == base_name:
            raise ConfigError(f"--adapter {name}: the base model is served under that name; choose another")
        try:
            registry.load(name, path)
        except ServeError as e:
            raise ModelError(f"--adapter {name}={path}: {e}") from None
    engine = Engine(model, tokenizer, lambda info: read_lora_weights(info.path, model), max_loaded=max_loaded,
                    max_batch=max_batch)
    registry.on_unload = engine.forget
    return ServerState(model, tokenizer, base_name, registry, engine)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket at host:port; ConfigError naming --host/--port when it cannot be had (in use, ...)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                          f"pick a free port with --port") from None


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          allow_runtime_lora: bool = False, on_ready=None, sock: socket.socket | None = None) -> None:
    """Run the server until interrupted, on `sock` (else host:port, bound now); `api_key` None takes
    $TUNELAB_API_KEY (none when unset or empty)."""
    import uvicorn

    from tunelab.serve.api import create_app

    api_key = api_key or os.environ.get("TUNELAB_API_KEY") or None
    app = create_app(state, api_key=api_key, allow_runtime_lora=allow_runtime_lora)
    sock = sock if sock is not None else bind(host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(f"http://{host}:{sock.getsockname()[1]}/v1")
    server.run(sockets=[sock])
