"""Federated algorithms, one module each, behind one interface (base.Algorithm).

Every module of this package is imported here, so an algorithm module that registers
itself (`@registry.register(name, config_class)`) is available by name without editing
any other file.
"""

import importlib
import pkgutil

from pfedla_jax.algorithms.base import Algorithm, Evaluation, FLContext, NoConfig
from pfedla_jax.algorithms.registry import algorithm_class, algorithm_names, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

from pfedla_jax.algorithms.fedavg import FedAvg  # noqa: E402
from pfedla_jax.algorithms.fedbn import FedBN, FedBNConfig  # noqa: E402
from pfedla_jax.algorithms.fedfomo import FedFomo, FedFomoConfig  # noqa: E402
from pfedla_jax.algorithms.fedrep import FedRep, FedRepConfig  # noqa: E402
from pfedla_jax.algorithms.local import Local  # noqa: E402
from pfedla_jax.algorithms.perfedavg import PerFedAvg, PerFedAvgConfig  # noqa: E402
from pfedla_jax.algorithms.pfedhn import PFedHN, PFedHNConfig  # noqa: E402
from pfedla_jax.algorithms.pfedla import PFedLA, PFedLAConfig  # noqa: E402
from pfedla_jax.algorithms.pfedme import PFedMe, PFedMeConfig  # noqa: E402

__all__ = ["Algorithm", "Evaluation", "FLContext", "FedAvg", "FedBN", "FedBNConfig", "FedFomo",
           "FedFomoConfig", "FedRep", "FedRepConfig", "Local", "NoConfig", "PFedHN", "PFedHNConfig",
           "PFedLA", "PFedLAConfig", "PFedMe", "PFedMeConfig", "PerFedAvg", "PerFedAvgConfig",
           "algorithm_class", "algorithm_names", "register"]
