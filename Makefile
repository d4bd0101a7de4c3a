# The two commands of the README. Both do all set-up on a fresh machine (a .venv in this directory).
# Torch: pinned to 2.13.0 only when the venv has no torch yet (the package itself asks for a range,
# so a user's CUDA build is kept); everything else comes from PyPI by name.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test install install-test clean

demo: $(VENV)/.installed
	$(BIN)/tunelab demo

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

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PIP) install -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) runs build *.egg-info
