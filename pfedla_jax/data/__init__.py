"""Data layer: sources (local IDX, TFDS, synthetic), client partitions (and their files),
device store.

`tensorflow_datasets` is imported only when a ``tfds:`` dataset is loaded.
"""

from pfedla_jax.data.partition import (
    SCHEMES,
    Partition,
    make_partition,
    max_samples_per_client,
)
from pfedla_jax.data.partition_file import (
    dataset_fingerprint,
    partition_record,
    read_partition,
    write_partition,
)
from pfedla_jax.data.sources import (
    DEFAULT_FMNIST_DIR,
    VALID_NAMES,
    Dataset,
    clear_cache,
    load_dataset,
    synthetic_templates,
)
from pfedla_jax.data.store import (
    ClientStore,
    build_client_store,
    label_histogram,
    normalize_images,
)

__all__ = [
    "DEFAULT_FMNIST_DIR",
    "SCHEMES",
    "VALID_NAMES",
    "ClientStore",
    "Dataset",
    "Partition",
    "build_client_store",
    "clear_cache",
    "dataset_fingerprint",
    "label_histogram",
    "load_dataset",
    "make_partition",
    "max_samples_per_client",
    "normalize_images",
    "partition_record",
    "read_partition",
    "synthetic_templates",
    "write_partition",
]
