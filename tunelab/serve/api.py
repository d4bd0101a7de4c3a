"""The OpenAI-compatible HTTP surface (FastAPI): routes, request checks, response objects, Server-Sent Events.

Routes: `GET /health` (no key needed), `GET /v1/models` (the base and every adapter), `GET /v1/models/{id}`,
`POST /v1/completions`, `POST /v1/chat/completions` (each adapter's own chat template), and vLLM's
`POST /v1/load_lora_adapter` / `POST /v1/unload_lora_adapter` (with `allow_runtime_lora`). A request picks its
adapter by `model`. Supported fields: max_tokens (chat: or max_completion_tokens), temperature (0 = greedy),
top_p, n (at most 8), stop (at most 4 strings), seed, stream with stream_options.include_usage, user, and vLLM's
min_tokens; unknown fields are ignored; fields whose feature the server lacks (logprobs, echo, suffix, best_of > 1,
penalties, logit_bias, tools) are refused with 400 rather than silently ignored.
Every error is OpenAI's object `{"error": {"message", "type", "param", "code"}}` with its status: 400 bad JSON /
fields / values / context length, 401 no or wrong `Authorization: Bearer` key, 403 refused paths or routes, 404
unknown model or route, 413 body over the limit, 503 queue full. Once a stream has started, an error arrives as
an SSE event `{"error": ...}` followed by `data: [DONE]`. A client that goes away cancels its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
import uuid
from typing import Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.data.chat import prompt_for_generation
from tunelab.data.text import bos_ids, with_bos
from tunelab.errors import TunelabError
from tunelab.serve.adapters import ServeError, check_name
from tunelab.serve.engine import Request as GenRequest
from tunelab.serve.engine import Sampling

log = logging.getLogger("tunelab.serve")
MAX_N, MAX_STOP, MAX_STOP_CHARS = 8, 4, 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _Generation(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None
    min_tokens: int | None = Field(None, ge=0)  # vLLM's extension: no stop token before this many


class CompletionBody(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatBody(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None


class LoadBody(_Strict):
    lora_name: str
    lora_path: str


class UnloadBody(_Strict):
    lora_name: str
    lora_int_id: int | None = None


_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "a string or a list of at most 4 strings",
    "content": "a string or a list of {type: text, text} parts",
    "role": "one of system, developer, user, assistant",
}


_UNION_TAGS = {"str", "int", "bool", "float", "dict", "list"}


def error_body(status: int, message: str, type: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code if code is not None else
                      str(status)}}


def error_response(e: ServeError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(error_body(e.status, str(e), e.type, e.code, e.param), status_code=e.status, headers=headers)


def _validation_error(e: ValidationError) -> ServeError:
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"] if isinstance(x, int | str)]
    names = [x for x in loc if x not in _UNION_TAGS and "[" not in x and not x[:1].isupper()]  # no union tags
    param = ".".join(names) or None
    field = next((x for x in reversed(names) if not x.isdigit()), None)
    if err["type"] == "missing":
        msg = f"`{param}` is required"
    elif field in _EXPECTED:
        msg = f"`{param}` must be {_EXPECTED[field]}"
    else:
        msg = f"`{param}`: {err['msg']}"
    return ServeError(400, msg, code="invalid_value" if err["type"] != "missing" else "missing_field", param=param)


async def read_json(request: Request, limit: int) -> dict:
    """The request body as a JSON object; 413 past `limit` bytes, 400 when it is not a JSON object."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ServeError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ServeError(400, f"the request body must be a JSON object, found {type(data).__name__}",
                         code="invalid_json")
    return data


