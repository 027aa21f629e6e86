"""Client partitions of a pooled dataset, then a per-client 70/30 train/test split.

One module per scheme, each registering itself (`registry.register_scheme`):

* ``noniid1`` (`noniid1`): k random classes per client, the same number of samples of
  each (the pFedLA paper's non-IID 1, Table 1).
* ``noniid2`` (`noniid2`): all classes per client, a few dominant ones (non-IID 2,
  Table 2).
* ``adjacent`` (`adjacent`): sliding windows of k classes (the paper's Fig. 6).
* ``fig5`` (`fig5`): a target client, one with the same classes, one sharing k - 1, the
  others fewer (the paper's Fig. 5).
* ``dirichlet`` (`dirichlet`) and ``iid`` (`iid`): extra schemes.

Every module of this package is imported here, so a new scheme is one new module (or a
module anywhere else that registers its scheme when imported). `make_partition` and
`max_samples_per_client` run a scheme by name; `SCHEMES` (the registered names, in
`Scheme.order`) and `scheme_parameters(name)` come from the registry.

What all schemes share (`common`): everything is deterministic given the seed, no example
is given to two clients, an infeasible request raises `UserInputError` (one line naming
the feasible values or the parameters to change) instead of being silently shrunk, all
clients hold the same number of samples ("the same amount of training data for both 10
and 100 clients cases") except under dirichlet, and every client's data is split 70% train
/ 30% test per class, every client getting >= 1 train and >= 1 test example.
"""

import importlib
import pkgutil

from pfedla_jax.data.partition.common import (MIN_SPLIT, TRAIN_FRACTION, Partition, Pool,
                                              split_train_test)
from pfedla_jax.data.partition.registry import (Scheme, get_scheme, make_partition,
                                                max_samples_per_client, register_scheme,
                                                scheme_names, scheme_parameters,
                                                unregister_scheme)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def __getattr__(name: str):
    # SCHEMES follows the registry, so a scheme registered after this import is listed.
    if name == "SCHEMES":
        return scheme_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MIN_SPLIT", "SCHEMES", "TRAIN_FRACTION", "Partition", "Pool", "Scheme",
           "get_scheme", "make_partition", "max_samples_per_client", "register_scheme",
           "scheme_names", "scheme_parameters", "split_train_test", "unregister_scheme"]
