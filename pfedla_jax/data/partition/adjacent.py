"""``adjacent``: sliding windows of classes; clients with adjacent IDs share k - 1 classes.

Source: the class layout of the pFedLA paper's Fig. 6 (Ma et al., CVPR 2022, Sec. 4.3):
8 clients with IDs 0-7, 4 classes each, adjacent IDs sharing 3 classes.

With C = num_classes, N = num_clients, S = samples_per_client, k = classes_per_client:
client i holds classes {i, i+1, ..., i+k-1} mod C and S/k samples of each, so clients i
and i+1 share k - 1 classes. Class c is used by the clients i with (c - i) mod C < k,
which need not be balanced (with N < C the classes near the wrap are used less). The
sets are fixed; the seed only picks the examples. The size rules are those of every
k-class scheme (`k_classes`): S a multiple of k with S/k >= 2, feasible iff u_c * S/k <=
n_c for all c, the largest feasible S is k * min_c floor(n_c / u_c); when none is
feasible the error names the largest num_clients and classes_per_client that are.
"""

from __future__ import annotations

import numpy as np

from pfedla_jax.data.partition import k_classes
from pfedla_jax.data.partition.common import Pool
from pfedla_jax.data.partition.registry import Scheme, register_scheme

NAME = "adjacent"


def clients(pool: Pool, rng, samples_per_client, *, classes_per_client=None):
    """The `Scheme.clients` of adjacent; classes_per_client (k) is required."""
    return k_classes.clients(NAME, pool, rng, samples_per_client, classes_per_client,
                             _class_sets, _advice)


def max_samples_per_client(pool: Pool, rng, *, classes_per_client=None) -> int:
    """The `Scheme.max_samples_per_client` of adjacent: k * min_c floor(n_c / u_c)."""
    return k_classes.max_samples_per_client(NAME, pool, rng, classes_per_client,
                                            _class_sets, _advice)


def window_class_sets(num_clients: int, k: int, num_classes: int) -> np.ndarray:
    """Client i holds classes {i, ..., i+k-1} mod C; int64 [N, k], rows sorted.

    Deterministic (no random draw), so it leaves the partition's random stream untouched.
    """
    window = (np.arange(num_clients)[:, None] + np.arange(k)[None, :]) % num_classes
    return np.sort(window, axis=1).astype(np.int64)


def _class_sets(rng, num_clients: int, k: int, avail: np.ndarray) -> np.ndarray:
    del rng  # fixed sets
    return window_class_sets(num_clients, k, avail.shape[0])


def _uses(n: int, k: int, avail: np.ndarray) -> np.ndarray:
    c = avail.shape[0]
    return np.bincount(window_class_sets(n, k, c).reshape(-1), minlength=c)


def _advice(n: int, k: int, avail: np.ndarray) -> str:
    return k_classes.advice_from_uses(_uses, n, k, avail)


register_scheme(Scheme(
    name=NAME,
    description=("client i holds classes i..i+k-1 mod C (k = classes_per_client), the same "
                 "number of samples of each (paper Fig. 6)"),
    parameters=("classes_per_client",),
    clients=clients,
    max_samples_per_client=max_samples_per_client,
    order=30,
))
