# Two commands for a new user (README): `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A second venv standing for the apptainer image in the integration tier: bakery-slurm installed
# from this checkout as a package (not editable), as the image has it. Never on the tests' PATH.
IMAGE_VENV ?= .image-venv
PACKAGE_FILES := $(shell find bakery_slurm templates -type f -not -name '*.pyc')

.PHONY: install image-venv demo test test-fast test-gpu slurm-up slurm-down bench

# torch goes first and pinned: its CPU wheel is what we test with, and a bare `torch`
# requirement resolved later by pip would pull a multi-GB CUDA build.
$(VENV)/.installed: setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,eval]'
	touch $@

install: $(VENV)/.installed

$(IMAGE_VENV)/.deps: setup.cfg constraints.txt
	$(PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/pip install -q --upgrade pip
	$(IMAGE_VENV)/bin/pip install -q torch==2.13.0
	$(IMAGE_VENV)/bin/pip install -q -c constraints.txt '.[eval]'
	touch $@

$(IMAGE_VENV)/.installed: $(IMAGE_VENV)/.deps $(PACKAGE_FILES)
	$(IMAGE_VENV)/bin/pip install -q --no-deps --force-reinstall .
	rm -rf build
	touch $@

image-venv: $(IMAGE_VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/bakery-slurm demo bakery-demo

# Every tier: unit, cli, e2e (tiny real models) and slurm (a real single-node cluster, started
# here as root). Under CI=true a missing SLURM fails the run instead of skipping.
test: install image-venv slurm-up
	HF_HUB_OFFLINE=1 BAKERY_IMAGE_VENV=$(IMAGE_VENV) $(BIN)/python -m pytest tests

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not e2e and not slurm and not gpu" tests

# On a machine with a CUDA GPU (and a CUDA build of torch in the venv).
test-gpu: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m gpu tests/gpu

slurm-up:
	@if [ "$$(id -u)" = 0 ]; then tests/integration/slurm_cluster.sh up; \
	else echo "not root: not starting SLURM (slurm tests need a running cluster)"; fi

slurm-down:
	tests/integration/slurm_cluster.sh down

bench: install slurm-up
	$(BIN)/python benchmarks/bench_ledger.py
	$(BIN)/python benchmarks/bench_sources.py
	$(BIN)/python benchmarks/bench_merge.py
	$(BIN)/python benchmarks/bench_engine.py
