"""Device-resident client data: one image table plus padded per-client index tables.

A training round gathers `images[train_idx[client, batch_positions]]` on device, so no
host-to-device copy happens inside the round loop. Images stay uint8 on device (4x
less memory than float32) and are normalised on the fly by `normalize_images`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pfedla_jax.data.partition import Partition
from pfedla_jax.data.sources import Dataset
from pfedla_jax.errors import UserInputError


@flax.struct.dataclass
class ClientStore:
    """All clients' data on device (a pytree; the int fields are static metadata).

    Attributes:
        images: uint8 [M', H, W, C], only the examples some client uses, re-indexed.
        labels: int32 [M'].
        train_idx: int32 [N, max_train] indices into `images`; entries at positions
            >= train_count[i] are padding and equal 0.
        train_count: int32 [N] train examples per client.
        test_idx: int32 [N, max_test], padded like train_idx.
        test_count: int32 [N].
        mean: float32 [C] per-channel mean of the dataset's images/255.
        std: float32 [C] per-channel std.
        num_clients: N (static).
        num_classes: Number of classes (static).
        max_train: Width of train_idx, >= 1 (static).
        max_test: Width of test_idx, >= 1 (static).
        val_idx: int32 [N, max_val], the clients' validation splits (padded like
            train_idx), or None without a validation split (data/validation.py).
        val_count: int32 [N] validation examples per client, or None.
        max_val: Width of val_idx (static; 0 without a validation split).
    """

    images: jax.Array
    labels: jax.Array
    train_idx: jax.Array
    train_count: jax.Array
    test_idx: jax.Array
    test_count: jax.Array
    mean: jax.Array
    std: jax.Array
    num_clients: int = flax.struct.field(pytree_node=False)
    num_classes: int = flax.struct.field(pytree_node=False)
    max_train: int = flax.struct.field(pytree_node=False)
    max_test: int = flax.struct.field(pytree_node=False)
    val_idx: jax.Array | None = None
    val_count: jax.Array | None = None
    max_val: int = flax.struct.field(pytree_node=False, default=0)

    def split(self, name: str) -> tuple[jax.Array, jax.Array, int]:
        """(index table [N, width], counts [N], width) of split `name`: 'train', 'test' or
        'validation'.

        Raises:
          UserInputError: an unknown split, or 'validation' in a store without one.
        """
        if name == "train":
            return self.train_idx, self.train_count, self.max_train
        if name == "test":
            return self.test_idx, self.test_count, self.max_test
        if name == "validation":
            if self.val_idx is None:
                raise UserInputError("this client data has no validation split "
                                     "(--validation_fraction=0)")
            return self.val_idx, self.val_count, self.max_val
        raise UserInputError(f"unknown split {name!r}; expected train, test or validation")


def _pad_table(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stacks ragged index rows into int32 [N, max(1, longest)] (0-padded) and counts."""
    counts = np.array([r.shape[0] for r in rows], dtype=np.int32)
    # Width >= 1 so that a table never has a zero-size axis (gathers on it would fail).
    table = np.zeros((len(rows), max(1, int(counts.max(initial=0)))), dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, : r.shape[0]] = r
    return table, counts


def build_client_store(
    dataset: Dataset,
    partition: Partition,
    device: jax.Device | jax.sharding.Sharding | None = None,
    validation_indices: list[np.ndarray] | None = None,
) -> ClientStore:
    """Copies the examples the partition uses to device, with padded index tables.

    Args:
        dataset: The pooled dataset the partition indexes.
        partition: The client partition.
        device: Where to place the arrays (`jax.device_put` target); default device if
            None.
        validation_indices: Per client, int indices into the dataset of its validation
            split (data/validation.py; disjoint from the partition's train indices, which
            are then what the client trains on), or None for no validation split.

    Returns:
        The `ClientStore`; `images[train_idx[i, :train_count[i]]]` are client i's train
        images in the partition's order (likewise for test).

    Raises:
        UserInputError: The partition indexes examples the dataset does not have.
    """
    n = partition.num_clients
    if n < 1:
        raise UserInputError("build_client_store: the partition has no clients")
    val_rows = list(validation_indices) if validation_indices is not None else []
    if validation_indices is not None and len(val_rows) != n:
        raise UserInputError(f"build_client_store: {len(val_rows)} validation splits for {n} clients")
    all_idx = np.concatenate(list(partition.train_indices) + list(partition.test_indices) + val_rows)
    m = len(dataset.labels)
    if all_idx.size and (all_idx.min() < 0 or all_idx.max() >= m):
        raise UserInputError(
            f"build_client_store: the partition indexes examples up to {all_idx.max()} "
            f"but dataset {dataset.name} has {m}; was it made for another dataset?"
        )
    # Only used examples go to device (a 10x400 partition of CIFAR would otherwise
    # carry 56k unused images); np.unique sorts, so searchsorted re-indexes.
    used = np.unique(all_idx)
    train_idx, train_count = _pad_table(
        [np.searchsorted(used, r).astype(np.int32) for r in partition.train_indices])
    test_idx, test_count = _pad_table(
        [np.searchsorted(used, r).astype(np.int32) for r in partition.test_indices])
    val_idx = val_count = None
    if validation_indices is not None:
        val_idx, val_count = _pad_table([np.searchsorted(used, r).astype(np.int32) for r in val_rows])
    images = np.asarray(dataset.images)[used]
    labels = np.asarray(dataset.labels, dtype=np.int32)[used]

    def put(x):
        return jax.device_put(x, device)

    return ClientStore(
        images=put(images),
        labels=put(labels),
        train_idx=put(train_idx),
        train_count=put(train_count),
        test_idx=put(test_idx),
        test_count=put(test_count),
        mean=put(np.asarray(dataset.mean, dtype=np.float32)),
        std=put(np.asarray(dataset.std, dtype=np.float32)),
        num_clients=n,
        num_classes=int(dataset.num_classes),
        max_train=int(train_idx.shape[1]),
        max_test=int(test_idx.shape[1]),
        val_idx=None if val_idx is None else put(val_idx),
        val_count=None if val_count is None else put(val_count),
        max_val=0 if val_idx is None else int(val_idx.shape[1]),
    )


def normalize_images(images_uint8: jax.Array, mean, std) -> jax.Array:
    """Per-channel standardisation: (x / 255 - mean) / std.

    Args:
        images_uint8: uint8 [..., H, W, C] (any leading dims).
        mean: float [C] (broadcast over the last axis).
        std: float [C].

    Returns:
        float32 [..., H, W, C].
    """
    x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def label_histogram(
    source: ClientStore | Partition,
    labels: np.ndarray | Dataset | None = None,
    num_classes: int | None = None,
    split: str = "all",
) -> np.ndarray:
    """Examples of each class per client (for plots and tests).

    Args:
        source: A `ClientStore`, or a `Partition` together with `labels`.
        labels: For a Partition: the dataset's int [M] labels, or the `Dataset` itself.
            Ignored for a ClientStore.
        num_classes: Number of columns; defaults to the store's / dataset's class count,
            or max(labels) + 1 for a bare label array.
        split: "all" (train + test), "train" or "test" (a store's train split includes its
            validation split, held out of training).

    Returns:
        int64 [N, num_classes] counts.
    """
    if split not in ("all", "train", "test"):
        raise UserInputError(f"label_histogram: split must be all, train or test, got {split!r}")
    if isinstance(source, ClientStore):
        host_labels = np.asarray(source.labels)
        num_classes = source.num_classes if num_classes is None else num_classes
        rows = []
        for table, count in ((source.train_idx, source.train_count),
                             (source.test_idx, source.test_count)):
            table, count = np.asarray(table), np.asarray(count)
            rows.append([table[i, : count[i]] for i in range(source.num_clients)])
        if source.val_idx is not None:  # held out of training: part of the client's train split
            table, count = np.asarray(source.val_idx), np.asarray(source.val_count)
            rows[0] = [np.concatenate([r, table[i, : count[i]]]) for i, r in enumerate(rows[0])]
    elif isinstance(source, Partition):
        if labels is None:
            raise UserInputError("label_histogram: a Partition needs the dataset's labels")
        if isinstance(labels, Dataset):
            num_classes = labels.num_classes if num_classes is None else num_classes
            labels = labels.labels
        host_labels = np.asarray(labels)
        if num_classes is None:
            num_classes = int(host_labels.max(initial=-1)) + 1
        rows = [list(source.train_indices), list(source.test_indices)]
    else:
        raise TypeError(f"label_histogram: expected ClientStore or Partition, got {type(source)}")
    use = {"all": rows, "train": rows[:1], "test": rows[1:]}[split]
    n = len(rows[0])
    hist = np.zeros((n, num_classes), dtype=np.int64)
    for part in use:
        for i, idx in enumerate(part):
            counts = np.bincount(host_labels[idx], minlength=num_classes)
            if counts.size > num_classes:
                raise UserInputError(
                    f"label_histogram: label {counts.size - 1} >= num_classes={num_classes}")
            hist[i] += counts
    return hist
