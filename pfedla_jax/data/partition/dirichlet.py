"""``dirichlet``: each class divided among the clients in Dirichlet-distributed proportions.

Source: the label-skew Dirichlet split of Hsu, Qi & Brown, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification" (2019), drawn per
class over the clients (proportions over N clients, not over C classes per client). Not
a setting of the pFedLA paper: an extra scheme.

With C = num_classes, N = num_clients, S = samples_per_client: for every class, the
proportions of its examples going to each client are drawn ~ Dir(alpha * 1_N) (alpha =
dirichlet_alpha), cut points floor(cumsum(p) * n_c); the draw of all classes is
repeated (up to DIRICHLET_MAX_TRIES times) until every client has >= max(min_client_size,
2) samples (one train and one test example at least). With samples_per_client, a random
subset of N*S examples is drawn first, so S is the MEAN client size (the Partition's
samples_per_client); without it the whole pool is used and client sizes vary (the
Partition's samples_per_client is None). The largest S is floor(M / N) (seed-
independent); no smallest S is named, since at S = max(min_client_size, 2) every client
must get exactly S, which random draws (almost) never give.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from pfedla_jax.data.partition.common import (MIN_SPLIT, Pool, check_size, is_int, or_list,
                                              pool_max)
from pfedla_jax.data.partition.registry import Scheme, register_scheme
from pfedla_jax.errors import UserInputError

NAME = "dirichlet"

# Draws until every client has `min_client_size` samples; bounded so that an impossible
# request (tiny alpha, many clients) fails instead of looping forever.
DIRICHLET_MAX_TRIES = 1000


def clients(pool: Pool, rng, samples_per_client, *, dirichlet_alpha=0.5, min_client_size=10):
    """The `Scheme.clients` of dirichlet.

    Args:
        dirichlet_alpha: The Dirichlet concentration, > 0 (small: skewed clients).
        min_client_size: The smallest acceptable client (train + test), >= 0; values
            below 2 act as 2 (one train and one test example).
    """
    alpha = dirichlet_alpha
    if not isinstance(alpha, numbers.Real) or not (0.0 < alpha < math.inf):
        raise UserInputError(f"dirichlet: dirichlet_alpha must be > 0, got {alpha!r}")
    need = _effective_min(min_client_size)
    n, m, labels = pool.num_clients, pool.num_examples, pool.labels
    s_max = _max(pool, need, min_client_size)  # >= need
    if samples_per_client is None:
        chosen = np.arange(m)
    else:
        s = check_size(samples_per_client)
        if s > s_max:
            raise UserInputError(
                f"dirichlet: {n} clients x {s} samples need {n * s} examples but only {m} "
                f"exist; the largest feasible samples_per_client is {s_max}"
            )
        if s < need:
            # No smallest value to name: at S = need every client must get exactly S,
            # which random draws (almost) never give.
            levers = [f"raise samples_per_client (at most {s_max})"] + (
                ["lower min_client_size"] if need > MIN_SPLIT else []) + [
                "leave samples_per_client unset for the whole pool"]
            raise UserInputError(
                f"dirichlet: samples_per_client={s} (the mean client size) is below the "
                f"{need} samples every client needs ({_why(need, min_client_size)}); "
                f"{or_list(levers)}"
            )
        chosen = np.sort(rng.choice(m, size=n * s, replace=False))
    chosen_labels = labels[chosen]
    by_class = [rng.permutation(chosen[chosen_labels == c]) for c in range(pool.num_classes)]
    smallest = 0
    for _ in range(DIRICHLET_MAX_TRIES):
        cuts = _cuts(rng, by_class, n, float(alpha))
        if cuts is None:
            continue
        sizes = sum(np.diff(cut, prepend=0) for cut in cuts)
        smallest = max(smallest, int(sizes.min()))
        if sizes.min() >= need:
            parts = [[] for _ in range(n)]
            for idx, cut in zip(by_class, cuts):
                for i, piece in enumerate(np.split(idx, cut[:-1])):
                    parts[i].append(piece)
            total = None if samples_per_client is None else int(samples_per_client)
            return [np.concatenate(p) for p in parts], total
    raise UserInputError(
        f"dirichlet: after {DIRICHLET_MAX_TRIES} draws with alpha={alpha} some client "
        f"always had fewer than {need} samples ({_why(need, min_client_size)}; best "
        f"draw's smallest client: {smallest}); raise dirichlet_alpha or lower num_clients"
        + (" or min_client_size" if need > MIN_SPLIT else "")
    )


def max_samples_per_client(pool: Pool, rng, *, dirichlet_alpha=0.5, min_client_size=10) -> int:
    """The `Scheme.max_samples_per_client` of dirichlet: floor(M / N), if it is at least
    max(min_client_size, 2) (dirichlet_alpha is not a bound of the size)."""
    del rng, dirichlet_alpha
    return _max(pool, _effective_min(min_client_size), min_client_size)


def _effective_min(min_client_size) -> int:
    """Validates min_client_size; returns the effective minimum max(it, MIN_SPLIT)."""
    if not is_int(min_client_size) or min_client_size < 0:
        raise UserInputError(
            f"dirichlet: min_client_size must be an integer >= 0, got {min_client_size!r}"
        )
    return max(int(min_client_size), MIN_SPLIT)


def _why(need: int, min_client_size) -> str:
    return ("one train and one test example" if need == MIN_SPLIT
            else f"min_client_size={min_client_size}")


def _max(pool: Pool, need: int, min_client_size) -> int:
    # The bound is necessary only (random draws decide), so the advice names no value.
    return pool_max(pool, NAME, need, why=_why(need, min_client_size), exact=False,
                    lower_also="min_client_size" if need > MIN_SPLIT else None)


def _cuts(rng, by_class, n, alpha):
    """One Dirichlet draw: per class, int64 [N] cumulative end offsets (last = size).

    Only cut points are drawn: materialising N pieces per class for every rejected
    attempt would make failing searches slow with many clients.

    Returns:
        The list of cut arrays, or None when a draw underflowed (tiny alpha).
    """
    cuts = []
    for idx in by_class:
        p = rng.dirichlet(np.full(n, alpha))
        if not np.all(np.isfinite(p)):
            return None
        cut = np.minimum((np.cumsum(p) * idx.size).astype(np.int64), idx.size)
        cut[-1] = idx.size  # cumsum may end a hair below 1.
        cuts.append(cut)
    return cuts


register_scheme(Scheme(
    name=NAME,
    description=("each class divided among the clients in Dirichlet(dirichlet_alpha) "
                 "proportions, every client >= min_client_size (Hsu et al. 2019)"),
    parameters=("dirichlet_alpha", "min_client_size"),
    clients=clients,
    max_samples_per_client=max_samples_per_client,
    order=50,
))
