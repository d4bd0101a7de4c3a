"""Does extending SmolLM2's vocabulary with Chinese tokens pay on CPsyCounD? The original against +N tokens.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/vocab_extend.py                      # ~15 minutes on 2 cores
    .venv/bin/python benchmarks/vocab_extend.py --sizes 2000 8000 --pt-steps 30 --ft-steps 20 --json out.json

Data: CPsyCounD's dialogues (../shared/data/cpsycound); the last `--held-out` dialogues are never seen by the
tokenizer or the models. For each variant, the original SmolLM2-135M-Instruct and the same model extended by
`tunelab vocab extend --model` with N tokens learned on the training dialogues (new rows: sub-token mean):

1. tokens per character of the held-out dialogues, and the characters that fit in 2,048 tokens;
2. held-out bits per byte (total NLL / ln 2 / UTF-8 bytes: comparable across tokenizers) before training;
3. continued pretraining (`tunelab pretrain`, every weight trains, the whole embedding included) on the training
   dialogues' text: the same steps of the same tokens per step (`--seq` x `--batch`) for every variant, so the
   same compute and, up to the larger head's softmax, the same wall clock (measured and printed); an extended
   variant reads more characters in those tokens. Then held-out bits per byte again;
4. fine-tuning (`tunelab finetune`, method full, the loss on the counsellor's turns) of each continued model on
   the training dialogues, same steps and batch; then the held-out counsellor turns' bits per byte (the NLL of the
   trained tokens, end-of-turn included, over the UTF-8 bytes of the counsellor's text).

Every figure of a variant is printed next to the original's, as a ratio. Budgets are small (2 CPU cores): the
numbers say which way the first minutes go, not where a long run ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def split_dialogues(path: Path, held: int) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records[:-held], records[-held:]


def dialogue_text(record: dict) -> str:
    return "\n".join(m["content"] for m in record["messages"])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def held_out_bpb(model_dir: Path, texts: list[str]) -> float:
    from tunelab.evaluate.perplexity import perplexity
    from tunelab.models import load_model, load_tokenizer

    model = load_model(model_dir).eval()
    return perplexity(model, load_tokenizer(model_dir), texts, max_length=512, stride=512)["bits_per_byte"]


@torch.no_grad()
def assistant_bpb(model_dir: Path, chats: Path, max_len: int) -> float:
    """NLL of the counsellor's trained tokens (as finetune masks them) over the UTF-8 bytes of their text."""
    from tunelab.data.chat import chat_template_for, encode_example
    from tunelab.data.records import read_examples
    from tunelab.models import load_model, load_tokenizer

    model, tok = load_model(model_dir).eval(), load_tokenizer(model_dir)
    template = chat_template_for(tok)
    nll, n_bytes = 0.0, 0
    for ex in read_examples(chats):  # consecutive turns of one role merged, as finetune reads them
        enc = encode_example(ex, tok, template, 10**9)
        ids = torch.tensor(enc.input_ids)
        labels = torch.tensor(enc.labels)
        for start in range(0, len(ids) - 1, max_len):  # disjoint windows; each window's first label is unscored
            window = ids[start:start + max_len + 1]
            logits = model(input_ids=window[None, :-1]).logits[0].float()
            nll += F.cross_entropy(logits, labels[start + 1:start + len(window)], ignore_index=-100,
                                   reduction="sum").item()
        n_bytes += sum(len(m["content"].encode("utf-8")) for m in ex.messages if m["role"] == "assistant")
    return nll / math.log(2) / n_bytes


def pretrain(base: Path, train_text: Path, held_text: Path, out: Path, name: str, a) -> tuple[Path, float]:
    from tunelab.config import PretrainConfig
    from tunelab.train.pretrain import run_pretrain

    cfg = PretrainConfig.model_validate({
        "name": name, "out_dir": str(out), "seed": 0, "model": {"base": str(base)},
        "data": {"sources": [{"path": str(train_text)}], "seq_len": a.seq, "eval_paths": [str(held_text)]},
        "train": {"steps": a.pt_steps, "micro_batch_size": a.batch, "lr": a.pt_lr, "warmup_steps": 3,
                  "eval_every": 0, "eval_batches": 1, "log_every": 10}})
    return out / name / "model", run_pretrain(cfg)["train_wall_s"]


