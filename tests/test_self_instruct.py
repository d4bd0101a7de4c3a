"""tunelab data self-instruct against a scripted OpenAI-compatible fake server: every filter, error path and resume.

The fake (stdlib http.server on a free local port) answers GET /v1/models and POST /v1/chat/completions from a
script, one item per request (retries included): a reply text, an HTTP status, a delay longer than the client's
timeout, a body that is not JSON, or a hang; it records every prompt it was sent.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.data.records import read_examples
from tunelab.data.self_instruct import (
    SelfInstructConfig,
    build_prompt,
    parse_task,
    read_seed_tasks,
    run_self_instruct,
    split_reply,
)

SEEDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat well, sleep enough and exercise."},
    {"instruction": "Translate the sentence into French.", "input": "I like apples.", "output": "J'aime les pommes."},
    {"instruction": "Is the number prime or composite?", "input": "17", "output": "Prime."},
    {"instruction": "Suggest a name for a bakery that sells only bread.", "input": "", "output": "The Daily Loaf."},
]


def task(n: int, instruction: str, inp: str = "<noinput>", output: str = "An answer.") -> str:
    return f"{n}. Instruction: {instruction}\n{n}. Input:\n{inp}\n{n}. Output:\n{output}\n###\n"


# one reply: the model continues "5. Instruction:" (4 in-context tasks), each task hitting one filter
GOOD_1 = "Summarise the story of a famous novel in two sentences."
GOOD_2 = "List four ways to reduce the energy used by a household."
SCRIPTED = (" " + GOOD_1 + "\n5. Input:\nPride and Prejudice\n5. Output:\nA young woman judges a proud man.\n###\n"
            + task(6, "Summarise the story of a famous novel in two short sentences.")  # similar to GOOD_1
            + task(7, "Give three tips for staying healthy.")  # similar to a seed (ROUGE-L 1.0)
            + task(8, "Draw a picture of a cat sitting on a mat.")  # blacklist
            + task(9, "Write a program that prints the first ten primes.")  # program
            + task(10, "\"Quoted\" instructions are not allowed here at all.")  # punctuation_start
            + task(11, "Écris une phrase sur la mer et le vent.")  # non_ascii_start
            + task(12, "Sort it.")  # too_short
            + task(13, "Explain recursion to a child.", output="")  # empty
            + task(13, "Repeat after me the following words.", inp="Hello there", output="Hello there")  # copies
            + "14. This block has no instruction structure at all\n###\n"  # malformed
            + task(15, GOOD_2, output="Turn off lights, insulate, use LEDs, line-dry clothes.")
            + "16. Instruction: Describe the water cycle in simple words\n16. Input:\n<noinput>\n16. Out")  # cut


class FakeOpenAI(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: list):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script, self.prompts, self.keys, self.lock = list(script), [], [], threading.Lock()
        self.hit = threading.Event()  # set when a "hang" item is reached

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("retry-after-ms", "5")  # the client's retries wait 5 ms, not seconds
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout) and closed the connection
            pass

    def do_GET(self) -> None:
        self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}).encode())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server: FakeOpenAI = self.server
        with server.lock:
            item = server.script.pop(0) if server.script else {"status": 503}
            server.prompts.append(body["messages"][-1]["content"])
            server.keys.append(self.headers.get("Authorization"))
        if "hang" in item:
            server.hit.set()
            time.sleep(item["hang"])
            return
        if "sleep" in item:
            time.sleep(item["sleep"])
        if "status" in item:
            self._send(item["status"], b'{"error": {"message": "scripted failure"}}')
        elif "raw" in item:
            self._send(200, item["raw"].encode(), "text/plain")
        else:
            self._send(200, json.dumps({
                "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": item.get("finish", "stop"),
                             "message": {"role": "assistant", "content": item["text"]}}]}).encode())


@pytest.fixture()
def fake():
    servers = []

    def start(script):
        s = FakeOpenAI(script)
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture()
def seed_file(tmp_path):
    p = tmp_path / "seeds.jsonl"
    p.write_text("".join(json.dumps({"id": f"seed_task_{i}", "instruction": t["instruction"],
                                     "instances": [{"input": t["input"], "output": t["output"]}],
                                     "is_classification": False}) + "\n" for i, t in enumerate(SEEDS)))
    return p


def config(seed_file, out, url, **kw) -> SelfInstructConfig:
    base = dict(seed_tasks=str(seed_file), out=str(out), num=2, generator_url=url, prompt_seed_tasks=3,
                prompt_generated_tasks=1, prompts_per_round=1, retries=1, timeout=5, patience=3)
    return SelfInstructConfig(**{**base, **kw})


def test_every_filter_counts_and_the_output_is_alpaca(fake, seed_file, tmp_path):
    server = fake([{"text": SCRIPTED, "finish": "length"}])
    out = tmp_path / "gen" / "tasks.jsonl"
    report = run_self_instruct(config(seed_file, out, server.url, num=5, max_rounds=1))
    assert report["rejected"] == {"malformed": 1, "truncated": 1, "empty": 1, "output_copies_input": 1,
                                  "too_short": 1, "too_long": 0,
                                  "blacklist": 1, "program": 1, "punctuation_start": 1, "non_ascii_start": 1,
                                  "similar": 2}
    assert report["candidates"] == 13 and report["kept"] == 2 and report["acceptance_rate"] == pytest.approx(2 / 13)
    assert report["status"] == "stopped: max_rounds"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"instruction": GOOD_1, "input": "Pride and Prejudice",
                     "output": "A young woman judges a proud man."},
                    {"instruction": GOOD_2, "input": "", "output": "Turn off lights, insulate, use LEDs, line-dry "
                                                                   "clothes."}]
    similar = report["examples"]["similar"]
    assert similar[0]["most_similar"] == GOOD_1 and similar[1]["most_similar"] == SEEDS[0]["instruction"]
    assert similar[1]["rouge_l"] == 1.0
    # the output is what `tunelab finetune` reads: Alpaca records -> user/assistant chats
    examples = read_examples(out)
    assert examples[0].messages == [{"role": "user", "content": GOOD_1 + "\n\nPride and Prejudice"},
                                    {"role": "assistant", "content": "A young woman judges a proud man."}]
    saved = json.loads((tmp_path / "gen" / "tasks.report.json").read_text())
    assert saved["kind"] == "self-instruct" and saved["rejected"] == report["rejected"]


def test_finishes_at_num_with_a_summary(fake, seed_file, tmp_path, capsys):
    server = fake([{"text": SCRIPTED}])
    out = tmp_path / "tasks.jsonl"
    code = main(["data", "self-instruct", "--seed-tasks", str(seed_file), "--generator-url", server.url,
                 "--num", "2", "--out", str(out), "prompts_per_round=1", "retries=0"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "2/2 tasks kept" in text and "(finished)" in text and "similar 2" in text and "blacklist 1" in text
    assert len(out.read_text().splitlines()) == 2
    assert len(server.prompts) == 1  # the first reply held enough tasks
    prompt = server.prompts[0]
    # 3 seed tasks + 1 kept one (a seed while none is kept) in context
    assert prompt.count("###") == 5 and prompt.endswith("###\n5. Instruction:")
    assert main(["data", "self-instruct", "--seed-tasks", str(seed_file), "--generator-url", server.url,
                 "--num", "2", "--out", str(out), "prompts_per_round=1"]) == 0  # done already: no request
    assert len(server.prompts) == 1


def test_failing_endpoint_keeps_the_tasks_and_a_rerun_continues_as_if_never_stopped(fake, seed_file, tmp_path,
                                                                                   capsys):
    replies = [{"text": task(5, t)} for t in (GOOD_1, GOOD_2, "Name the planets of the solar system in order.",
                                              "Why do leaves change colour in autumn?")]
    reference = fake(list(replies))
    ref_out = tmp_path / "ref.jsonl"
    run_self_instruct(config(seed_file, ref_out, reference.url, num=4))
    # the same replies, but the endpoint fails (500, then 500 on the retry) before the third
    server = fake(replies[:2] + [{"status": 500}, {"status": 500}] + replies[2:])
    out = tmp_path / "tasks.jsonl"
    argv = ["data", "self-instruct", "--seed-tasks", str(seed_file), "--generator-url", server.url, "--num", "4",
            "--out", str(out), "prompts_per_round=1", "prompt_seed_tasks=3", "prompt_generated_tasks=1",
            "retries=1", "timeout=5", "patience=3"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 500" in err[0] and "2 task(s) kept" in err[0] and "rerun" in err[0], err
    assert len(out.read_text().splitlines()) == 2
    assert json.loads((tmp_path / "tasks.report.json").read_text())["status"] == "failed"
    assert main(argv) == 0
    assert out.read_text() == ref_out.read_text()
    # round r samples its prompt from (seed, r) and the kept tasks alone: the resumed run asked what the other asked
    assert [p for i, p in enumerate(server.prompts) if i not in (2, 3)] == reference.prompts


def test_timeouts_are_retried_then_reported(fake, seed_file, tmp_path, capsys):
    server = fake([{"sleep": 2, "text": "late"}, {"text": task(5, GOOD_2)}])
    out = tmp_path / "tasks.jsonl"
    report = run_self_instruct(config(seed_file, out, server.url, num=1, timeout=0.5, retries=1))
    assert report["kept"] == 1 and len(server.prompts) == 2
    server = fake([{"sleep": 2, "text": "late"}, {"sleep": 2, "text": "late"}])
    code = main(["data", "self-instruct", "--seed-tasks", str(seed_file), "--generator-url", server.url, "--num",
                 "1", "--out", str(tmp_path / "t2.jsonl"), "timeout=0.5", "retries=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "timed out (0.5s, 1 retries)" in err[0], err


@pytest.mark.parametrize("item, message", [
    ({"raw": "<html>not an API</html>"}, "the reply is not JSON"),
    ({"raw": '{"unexpected": true}'}, "unexpected reply"),
    ({"status": 404}, "HTTP 404"),
])
def test_misbehaving_endpoint_is_one_line(fake, seed_file, tmp_path, capsys, item, message):
    server = fake([item])
    out = tmp_path / "tasks.jsonl"
    code = main(["data", "self-instruct", "--seed-tasks", str(seed_file), "--generator-url", server.url, "--num",
                 "1", "--out", str(out), "retries=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: generator endpoint") and message in err[0], err
    assert not out.exists()  # nothing was kept: the report says it failed
    assert json.loads((tmp_path / "tasks.report.json").read_text())["status"] == "failed"


def test_unreachable_endpoint_is_one_line_and_writes_nothing(seed_file, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["data", "self-instruct", "--seed-tasks", str(seed_file), "--generator-url",
                 f"http://127.0.0.1:{port}", "--num", "1", "--out", str(tmp_path / "t.jsonl"), "retries=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot connect" in err[0] and f"127.0.0.1:{port}/v1" in err[0], err
    assert list(tmp_path.iterdir()) == [seed_file]


def test_repeating_nothing_new_stops_at_patience(fake, seed_file, tmp_path):
    server = fake([{"text": task(5, SEEDS[1]["instruction"])}] * 3)
    report = run_self_instruct(config(seed_file, tmp_path / "t.jsonl", server.url, num=3, patience=3))
    assert report["status"].startswith("stopped: 3 rounds") and report["kept"] == 0
    assert report["rejected"]["similar"] == 3 and (tmp_path / "t.jsonl").read_text() == ""


def test_killed_run_keeps_its_tasks_and_continues(fake, seed_file, tmp_path):
    tasks = [GOOD_1, GOOD_2, "Name the planets of the solar system in order."]
    replies = [{"text": task(5, t)} for t in tasks]
    server = fake(replies[:2] + [{"hang": 30}] + replies[2:])
    out = tmp_path / "tasks.jsonl"
    argv = ["data", "self-instruct", "--seed-tasks", str(seed_file), "--generator-url", server.url, "--num", "3",
            "--out", str(out), "prompts_per_round=1", "timeout=60"]
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from tunelab.cli import main; sys.exit(main())",
                             *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert server.hit.wait(60), proc.communicate()[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(out.read_text().splitlines()) == 2  # the two rounds before the kill are on disk
    assert main(argv) == 0
    rows = [json.loads(line)["instruction"] for line in out.read_text().splitlines()]
    assert rows == tasks


def test_cut_last_line_is_dropped_and_a_foreign_file_is_refused(fake, seed_file, tmp_path, capsys):
    server = fake([{"text": task(5, GOOD_1)}, {"text": task(5, GOOD_2)}])
    out = tmp_path / "tasks.jsonl"
    run_self_instruct(config(seed_file, out, server.url, num=1))
    with open(out, "a") as f:
        f.write('{"instruction": "half a rec')  # a kill in the middle of a write
    report = run_self_instruct(config(seed_file, out, server.url, num=2))
    assert report["kept"] == 2 and [json.loads(x)["instruction"] for x in out.read_text().splitlines()] == [
        GOOD_1, GOOD_2]
    other = tmp_path / "mine.jsonl"
    other.write_text('{"instruction": "x", "input": "", "output": "y"}\n')
    code = main(["data", "self-instruct", "--seed-tasks", str(seed_file), "--generator-url", server.url, "--num",
                 "1", "--out", str(other)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "was not written by tunelab data self-instruct" in err
    assert other.read_text() == '{"instruction": "x", "input": "", "output": "y"}\n'
    code = main(["data", "self-instruct", "--seed-tasks", str(seed_file), "--generator-url", server.url, "--num",
                 "2", "--out", str(out), "threshold=0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "threshold=0.7, now 0.5" in err


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "Do it well.", "instances": []}', "'instances' must be a non-empty list"),
    ('{"prompt": "x"}', "no 'instruction' string"),
    ('{"instruction": "Do it", "instances": [{"input": 3, "output": "y"}]}', "'input' must be a string"),
    ("{not json", "invalid JSON"),
])
def test_seed_file_in_a_wrong_format_names_file_and_line(seed_file, tmp_path, capsys, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(seed_file.read_text().splitlines()[0] + "\n\n" + line + "\n")
    code = main(["data", "self-instruct", "--seed-tasks", str(bad), "--generator-url", "http://127.0.0.1:9",
                 "--num", "1", "--out", str(tmp_path / "t.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{bad}:3:" in err[0] and message in err[0], err


def test_the_api_key_is_sent_and_never_written(fake, seed_file, tmp_path, monkeypatch):
    server = fake([{"text": task(5, GOOD_1)}, {"text": task(5, GOOD_2)}])
    out = tmp_path / "t.jsonl"
    assert main(["data", "self-instruct", "--seed-tasks", str(seed_file), "--generator-url", server.url, "--num",
                 "1", "--out", str(out), "--api-key", "sk-secret-1", "prompts_per_round=1"]) == 0
    monkeypatch.setenv("MY_KEY", "sk-secret-2")
    assert main(["data", "self-instruct", "--seed-tasks", str(seed_file), "--generator-url", server.url, "--num",
                 "2", "--out", str(out), "api_key_env=MY_KEY", "prompts_per_round=1"]) == 0
    assert server.keys == ["Bearer sk-secret-1", "Bearer sk-secret-2"]
    assert "sk-secret" not in (tmp_path / "t.report.json").read_text() + out.read_text()


def test_one_generator_is_required(seed_file, tmp_path, capsys):
    code = main(["data", "self-instruct", "--seed-tasks", str(seed_file), "--num", "1", "--out",
                 str(tmp_path / "t.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "give exactly one of generator" in err[0]
    assert main(["data", "self-instruct", "--generator-url", "http://127.0.0.1:9", "--num", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing --seed-tasks" in err[0] and "--out" in err[0] and "--num (" not in err[0]


def test_chinese_seeds_use_chinese_prompts_and_character_rouge(fake, tmp_path):
    seeds = tmp_path / "zh.jsonl"
    zh = [("写一首关于春天的短诗。", "春风吹绿了柳枝。"), ("把下面的句子翻译成英文。", "I like tea."),
          ("列出三种常见的水果。", "苹果、香蕉、橙子。"), ("解释什么是光合作用。", "植物利用阳光制造养分。")]
    seeds.write_text("".join(json.dumps({"instruction": i, "input": "", "output": o}, ensure_ascii=False) + "\n"
                             for i, o in zh), encoding="utf-8")
    reply = (" 写一首关于秋天的短诗。\n5. 输入:\n<无输入>\n5. 输出:\n秋叶落满了山路。\n###\n"  # char ROUGE 0.9 > 0.7
             "6. 指令: 请用三句话介绍长城的历史。\n6. 输入:\n<无输入>\n6. 输出:\n长城始建于春秋战国时期。\n###\n"
             "7. 指令: 给这张图片写一个标题。\n7. 输入:\n<无输入>\n7. 输出:\n美丽的风景。\n")  # blacklist 图片
    server = fake([{"text": reply}])
    out = tmp_path / "zh_tasks.jsonl"
    report = run_self_instruct(config(seeds, out, server.url, num=1))
    assert report["settings"]["language"] == "zh"
    assert "指令" in server.prompts[0] and server.prompts[0].endswith("5. 指令:")
    assert report["rejected"]["similar"] == 1 and report["examples"]["similar"][0]["rouge_l"] == 0.9
    assert json.loads(out.read_text(encoding="utf-8")) == {"instruction": "请用三句话介绍长城的历史。", "input": "",
                                                           "output": "长城始建于春秋战国时期。"}


def test_reply_parsing_tolerates_a_restated_number_and_missing_input():
    blocks = split_reply("4. Instruction: Name a colour.\n4. Output: Blue.\n5. Instruction: Add 2 and 3.\n"
                         "5. Input: <noinput>\n5. Output: 5", 4, "en")
    assert [parse_task(b) for b in blocks] == [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
                                               {"instruction": "Add 2 and 3.", "input": "", "output": "5"}]
    # an empty field never swallows the next label (SmolLM2 wrote "12. Instruction:\n1. Input:\n...")
    assert parse_task("12. Instruction:\n1. Input:\nSome text.\n1. Output:\nMore.") == {
        "instruction": "", "input": "Some text.", "output": "More."}
    assert parse_task("6. Instruction:\nName a fruit.\n6. Input:\n6. Output:\nPear.") == {
        "instruction": "Name a fruit.", "input": "", "output": "Pear."}
    assert build_prompt(SEEDS[:1], "en", 20).endswith("###\n1. Instruction: Give three tips for staying healthy.\n"
                                                      "1. Input:\n<noinput>\n1. Output:\nEat well, sleep enough and "
                                                      "exercise.\n###\n2. Instruction:")


def test_alpaca_seed_file_reads():
    path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "alpaca_seed_tasks.jsonl"
    if not path.is_file():
        pytest.skip("../shared/data is absent")
    seeds = read_seed_tasks(path)
    assert len(seeds) == 175 and seeds[1] == {"instruction": "What is the relation between the given pairs?",
                                              "input": "Night : Day :: Right : Left",
                                              "output": "The relation between the given pairs is that they are "
                                                        "opposites."}


def test_local_model_generator_is_seeded(base_model_dir, seed_file, tmp_path):
    """The local generator end to end on the micro model: it never stops, so its one block is cut (truncated)."""
    runs = []
    for name in ("a", "b"):
        cfg = SelfInstructConfig(seed_tasks=str(seed_file), out=str(tmp_path / f"{name}.jsonl"), num=1,
                                 generator=str(base_model_dir), max_tokens=16, prompts_per_round=2, max_rounds=1,
                                 list_length=8)
        runs.append(run_self_instruct(cfg))
    a, b = runs
    assert a["status"] == "stopped: max_rounds" and a["requests"] == 2 and a["kept"] == 0
    assert a["candidates"] == a["rejected"]["truncated"] == 2
    assert a["examples"] == b["examples"]  # the same seed samples the same text


def test_smollm2_writes_candidates(real_smollm2, tmp_path):
    """SmolLM2-135M-Instruct as the local generator: one short greedy reply, counted candidate by candidate."""
    path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "alpaca_seed_tasks.jsonl"
    if not path.is_file():
        pytest.skip("../shared/data is absent")
    cfg = SelfInstructConfig(seed_tasks=str(path), out=str(tmp_path / "t.jsonl"), num=5, generator=str(real_smollm2),
                             max_tokens=8, temperature=0, prompts_per_round=1, prompt_seed_tasks=1,
                             prompt_generated_tasks=0, list_length=3, max_rounds=1)
    report = run_self_instruct(cfg)
    assert report["requests"] == 1 and report["candidates"] >= 1
    assert report["candidates"] == report["kept"] + sum(report["rejected"].values())
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == report["kept"]


def test_concurrent_requests(fake, seed_file, tmp_path):
    tasks = [GOOD_1, GOOD_2, "Name the planets of the solar system in order."]
    server = fake([{"sleep": 0.2, "text": task(5, t)} for t in tasks])
    report = run_self_instruct(config(seed_file, tmp_path / "t.jsonl", server.url, num=3, prompts_per_round=3,
                                      workers=3))
    assert report["rounds"] == 1 and report["kept"] == 3
    kept = [json.loads(x)["instruction"] for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert sorted(kept) == sorted(tasks)


def test_tunelab_serve_as_the_generator(base_model_dir, seed_file, tmp_path):
    """`--generator-url` against `tunelab serve` itself (the micro model; its replies are cut at max_tokens)."""
    pytest.importorskip("uvicorn")
    from conftest import serving

    from tunelab.serve.api import create_app
    from tunelab.serve.server import build_state

    model = tmp_path / "model"  # the micro model with room for a self-instruct prompt (RoPE: no learned positions)
    shutil.copytree(base_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    with serving(create_app(build_state(model, precision=None))) as address:
        url = "http://{}:{}/v1".format(*address)
        cfg = SelfInstructConfig(seed_tasks=str(seed_file), out=str(tmp_path / "t.jsonl"), num=1, generator_url=url,
                                 max_tokens=16, prompts_per_round=2, max_rounds=1, list_length=8, retries=0)
        report = run_self_instruct(cfg)
    assert report["requests"] == 2 and report["status"] == "stopped: max_rounds"
    # the server said finish_reason "length" for both replies: each reply's last block is cut, the rest malformed
    assert report["rejected"]["truncated"] == 2
    assert report["candidates"] == report["rejected"]["truncated"] + report["rejected"]["malformed"]
