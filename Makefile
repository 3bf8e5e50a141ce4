# Two commands for a newcomer: `make demo` and `make test`. Both create .venv (Python 3.12) when missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Find a Python 3.12 without hard-coding a machine path: $PYTHON if set, else python3.12 on PATH, else pyenv's newest 3.12.
PYTHON ?= $(shell for c in python3.12 python3; do \
    if command -v $$c >/dev/null && $$c -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then echo $$c; exit; fi; done; \
  if command -v pyenv >/dev/null; then v=$$(pyenv versions --bare | grep -E '^3\.12(\.|$$)' | sort -V | tail -1); \
    [ -n "$$v" ] && echo "env PYENV_VERSION=$$v python3.12"; fi)

.PHONY: venv demo test test-slow lint clean
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@[ -n "$(PYTHON)" ] || { echo "error: Python 3.12 not found (install it, or set PYTHON=/path/to/python3.12)"; exit 2; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

demo: venv
	$(VENV)/bin/falcon-bridge demo

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

lint: venv
	$(VENV)/bin/ruff check falcon_bridge tests bench examples

clean:
	rm -rf $(VENV) build *.egg-info
