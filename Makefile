# Fresh-machine entry points. `make run` = the main job, `make test` = the test suite.
# Both create .venv and install the package on first use: `make run` the package alone,
# `make test` (and `make bench`) also the extras `test` and `torch` (pytest and the CPU
# PyTorch 2.13.0 of the parity test and the benchmark); the real Fashion-MNIST files
# come from Debian's dataset-fashion-mnist package (installed if missing; needs root).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
WORKDIR ?= runs/pfedla_fmnist

.PHONY: setup setup-test data test run bench gpu-check clean

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
	PFEDLA_REQUIRE_TORCH=1 $(PY) -m pytest -q

run: setup data
	$(PY) -m experiments.run --flagfile=experiments/presets/fmnist_quick.flags --workdir=$(WORKDIR)

bench: setup-test
	$(PY) -m experiments.benchmark --out=runs/benchmark.json

# On a GPU machine (under 8 minutes on an H100/H200): correctness of the GPU path and its
# speed against the PyTorch reference on the same GPU; writes runs/gpu_check/gpu_check.{json,md}.
# Uses the Python environment as it is (no install step: the GPU machine brings its own
# CUDA builds of jax and torch); tensorflow-datasets and tensorboardX are not needed.
GPU_CHECK_DIR ?= runs/gpu_check
gpu-check:
	$(PYTHON) -m experiments.gpu_check --out_dir=$(GPU_CHECK_DIR)

clean:
	rm -rf $(VENV) runs
