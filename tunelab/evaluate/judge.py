"""LLM-as-judge, MT-bench style: pairwise comparison with the answer order swapped, or 1-10 grading.

Judges: an OpenAI-compatible chat endpoint (`URLJudge`: POST `<url>/v1/chat/completions` with urllib, at
temperature 0; an unreachable URL or a timeout is an error naming the URL), or a local model or adapter
directory (`LocalJudge`: tunelab's batched greedy generation with the judge's own chat template). A judge is
any callable from a list of chats to a list of replies, so tests and users can plug in their own.

Pairwise (FastChat's `pair-v2` prompt): each prompt is judged twice, with the evaluated model's answer as
assistant A and then as assistant B; the verdicts `[[A]]`, `[[B]]`, `[[C]]` (tie) are mapped back to the
models, and two verdicts that disagree count as a tie (FastChat's "inconsistent"). Reported from the
evaluated model's side: wins, ties, losses, win rate (wins + ties/2) / (wins + ties + losses), and the
position-consistency rate (the share of parsed pairs whose two verdicts agree). A verdict with no single
`[[A]]`/`[[B]]`/`[[C]]` is unparseable: its pair is counted apart (`unparseable`), kept with the judge's raw
outputs, never dropped silently or turned into a tie.
Single (`single-v1`): the judge rates each answer "Rating: [[k]]" (FastChat's regex and its fallback),
k in 1..10; unparseable or out-of-range ratings are counted and kept with the raw output.
Not supported: reference-guided grading for maths, multi-turn questions, AlpacaEval's length control.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tunelab.data.chat import chat_template_for
from tunelab.errors import ConfigError, ModelError, TunelabError
from tunelab.serve.generate import answer_chats, load_tuned, resolve_base

Chat = list[dict[str, str]]
Judge = Callable[[list[Chat]], list[str]]

PAIR_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user question displayed below. Choose the assistant that follows the user's instructions and answers "
    "the user's question better, considering helpfulness, relevance, accuracy, depth and level of detail. Begin "
    "your evaluation by comparing the two responses and give a short explanation. Avoid any position biases and "
    "ensure that the order in which the responses were presented does not influence your decision. Do not allow "
    "the length of the responses to influence your evaluation. Do not favor certain names of the assistants. Be "
    "as objective as possible. After providing your explanation, output your final verdict by strictly following "
    'this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.')
PAIR_USER = ("[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's "
             "Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]")
SINGLE_SYSTEM = "You are a helpful assistant."
SINGLE_USER = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, "
    'you must rate the response on a scale of 1 to 10 by strictly following this format: "[[rating]]", for '
    'example: "Rating: [[5]]".\n\n[Question]\n{question}\n\n[The Start of Assistant\'s Answer]\n{answer}\n'
    "[The End of Assistant's Answer]")

VERDICT = re.compile(r"\[\[([ABC])\]\]")
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")


def pair_chat(question: str, a: str, b: str) -> Chat:
    """The judge's conversation comparing answer `a` (assistant A) with answer `b` (assistant B)."""
    return [{"role": "system", "content": PAIR_SYSTEM},
            {"role": "user", "content": PAIR_USER.format(question=question, a=a, b=b)}]