def _parse(model: type[BaseModel], data: dict) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _refuse_unsupported(body: _Generation) -> None:
    unsupported = {
        "logprobs": body.logprobs not in (None, False, 0) if hasattr(body, "logprobs") else False,
        "top_logprobs": getattr(body, "top_logprobs", None) not in (None, 0),
        "echo": getattr(body, "echo", None) is True,
        "suffix": getattr(body, "suffix", None) not in (None, ""),
        "best_of": getattr(body, "best_of", None) not in (None, 1),
        "presence_penalty": body.presence_penalty not in (None, 0),
        "frequency_penalty": body.frequency_penalty not in (None, 0),
        "logit_bias": bool(body.logit_bias),
        "tools": bool(getattr(body, "tools", None)),
    }
    for key, used in unsupported.items():
        if used:
            raise ServeError(400, f"`{key}` is not supported by this server; leave it out", code="unsupported_field",
                             param=key)


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise ServeError(400, f"`stop` has {len(stops)} strings; at most {MAX_STOP}", code="invalid_value",
                         param="stop")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise ServeError(400, f"`stop` strings must be 1 to {MAX_STOP_CHARS} characters long", code="invalid_value",
                             param="stop")
    return stops


class _EventStream(StreamingResponse):
    """SSE that calls `on_close` however it ends, and notices a client that leaves even between two events."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def run(func) -> None:
                    with contextlib.suppress(OSError):
                        await func()
                    tg.cancel_scope.cancel()

                tg.start_soon(run, lambda: self.stream_response(send))
                await run(lambda: self.listen_for_disconnect(receive))
        finally:
            self.on_close()


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class _Job:
    """The engine requests behind one HTTP request (one per prompt and choice), their events in one queue."""

    def __init__(self, state, prompts: list[list[int]], adapter, sampling: list[Sampling]):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.requests = [GenRequest(ids, adapter, s, self._emitter(i)) for i, (ids, s) in
                         enumerate(zip(prompts, sampling))]
        self.state = state

    def _emitter(self, i: int):
        return lambda event: self.loop.call_soon_threadsafe(self.events.put_nowait, (i, event))

    def submit(self) -> None:
        try:
            for r in self.requests:
                self.state.engine.submit(r)
        except ServeError:
            self.cancel()
            raise

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()


class _Reply:
    """What a completion needs to build OpenAI's objects: kind, id, model name, and per choice text/finish."""

    def __init__(self, chat: bool, model: str, n_choices: int):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text = [""] * n_choices
        self.finish: list[str | None] = [None] * n_choices
        self.prompt_tokens = [0] * n_choices
        self.completion_tokens = [0] * n_choices

    def usage(self, prompt_counts: list[int]) -> dict:
        prompt = sum(prompt_counts)
        completion = sum(self.completion_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk(self, i: int, text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def final(self, prompt_counts: list[int]) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(self.text, self.finish))]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(self.text, self.finish))]
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage(prompt_counts)}


def _apply(reply: _Reply, i: int, event: tuple) -> ServeError | None:
    if event[0] == "text":
        reply.text[i] += event[1]
    elif event[0] == "done":
        reply.finish[i], reply.prompt_tokens[i], reply.completion_tokens[i] = event[1], event[2], event[3]
    else:
        return event[1]
    return None


