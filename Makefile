# The two commands of the README: `make demo` and `make check`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo check venv lint types test bench clean ops-lint lock

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

# The container and monitoring files: Dockerfile, compose file, Prometheus config and alerts.
# promtool comes with Debian's "prometheus" package (.ci/run installs it).
ops-lint: venv
	$(BIN)/hadolint Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	promtool check rules config/alerts.yml
	promtool test rules config/alerts.test.yml
	promtool check config config/prometheus.yml

# The pinned runtime dependencies the image installs (after changing pyproject.toml).
lock:
	rm -rf build/lock && $(PYTHON) -m venv build/lock
	build/lock/bin/pip install --quiet .
	{ sed -n '1,3p' requirements.lock; build/lock/bin/pip freeze --exclude kounta-proxy; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf build/lock

# Everything CI runs: lint, types, the ops files, all tests.
check: lint types ops-lint test

bench: venv
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage build *.egg-info
