"""A per-client validation split, carved out of each client's training split.

Hyperparameters are chosen on it (`experiments.tune`), never on the test split: the
protocol of the personalised-FL benchmarks that tune every method (e.g. pFL-Bench,
Chen et al., NeurIPS 2022 Datasets and Benchmarks: train/validation/test per client).

Per client and per class with n_c >= 2 training examples, round_half_up(fraction * n_c)
of them (at most n_c - 1, so the class stays in training) go to validation: the split is
stratified. A class with a single training example stays in training. A client that would
get no validation example this way (few examples per class) gives one example, drawn at
random among those of its classes with >= 2 examples (else among all), provided it keeps
>= 1 training example. The draw uses its own stream, `np.random.default_rng([seed,
VALIDATION_STREAM])`, so the same seed gives the same split whatever else the run draws;
both parts keep the order of the client's training split.
"""

from __future__ import annotations

import numpy as np

from pfedla_jax.data.partition.common import round_half_up
from pfedla_jax.errors import UserInputError

# the second word of the validation split's seed (any fixed number distinct per stream)
VALIDATION_STREAM = 0x7A1D


def check_fraction(fraction: float) -> None:
    """Raises UserInputError unless 0 <= fraction < 1 (0: no validation split)."""
    if not (0.0 <= fraction < 1.0):
        raise UserInputError(f"--validation_fraction must be in [0, 1), got {fraction}")


def validation_split(train_indices: list[np.ndarray], labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Splits every client's training indices into (training, validation).

    Args:
      train_indices: per client, int [n_i] indices into `labels` (a Partition's
        train_indices).
      labels: int [M], the dataset's labels.
      fraction: in (0, 1), the share of each class held out (module docstring).
      seed: the run's seed.

    Returns:
      (rest, validation): per client, int64 index arrays, disjoint, whose union is the
      client's training split; each keeps the training split's order.

    Raises:
      UserInputError: fraction not in (0, 1), or a client with fewer than 2 training
        examples (no split leaves both parts non-empty).
    """
    if not (0.0 < fraction < 1.0):
        raise UserInputError(f"--validation_fraction must be in (0, 1) for a validation split, "
                             f"got {fraction}")
    rng = np.random.default_rng([int(seed), VALIDATION_STREAM])
    labels = np.asarray(labels)
    rest, validation = [], []
    for i, idx in enumerate(train_indices):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size < 2:
            raise UserInputError(
                f"client {i} has {idx.size} training example(s): a validation split needs >= 2 "
                "per client; use more --samples_per_client or --validation_fraction=0")
        lab = labels[idx]
        held = np.zeros(idx.size, dtype=bool)
        for c in np.unique(lab):
            where = np.flatnonzero(lab == c)
            if where.size < 2:
                continue
            k = min(round_half_up(fraction * where.size), where.size - 1)
            held[rng.permutation(where)[:k]] = True
        if not held.any():
            counts = np.bincount(np.searchsorted(np.unique(lab), lab))
            pool = np.flatnonzero(counts[np.searchsorted(np.unique(lab), lab)] >= 2)
            held[rng.choice(pool if pool.size else np.arange(idx.size))] = True
        rest.append(idx[~held])
        validation.append(idx[held])
    return rest, validation