def create_app(state, api_key: str | None = None, allow_runtime_lora: bool = False,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """The ASGI app over a started-or-not `ServerState` (`tunelab.serve.server`); the engine runs while it does."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        try:
            yield
        finally:
            state.engine.stop()

    app = FastAPI(title="tunelab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(ServeError)
    async def _serve_error(request, e: ServeError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(ServeError(e.status_code, message, code=str(e.status_code)))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("unexpected error")
        return error_response(ServeError(500, "internal server error (see the server log)", code="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": state.engine.running, "waiting": state.engine.pending}

    @app.get("/v1/models")
    async def models():
        names = await run_in_threadpool(state.registry.names)
        return {"object": "list", "data": [state.card(None)] + [state.card(n) for n in names]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != state.base_name:
            await run_in_threadpool(state.registry.resolve, name)
        return state.card(None if name == state.base_name else name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = _parse(CompletionBody, await read_json(request, max_body_bytes))
        return await _generate(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = _parse(ChatBody, await read_json(request, max_body_bytes))
        return await _generate(request, body, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = _parse(LoadBody, await read_json(request, max_body_bytes))
        _runtime_allowed()
        await run_in_threadpool(state.registry.load, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = _parse(UnloadBody, await read_json(request, max_body_bytes))
        _runtime_allowed()
        check_name(body.lora_name, "lora_name")
        await run_in_threadpool(state.registry.unload, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def _runtime_allowed() -> None:
        if not allow_runtime_lora:
            raise ServeError(403, "loading and unloading adapters at run time is off; start the server with "
                                  "--allow-runtime-lora to allow it", code="runtime_lora_disabled")

    async def _generate(request: Request, body: _Generation, chat: bool):
        _refuse_unsupported(body)
        stops = _stops(body.stop)
        adapter = await run_in_threadpool(state.registry.resolve, body.model)
        prompts = await run_in_threadpool(state.chat_prompt if chat else state.completion_prompts, body, adapter)
        n = body.n or 1
        limit = body.max_completion_tokens if chat and body.max_completion_tokens is not None else body.max_tokens
        samplings, choice_prompts = [], []
        for ids in prompts:
            max_tokens = state.check_length(ids, limit, None if chat else 16, "messages" if chat else "prompt")
            stop_ids = set(state.stop_ids(adapter, chat))
            for j in range(n):
                seed = None if body.seed is None else body.seed + j
                temperature = 1.0 if body.temperature is None else body.temperature
                samplings.append(Sampling(max_tokens, temperature, 1.0 if body.top_p is None else body.top_p,
                                          seed, stops, stop_ids, min(body.min_tokens or 0, max_tokens)))
                choice_prompts.append(ids)
        job = _Job(state, choice_prompts, adapter, samplings)
        reply = _Reply(chat, body.model, len(choice_prompts))
        counts = [len(ids) for ids in choice_prompts]
        job.submit()
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(request, job, reply, counts, usage)
        try:
            done = 0
            while done < len(choice_prompts):
                try:
                    i, event = await asyncio.wait_for(job.events.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return PlainTextResponse("client disconnected", status_code=499)
                    continue
                if (err := _apply(reply, i, event)) is not None:
                    raise err
                done += event[0] == "done"
            return reply.final(counts)
        finally:
            job.cancel()

    async def _stream(request: Request, job: _Job, reply: _Reply, counts: list[int], usage: bool):
        first = await job.events.get()  # an error before anything was generated is still a plain HTTP error
        if first[1][0] == "error":
            job.cancel()
            raise first[1][1]

        async def events():
            if reply.chat:
                for i in range(len(counts)):
                    yield _sse(reply.chunk(i, role=True))
            done, item = 0, first
            while True:
                i, event = item
                if event[0] == "error":
                    err = event[1]
                    yield _sse(error_body(err.status, str(err), err.type, err.code, err.param))
                    break
                _apply(reply, i, event)
                if event[0] == "text":
                    yield _sse(reply.chunk(i, event[1]))
                else:
                    yield _sse(reply.chunk(i, finish=event[1]))
                    done += 1
                    if done == len(counts):
                        if usage:
                            yield _sse({**reply.chunk(0), "choices": [], "usage": reply.usage(counts)})
                        break
                item = await job.events.get()
            yield _sse("[DONE]")

        return _EventStream(events(), on_close=job.cancel)

    return app


class _Guard:
    """ASGI middleware: the Bearer key on every route but /health (401), and a Content-Length limit (413)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        problem = None
        if self.digest is not None and scope["path"] != "/health":
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not given or not secrets.compare_digest(hashlib.sha256(given).digest(), self.digest):
                problem = ServeError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`"
                                          " with the key the server was started with", code="invalid_api_key")
        length = headers.get(b"content-length")
        if problem is None and length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                too_big = False
            if too_big:
                problem = ServeError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                                     code="request_too_large")
        if problem is not None:
            return await error_response(problem)(scope, receive, send)
        await self.app(scope, receive, send)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt text, started with the tokenizer's BOS when its rule adds one (`bos_ids`)."""
    return with_bos(tokenizer(text, add_special_tokens=False)["input_ids"], bos_ids(tokenizer))


def render_chat(tokenizer, template: str, messages: list[Message]) -> str:
    """The prompt a chat template renders for the next assistant turn; 400 if the template refuses it."""
    turns = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        turns.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    try:
        return prompt_for_generation(turns, tokenizer, template)
    except TunelabError as e:
        raise ServeError(400, f"`messages`: {e}", code="invalid_value", param="messages") from None
