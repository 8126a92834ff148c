# Everything a fresh machine needs: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RAY_STAMP := $(VENV)/.ray-stamp
PACKAGES := energy scheduler telemetry reports

.PHONY: demo test test-cluster lint typecheck unit bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins torch to the CPU build that lies on this machine's disk, and the
	# frameworks of the callbacks (hf, lightning) to the versions they are tested with.
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,postgres,torch,hf,lightning]'
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
	$(BIN)/pytest -q -n auto --durations=10 -m 'not cluster and not distributed and not slurm and not ray and not long'

test: lint typecheck unit

# Runs of several ranks (4-rank torchrun, 2-rank DDP with the framework callbacks); the energy
# optimiser on the real example for a few minutes, beside the same job at the default; several nodes
# on one store (daemons on one PostgreSQL, a run spread over them, the cluster cap); a real
# single-node Slurm whose prolog and epilog are powertrain's (.ci/slurm.sh installs it); and a
# local Ray cluster of two nodes placing jobs on two daemons (a test file runs on one worker:
# the Ray tests share one cluster).
test-cluster: $(STAMP) $(RAY_STAMP)
	$(BIN)/pytest -q -n auto --dist loadfile --durations=10 -m 'cluster or distributed or slurm or ray or long'

# The ray extra, for the cluster tests only (Ray is large). zeus (the bench extra) pulls in
# amdsmi, whose import fails without ROCm's library and takes `import ray` down with it; zeus
# does without it, so it goes.
$(RAY_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[ray]'
	$(BIN)/python -m pip uninstall --quiet --yes amdsmi
	touch $@

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,postgres,torch,bench]'
	$(BIN)/python bench/ingest.py --json bench/results/ingest.json
	$(BIN)/python bench/daemon_overhead.py --json bench/results/daemon_overhead.json
	$(BIN)/python bench/metrics.py --json bench/results/metrics.json
	$(BIN)/python bench/calibrate_sim.py --json bench/results/calibrate_sim.json
	$(BIN)/python bench/optimizer.py --seeds 0-9 --workers 2 --json bench/results/optimizer.json
	$(BIN)/python bench/optimizer.py --joint --json bench/results/optimizer_joint.json
	$(BIN)/python bench/budget.py --json bench/results/budget.json
	$(BIN)/python bench/client_overhead.py --json bench/results/client_overhead.json
	$(BIN)/python bench/report_scale.py --json bench/results/report_scale.json
	$(BIN)/python bench/cluster_cap.py --json bench/results/cluster_cap.json

clean:
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache
