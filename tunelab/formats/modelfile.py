"""The Ollama `Modelfile` beside a GGUF export: the chat template as Go template text, its system prompt and stops.

A chat format is literal text around each turn (`TurnFormat`); the same description renders a probe chat in
Python, which must equal the tokenizer's own Jinja template's rendering before the Go template is written.
"""

from __future__ import annotations

from dataclasses import dataclass


def adds_special(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) as the tokenizer really behaves."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids and bos is not None and ids[0] == bos), bool(ids and eos is not None and ids[-1] == eos)


@dataclass(frozen=True)
class TurnFormat:
    """A chat format as literal text around each turn: the one source of the Go template and of its Python twin."""

    name: str
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    stops: tuple[str, ...]


FORMATS = (
    TurnFormat("chatml", ("<|im_start|>system\n", "<|im_end|>\n"), ("<|im_start|>user\n", "<|im_end|>\n"),
               ("<|im_start|>assistant\n", "<|im_end|>\n"), "<|im_start|>assistant\n",
               ("<|im_end|>", "<|im_start|>")),
    TurnFormat("llama3", ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
               ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
               ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
               ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
    # Gemma has no system role: its template puts the system text into the first user turn; Ollama's own
    # gemma3 template renders it as a user turn, as this does
    TurnFormat("gemma", ("<start_of_turn>user\n", "<end_of_turn>\n"), ("<start_of_turn>user\n", "<end_of_turn>\n"),
               ("<start_of_turn>model\n", "<end_of_turn>\n"), "<start_of_turn>model\n", ("<end_of_turn>",)),
    TurnFormat("plain", ("### System:\n", "\n\n"), ("### User:\n", "\n\n"), ("### Assistant: ", "{eos}\n\n"),
               "### Assistant:", ("{eos}", "### User:")),
)

PROBE_CHAT = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"},
              {"role": "user", "content": "Tell me about rivers."}]


def _fill(text: str, eos: str) -> str:
    return text.replace("{eos}", eos)


def render_turns(fmt: TurnFormat, messages: list[dict[str, str]], eos: str = "", prefix: str = "") -> str:
    """What the Modelfile's Go template renders for `messages` (then the generation prompt)."""
    out = [prefix]
    for m in messages:
        pre, suf = getattr(fmt, m["role"] if m["role"] in ("system", "user") else "assistant")
        out.append(_fill(pre, eos) + m["content"] + _fill(suf, eos))
    return "".join(out) + _fill(fmt.generation, eos)


def go_template(fmt: TurnFormat, eos: str = "", prefix: str = "") -> str:
    """The Ollama TEMPLATE (Go text/template over .Messages) for `fmt`."""
    s, u, a = ([_fill(x, eos) for x in pair] for pair in (fmt.system, fmt.user, fmt.assistant))
    return (f'{prefix}{{{{ range .Messages }}}}{{{{ if eq .Role "system" }}}}{s[0]}{{{{ .Content }}}}{s[1]}'
            f'{{{{ else if eq .Role "user" }}}}{u[0]}{{{{ .Content }}}}{u[1]}'
            f'{{{{ else }}}}{a[0]}{{{{ .Content }}}}{a[1]}{{{{ end }}}}{{{{ end }}}}{_fill(fmt.generation, eos)}')


def detect_chat_format(tokenizer) -> tuple[TurnFormat | None, str, str | None]:
    """(format, literal prefix, default system prompt) whose rendering equals the tokenizer's Jinja template's
    on a probe chat (the BOS the runtime adds left out), or (None, "", None) when none does."""
    if not isinstance(tokenizer.chat_template, str) or not tokenizer.chat_template:
        return None, "", None
    try:
        jinja = tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that needs other roles or variables: no Ollama template for it
        return None, "", None
    eos = tokenizer.eos_token or ""
    bos, adds_bos = tokenizer.bos_token, adds_special(tokenizer)[0]
    candidates = [(jinja, "")]  # (text the Go template must produce, literal prefix of the template)
    if bos and jinja.startswith(bos):  # the runtime adds BOS itself when add_bos is set, else the template must
        stripped = (jinja[len(bos):], "" if adds_bos else bos)
        candidates = [stripped] if adds_bos else [*candidates, stripped]
    for text, prefix in candidates:
        for fmt in FORMATS:
            if text == render_turns(fmt, PROBE_CHAT, eos):
                return fmt, prefix, None
            pre, suf = (_fill(x, eos) for x in fmt.system)
            if text.startswith(pre) and suf in text[len(pre):]:
                system = text[len(pre):].split(suf, 1)[0]  # a default system prompt the template adds
                if text == render_turns(fmt, [{"role": "system", "content": system}, *PROBE_CHAT], eos):
                    return fmt, prefix, system
    return None, "", None


def modelfile(tokenizer, gguf_name: str = "model.gguf") -> tuple[str, str | None]:
    """(Ollama Modelfile text, chat format name or None when the template is not one tunelab can translate)."""
    fmt, prefix, system = detect_chat_format(tokenizer)
    eos = tokenizer.eos_token or ""
    lines = [f"FROM ./{gguf_name}"]
    stops: list[str] = []
    if fmt is None:
        lines.append("# the chat template is not one tunelab can translate to Ollama's Go template: Ollama will "
                     "use the GGUF's tokenizer.chat_template or fall back to the raw prompt")
    else:
        lines.append(f'TEMPLATE """{go_template(fmt, eos, prefix)}"""')
        if system is not None:
            lines.append(f'SYSTEM """{system}"""')
        stops = [_fill(s, eos) for s in fmt.stops]
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{s}"' for s in stops if s]
    return "\n".join(lines) + "\n", fmt.name if fmt else None
