"""Serving many adapters: `tunelab serve` vs transformers + PEFT, N concurrent requests spread over K adapters.

    .venv/bin/python benchmarks/serve_throughput.py                          # SmolLM2-135M-Instruct if imported
    .venv/bin/python benchmarks/serve_throughput.py --n 32 --tokens 32 --k 1 8 32 --json out.json

The N requests arrive together; request i asks adapter i mod K (uniform), with a prompt of 6 to 40 tokens, and
gets exactly `--tokens` greedy tokens (vLLM's `min_tokens` on the server, PEFT's `min_new_tokens`: equal work).
Adapters: random LoRA adapters on every linear layer but the head, ranks alternating 8 and 16 (B ~ N(0, 0.02)).
All three contenders run in fp32 on the same machine, one after the other:

- tunelab serve: `tunelab serve MODEL --adapters-dir DIR --max-loaded 32 --max-batch N` in its own process; the
  client (the official `openai` AsyncOpenAI, streaming, in this process) sends all N requests at once; every
  adapter is warm (one request each first, and one untimed round of the first workload). TTFT is the first
  streamed text, latency the last chunk.
- PEFT sequential: one PeftModel with the K adapters loaded; the requests are answered one at a time in arrival
  order, `set_adapter(name)` then `generate` (S-LoRA's PEFT baseline, without its per-adapter batching).
- PEFT mixed batch: the same PeftModel; all N requests in one left-padded `generate(adapter_names=[...])` (static
  batching: a row's latency is the batch's end).

Output tokens/s = N x tokens / wall time from the first request to the last reply; TTFT and latency are measured
from the moment all requests arrived. Ratios are against each PEFT baseline of the same K, measured in the same
run. Correctness gate: the replies of the server and of PEFT sequential are compared text for text (fp32 greedy:
they should be identical).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the river runs past the old mill where the baker sells bread to travellers who come from the north "
         "each spring with copper pots and stories of the sea").split()


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(3 * i) % 11:(3 * i) % 11 + 4 + (7 * i) % 24]).capitalize() for i in range(n)]


def make_adapters(model_dir: Path, out: Path, k: int) -> list[str]:
    from tunelab.methods import LoRA, save_lora_adapter
    from tunelab.models import load_model, load_tokenizer

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    names = []
    for i in range(k):
        r = 8 if i % 2 == 0 else 16
        method = LoRA(r=r, alpha=2 * r, target_modules="all-linear")
        method.inject(model)
        torch.manual_seed(i)
        for layer in method.layers.values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
        save_lora_adapter(method, out / f"a{i}", str(model_dir.resolve()), tok)
        method.remove()
        names.append(f"a{i}")
    return names


def summary(name: str, wall: float, ttft: list[float], lat: list[float], tokens: int) -> dict:
    q = statistics.quantiles(lat, n=20) if len(lat) > 1 else lat * 19
    return {"system": name, "wall_s": wall, "tok_s": tokens / wall, "ttft_p50": statistics.median(ttft),
            "lat_p50": statistics.median(lat), "lat_p95": q[18]}


def preset_model(work: Path) -> Path:
    """The tiny preset (random weights) with a byte-level BPE tokenizer trained on a small text, as a model dir."""
    from tunelab.models import create_model, load_tokenizer, save_model
    from tunelab.vocab.train import train_tokenizer_files

    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))))
    train_tokenizer_files([corpus], work / "tokenizer", vocab_size=300)
    tok = load_tokenizer(work / "tokenizer")
    return save_model(create_model("tiny", "llama", tok, seed=0), tok, work / "model")


# --- tunelab serve --------------------------------------------------------------------------------------------------

def start_server(model_dir: Path, adapters_dir: Path, n: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tunelab", "serve", str(model_dir), "--adapters-dir", str(adapters_dir),
           "--max-loaded", "32", "--max-batch", str(n), "--port", str(port), "--precision", "fp32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import urllib.request
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc, port
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("tunelab serve did not start") from None
            time.sleep(0.5)


async def run_server(port: int, jobs: list[tuple[str, str]], tokens: int) -> tuple[dict, list[str]]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    for name in dict.fromkeys(a for a, _ in jobs):  # warm: every adapter resident
        await client.completions.create(model=name, prompt="warm", max_tokens=2)
    t0 = time.perf_counter()

    async def one(adapter: str, prompt: str):
        first, text = None, []
        stream = await client.completions.create(model=adapter, prompt=prompt, max_tokens=tokens, temperature=0,
                                                 stream=True, extra_body={"min_tokens": tokens})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                first = first or time.perf_counter() - t0
                text.append(chunk.choices[0].text)
        return first, time.perf_counter() - t0, "".join(text)

    results = await asyncio.gather(*(one(a, p) for a, p in jobs))
    wall = time.perf_counter() - t0
    await client.close()
    return (summary("tunelab serve", wall, [r[0] for r in results], [r[1] for r in results], len(jobs) * tokens),
            [r[2] for r in results])


# --- PEFT --------------------------------------------------------------------------------------------------------

class FirstToken:
    """A generate streamer that notes when the first new tokens come (its second `put`)."""

    def __init__(self):
        self.calls, self.at = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self):
        pass


def peft_model(model_dir: Path, adapters_dir: Path, names: list[str]):
    from peft import PeftModel

    from tunelab.models import load_model

    pm = PeftModel.from_pretrained(load_model(model_dir).eval(), adapters_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(adapters_dir / name, adapter_name=name)
    return pm


@torch.inference_mode()
def run_peft_sequential(pm, tok, jobs, tokens: int) -> tuple[dict, list[str]]:
    from tunelab.serve.api import encode_text

    t0, ttft, lat, texts = time.perf_counter(), [], [], []
    for adapter, prompt in jobs:
        ids = torch.tensor([encode_text(tok, prompt)])
        pm.set_adapter(adapter)
        s = FirstToken()
        out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                          min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, streamer=s)
        ttft.append(s.at - t0)
        lat.append(time.perf_counter() - t0)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True, clean_up_tokenization_spaces=False))
    wall = time.perf_counter() - t0
    return summary("PEFT sequential (set_adapter)", wall, ttft, lat, len(jobs) * tokens), texts


@torch.inference_mode()
def run_peft_mixed(pm, tok, jobs, tokens: int) -> dict:
    from tunelab.serve.api import encode_text

    rows = [encode_text(tok, p) for _, p in jobs]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    t0 = time.perf_counter()
    s = FirstToken()
    pm.generate(input_ids=ids, attention_mask=mask, adapter_names=[a for a, _ in jobs], max_new_tokens=tokens,
                min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                streamer=s)
    wall = time.perf_counter() - t0
    return summary("PEFT mixed batch (adapter_names)", wall, [s.at - t0] * len(jobs), [wall] * len(jobs),
                   len(jobs) * tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"),
                    help="HF model directory (default: the imported SmolLM2-135M-Instruct; else the tiny preset)")
    ap.add_argument("--n", type=int, default=32, help="concurrent requests")
    ap.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 8, 32], help="adapter counts")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    from tunelab.models import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"{model_dir}: no model there (tunelab models get smollm2-135m-instruct); using the tiny preset")
        model_dir = preset_model(work)
    tok = load_tokenizer(model_dir)
    adapters_dir = work / "adapters"
    names = make_adapters(model_dir, adapters_dir, max(args.k))
    texts_prompts = prompts(args.n)
    workloads = {k: [(names[i % k], texts_prompts[i]) for i in range(args.n)] for k in args.k}
    print(f"model {model_dir.name}, N={args.n} requests x {args.tokens} tokens, K={args.k}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)

    rows, replies = [], {}
    proc, port = start_server(model_dir, adapters_dir, args.n)
    try:
        asyncio.run(run_server(port, workloads[args.k[0]], args.tokens))  # warm-up round, not timed
        for k, jobs in workloads.items():
            row, replies[k] = asyncio.run(run_server(port, jobs, args.tokens))
            rows.append({"k": k, **row})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    pm = peft_model(model_dir, adapters_dir, names)
    run_peft_mixed(pm, tok, workloads[args.k[0]][:2], 2)  # warm-up
    for k, jobs in workloads.items():
        seq, texts = run_peft_sequential(pm, tok, jobs, args.tokens)
        same = sum(a == b for a, b in zip(texts, replies[k]))
        rows.append({"k": k, **seq, "identical_to_server": f"{same}/{len(jobs)}"})
        print(json.dumps(rows[-1]), flush=True)
        rows.append({"k": k, **run_peft_mixed(pm, tok, jobs, args.tokens)})
        print(json.dumps(rows[-1]), flush=True)

    print("\n| K | system | output tok/s | x PEFT seq | x PEFT mixed | TTFT p50 s | latency p50 s | latency p95 s |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.k:
        mine = [r for r in rows if r["k"] == k]
        seq = next(r for r in mine if r["system"].startswith("PEFT seq"))
        mixed = next(r for r in mine if r["system"].startswith("PEFT mixed"))
        for r in mine:
            print(f"| {k} | {r['system']} | {r['tok_s']:.1f} | {r['tok_s'] / seq['tok_s']:.2f} | "
                  f"{r['tok_s'] / mixed['tok_s']:.2f} | {r['ttft_p50']:.2f} | {r['lat_p50']:.2f} | "
                  f"{r['lat_p95']:.2f} |")
    gate = [r["identical_to_server"] for r in rows if "identical_to_server" in r]
    print(f"\nreplies identical to PEFT sequential (fp32 greedy), per K: {', '.join(gate)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