def single_chat(question: str, answer: str) -> Chat:
    """The judge's conversation grading one answer from 1 to 10."""
    return [{"role": "system", "content": SINGLE_SYSTEM},
            {"role": "user", "content": SINGLE_USER.format(question=question, answer=answer)}]


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "C" (tie) when the output names exactly one verdict, else None (unparseable)."""
    found = set(VERDICT.findall(text))
    return found.pop() if len(found) == 1 else None


def parse_rating(text: str) -> float | None:
    """The rating in "[[k]]" (or "[k]"), when it is a number from 1 to 10, else None (unparseable)."""
    m = RATING.search(text) or RATING_FALLBACK.search(text)
    if m is None:
        return None
    value = float(m.group(1))
    return value if 1 <= value <= 10 else None


def pair_outcome(first: str | None, second: str | None) -> tuple[str, bool | None]:
    """(win/tie/loss/unparseable for the model, whether the verdicts agree) from the two orders.

    `first` judged (model = A, baseline = B); `second` judged the swapped order (baseline = A, model = B).
    """
    if first is None or second is None:
        return "unparseable", None
    one = {"A": "win", "B": "loss", "C": "tie"}[first]
    two = {"A": "loss", "B": "win", "C": "tie"}[second]
    return (one, True) if one == two else ("tie", False)


def judge_pairwise(judge: Judge, questions: list[str], answers: list[str], baseline: list[str]) -> dict:
    """Wins, ties and losses of `answers` against `baseline`, each pair judged in both orders."""
    chats = [c for q, a, b in zip(questions, answers, baseline) for c in (pair_chat(q, a, b), pair_chat(q, b, a))]
    outputs = judge(chats)
    if len(outputs) != len(chats):
        raise TunelabError(f"the judge returned {len(outputs)} replies for {len(chats)} requests")
    samples = []
    for i, (q, a, b) in enumerate(zip(questions, answers, baseline)):
        raw = outputs[2 * i:2 * i + 2]
        verdicts = [parse_verdict(o) for o in raw]
        outcome, consistent = pair_outcome(*verdicts)
        samples.append({"question": q, "answer": a, "baseline": b, "verdicts": verdicts, "outcome": outcome,
                        "consistent": consistent, "judge_outputs": raw})
    count = {k: sum(s["outcome"] == k for s in samples) for k in ("win", "tie", "loss", "unparseable")}
    parsed = len(samples) - count["unparseable"]
    consistent = sum(bool(s["consistent"]) for s in samples)
    decided = count["win"] + count["tie"] + count["loss"]
    metrics = {"win_rate": (count["win"] + 0.5 * count["tie"]) / decided if decided else None,
               "wins": count["win"], "ties": count["tie"], "losses": count["loss"],
               "unparseable": count["unparseable"],
               "position_consistency": consistent / parsed if parsed else None}
    return {"metrics": metrics, "pairs": len(samples), "inconsistent": parsed - consistent,
            "unparseable_outputs": [o for s in samples if s["outcome"] == "unparseable" for o in s["judge_outputs"]
                                    if parse_verdict(o) is None],
            "samples": samples}


def judge_single(judge: Judge, questions: list[str], answers: list[str]) -> dict:
    """Mean 1-10 rating of `answers`; unparseable ratings are counted and kept."""
    outputs = judge([single_chat(q, a) for q, a in zip(questions, answers)])
    ratings = [parse_rating(o) for o in outputs]
    valid = [r for r in ratings if r is not None]
    samples = [{"question": q, "answer": a, "rating": r, "judge_output": o}
               for q, a, r, o in zip(questions, answers, ratings, outputs)]
    return {"metrics": {"mean_rating": sum(valid) / len(valid) if valid else None,
                        "unparseable": len(ratings) - len(valid)},
            "graded": len(valid), "unparseable_outputs": [o for o, r in zip(outputs, ratings) if r is None],
            "samples": samples}


# ---------------------------------------------------------------------------------------------------------
# judges


class URLJudge:
    """An OpenAI-compatible `/v1/chat/completions` endpoint, asked one chat at a time at temperature 0."""

    def __init__(self, url: str, model: str = "judge", timeout: float = 120.0, max_tokens: int = 256,
                 api_key_env: str | None = None):
        self.url = endpoint_url(url)
        self.model, self.timeout, self.max_tokens = model, timeout, max_tokens
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ConfigError(f"api_key_env: the environment variable {api_key_env} is not set")

    def check(self) -> None:
        """Fail early, naming the URL, when the endpoint does not answer a chat as the judge will be asked.

        First a connection to its host and port, then one real chat completion (one token, the same URL, model,
        key and proxy settings as the judging), so a wrong path, model name or key fails before any model loads.
        """
        parts = urllib.parse.urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        proxied = urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(parts.hostname)
        if not proxied:  # through a proxy only the request below tells
            try:
                socket.create_connection((parts.hostname, port), timeout=min(self.timeout, 10)).close()
            except OSError as e:
                raise TunelabError(f"judge endpoint {self.url}: cannot connect ({e.strerror or e}); start the "
                                   f"server or fix --judge-url / judge_url") from None
        self.ask([{"role": "user", "content": "Reply with OK."}], max_tokens=1)

    def __call__(self, chats: list[Chat]) -> list[str]:
        return [self.ask(c) for c in chats]

    def ask(self, chat: Chat, max_tokens: int | None = None) -> str:
        """The endpoint's reply to one chat."""
        body = json.dumps({"model": self.model, "messages": chat, "temperature": 0,
                           "max_tokens": max_tokens or self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:200]
            raise TunelabError(f"judge endpoint {self.url}: HTTP {e.code} {e.reason} ({detail}); check the URL "
                               f"and judge_model") from None
        except (urllib.error.URLError, OSError) as e:  # refused, unknown host, timeout
            reason = getattr(e, "reason", e)
            raise TunelabError(f"judge endpoint {self.url}: no answer ({reason}; timeout {self.timeout:g}s); start "
                               f"the server or fix --judge-url / judge_url") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TunelabError(f"judge endpoint {self.url}: the reply is not JSON; is it an OpenAI-compatible "
                               f"/v1/chat/completions endpoint?") from None
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise TunelabError(f"judge endpoint {self.url}: unexpected reply {str(data)[:200]!r}; expected "
                               f"choices[0].message.content") from None


def endpoint_url(url: str) -> str:
    """The chat-completions URL of a server given as `http://host:port`, `.../v1` or the full path."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"judge_url {url!r}: expected an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1")
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def check_local_judge(model_ref: str) -> None:
    """Fail early, before any model loads, when a local judge is not a model (or adapter with its base) directory."""
    base, adapter = resolve_base(model_ref, None)
    for d, what in ((base, "model"), (adapter, "adapter")):
        name = "config.json" if what == "model" else "adapter_config.json"
        if d is not None and not (Path(d) / name).is_file():
            raise ModelError(f"judge {model_ref}: {d} has no {name}, so it is not a {what} directory; give judge: "
                             f"a model directory (or an adapter directory), or judge_url: an endpoint")


class LocalJudge:
    """A local model or adapter directory as the judge: batched greedy replies with its chat template."""

    def __init__(self, model_ref: str, max_tokens: int = 256, batch_size: int = 8, template: str | None = None):
        self.model, self.tokenizer, _ = load_tuned(model_ref, precision="auto")
        self.template = chat_template_for(self.tokenizer, template)
        self.max_tokens, self.batch_size = max_tokens, batch_size

    def __call__(self, chats: list[Chat]) -> list[str]:
        return answer_chats(self.model, self.tokenizer, chats, self.template, max_new_tokens=self.max_tokens,
                            batch_size=self.batch_size)
