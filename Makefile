# The two commands of the README: `make demo` and `make check`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo check venv lint types test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

venv: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'

# Fresh clone -> isolated environment -> the proxy in front of the offline sandbox.
demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/kounta-proxy demo

lint: venv
	$(BIN)/ruff check --output-format concise proxy tests bench
	$(BIN)/ruff format --check proxy tests bench

types: venv
	$(BIN)/mypy

test: venv
	$(BIN)/python -m pytest --cov --cov-report=term --cov-fail-under=80 -q

# Everything CI runs: lint, types, all tests.
check: lint types test

bench: venv
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage build *.egg-info
