# Two entry points for a fresh machine: `make demo` runs the quick start,
# `make test` runs lint, type checks and the test suite. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf examples/quickstart/data
	$(BIN)/conveyor run examples/quickstart --until-idle

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check conveyor tests benchmarks examples
	$(BIN)/ruff format --check conveyor tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/memory_throughput.py
	$(BIN)/python benchmarks/sqlite_throughput.py
	$(BIN)/python benchmarks/lua_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
