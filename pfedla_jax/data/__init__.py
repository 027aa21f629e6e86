"""Data layer: sources (local IDX, TFDS, synthetic), client partitions (a registry of
schemes, and partition files), device store.

`tensorflow_datasets` is imported only when a ``tfds:`` dataset is loaded.
"""

from pfedla_jax.data.partition import (
    Partition,
    Scheme,
    make_partition,
    max_samples_per_client,
    register_scheme,
    scheme_names,
    scheme_parameters,
)
from pfedla_jax.data.partition_file import (
    dataset_fingerprint,
    partition_record,
    read_partition,
    with_validation,
    write_partition,
)
from pfedla_jax.data.validation import validation_split
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
    "Scheme",
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
    "register_scheme",
    "scheme_parameters",
    "synthetic_templates",
    "validation_split",
    "with_validation",
    "write_partition",
]


def __getattr__(name: str):
    # SCHEMES follows the registry of partition schemes (a scheme registered later is listed).
    if name == "SCHEMES":
        return scheme_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
