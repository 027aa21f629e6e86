"""Client partitions of a pooled dataset, then a per-client 70/30 train/test split.

Paper §5: non-IID 1 gives each client k random classes with the same amount of data
per class; non-IID 2 gives every client all classes with a few dominant ones; every
client's data is then split 70% train / 30% test with the same class distribution.
All clients hold the same number of samples ("the same amount of training data for
both 10 and 100 clients cases"). `adjacent` is the class layout of the paper's Fig. 6
(sliding windows of classes, adjacent client IDs share k - 1 classes) and `fig5` that of
its Fig. 5 (a target client, one with the same classes, one sharing k - 1, the others
fewer). Dirichlet and IID splits are extra schemes.

Everything is deterministic given `seed` (one `np.random.default_rng(seed)` stream,
consumed in a fixed order), no example is given to two clients, and an infeasible
request raises `UserInputError` instead of being silently shrunk.

Every size accounts for the split: every client gets >= 1 train and >= 1 test example;
the schemes with k equal classes per client (noniid1, adjacent, fig5) give each class of
a client >= 2 examples, so that every class a client holds is in both its train and its
test split, and noniid2 does so for the dominant classes. Automatic sizes,
smallest/largest feasible sizes and the advice in error messages all follow these
rules; when no size is feasible the message names the parameters that help
(num_clients, classes_per_client, dominant_share, min_client_size).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from pfedla_jax.errors import UserInputError

SCHEMES = ("noniid1", "noniid2", "adjacent", "fig5", "dirichlet", "iid")
# Schemes whose clients hold k classes with S/k samples each (the noniid1 machinery).
_K_CLASS_SCHEMES = ("noniid1", "adjacent", "fig5")

# Dirichlet draws until every client has `min_client_size` samples; bounded so that an
# impossible request (tiny alpha, many clients) fails instead of looping forever.
DIRICHLET_MAX_TRIES = 1000

# Fewest examples of a class a client may hold in noniid1 / adjacent / fig5 (and of a
# noniid2 dominant class), and fewest examples of any client: one train, one test.
MIN_SPLIT = 2


@dataclasses.dataclass(frozen=True, eq=False)
class Partition:
    """Which examples each client holds, split into train and test.

    `eq=False`: the fields are arrays, so only identity comparison makes sense.

    Attributes:
        train_indices: Per client, int64 [n_train_i] indices into the dataset, shuffled.
        test_indices: Per client, int64 [n_test_i] indices into the dataset, shuffled.
        client_classes: Per client, int64 sorted classes it holds (train or test).
        scheme: The scheme name.
        samples_per_client: Per-client total (train + test); None for dirichlet without
            a target size (client sizes then vary). For dirichlet with a target it is
            the MEAN client size.
    """

    train_indices: list[np.ndarray]
    test_indices: list[np.ndarray]
    client_classes: list[np.ndarray]
    scheme: str
    samples_per_client: int | None

    @property
    def num_clients(self) -> int:
        return len(self.train_indices)

    def client_indices(self, i: int) -> np.ndarray:
        """All (train then test) indices of client i, int64."""
        return np.concatenate([self.train_indices[i], self.test_indices[i]])


def make_partition(
    labels: np.ndarray,
    num_classes: int,
    num_clients: int,
    scheme: str,
    *,
    classes_per_client: int | None = None,
    dominant_classes: int = 2,
    dominant_share: float = 0.8,
    dirichlet_alpha: float = 0.5,
    min_client_size: int = 10,
    samples_per_client: int | None = None,
    train_fraction: float = 0.7,
    seed: int = 0,
) -> Partition:
    """Partitions a labelled pool among clients and splits each client train/test.

    Schemes (C = num_classes, N = num_clients, S = samples_per_client):

    * ``noniid1``: each client gets k = classes_per_client distinct classes and S/k
      samples of each. Class sets are random but balanced: class c is used by u_c
      clients, u_c in {floor(N*k/C), ceil(N*k/C)}; the ceil goes to the classes with
      the most examples (ties broken at random), and clients (in order) take the k
      classes with the most uses left (random tie-break), which always completes.
      S must be a multiple of k (no remainder rule: anything else raises, naming the
      nearest valid values) and S/k >= 2 (one train and one test example per class).
      Feasible iff u_c * S/k <= examples of class c for all c, so the largest feasible
      S is k * min_c floor(n_c / u_c) (seed-independent); if that gives S/k < 2 nothing
      is feasible and the error names the num_clients / classes_per_client that are.
    * ``adjacent`` (paper Fig. 6): like noniid1 (k = classes_per_client classes, S/k
      samples of each, the same multiple-of-k rule, feasibility check and largest
      feasible S), but the class sets are fixed sliding windows instead of random ones:
      client i holds classes {i, i+1, ..., i+k-1} mod C, so clients i and i+1 share k - 1
      classes (Fig. 6: 8 clients, 4 classes each, adjacent IDs share 3). Class c is then
      used by the clients i with (c - i) mod C < k, which need not be balanced (with N < C
      the classes near the wrap are used less); the seed only picks the examples.
    * ``fig5`` (paper Fig. 5): like noniid1 (k classes, S/k samples each, the same size
      rules), with fixed roles: client 0 is the target, holding k random classes T;
      client 1 holds exactly T ("same labels"); client 2 holds k - 1 classes of T plus
      one other ("similar"); every other client holds k random classes sharing at most
      k - 2 with T (drawn until they do). Needs N >= 3, k >= 2 and C >= k + 2. The
      paper's setting: 8 clients x 4 classes.
    * ``noniid2``: every client holds all C classes; d = dominant_classes of them
      (random, balanced like noniid1's sets) are dominant. With R =
      round_half_up(dominant_share * S), each of the C - d other classes gets exactly
      floor((S - R) / (C - d)) samples and the dominant classes share the remaining
      D >= R (so the dominant share exceeds dominant_share by less than (C - d) / S):
      floor(D / d) each, plus one for the first D mod d of them in the client's fixed
      order (a random class permutation rotated by the client id, which spreads those
      extras over classes). Every class must get >= 1 sample per client and every
      dominant class >= 2 (one train, one test); a minor class with a single sample is
      in train only (the paper's CIFAR-100 setting at 100 clients, 6 dominant classes,
      needs that: its largest size, 598, gives each of the 94 minor classes 1 sample).
      The largest feasible S is found by scanning down from an analytic upper bound.
    * ``dirichlet``: per class, proportions over clients ~ Dir(alpha * 1_N); redrawn
      (up to DIRICHLET_MAX_TRIES times) until every client has >= max(min_client_size,
      2) samples. With samples_per_client, a random subset of N*S examples is drawn
      first, so S is the mean client size; without it the whole pool is used.
    * ``iid``: a random equal split, S >= 2 samples each.

    Each client's data is then split per class: n_train = round_half_up(train_fraction
    * n_c), clamped to [1, n_c - 1] when n_c >= 2 so both splits get the class; a single
    example goes to train iff round_half_up(train_fraction) = 1. A client whose classes
    all hold a single example (possible with dirichlet and iid) cannot be split per
    class, so it is split as a whole: round_half_up(train_fraction * n) of its n >= 2
    examples, clamped to [1, n - 1], chosen at random, go to train. Every client thus
    gets >= 1 train and >= 1 test example. Train and test are shuffled.

    Args:
        labels: int [M] class of every example of the pooled dataset.
        num_classes: C; labels must lie in [0, C).
        num_clients: N >= 1.
        scheme: One of SCHEMES.
        classes_per_client: noniid1's / adjacent's / fig5's k (the paper: 4; 12 for
            CIFAR-100). Required for these schemes.
        dominant_classes: noniid2's d, 1 <= d < C.
        dominant_share: noniid2's share of a client's samples in its d dominant classes,
            d/C <= share < 1.
        dirichlet_alpha: Dirichlet concentration, > 0.
        min_client_size: dirichlet's smallest acceptable client (train + test), >= 0;
            values below 2 act as 2 (one train and one test example).
        samples_per_client: Per-client total S (train + test), >= 2; None = the largest
            the data allows for this scheme (`max_samples_per_client`), or the whole
            pool for dirichlet.
        train_fraction: Share of each client's data used for training, in (0, 1).
        seed: Seed of the partition.

    Returns:
        The `Partition`.

    Raises:
        UserInputError: Bad parameter values or an infeasible request (the message names
            the feasible values or the parameters to change).
    """
    labels, avail = _check_common(labels, num_classes, num_clients, scheme, train_fraction)
    n = int(num_clients)
    rng = np.random.default_rng(seed)

    if scheme in _K_CLASS_SCHEMES:
        k = _check_k(classes_per_client, num_classes, scheme)
        # Class sets first: they do not depend on S, so `max_samples_per_client` with
        # the same seed sees the same sets.
        sets = _class_sets(scheme, rng, n, k, avail)
        uses = np.bincount(sets.reshape(-1), minlength=num_classes)
        s_max = _noniid1_max(avail, uses, n, k, scheme)
        if samples_per_client is None:
            total = s_max
        else:
            total = _check_size(samples_per_client)
            s_min = MIN_SPLIT * k  # <= s_max: _noniid1_max raised otherwise
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
        counts = np.zeros((n, num_classes), dtype=np.int64)
        np.put_along_axis(counts, sets, total // k, axis=1)
    elif scheme == "noniid2":
        d, share = _check_noniid2(dominant_classes, dominant_share, num_classes)
        plan = _Noniid2Plan(rng, n, num_classes, d, share, avail)
        if samples_per_client is None:
            total = plan.max_size()
        else:
            total = _check_size(samples_per_client)
            plan.check(total)
        counts = plan.counts(total)
    elif scheme == "iid":
        s_max = _pool_max(labels.shape[0], n, scheme, MIN_SPLIT, None)
        if samples_per_client is None:
            total = s_max
        else:
            total = _check_size(samples_per_client)
            if total < MIN_SPLIT:
                raise UserInputError(
                    f"iid: samples_per_client={total} leaves no example for one of train "
                    f"and test; the smallest valid samples_per_client is {MIN_SPLIT}"
                )
            if total > s_max:
                raise UserInputError(
                    f"iid: {n} clients x {total} samples need {n * total} examples but "
                    f"only {labels.shape[0]} exist; the largest feasible "
                    f"samples_per_client is {s_max}"
                )
        chosen = rng.permutation(labels.shape[0])[: n * total].reshape(n, total)
        return _finish(rng, list(chosen), labels, train_fraction, scheme, total)
    else:  # dirichlet
        clients = _dirichlet(rng, labels, num_classes, n, dirichlet_alpha,
                             min_client_size, samples_per_client)
        total = None if samples_per_client is None else int(samples_per_client)
        return _finish(rng, clients, labels, train_fraction, scheme, total)

    return _finish(rng, _deal_by_counts(rng, labels, counts), labels, train_fraction,
                   scheme, int(total))


def max_samples_per_client(
    labels: np.ndarray,
    num_classes: int,
    num_clients: int,
    scheme: str,
    *,
    classes_per_client: int | None = None,
    dominant_classes: int = 2,
    dominant_share: float = 0.8,
    dirichlet_alpha: float = 0.5,
    min_client_size: int = 10,
    samples_per_client: int | None = None,
    train_fraction: float = 0.7,
    seed: int = 0,
) -> int:
    """The largest samples_per_client `make_partition` accepts with these arguments.

    It is what `make_partition` uses when samples_per_client is None (except for
    dirichlet, which then uses the whole pool; its bound here is floor(M / N)).
    Arguments are those of `make_partition`; samples_per_client is ignored.
    noniid2's bound may depend on the seed (through the dominant-class sets).
    The bound accounts for the 70/30 split (see `make_partition`): it is never below 2
    (k-class schemes: 2k; dirichlet: max(min_client_size, 2), whose random draws may
    still fail at that size).

    Returns:
        The largest feasible per-client total (train + test), an int.

    Raises:
        UserInputError: Bad parameter values, or no size at all is feasible (the message
            names the parameters to change).
    """
    del samples_per_client, dirichlet_alpha  # Not bounds of the size.
    labels, avail = _check_common(labels, num_classes, num_clients, scheme, train_fraction)
    n = int(num_clients)
    rng = np.random.default_rng(seed)
    if scheme in _K_CLASS_SCHEMES:
        k = _check_k(classes_per_client, num_classes, scheme)
        sets = _class_sets(scheme, rng, n, k, avail)
        uses = np.bincount(sets.reshape(-1), minlength=num_classes)
        return _noniid1_max(avail, uses, n, k, scheme)
    if scheme == "noniid2":
        d, share = _check_noniid2(dominant_classes, dominant_share, num_classes)
        return _Noniid2Plan(rng, n, num_classes, d, share, avail).max_size()
    if scheme == "dirichlet":
        return _pool_max(labels.shape[0], n, scheme, _dirichlet_min(min_client_size),
                         min_client_size)
    return _pool_max(labels.shape[0], n, scheme, MIN_SPLIT, None)


# ----------------------------------------------------------------------------- checks


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_common(labels, num_classes, num_clients, scheme, train_fraction):
    """Validates the arguments every scheme uses; returns (labels int64 [M], counts [C])."""
    if scheme not in SCHEMES:
        raise UserInputError(f"unknown partition scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if not _is_int(num_classes) or num_classes < 1:
        raise UserInputError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if not _is_int(num_clients) or num_clients < 1:
        raise UserInputError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not isinstance(train_fraction, numbers.Real) or not 0.0 < train_fraction < 1.0:
        raise UserInputError(f"train_fraction must lie in (0, 1), got {train_fraction!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserInputError(
            f"labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserInputError(
            f"labels must lie in [0, {num_classes}), got range "
            f"[{labels.min()}, {labels.max()}]"
        )
    return labels, np.bincount(labels, minlength=num_classes)


def _check_size(samples_per_client) -> int:
    if not _is_int(samples_per_client) or samples_per_client < 1:
        raise UserInputError(
            f"samples_per_client must be an integer >= 1 or None, got {samples_per_client!r}"
        )
    return int(samples_per_client)


def _check_k(k, num_classes, scheme="noniid1") -> int:
    if k is None:
        raise UserInputError(
            f"{scheme} needs classes_per_client (the paper uses 4, or 12 for CIFAR-100)"
        )
    if not _is_int(k) or not 1 <= k <= num_classes:
        raise UserInputError(
            f"{scheme}: classes_per_client must be an integer in [1, {num_classes}] "
            f"(num_classes), got {k!r}"
        )
    return int(k)


def _check_noniid2(d, share, num_classes) -> tuple[int, float]:
    if not _is_int(d) or not 1 <= d < num_classes:
        raise UserInputError(
            f"noniid2: dominant_classes must be an integer in [1, {num_classes - 1}] "
            f"(below num_classes={num_classes}), got {d!r}"
        )
    if not isinstance(share, numbers.Real) or not 0.0 < share < 1.0:
        raise UserInputError(f"noniid2: dominant_share must lie in (0, 1), got {share!r}")
    if share < d / num_classes:
        raise UserInputError(
            f"noniid2: dominant_share={share} gives the {d} dominant classes less than "
            f"their uniform share {d}/{num_classes}={d / num_classes:g}"
        )
    return int(d), float(share)


def _round_half_up(x: float) -> int:
    # The epsilon keeps exact halves (0.7 * 5 = 3.5) from rounding down through
    # binary representation error; Python's round() would round halves to even.
    return int(math.floor(x + 0.5 + 1e-9))


def _or_list(items: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _pool_max(m: int, n: int, scheme: str, need: int, min_client_size) -> int:
    """floor(m / n) for iid / dirichlet, or UserInputError when it is below `need`.

    Args:
        m: Examples in the pool.
        n: Clients.
        scheme: For the message.
        need: Fewest examples a client may hold (>= MIN_SPLIT).
        min_client_size: dirichlet's argument (named in the advice when it is what
            raises `need` above MIN_SPLIT), or None.
    """
    s_max = m // n
    if s_max >= need:
        return s_max
    why = ("one train and one test example" if need == MIN_SPLIT
           else f"min_client_size={min_client_size}")
    if m < need:
        advice = "use a larger dataset"
    elif scheme == "iid":  # Exact: any m // 2 clients get 2 examples each.
        advice = f"use num_clients <= {m // need}"
    else:
        # dirichlet: the bound is necessary only (random draws decide), so no value.
        advice = "lower num_clients" + (
            " or min_client_size" if need > MIN_SPLIT and s_max >= MIN_SPLIT else "")
    raise UserInputError(
        f"{scheme}: {n} clients x {need} samples ({why}) need {n * need} examples but "
        f"the pool has {m}; no samples_per_client is feasible; {advice}"
    )


# ----------------------------------------------------------------------------- noniid1 / adjacent / fig5


def _class_sets(scheme: str, rng, num_clients: int, k: int, avail: np.ndarray) -> np.ndarray:
    """int64 [N, k] sorted class sets: random balanced (noniid1), sliding windows
    (adjacent) or the Fig. 5 roles (fig5)."""
    if scheme == "adjacent":
        return _adjacent_class_sets(num_clients, k, avail.shape[0])
    if scheme == "fig5":
        return _fig5_class_sets(rng, num_clients, k, avail.shape[0])
    return _balanced_class_sets(rng, num_clients, k, avail)


def _fig5_class_sets(rng, num_clients: int, k: int, num_classes: int) -> np.ndarray:
    """Paper Fig. 5: target T (client 0), same labels (1), k - 1 shared (2), others (<= k - 2).

    Returns:
        int64 [N, k], each row sorted and distinct.

    Raises:
        UserInputError: fewer than 3 clients, k < 2, or fewer than k + 2 classes.
    """
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


def _adjacent_class_sets(num_clients: int, k: int, num_classes: int) -> np.ndarray:
    """Client i holds classes {i, ..., i+k-1} mod C (paper Fig. 6); int64 [N, k], sorted.

    Deterministic (no random draw), so it leaves the partition's random stream untouched.
    """
    window = (np.arange(num_clients)[:, None] + np.arange(k)[None, :]) % num_classes
    return np.sort(window, axis=1).astype(np.int64)


def _balanced_class_sets(rng, num_clients: int, k: int, avail: np.ndarray) -> np.ndarray:
    """Random class sets, each class used by floor or ceil(N*k/C) clients.

    Args:
        rng: The partition's generator.
        num_clients: N.
        k: Classes per client.
        avail: int [C] examples per class.

    Returns:
        int64 [N, k], each row sorted and distinct.
    """
    c = avail.shape[0]
    q, r = divmod(num_clients * k, c)
    # The r classes used one extra time are the most plentiful ones (random among
    # equals), which maximises the largest feasible per-class size.
    order = np.lexsort((rng.permutation(c), -avail))
    remaining = np.full(c, q, dtype=np.int64)
    remaining[order[:r]] += 1
    sets = np.empty((num_clients, k), dtype=np.int64)
    for i in range(num_clients):
        # Taking the k classes with the most uses left always completes: a class with
        # as many uses left as clients left is always among them (Gale-Ryser), and the
        # random tie-break keeps the sets random.
        pick = np.lexsort((rng.random(c), -remaining))[:k]
        sets[i] = np.sort(pick)
        remaining[pick] -= 1
    assert not remaining.any(), remaining
    return sets


def _noniid1_max(avail: np.ndarray, uses: np.ndarray, n: int, k: int,
                 scheme: str = "noniid1") -> int:
    """k * min_c floor(avail_c / uses_c) over used classes; UserInputError below 2k."""
    used = uses > 0
    per_class = avail[used] // uses[used]
    j = int(np.argmin(per_class))
    if per_class[j] < MIN_SPLIT:
        c = int(np.flatnonzero(used)[j])
        raise UserInputError(
            f"{scheme}: {n} clients x {k} classes use class {c} for {uses[c]} clients but "
            f"only {avail[c]} examples exist, fewer than {MIN_SPLIT} per client (one train "
            f"and one test example); no samples_per_client is feasible; "
            f"{_k_class_advice(scheme, n, k, avail)}"
        )
    return int(k * per_class[j])


def _k_class_uses(scheme: str, n: int, k: int, avail: np.ndarray) -> np.ndarray:
    """int64 [C] clients using each class: exact for adjacent; for noniid1 the balanced
    counts up to ties between equally plentiful classes (which leave feasibility as is)."""
    c = avail.shape[0]
    if scheme == "adjacent":
        return np.bincount(_adjacent_class_sets(n, k, c).reshape(-1), minlength=c)
    q, r = divmod(n * k, c)
    uses = np.full(c, q, dtype=np.int64)
    uses[np.argsort(-avail, kind="stable")[:r]] += 1
    return uses


def _k_class_feasible(scheme: str, n: int, k: int, avail: np.ndarray) -> bool:
    """Whether some samples_per_client is feasible (noniid1 / adjacent only)."""
    uses = _k_class_uses(scheme, n, k, avail)
    used = uses > 0
    return bool((avail[used] // uses[used] >= MIN_SPLIT).all())


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


def _k_class_advice(scheme: str, n: int, k: int, avail: np.ndarray) -> str:
    """What makes a k-class scheme feasible: the largest num_clients / classes_per_client
    that are (noniid1, adjacent: their uses grow with both), or which to lower (fig5,
    whose random class sets leave no exact bound)."""
    if scheme == "fig5":
        levers = (["num_clients (>= 3)"] if n > 3 else []) + (
            ["classes_per_client (>= 2)"] if k > 2 else [])
        return "lower " + _or_list(levers) if levers else "use a larger dataset"
    levers = []
    n_ok = _largest(lambda x: _k_class_feasible(scheme, x, k, avail), 1, n - 1)
    if n_ok is not None:
        levers.append(f"num_clients <= {n_ok}")
    k_ok = _largest(lambda x: _k_class_feasible(scheme, n, x, avail), 1, k - 1)
    if k_ok is not None:
        levers.append(f"classes_per_client <= {k_ok}")
    return "use " + _or_list(levers) if levers else "use a larger dataset"


# ----------------------------------------------------------------------------- noniid2


def _noniid2_split(s: int, share: float, m: int) -> tuple[int, int]:
    """noniid2's (D, non) for per-client total s: see `_Noniid2Plan`."""
    non = (s - _round_half_up(share * s)) // m
    return s - m * non, non


