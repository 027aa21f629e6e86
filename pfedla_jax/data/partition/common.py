"""What every partition scheme shares: the `Partition`, the checked inputs (`Pool`), the
per-client train/test split and the size rules it imposes, and the dealing of examples.

The split (pFedLA paper, Sec. 4: each client's data is 70% train, 30% test, with the same
class distribution) is done per class by `split_train_test`, after the scheme has chosen
every client's examples. Every size a scheme accepts accounts for it: every client holds
>= MIN_SPLIT examples (one train, one test), and the schemes that give every class of a
client the same count give it >= MIN_SPLIT, so each class a client holds is in both its
train and its test split.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from pfedla_jax.errors import UserInputError

# The share of each client's data used for training: the paper's 70/30 split.
TRAIN_FRACTION = 0.7

# Fewest examples of a class a client may hold in the schemes that give each class of a
# client the same count (and of a noniid2 dominant class), and fewest examples of any
# client: one train, one test.
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


@dataclasses.dataclass(frozen=True, eq=False)
class Pool:
    """The checked inputs every scheme partitions (built by `check_pool`).

    Attributes:
        labels: int64 [M] class of every example of the pooled dataset, in [0, C).
        num_classes: C >= 1.
        num_clients: N >= 1.
        class_counts: int64 [C] examples of each class.
    """

    labels: np.ndarray
    num_classes: int
    num_clients: int
    class_counts: np.ndarray

    @property
    def num_examples(self) -> int:
        """M."""
        return int(self.labels.shape[0])


def check_pool(labels, num_classes, num_clients, train_fraction) -> Pool:
    """Validates the arguments every scheme takes; returns them as a `Pool`.

    Raises:
        UserInputError: num_classes or num_clients not an integer >= 1, train_fraction
            outside (0, 1), labels not a 1-D integer array or outside [0, num_classes).
    """
    if not is_int(num_classes) or num_classes < 1:
        raise UserInputError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if not is_int(num_clients) or num_clients < 1:
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
    return Pool(labels=labels, num_classes=int(num_classes), num_clients=int(num_clients),
                class_counts=np.bincount(labels, minlength=num_classes))


def is_int(x) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_size(samples_per_client) -> int:
    """Validates a requested per-client total (train + test); returns it as an int.

    Raises:
        UserInputError: not an integer >= 1.
    """
    if not is_int(samples_per_client) or samples_per_client < 1:
        raise UserInputError(
            f"samples_per_client must be an integer >= 1 or None, got {samples_per_client!r}"
        )
    return int(samples_per_client)


def round_half_up(x: float) -> int:
    """floor(x + 0.5): halves round up (Python's round() rounds them to even)."""
    # The epsilon keeps exact halves (0.7 * 5 = 3.5) from rounding down through
    # binary representation error.
    return int(math.floor(x + 0.5 + 1e-9))


def or_list(items: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def pool_max(pool: Pool, scheme: str, need: int = MIN_SPLIT, *, why: str | None = None,
             exact: bool = True, lower_also: str | None = None) -> int:
    """floor(M / N), the largest equal share of the pool; UserInputError when below `need`.

    Args:
        pool: The partitioned pool (M examples, N clients).
        scheme: For the message.
        need: Fewest examples a client may hold (>= MIN_SPLIT).
        why: Why it needs them, for the message; default: one train and one test example.
        exact: Whether N clients of `need` examples are feasible whenever N * need <= M
            (iid), so the advice names the largest num_clients; else (dirichlet, whose
            random draws decide) the bound is necessary only and the advice names no value.
        lower_also: Another parameter whose lowering helps (dirichlet's min_client_size),
            advised when floor(M / N) >= MIN_SPLIT.

    Returns:
        floor(M / N), an int >= need.
    """
    m, n = pool.num_examples, pool.num_clients
    s_max = m // n
    if s_max >= need:
        return s_max
    why = why or "one train and one test example"
    if m < need:
        advice = "use a larger dataset"
    elif exact:  # any floor(m / need) clients get `need` examples each
        advice = f"use num_clients <= {m // need}"
    else:
        advice = "lower num_clients" + (
            f" or {lower_also}" if lower_also and s_max >= MIN_SPLIT else "")
    raise UserInputError(
        f"{scheme}: {n} clients x {need} samples ({why}) need {n * need} examples but "
        f"the pool has {m}; no samples_per_client is feasible; {advice}"
    )


def balanced_class_sets(rng, num_clients: int, k: int, avail: np.ndarray) -> np.ndarray:
    """Random class sets of k classes, each class used by floor or ceil(N*k/C) clients.

    The ceil goes to the classes with the most examples (ties broken at random), which
    maximises the largest feasible per-class size; clients (in order) take the k classes
    with the most uses left (random tie-break), which always completes.

    Args:
        rng: The partition's generator.
        num_clients: N.
        k: Classes per client, 1 <= k <= C.
        avail: int [C] examples per class.

    Returns:
        int64 [N, k], each row sorted and distinct.
    """
    c = avail.shape[0]
    q, r = divmod(num_clients * k, c)
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


def deal_by_counts(rng, labels: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Hands out counts[i, c] distinct random examples of class c to client i.

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


def split_train_test(rng, clients, labels, train_fraction, scheme, total) -> Partition:
    """Splits every client's examples train/test per class and builds the Partition.

    Per class of a client with n_c examples: n_train = round_half_up(train_fraction *
    n_c), clamped to [1, n_c - 1] when n_c >= 2 so both splits get the class; a single
    example goes to train iff round_half_up(train_fraction) = 1. A client whose classes
    all hold a single example cannot be split per class, so it is split as a whole:
    round_half_up(train_fraction * n) of its n >= 2 examples, clamped to [1, n - 1],
    chosen at random, go to train. Every client thus gets >= 1 train and >= 1 test
    example. Train and test are shuffled.

    Args:
        rng: The partition's generator (after the scheme's draws).
        clients: Per client, int indices into `labels`, >= MIN_SPLIT of them.
        labels: int64 [M].
        train_fraction: In (0, 1).
        scheme: The Partition's scheme name.
        total: The Partition's samples_per_client.

    Returns:
        The `Partition`.
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
            n_train = np.array([round_half_up(train_fraction * c) for c in cnt],
                               dtype=np.int64)
            two = cnt >= 2
            n_train[two] = np.clip(n_train[two], 1, cnt[two] - 1)
            group = np.repeat(np.arange(cls.size), cnt)
            rank = np.arange(idx.size) - start[group]
            is_train = rank < n_train[group]
        else:  # All singletons: no per-class split exists; split the (random) order.
            n_tr = min(max(round_half_up(train_fraction * idx.size), 1), idx.size - 1)
            is_train = np.arange(idx.size) < n_tr
        train.append(rng.permutation(idx[is_train]))
        test.append(rng.permutation(idx[~is_train]))
        classes.append(cls.astype(np.int64))
    return Partition(train_indices=train, test_indices=test, client_classes=classes,
                     scheme=scheme, samples_per_client=total)
