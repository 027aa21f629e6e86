# Fresh-machine entry points. `make run` = the main job, `make test` = the test suite (what
# CI runs), `make test-fast` = its fast tier (the tests not marked slow: run it while
# developing). `make test` runs two pytest-xdist workers, one test file at a time each
# (module fixtures are shared within a file). All create .venv and install the package on first use: `make run` the
# package alone, the test targets (and `make bench`) also the extras `test` and `torch`
# (pytest and the CPU PyTorch 2.13.0 of the parity tests and the benchmark); the real
# Fashion-MNIST files come from Debian's dataset-fashion-mnist package (installed if
# missing; needs root).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
WORKDIR ?= runs/pfedla_fmnist

.PHONY: setup setup-test data test test-fast run bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .
	touch $@

setup-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/pip install -q -e ".[test,torch]"
	touch $@

data:
	@test -f $(FMNIST) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; }

test: setup-test data
	PFEDLA_REQUIRE_TORCH=1 $(PY) -m pytest -q -n 2 --dist loadfile

test-fast: setup-test data
	PFEDLA_REQUIRE_TORCH=1 $(PY) -m pytest -q -m "not slow"

run: setup data
	$(PY) -m experiments.run --flagfile=experiments/presets/fmnist_quick.flags --workdir=$(WORKDIR)

bench: setup-test
	$(PY) -m experiments.bench.benchmark --out=runs/benchmark.json

# On a GPU machine (under 8 minutes on an H100/H200): correctness of the GPU path and its
# speed against the PyTorch reference on the same GPU; writes runs/gpu_check/gpu_check.{json,md}.
# Uses the Python environment as it is (no install step: the GPU machine brings its own
# CUDA builds of jax and torch); tensorflow-datasets and tensorboardX are not needed.
GPU_CHECK_DIR ?= runs/gpu_check
gpu-check:
	$(PYTHON) -m experiments.bench.gpu_check --out_dir=$(GPU_CHECK_DIR)

clean:
	rm -rf $(VENV) runs