def _noniid2_valid(s: int, share: float, m: int, d: int) -> bool:
    """Whether total s gives every class >= 1 and every dominant class >= 2 samples."""
    dom, non = _noniid2_split(s, share, m)
    return non >= 1 and dom >= MIN_SPLIT * d


def _noniid2_min_size(share: float, m: int, d: int) -> int:
    """Smallest valid noniid2 total (m other and d dominant classes); seed-independent."""
    # S - R grows with S, so bisect for the first S with non >= 1 ...
    low = m
    lo, hi = 1, 1
    while (hi - _round_half_up(share * hi)) < low:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if mid - _round_half_up(share * mid) >= low:
            hi = mid
        else:
            lo = mid + 1
    # ... then walk up for the dominant classes (share >= d/C makes this rare).
    while not _noniid2_valid(lo, share, m, d):
        lo += 1
    return lo


class _Noniid2Plan:
    """noniid2's random choices (dominant sets, remainder order), fixed before S.

    Every client has the same total S, so it splits the same way: R = round_half_up(
    share * S), each of the m = C - d other classes gets non = floor((S - R) / m), and
    the d dominant classes share D = S - m * non (>= R; the other group's rounding
    remainder goes to the dominant classes, so the other classes are exactly equal and
    the dominant share is exceeded by less than m / S). Within the dominant group each
    class gets floor(D / d), and D mod d of them one more, taken in the client's order
    (a random class permutation rotated by the client id, spreading the extra samples
    over classes).
    """

    def __init__(self, rng, n, num_classes, d, share, avail):
        self.n, self.c, self.d, self.m = n, num_classes, d, num_classes - d
        self.share, self.avail = share, avail
        dom_sets = _balanced_class_sets(rng, n, d, avail)
        self.dominant = np.zeros((n, num_classes), dtype=bool)
        np.put_along_axis(self.dominant, dom_sets, True, axis=1)
        self.uses = self.dominant.sum(axis=0)  # [C] clients where c is dominant
        perm = rng.permutation(num_classes)
        rank = np.empty(num_classes, dtype=np.int64)
        rank[perm] = np.arange(num_classes)
        key = np.where(self.dominant, (rank[None, :] - np.arange(n)[:, None]) % num_classes,
                       num_classes)
        order = np.argsort(key, axis=1, kind="stable")
        self.pos = np.empty_like(order)  # rank of a dominant class in its client's order
        np.put_along_axis(self.pos, order, np.arange(num_classes)[None, :], axis=1)
        # extra[c, r]: clients in which class c gets one of r remainder samples.
        self.extra = np.stack(
            [(self.dominant & (self.pos < r)).sum(axis=0) for r in range(d)], axis=1)

    def split(self, s: int) -> tuple[int, int]:
        """(D, non): dominant-group total and the count of each other class."""
        return _noniid2_split(s, self.share, self.m)

    def counts(self, s: int) -> np.ndarray:
        """int64 [N, C] samples of each class per client for per-client total s."""
        dom, non = self.split(s)
        dom_counts = dom // self.d + (self.pos < dom % self.d)
        return np.where(self.dominant, dom_counts, non).astype(np.int64)

    def need(self, s: int) -> np.ndarray:
        """int64 [C] examples of each class all clients need: column sums of counts."""
        dom, non = self.split(s)
        return self.uses * (dom // self.d) + self.extra[:, dom % self.d] + (
            self.n - self.uses) * non

    def _valid(self, s: int) -> bool:
        return _noniid2_valid(s, self.share, self.m, self.d)

    def min_size(self) -> int:
        """Smallest S giving every class >= 1 and every dominant class >= 2 samples in
        every client; it need not be feasible (see `smallest_feasible`)."""
        return _noniid2_min_size(self.share, self.m, self.d)

    def _feasible(self, s: int) -> bool:
        return bool((self.need(s) <= self.avail).all())

    def fits_smallest(self) -> bool:
        """Whether the smallest valid size is feasible."""
        return self._feasible(self.min_size())

    def max_size(self) -> int:
        lo = self.min_size()
        # need(S) is not monotone in S (D drops when `non` steps up), so no bisection.
        # Instead: need_c(S) >= S * rate_c - slack_c (each count is at least its exact
        # share minus rounding), which bounds the feasible S from above; scan down from
        # that bound, a few times C steps at most.
        rate = self.uses * self.share / self.d + (self.n - self.uses) * (1 - self.share) / self.m
        slack = self.uses * (0.5 / self.d + 1) + (self.n - self.uses) * (0.5 / self.m + 1)
        hi = min(int(self.avail.sum()) // self.n,
                 int(np.floor(np.min((self.avail + slack) / rate))))
        for s in range(hi, lo - 1, -1):
            if self._valid(s) and self._feasible(s):
                return s
        self._raise_infeasible(lo, None)

    def smallest_feasible(self) -> int:
        """Smallest valid S that the data allows (raises like `max_size` if none)."""
        s_max = self.max_size()
        return next(s for s in range(self.min_size(), s_max + 1)
                    if self._valid(s) and self._feasible(s))

    def check(self, s: int) -> None:
        if not self._valid(s):
            dom, non = self.split(s)
            raise UserInputError(
                f"noniid2: samples_per_client={s} is too small for all {self.c} classes "
                f"to be present with >= {MIN_SPLIT} samples (one train, one test) of each "
                f"dominant class ({self.d} dominant classes sharing {dom}, {self.m} other "
                f"classes getting {non} each); the smallest valid samples_per_client is "
                f"{self.smallest_feasible()}"
            )
        if not self._feasible(s):
            self._raise_infeasible(s, self.max_size())

    def _raise_infeasible(self, s: int, s_max: int | None) -> None:
        need = self.need(s)
        c = int(np.argmax(need - self.avail))
        if s_max is not None:
            tail = f"the largest feasible samples_per_client is {s_max}"
        else:
            # Name only the levers that help: one client at this share, or these
            # clients at the uniform share d/C, fit at their smallest valid size (their
            # random choices drawn from a throwaway generator).
            def fits(n, share):
                return _Noniid2Plan(np.random.default_rng(0), n, self.c, self.d, share,
                                    self.avail).fits_smallest()

            uniform = self.d / self.c
            levers = (["num_clients"] if self.n > 1 and fits(1, self.share) else []) + (
                ["dominant_share"] if self.share > uniform and fits(self.n, uniform) else [])
            tail = ("no samples_per_client with every class present is feasible; "
                    + ("lower " + _or_list(levers) if levers else "use a larger dataset"))
        raise UserInputError(
            f"noniid2: {self.n} clients ({self.d} dominant classes, share "
            f"{self.share:g}) need {need[c]} samples of class {c} at samples_per_client="
            f"{s} but only {self.avail[c]} exist; {tail}"
        )


