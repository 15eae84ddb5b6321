# Two entry points for a fresh machine: `make demo` runs the quick start,
# `make test` runs lint, type checks and the test suite. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest chaos bench clean test-pythons

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

# Two worker processes (pytest-xdist), each test file on one of them: the suite mostly
# waits on brokers and timers, so two workers halve its time on this 2-core machine.
pytest: $(STAMP)
	$(BIN)/pytest -n 2 --dist loadfile

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

# Not part of `make test`: the suite on each supported Python, each in its own venv under
# build/pythons/ (installed with .[dev]). Interpreters: $(PYENV_ROOT)/versions/X.Y.*, else pythonX.Y
# on PATH. By default the suite without the chaos and slow tests (PYTEST_ARGS= runs all of it).
TEST_PYTHONS ?= 3.11 3.12 3.13
PYENV_ROOT ?= $(HOME)/.pyenv
PYTEST_ARGS ?= -n 2 --dist loadfile -m "not long and not chaos and not slow"
test-pythons:
	@failed=""; for v in $(TEST_PYTHONS); do \
		py=$$(ls -d $(PYENV_ROOT)/versions/$$v.*/bin/python$$v 2>/dev/null | sort -V | tail -n 1); \
		[ -n "$$py" ] || py=$$(command -v python$$v || true); \
		if [ -z "$$py" ]; then echo "== Python $$v: not found"; failed="$$failed $$v"; continue; fi; \
		env=build/pythons/$$v; echo "== Python $$v: $$py -> $$env"; \
		{ [ -x $$env/bin/python ] || $$py -m venv $$env; } && \
		$$env/bin/pip install -q --upgrade pip && $$env/bin/pip install -q -e '.[dev]' && \
		$$env/bin/pytest -q $(PYTEST_ARGS) || failed="$$failed $$v"; \
	done; \
	if [ -n "$$failed" ]; then echo "test-pythons: failed on$$failed"; exit 1; fi; \
	echo "test-pythons: passed on $(TEST_PYTHONS)"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build/pythons
