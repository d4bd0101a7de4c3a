"""Generators for self-instruct: a local model (tunelab's batched generation) or an OpenAI-compatible endpoint.

A generator is called with a list of prompts and a seed and returns one `Reply` per prompt: the text and whether
it stopped at the token limit (so its last task may be cut). Each prompt is sent as one user turn of a chat.

The endpoint client is the official `openai` package (`/v1/chat/completions`), with a timeout and retries on
connection errors, timeouts, 429 and 5xx (its exponential back-off, honouring Retry-After). A failure after the
retries, or a reply that is not a chat completion, raises `GeneratorError` naming the URL and the cause.
The local generator imports the model stack lazily: `tunelab.data` itself stays free of models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tunelab.errors import ConfigError, TunelabError


class GeneratorError(TunelabError):
    """The generator failed: an endpoint that cannot be reached, answers with an error or with no completion."""


@dataclass
class Reply:
    """One completion: its text, and True when it stopped at the token limit (its last item may be cut)."""

    text: str
    truncated: bool


def base_url(url: str) -> str:
    """The OpenAI base URL (`.../v1`) of a server given as `http://host:port`, `.../v1` or the full chat path."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"generator_url {url!r}: expected an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1")
    url = url.rstrip("/")
    for tail in ("/chat/completions", "/completions"):
        if url.endswith(tail):
            url = url[: -len(tail)]
    return url if url.endswith("/v1") else url + "/v1"


class EndpointGenerator:
    """Chat completions from an OpenAI-compatible server, one request per prompt."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, max_tokens: int = 2048, temperature: float = 1.0, top_p: float = 1.0,
                 stop: list[str] | None = None, workers: int = 1):
        import openai

        self.url = base_url(url)
        key = api_key or os.environ.get("OPENAI_API_KEY") or "unused"  # a local server needs none
        self.client = openai.OpenAI(base_url=self.url, api_key=key, timeout=timeout, max_retries=retries)
        self.timeout, self.retries = timeout, retries
        self.max_tokens, self.temperature, self.top_p, self.stop = max_tokens, temperature, top_p, stop
        self.workers = workers
        self.model = model or self._first_model()

    def describe(self) -> str:
        return f"endpoint {self.url} (model {self.model})"

    def _first_model(self) -> str:
        """The first model the server lists (GET /v1/models), for a user who did not name one."""
        models = self._call(lambda: self.client.models.list(), "GET /models")
        try:
            return next(iter(models)).id
        except (StopIteration, AttributeError, TypeError):
            raise GeneratorError(f"generator endpoint {self.url}: GET /models lists no model; name one with "
                                 f"--model (generator_model=)") from None

    def _call(self, fn, what: str):
        import openai

        try:
            return fn()
        except openai.APIStatusError as e:
            detail = " ".join(str(getattr(e.response, "text", "") or e.message).split())[:200]
            raise GeneratorError(f"generator endpoint {self.url}: {what} answered HTTP {e.status_code} ({detail}) "
                                 f"after {self.retries} retries; check the URL, --model and --api-key") from None
        except openai.APITimeoutError:
            raise GeneratorError(f"generator endpoint {self.url}: {what} timed out ({self.timeout:g}s, "
                                 f"{self.retries} retries); raise timeout= or check the server") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise GeneratorError(f"generator endpoint {self.url}: cannot connect ({type(cause).__name__}: "
                                 f"{cause}) after {self.retries} retries; start the server or fix "
                                 f"--generator-url") from None
        except openai.APIResponseValidationError as e:
            raise GeneratorError(f"generator endpoint {self.url}: {what} sent a reply that is not an OpenAI "
                                 f"response ({e.message}); is it an OpenAI-compatible server?") from None
        except openai.OpenAIError as e:  # anything else the client raises (e.g. a body that is not JSON)
            raise GeneratorError(f"generator endpoint {self.url}: {what} failed ({type(e).__name__}: {e})") from None

    def __call__(self, prompts: list[str], seed: int = 0) -> list[Reply]:
        """One reply per prompt, in prompt order; `workers` requests at a time (the client is thread-safe)."""
        if self.workers <= 1:
            return [self._complete(p, seed + i) for i, p in enumerate(prompts)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self._complete, prompts, [seed + i for i in range(len(prompts))]))

    def _complete(self, prompt: str, seed: int) -> Reply:
        extra = {"stop": self.stop} if self.stop else {}
        response = self._call(lambda: self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": prompt}], max_tokens=self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, seed=seed, **extra), "POST /chat/completions")
        if isinstance(response, str):  # the client hands over a body it could not parse as JSON
            raise GeneratorError(f"generator endpoint {self.url}: the reply is not JSON ({response[:100]!r}); is it "
                                 f"an OpenAI-compatible server?")
        try:
            choice = response.choices[0]
            text = choice.message.content
        except (AttributeError, IndexError, TypeError):
            raise GeneratorError(f"generator endpoint {self.url}: unexpected reply {str(response)[:200]!r}; "
                                 f"expected choices[0].message.content (an OpenAI chat completion)") from None
        if not isinstance(text, str):
            raise GeneratorError(f"generator endpoint {self.url}: the reply has no text (choices[0].message."
                                 f"content is {type(text).__name__}); is it an OpenAI-compatible server?")
        return Reply(text=text, truncated=getattr(choice, "finish_reason", None) == "length")


def api_key_from(api_key: str | None, api_key_env: str | None) -> str | None:
    """The key given on the command line, else the one in the environment variable the recipe names (else the
    client takes $OPENAI_API_KEY, and sends a placeholder when that is unset too)."""
    if api_key or not api_key_env:
        return api_key
    value = os.environ.get(api_key_env)
    if not value:
        raise ConfigError(f"api_key_env: the environment variable {api_key_env} is not set")
    return value


class LocalGenerator:
    """A local model or adapter directory: batched sampling with its chat template (tunelab.serve.generate)."""

    def __init__(self, model_ref: str, max_tokens: int = 2048, temperature: float = 1.0, top_p: float = 1.0,
                 batch_size: int = 8):
        from tunelab.data.chat import chat_template_for
        from tunelab.serve.generate import load_tuned

        self.model_ref = model_ref
        self.model, self.tokenizer, _ = load_tuned(model_ref, precision="auto")
        self.template = chat_template_for(self.tokenizer)
        self.max_tokens, self.temperature, self.top_p, self.batch_size = max_tokens, temperature, top_p, batch_size

    def describe(self) -> str:
        return f"local model {self.model_ref}"

    def __call__(self, prompts: list[str], seed: int = 0) -> list[Reply]:
        from tunelab.serve.generate import answer_chats

        texts = answer_chats(self.model, self.tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                             self.template, max_new_tokens=self.max_tokens, temperature=self.temperature,
                             top_p=self.top_p, seed=seed, batch_size=self.batch_size)
        # answer_chats returns text only: a reply re-encoded to the token limit is taken as cut there
        return [Reply(text=t, truncated=len(self.tokenizer(t, add_special_tokens=False)["input_ids"])
                      >= self.max_tokens - 1) for t in texts]