def finetune(base: Path, train_chats: Path, out: Path, name: str, a) -> tuple[Path, float]:
    from tunelab.config import FinetuneConfig
    from tunelab.train.finetune import run_finetune

    cfg = FinetuneConfig.model_validate({
        "name": name, "out_dir": str(out), "seed": 0, "model": {"base": str(base)},
        "method": {"name": "full"},
        "data": {"train": [str(train_chats)], "eval_fraction": 0, "max_len": a.ft_len, "allow_empty": True},
        "train": {"steps": a.ft_steps, "micro_batch_size": a.batch // 2 or 1, "lr": a.ft_lr, "warmup_steps": 3,
                  "eval_every": 0, "log_every": 10}})
    summary = run_finetune(cfg)
    return out / name / "model", summary.get("train_wall_s", float("nan"))


def run_variant(n: int, a, files: dict, held: list[dict], out: Path) -> dict:
    from tunelab.models import load_tokenizer
    from tunelab.vocab.extend import extend_vocab
    from tunelab.vocab.resize import loss_texts

    label = "original" if n == 0 else f"+{n}"
    if n:
        base = out / f"ext-{n}"
        extend_vocab(a.model, [files["train_text"]], n, base, model=True, held_out=0, log=print)
    else:
        base = Path(a.model)
    tok = load_tokenizer(base)
    texts = [dialogue_text(d) for d in held]
    chars = sum(map(len, texts))
    tokens = sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"])
    eval_texts = loss_texts(texts, a.eval_chars)
    r = {"variant": label, "vocab": len(tok), "tokens_per_char": tokens / chars,
         "chars_in_2048": 2048 * chars / tokens}
    r["bpb_start"] = held_out_bpb(base, eval_texts)
    pt_model, r["pt_wall_s"] = pretrain(base, files["train_text"], files["held_text"], out, f"pt-{n}", a)
    r["pt_chars_seen"] = a.pt_steps * a.batch * a.seq / r["tokens_per_char"]
    r["bpb_pt"] = held_out_bpb(pt_model, eval_texts)
    ft_model, r["ft_wall_s"] = finetune(pt_model, files["train_chats"], out, f"ft-{n}", a)
    r["sft_bpb"] = assistant_bpb(ft_model, files["held_chats"], a.ft_len)
    print(json.dumps(r), flush=True)
    return r


def table(rows: list[dict]) -> str:
    base = rows[0]
    cols = [("vocab", "{:,}"), ("tokens_per_char", "{:.3f}"), ("chars_in_2048", "{:,.0f}"), ("bpb_start", "{:.4f}"),
            ("pt_wall_s", "{:.0f}"), ("pt_chars_seen", "{:,.0f}"), ("bpb_pt", "{:.4f}"), ("ft_wall_s", "{:.0f}"),
            ("sft_bpb", "{:.4f}")]
    head = "| variant | " + " | ".join(c for c, _ in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = []
        for c, fmt in cols:
            cell = fmt.format(r[c])
            if r is not base and c != "vocab":
                cell += f" ({r[c] / base[c]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cpsycound" / "cpsycound.jsonl"))
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000], help="vocabulary extensions to try")
    p.add_argument("--held-out", type=int, default=150, help="last dialogues held out from everything")
    p.add_argument("--eval-chars", type=int, default=6000, help="held-out characters scored for bits per byte")
    p.add_argument("--sft-eval", type=int, default=12, help="held-out dialogues scored after fine-tuning")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--pt-steps", type=int, default=24)
    p.add_argument("--pt-lr", type=float, default=2e-4)
    p.add_argument("--ft-steps", type=int, default=16)
    p.add_argument("--ft-lr", type=float, default=5e-5)
    p.add_argument("--ft-len", type=int, default=512)
    p.add_argument("--out", default="/tmp/tunelab-bench-vocab-extend")
    p.add_argument("--json", help="also write the rows to this JSON file")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    out = Path(a.out)
    if (out / "train_text.jsonl").is_file():  # this script's own scratch directory from an earlier run
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = split_dialogues(Path(a.data), a.held_out)
    files = {"train_text": write_jsonl(out / "train_text.jsonl", [{"text": dialogue_text(d)} for d in train]),
             "held_text": write_jsonl(out / "held_text.jsonl", [{"text": dialogue_text(d)} for d in held[:20]]),
             "train_chats": write_jsonl(out / "train_chats.jsonl", train),
             "held_chats": write_jsonl(out / "held_chats.jsonl", held[:a.sft_eval])}
    print(f"{len(train)} training dialogues, {len(held)} held out; sizes {a.sizes}; pretrain {a.pt_steps} steps x "
          f"{a.batch} x {a.seq} tokens, finetune {a.ft_steps} steps", flush=True)
    rows = [run_variant(n, a, files, held, out) for n in [0, *a.sizes]]
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
