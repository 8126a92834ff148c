# Everything a fresh machine needs: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PACKAGES := energy scheduler telemetry reports

.PHONY: demo test test-cluster lint typecheck unit bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins torch to the CPU build that lies on this machine's disk.
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,postgres,torch]'
	touch $@

demo: $(STAMP)
	$(BIN)/powertrain demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# Tests run on every core (pytest-xdist); the ten slowest are listed at the end. A PostgreSQL
# server is started for the run when its binaries are installed (tests/conftest.py).
unit: $(STAMP)
	$(BIN)/pytest -q -n auto --durations=10 -m 'not cluster'

test: lint typecheck unit

# Several nodes on one store: daemons on one PostgreSQL, a run spread over them.
test-cluster: $(STAMP)
	$(BIN)/pytest -q -n auto --durations=10 -m cluster

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,postgres,torch,bench]'
	$(BIN)/python bench/ingest.py --json bench/results/ingest.json
	$(BIN)/python bench/daemon_overhead.py --json bench/results/daemon_overhead.json
	$(BIN)/python bench/calibrate_sim.py --json bench/results/calibrate_sim.json
	$(BIN)/python bench/optimizer.py --json bench/results/optimizer.json
	$(BIN)/python bench/budget.py --json bench/results/budget.json
	$(BIN)/python bench/client_overhead.py --json bench/results/client_overhead.json
	$(BIN)/python bench/report_scale.py --json bench/results/report_scale.json

clean:
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache
