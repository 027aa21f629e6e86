"""Small shared builders for tests (synthetic data, tiny cohorts)."""

import functools
import os

import numpy as np

from pfedla_jax.data import Partition, build_client_store, load_dataset, make_partition


@functools.lru_cache(maxsize=None)
def synthetic(name="synthetic", per_class=60, seed=0):
    return load_dataset(name, synthetic_per_class=per_class, seed=seed)


def store_from_indices(dataset, train_lists, test_lists):
    """A ClientStore from explicit per-client index lists (for hand-built cohorts)."""
    train = [np.asarray(t, np.int64) for t in train_lists]
    test = [np.asarray(t, np.int64) for t in test_lists]
    classes = [np.unique(dataset.labels[np.concatenate([a, b])]) for a, b in zip(train, test)]
    part = Partition(train_indices=train, test_indices=test, client_classes=classes,
                     scheme="manual", samples_per_client=None)
    return build_client_store(dataset, part)


def small_store(num_clients=4, samples_per_client=60, scheme="noniid1", seed=0, name="synthetic",
                per_class=60, **kw):
    ds = synthetic(name, per_class, 0)
    kw.setdefault("classes_per_client", 2 if scheme == "noniid1" else None)
    part = make_partition(ds.labels, ds.num_classes, num_clients, scheme,
                          samples_per_client=samples_per_client, seed=seed, **kw)
    return ds, build_client_store(ds, part)


def import_torch():
    """torch; without it the calling test module is skipped, unless PFEDLA_REQUIRE_TORCH=1
    (CI), in which case a missing torch is an error. Call at module level."""
    import pytest

    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        if os.environ.get("PFEDLA_REQUIRE_TORCH") == "1":
            raise ImportError("PFEDLA_REQUIRE_TORCH=1 but torch is not installed "
                              "(pip install -e '.[torch]')") from err
        pytest.skip("torch not installed (optional extra 'torch'); set PFEDLA_REQUIRE_TORCH=1 "
                    "to make this an error", allow_module_level=True)
    return torch
