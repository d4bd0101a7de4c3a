"""LLM-as-judge: verdict parsing, order-swap bookkeeping with scripted, served and local judges, URL errors."""

import contextlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluate import load_eval_config
from tunelab.evaluate.judge import (
    LocalJudge,
    URLJudge,
    endpoint_url,
    judge_pairwise,
    judge_single,
    pair_outcome,
    parse_rating,
    parse_verdict,
)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        text = self.server.respond(body["messages"])
        out = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def openai_server(respond):
    """A minimal OpenAI-compatible /v1/chat/completions server on a free localhost port, in a thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.respond, server.requests = respond, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def answers_in(messages) -> tuple[str, str]:
    text = messages[-1]["content"]
    a = re.search(r"\[The Start of Assistant A's Answer\]\n(.*?)\n\[The End", text, re.S).group(1)
    b = re.search(r"\[The Start of Assistant B's Answer\]\n(.*?)\n\[The End", text, re.S).group(1)
    return a, b


def prefers_good(messages) -> str:
    """A scripted judge: the answer that says "good" wins; both or neither: it picks A (a position bias)."""
    a, b = answers_in(messages)
    if ("good" in a) == ("good" in b):
        return "Both are alike. [[A]]" if "good" in a else "A tie. [[C]]"
    return "Verdict: [[A]]" if "good" in a else "Verdict: [[B]]"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QUESTIONS = ["q1", "q2", "q3", "q4"]
MODEL = ["good 1", "bad", "good 3", "meh"]
BASELINE = ["bad", "good 2", "good", "meh"]


def test_parsing():
    assert [parse_verdict(t) for t in ("[[A]]", "so [[B]].", "[[C]]", "[[A]] or [[B]]", "A", "[[a]]")] == \
        ["A", "B", "C", None, None, None]
    assert parse_verdict("[[B]] ... final: [[B]]") == "B"
    assert [parse_rating(t) for t in ("Rating: [[7]]", "[[8.5]]", "rating [6]", "[[11]]", "[[0]]", "good")] == \
        [7.0, 8.5, 6.0, None, None, None]


def test_order_swap_outcomes():
    assert pair_outcome("A", "B") == ("win", True)  # model first, then model second: both pick the model
    assert pair_outcome("B", "A") == ("loss", True)
    assert pair_outcome("C", "C") == ("tie", True)
    assert pair_outcome("A", "A") == ("tie", False)  # always the first answer: position bias, counted as a tie
    assert pair_outcome("B", "B") == ("tie", False)
    assert pair_outcome("A", "C") == ("tie", False)
    assert pair_outcome(None, "A") == ("unparseable", None)


def test_pairwise_bookkeeping_through_an_endpoint():
    with openai_server(prefers_good) as (server, url):
        r = judge_pairwise(URLJudge(url, model="judge-x"), QUESTIONS, MODEL, BASELINE)
    assert len(server.requests) == 8 and all(p == "/v1/chat/completions" for p, _ in server.requests)
    bodies = [b for _, b in server.requests]
    assert all(b["temperature"] == 0 and b["model"] == "judge-x" for b in bodies)
    assert [answers_in(b["messages"]) for b in bodies[:2]] == [("good 1", "bad"), ("bad", "good 1")]  # swapped
    assert [s["outcome"] for s in r["samples"]] == ["win", "loss", "tie", "tie"]
    assert [s["consistent"] for s in r["samples"]] == [True, True, False, True]
    assert r["metrics"] == {"win_rate": 0.5, "wins": 1, "ties": 2, "losses": 1, "unparseable": 0,
                            "position_consistency": 0.75}
    assert r["inconsistent"] == 1 and r["unparseable_outputs"] == []


def test_biased_and_unparseable_judges():
    biased = judge_pairwise(lambda chats: ["[[A]]"] * len(chats), QUESTIONS, MODEL, BASELINE)
    assert biased["metrics"]["ties"] == 4 and biased["metrics"]["position_consistency"] == 0
    replies = iter(["[[A]]", "I cannot decide", "[[A]]", "[[B]]", "???", "!!!", "[[C]]", "[[C]]"])
    r = judge_pairwise(lambda chats: [next(replies) for _ in chats], QUESTIONS, MODEL, BASELINE)
    m = r["metrics"]
    assert (m["unparseable"], m["wins"], m["ties"], m["losses"]) == (2, 1, 1, 0)  # never dropped, never a tie
    assert r["unparseable_outputs"] == ["I cannot decide", "???", "!!!"]
    assert m["position_consistency"] == 1.0 and m["win_rate"] == 0.75
    assert r["samples"][0]["judge_outputs"] == ["[[A]]", "I cannot decide"]


def test_single_grading_counts_unparseable_ratings():
    replies = iter(["Rating: [[7]]", "[[11]]", "no idea", "Rating: [[9]]"])
    r = judge_single(lambda chats: [next(replies) for _ in chats], QUESTIONS, MODEL)
    assert r["metrics"] == {"mean_rating": 8.0, "unparseable": 2} and r["graded"] == 2
    assert r["unparseable_outputs"] == ["[[11]]", "no idea"]


def test_real_local_judge_loaded_and_served(base_model_dir):
    judge = LocalJudge(str(base_model_dir), max_tokens=6)
    r = judge_pairwise(judge, QUESTIONS[:3], MODEL[:3], BASELINE[:3])
    # the bookkeeping, not the judge's wisdom: two verdicts per pair, all counted, raw outputs kept
    outputs = [o for s in r["samples"] for o in s["judge_outputs"]]
    assert len(outputs) == 6
    m = r["metrics"]
    assert m["wins"] + m["ties"] + m["losses"] + m["unparseable"] == 3
    assert m["unparseable"] == sum(None in s["verdicts"] for s in r["samples"])
    assert len(r["unparseable_outputs"]) == sum(parse_verdict(o) is None for o in outputs)
    with openai_server(lambda messages: judge([messages])[0]) as (server, url):  # the same model, served
        served = judge_pairwise(URLJudge(url), QUESTIONS[:3], MODEL[:3], BASELINE[:3])
    assert [s["judge_outputs"] for s in served["samples"]] == [s["judge_outputs"] for s in r["samples"]]
    assert served["metrics"] == m


def test_unreachable_or_slow_judge_url_is_a_clear_error():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    judge = URLJudge(url, timeout=2)
    with pytest.raises(TunelabError, match=re.escape(f"judge endpoint {url}/chat/completions: cannot connect")):
        judge.check()
    with pytest.raises(TunelabError, match=re.escape(f"judge endpoint {url}/chat/completions: no answer")):
        judge([[{"role": "user", "content": "hi"}]])

    def slow(messages):
        time.sleep(1.5)
        return "[[A]]"

    with openai_server(slow) as (_, url), pytest.raises(TunelabError, match=r"timed out; timeout 0.3s"):
        URLJudge(url, timeout=0.3)([[{"role": "user", "content": "hi"}]])
    assert endpoint_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert endpoint_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_cli_judge_url_error_and_pairwise_needs_two_models(tmp_path, base_model_dir, capsys):
    from tunelab.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"instruction": "Say hi"}) + "\n", encoding="utf-8")
    url = f"http://127.0.0.1:{closed_port()}"
    code = main(["eval", "--models", f"{base_model_dir},{base_model_dir}", "--task", f"judge:{prompts}",
                 "--judge-url", url, f"out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: judge endpoint {url}/v1/chat/completions: cannot connect")
    code = main(["eval", "--models", str(base_model_dir), "--task", f"judge:{prompts}", "--judge-url", url,
                 f"out_dir={tmp_path}"])
    assert code == 2 and "pass at least two with --models" in capsys.readouterr().err


class _NotFound(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming): something listens, but not a chat endpoint
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(404)
        self.send_header("Content-Length", "9")
        self.end_headers()
        self.wfile.write(b"not found")

    def log_message(self, *args):
        pass


def test_every_judge_is_checked_before_any_model_loads(tmp_path, base_model_dir, monkeypatch):
    import tunelab.evaluate.suite as suite

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the judge was checked")

    monkeypatch.setattr(suite, "load_tuned", no_loading)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"instruction": "Say hi"}) + "\n", encoding="utf-8")
    models = f"{base_model_dir},{base_model_dir}"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        cfg = load_eval_config(None, [f"out_dir={tmp_path}"], models, [f"judge:{prompts}"], url)
        with pytest.raises(TunelabError, match=re.escape(f"judge endpoint {url}/chat/completions: HTTP 404")):
            suite.run_eval(cfg)
    finally:
        server.shutdown()
        server.server_close()
    not_a_model = tmp_path / "judge"
    not_a_model.mkdir()
    cfg = load_eval_config(None, [f"out_dir={tmp_path}", f"tasks.0.judge={not_a_model}"], models,
                           [f"judge:{prompts}"])
    with pytest.raises(TunelabError, match=f"judge {re.escape(str(not_a_model))}: .* has no config.json"):
        suite.run_eval(cfg)
