"""What the schemes with k equal classes per client share (noniid1, adjacent, fig5).

In these schemes every client holds k = classes_per_client distinct classes and S/k
samples of each (S = samples_per_client); they differ only in how the class sets are
chosen. Given the sets (int64 [N, k], rows sorted and distinct), class c is used by u_c
clients and:

* S must be a multiple of k (no remainder rule: anything else raises, naming the
  nearest valid values) and S/k >= 2 (one train and one test example per class).
* S is feasible iff u_c * S/k <= n_c (the examples of class c) for every c, so the
  largest feasible S is k * min_c floor(n_c / u_c); if that gives S/k < 2 nothing is
  feasible and the error gives the scheme's advice (which parameters to change).

The class sets are drawn before S is known, so `max_samples_per_client` with the same
seed sees the same sets as `clients`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pfedla_jax.data.partition.common import (MIN_SPLIT, Pool, check_size, deal_by_counts,
                                              is_int, or_list)
from pfedla_jax.errors import UserInputError

# (rng, N, k, avail int [C]) -> int64 [N, k] class sets, rows sorted and distinct.
ClassSets = Callable[[np.random.Generator, int, int, np.ndarray], np.ndarray]
# (N, k, avail int [C]) -> what makes some size feasible, e.g. "use num_clients <= 750".
Advice = Callable[[int, int, np.ndarray], str]
# (N, k, avail int [C]) -> int64 [C] clients using each class.
Uses = Callable[[int, int, np.ndarray], np.ndarray]


def check_classes_per_client(k, num_classes: int, scheme: str) -> int:
    """Validates classes_per_client; returns it as an int.

    Raises:
        UserInputError: None, or not an integer in [1, num_classes].
    """
    if k is None:
        raise UserInputError(
            f"{scheme} needs classes_per_client (the paper uses 4, or 12 for CIFAR-100)"
        )
    if not is_int(k) or not 1 <= k <= num_classes:
        raise UserInputError(
            f"{scheme}: classes_per_client must be an integer in [1, {num_classes}] "
            f"(num_classes), got {k!r}"
        )
    return int(k)


def clients(scheme: str, pool: Pool, rng, samples_per_client, classes_per_client,
            class_sets: ClassSets, advice: Advice) -> tuple[list[np.ndarray], int]:
    """A k-class scheme's clients (the `Scheme.clients` contract), given its class sets.

    Raises:
        UserInputError: bad classes_per_client or samples_per_client, or no feasible size.
    """
    k, sets, uses, s_max = _layout(scheme, pool, rng, classes_per_client, class_sets, advice)
    n = pool.num_clients
    if samples_per_client is None:
        total = s_max
    else:
        total = check_size(samples_per_client)
        s_min = MIN_SPLIT * k  # <= s_max: _largest_size raised otherwise
        if total % k:
            lo = (total // k) * k
            nearest = [v for v in (lo, lo + k) if s_min <= v <= s_max]
            if not nearest:
                nearest = [s_min if total < s_min else s_max]
            raise UserInputError(
                f"{scheme}: samples_per_client={total} is not a multiple of "
                f"classes_per_client={k}; use {' or '.join(map(str, nearest))}"
            )
        per_class = total // k
        if per_class < MIN_SPLIT:
            raise UserInputError(
                f"{scheme}: samples_per_client={total} gives each of the {k} classes "
                f"{per_class} sample per client, leaving no test examples (each class "
                f"needs one train and one test example); the smallest valid "
                f"samples_per_client is {s_min}"
            )
        avail = pool.class_counts
        need = uses * per_class
        bad = np.flatnonzero(need > avail)
        if bad.size:
            c = int(bad[np.argmax(need[bad] - avail[bad])])
            raise UserInputError(
                f"{scheme}: {n} clients x {k} classes need {need[c]} samples of class "
                f"{c} ({uses[c]} clients x {per_class}) at samples_per_client={total} "
                f"but only {avail[c]} exist; the largest feasible samples_per_client "
                f"is {s_max}"
            )
    counts = np.zeros((n, pool.num_classes), dtype=np.int64)
    np.put_along_axis(counts, sets, total // k, axis=1)
    return deal_by_counts(rng, pool.labels, counts), int(total)


def max_samples_per_client(scheme: str, pool: Pool, rng, classes_per_client,
                           class_sets: ClassSets, advice: Advice) -> int:
    """A k-class scheme's largest feasible size (the `Scheme.max_samples_per_client`
    contract): k * min_c floor(n_c / u_c) for the class sets `clients` draws with a
    generator seeded the same.

    Raises:
        UserInputError: bad classes_per_client, or no feasible size.
    """
    return _layout(scheme, pool, rng, classes_per_client, class_sets, advice)[3]


def advice_from_uses(uses: Uses, n: int, k: int, avail: np.ndarray) -> str:
    """The largest num_clients and classes_per_client that make some size feasible, for
    schemes whose class uses grow with both (noniid1, adjacent); else 'use a larger
    dataset'.

    Args:
        uses: The scheme's class uses for (N, k) (for random sets: the counts they have up
            to ties between equally plentiful classes, which leave feasibility as is).
        n: N of the refused request.
        k: classes_per_client of the refused request.
        avail: int [C] examples per class.
    """
    def feasible(n_, k_):
        u = uses(n_, k_, avail)
        used = u > 0
        return bool((avail[used] // u[used] >= MIN_SPLIT).all())

    levers = []
    n_ok = _largest(lambda x: feasible(x, k), 1, n - 1)
    if n_ok is not None:
        levers.append(f"num_clients <= {n_ok}")
    k_ok = _largest(lambda x: feasible(n, x), 1, k - 1)
    if k_ok is not None:
        levers.append(f"classes_per_client <= {k_ok}")
    return "use " + or_list(levers) if levers else "use a larger dataset"


def _layout(scheme, pool, rng, classes_per_client, class_sets, advice):
    """(k, class sets int64 [N, k], uses int64 [C], largest feasible S)."""
    k = check_classes_per_client(classes_per_client, pool.num_classes, scheme)
    sets = class_sets(rng, pool.num_clients, k, pool.class_counts)
    uses = np.bincount(sets.reshape(-1), minlength=pool.num_classes)
    return k, sets, uses, _largest_size(scheme, pool, uses, k, advice)


def _largest_size(scheme, pool, uses, k, advice) -> int:
    """k * min_c floor(avail_c / uses_c) over used classes; UserInputError below 2k."""
    avail, n = pool.class_counts, pool.num_clients
    used = uses > 0
    per_class = avail[used] // uses[used]
    j = int(np.argmin(per_class))
    if per_class[j] < MIN_SPLIT:
        c = int(np.flatnonzero(used)[j])
        raise UserInputError(
            f"{scheme}: {n} clients x {k} classes use class {c} for {uses[c]} clients but "
            f"only {avail[c]} examples exist, fewer than {MIN_SPLIT} per client (one train "
            f"and one test example); no samples_per_client is feasible; "
            f"{advice(n, k, avail)}"
        )
    return int(k * per_class[j])


def _largest(ok, lo: int, hi: int) -> int | None:
    """Largest x in [lo, hi] with ok(x), for ok true up to a point then false; or None."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
