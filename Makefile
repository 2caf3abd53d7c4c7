# The two commands of the README: `make run` and `make test`. Both create or update
# the virtual environment first, so they work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/example.yaml

.PHONY: setup run test check lint typecheck unit soak bench bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: setup
	$(BIN)/snapshotd start --config $(CONFIG)

lint: setup
	$(BIN)/ruff check snapshotd tests benchmarks examples
	$(BIN)/ruff format --check snapshotd tests benchmarks examples

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/python -m pytest -q

test: lint typecheck unit

soak: setup
	$(BIN)/python -m pytest -q -m soak

bench: setup
	$(BIN)/python -m benchmarks

bench-quick: setup
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
