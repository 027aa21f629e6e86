"""pfedla-jax: pFedLA (Ma et al., CVPR 2022) and personalized-FL baselines in JAX/Flax.

The Python API (what a notebook needs; the command line `python -m experiments.run` is a
thin shell over the same calls):

  import pfedla_jax as pf
  config = pf.ExperimentConfig(algorithm="pfedla", dataset="fmnist", num_clients=10,
                               samples_per_client=200, rounds=20,
                               train=pf.LocalTrainConfig(lr=0.05))
  summary = pf.run_experiment(config, workdir="runs/notebook")
  summary["final"]["test_acc"]

  pf.apply_overrides(config, {"pfedla.hn_lr": 0.2, "train.local_epochs": 5})
  pf.config_from_argv(["run", "--algorithm=fedavg", "--rounds=5"]).config
  pf.algorithm_names(), pf.algorithm_class("pfedla"), pf.register  # the registry

Every config is checked when it is built (UserInputError on a bad value).
`run_experiment` sets up devices as the command line does (one XLA CPU device per core
unless JAX has already computed something in the process; `RunOptions(host_devices=...)`).
Names are imported on first use, so `import pfedla_jax` itself loads nothing heavy and
changes no JAX setting.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "ExperimentConfig": "pfedla_jax.training.config",
    "RunOptions": "pfedla_jax.training.config",
    "apply_overrides": "pfedla_jax.training.config",
    "LocalTrainConfig": "pfedla_jax.core.local_training",
    "run_experiment": "pfedla_jax.training.loop",
    "build_experiment": "pfedla_jax.training.loop",
    "config_from_argv": "pfedla_jax.training.command_line",
    "RunCommand": "pfedla_jax.training.command_line",
    "Algorithm": "pfedla_jax.algorithms",
    "AlgorithmConfig": "pfedla_jax.algorithms",
    "Evaluation": "pfedla_jax.algorithms",
    "FLContext": "pfedla_jax.algorithms",
    "TableRow": "pfedla_jax.algorithms",
    "algorithm_class": "pfedla_jax.algorithms",
    "algorithm_names": "pfedla_jax.algorithms",
    "register": "pfedla_jax.algorithms",
    "set_host_devices": "pfedla_jax.runtime",
    "UserInputError": "pfedla_jax.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pfedla_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from pfedla_jax.algorithms import (Algorithm, AlgorithmConfig, Evaluation, FLContext,
                                       TableRow, algorithm_class, algorithm_names, register)
    from pfedla_jax.core.local_training import LocalTrainConfig
    from pfedla_jax.errors import UserInputError
    from pfedla_jax.runtime import set_host_devices
    from pfedla_jax.training.command_line import RunCommand, config_from_argv
    from pfedla_jax.training.config import ExperimentConfig, RunOptions, apply_overrides
    from pfedla_jax.training.loop import build_experiment, run_experiment
