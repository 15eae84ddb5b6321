# Two entry points for a fresh machine: `make demo` runs the quick start,
# `make test` runs lint, type checks and the test suite. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest chaos bench clean

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

# The chaos tests of tests/chaos for longer than in `make test` (12 s each there): SQLite and
# RabbitMQ (classic and quorum queues, on a private node) for CHAOS_SECONDS each. A soak:
# `make chaos CHAOS_SECONDS=1800`; a replay: `CONVEYOR_CHAOS_SEED=<printed> make chaos`. It also runs
# the tests marked `long` (left out of `make test`): RabbitMQ heartbeat loss on quorum queues and
# without a dead-letter queue.
CHAOS_SECONDS ?= 60
chaos: $(STAMP)
	CONVEYOR_CHAOS_SECONDS=$(CHAOS_SECONDS) CONVEYOR_CHAOS_AMQP_QUEUE_TYPES=classic,quorum \
		$(BIN)/pytest tests/chaos tests/amqp/test_faults.py -m "chaos or long" -s

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/memory_throughput.py
	$(BIN)/python benchmarks/sqlite_throughput.py
	$(BIN)/python benchmarks/lua_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