# ----------------------------------------------------------------------------- dirichlet


def _dirichlet_min(min_client_size) -> int:
    """Validates min_client_size; returns the effective minimum max(it, MIN_SPLIT)."""
    if not _is_int(min_client_size) or min_client_size < 0:
        raise UserInputError(
            f"dirichlet: min_client_size must be an integer >= 0, got {min_client_size!r}"
        )
    return max(int(min_client_size), MIN_SPLIT)


def _dirichlet(rng, labels, num_classes, n, alpha, min_client_size, samples_per_client):
    if not isinstance(alpha, numbers.Real) or not (0.0 < alpha < math.inf):
        raise UserInputError(f"dirichlet: dirichlet_alpha must be > 0, got {alpha!r}")
    need = _dirichlet_min(min_client_size)
    m = labels.shape[0]
    s_max = _pool_max(m, n, "dirichlet", need, min_client_size)  # >= need
    if samples_per_client is None:
        pool = np.arange(m)
    else:
        s = _check_size(samples_per_client)
        if s > s_max:
            raise UserInputError(
                f"dirichlet: {n} clients x {s} samples need {n * s} examples but only {m} "
                f"exist; the largest feasible samples_per_client is {s_max}"
            )
        if s < need:
            why = ("one train and one test example" if need == MIN_SPLIT
                   else f"min_client_size={min_client_size}")
            # No smallest value to name: at S = need every client must get exactly S,
            # which random draws (almost) never give.
            levers = [f"raise samples_per_client (at most {s_max})"] + (
                ["lower min_client_size"] if need > MIN_SPLIT else []) + [
                "leave samples_per_client unset for the whole pool"]
            raise UserInputError(
                f"dirichlet: samples_per_client={s} (the mean client size) is below the "
                f"{need} samples every client needs ({why}); {_or_list(levers)}"
            )
        pool = np.sort(rng.choice(m, size=n * s, replace=False))
    pool_labels = labels[pool]
    by_class = [rng.permutation(pool[pool_labels == c]) for c in range(num_classes)]
    smallest = 0
    for _ in range(DIRICHLET_MAX_TRIES):
        cuts = _dirichlet_cuts(rng, by_class, n, float(alpha))
        if cuts is None:
            continue
        sizes = sum(np.diff(cut, prepend=0) for cut in cuts)
        smallest = max(smallest, int(sizes.min()))
        if sizes.min() >= need:
            parts = [[] for _ in range(n)]
            for idx, cut in zip(by_class, cuts):
                for i, piece in enumerate(np.split(idx, cut[:-1])):
                    parts[i].append(piece)
            return [np.concatenate(p) for p in parts]
    why = ("one train and one test example" if need == MIN_SPLIT
           else f"min_client_size={min_client_size}")
    raise UserInputError(
        f"dirichlet: after {DIRICHLET_MAX_TRIES} draws with alpha={alpha} some client "
        f"always had fewer than {need} samples ({why}; best draw's smallest client: "
        f"{smallest}); raise dirichlet_alpha or lower num_clients"
        + (" or min_client_size" if need > MIN_SPLIT else "")
    )


