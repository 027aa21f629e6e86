"""``noniid1``: k random classes per client, the same number of samples of each.

Source: the pFedLA paper's non-IID 1 setting (Ma et al., CVPR 2022, Sec. 4, Table 1):
each client holds k random classes (k = 4; 12 for CIFAR-100) with the same amount of
data per class, and all clients hold the same amount of data.

With C = num_classes, N = num_clients, S = samples_per_client, k = classes_per_client:
each client gets k distinct classes and S/k samples of each. The class sets are random
but balanced: class c is used by u_c clients, u_c in {floor(N*k/C), ceil(N*k/C)}; the
ceil goes to the classes with the most examples (ties broken at random), and clients
(in order) take the k classes with the most uses left (random tie-break), which always
completes (`common.balanced_class_sets`). The size rules are those of every k-class
scheme (`k_classes`): S a multiple of k with S/k >= 2, feasible iff u_c * S/k <= n_c for
all c, so the largest feasible S is k * min_c floor(n_c / u_c) (seed-independent: the
uses are fixed up to ties between equally plentiful classes). When no size is feasible
the error names the largest num_clients and classes_per_client that are.
"""

from __future__ import annotations

import numpy as np

from pfedla_jax.data.partition import k_classes
from pfedla_jax.data.partition.common import Pool, balanced_class_sets
from pfedla_jax.data.partition.registry import Scheme, register_scheme

NAME = "noniid1"


def clients(pool: Pool, rng, samples_per_client, *, classes_per_client=None):
    """The `Scheme.clients` of noniid1; classes_per_client (k) is required."""
    return k_classes.clients(NAME, pool, rng, samples_per_client, classes_per_client,
                             _class_sets, _advice)


def max_samples_per_client(pool: Pool, rng, *, classes_per_client=None) -> int:
    """The `Scheme.max_samples_per_client` of noniid1: k * min_c floor(n_c / u_c)."""
    return k_classes.max_samples_per_client(NAME, pool, rng, classes_per_client,
                                            _class_sets, _advice)


def _class_sets(rng, num_clients: int, k: int, avail: np.ndarray) -> np.ndarray:
    return balanced_class_sets(rng, num_clients, k, avail)


def balanced_uses(n: int, k: int, avail: np.ndarray) -> np.ndarray:
    """int64 [C] clients using each class in noniid1's sets, up to ties between equally
    plentiful classes (which leave feasibility as is)."""
    c = avail.shape[0]
    q, r = divmod(n * k, c)
    uses = np.full(c, q, dtype=np.int64)
    uses[np.argsort(-avail, kind="stable")[:r]] += 1
    return uses


def _advice(n: int, k: int, avail: np.ndarray) -> str:
    return k_classes.advice_from_uses(balanced_uses, n, k, avail)


register_scheme(Scheme(
    name=NAME,
    description=("classes_per_client random classes per client, the same number of "
                 "samples of each (paper non-IID 1, Table 1)"),
    parameters=("classes_per_client",),
    clients=clients,
    max_samples_per_client=max_samples_per_client,
    order=10,
))
