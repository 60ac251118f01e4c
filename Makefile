# Quick start: `make demo` (venv + install + generate with the shipped model), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of PyTorch first: an unpinned torch could pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install dev demo test bench clean chromium

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev

demo: install
	$(VENV)/bin/dgemma generate --model models/dgemma-code-tiny --seed 0 --max-new-tokens 96 "def fibonacci(n):"

# the playground's browser tests drive Debian's chromium (Playwright's own browser download is not reachable)
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: dev chromium
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: dev
	$(PY) benchmarks/decode.py --json

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
