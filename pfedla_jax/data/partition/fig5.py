"""``fig5``: a target client, one with its classes, one sharing all but one, the others fewer.

Source: the class layout of the pFedLA paper's Fig. 5 (Ma et al., CVPR 2022, Sec. 4.3):
8 clients with 4 random classes each: a target client, a "same labels" client with the
same 4 classes, a "similar" client sharing 3 classes with it, and 5 others.

With C = num_classes, N = num_clients, S = samples_per_client, k = classes_per_client,
every client holds k classes and S/k samples of each, in fixed roles: client 0 is the
target, holding k random classes T; client 1 holds exactly T ("same labels"); client 2
holds k - 1 classes of T plus one other ("similar"); every other client holds k random
classes sharing at most k - 2 with T (drawn until they do). Needs N >= 3, k >= 2 and
C >= k + 2. The size rules are those of every k-class scheme (`k_classes`): S a multiple
of k with S/k >= 2, feasible iff u_c * S/k <= n_c for all c, the largest feasible S is
k * min_c floor(n_c / u_c) (it depends on the seed through the random sets); when none
is feasible the error names which of num_clients and classes_per_client to lower (the
random sets leave no exact bound).
"""

from __future__ import annotations

import numpy as np

from pfedla_jax.data.partition import k_classes
from pfedla_jax.data.partition.common import Pool, or_list
from pfedla_jax.data.partition.registry import Scheme, register_scheme
from pfedla_jax.errors import UserInputError

NAME = "fig5"


def clients(pool: Pool, rng, samples_per_client, *, classes_per_client=None):
    """The `Scheme.clients` of fig5; classes_per_client (k) is required."""
    return k_classes.clients(NAME, pool, rng, samples_per_client, classes_per_client,
                             _class_sets, _advice)


def max_samples_per_client(pool: Pool, rng, *, classes_per_client=None) -> int:
    """The `Scheme.max_samples_per_client` of fig5: k * min_c floor(n_c / u_c) for the
    class sets this seed draws."""
    return k_classes.max_samples_per_client(NAME, pool, rng, classes_per_client,
                                            _class_sets, _advice)


def _class_sets(rng, num_clients: int, k: int, avail: np.ndarray) -> np.ndarray:
    """Target T (client 0), same labels (1), k - 1 shared (2), others (<= k - 2 shared).

    Returns:
        int64 [N, k], each row sorted and distinct.

    Raises:
        UserInputError: fewer than 3 clients, k < 2, or fewer than k + 2 classes.
    """
    num_classes = avail.shape[0]
    if num_clients < 3 or k < 2 or num_classes < k + 2:
        raise UserInputError(
            f"fig5: needs >= 3 clients (target, same labels, similar), classes_per_client >= 2 "
            f"and >= classes_per_client + 2 classes; got {num_clients} clients, k={k}, "
            f"{num_classes} classes")
    target = np.sort(rng.choice(num_classes, k, replace=False))
    outside = np.setdiff1d(np.arange(num_classes), target)
    similar = np.sort(np.concatenate([rng.choice(target, k - 1, replace=False),
                                      rng.choice(outside, 1)]))
    sets = [target, target.copy(), similar]
    while len(sets) < num_clients:
        draw = np.sort(rng.choice(num_classes, k, replace=False))
        if np.intersect1d(draw, target).size <= k - 2:
            sets.append(draw)
    return np.stack(sets).astype(np.int64)


def _advice(n: int, k: int, avail: np.ndarray) -> str:
    """Which of num_clients and classes_per_client can still be lowered."""
    del avail
    levers = (["num_clients (>= 3)"] if n > 3 else []) + (
        ["classes_per_client (>= 2)"] if k > 2 else [])
    return "lower " + or_list(levers) if levers else "use a larger dataset"


register_scheme(Scheme(
    name=NAME,
    description=("client 0 the target with classes_per_client random classes, client 1 the "
                 "same, client 2 all but one of them, the others at most k - 2 (paper Fig. 5)"),
    parameters=("classes_per_client",),
    clients=clients,
    max_samples_per_client=max_samples_per_client,
    order=40,
))