def _dirichlet_cuts(rng, by_class, n, alpha):
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


# ----------------------------------------------------------------------------- common


def _deal_by_counts(rng, labels: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Hands out counts[i, c] distinct examples of class c to client i.

    Args:
        rng: The partition's generator.
        labels: int64 [M].
        counts: int64 [N, C], column sums <= examples per class (checked by callers).

    Returns:
        Per client, int64 indices (grouped by class; the split shuffles them).
    """
    n, c = counts.shape
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=c))])
    clients = [[] for _ in range(n)]
    for cls in range(c):
        if not counts[:, cls].any():
            continue
        idx = rng.permutation(order[starts[cls]:starts[cls + 1]])
        ends = np.cumsum(counts[:, cls])
        assert ends[-1] <= idx.size
        begin = 0
        for i in range(n):
            if counts[i, cls]:
                clients[i].append(idx[begin:ends[i]])
            begin = ends[i]
    return [np.concatenate(p) if p else np.zeros(0, np.int64) for p in clients]


def _finish(rng, clients, labels, train_fraction, scheme, total) -> Partition:
    """Splits every client's examples train/test per class and builds the Partition.

    Every client must hold >= 2 examples (the schemes ensure it); one whose classes are
    all single examples is split as a whole, so each gets >= 1 train and >= 1 test.
    """
    train, test, classes = [], [], []
    for idx in clients:
        idx = rng.permutation(np.asarray(idx, dtype=np.int64))
        assert idx.size >= MIN_SPLIT, idx.size
        lab = labels[idx]
        srt = np.argsort(lab, kind="stable")  # Stable: keeps the random order per class.
        cls, start, cnt = np.unique(lab[srt], return_index=True, return_counts=True)
        if cnt.max() >= 2:
            idx = idx[srt]
            n_train = np.array([_round_half_up(train_fraction * c) for c in cnt],
                               dtype=np.int64)
            two = cnt >= 2
            n_train[two] = np.clip(n_train[two], 1, cnt[two] - 1)
            group = np.repeat(np.arange(cls.size), cnt)
            rank = np.arange(idx.size) - start[group]
            is_train = rank < n_train[group]
        else:  # All singletons: no per-class split exists; split the (random) order.
            n_tr = min(max(_round_half_up(train_fraction * idx.size), 1), idx.size - 1)
            is_train = np.arange(idx.size) < n_tr
        train.append(rng.permutation(idx[is_train]))
        test.append(rng.permutation(idx[~is_train]))
        classes.append(cls.astype(np.int64))
    return Partition(train_indices=train, test_indices=test, client_classes=classes,
                     scheme=scheme, samples_per_client=total)
