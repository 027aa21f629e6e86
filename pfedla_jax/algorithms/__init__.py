"""Federated algorithms, one module each, behind one interface (base.Algorithm).

Every module of this package is imported here, so an algorithm module that registers
itself (`@registry.register(name, config_class)`) is available by name without editing
any other file; the classes are reached through the registry (`algorithm_class(name)`)
or their modules (`pfedla_jax.algorithms.pfedla.PFedLA`).
"""

import importlib
import pkgutil

from pfedla_jax.algorithms.base import (Algorithm, AlgorithmConfig, Evaluation, FLContext,
                                        NoConfig, TableRow)
from pfedla_jax.algorithms.registry import (algorithm_class, algorithm_names, config_fields,
                                            register)
from pfedla_jax.algorithms.search_space import (CLIENT_LR, Choice, ConfigBound, Hyperparameter,
                                                IntRange, LogUniform, Uniform)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry", "search_space"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Algorithm", "AlgorithmConfig", "CLIENT_LR", "Choice", "ConfigBound", "Evaluation", "FLContext",
           "Hyperparameter", "IntRange", "LogUniform", "NoConfig", "TableRow", "Uniform",
           "algorithm_class", "algorithm_names", "config_fields", "register"]
