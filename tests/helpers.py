"""Small shared builders for tests (synthetic data, tiny cohorts) and the in-process check of
a command's one-line error (`one_error_line`)."""

import functools
import os

import numpy as np
import pytest

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
    """(dataset, ClientStore) of a synthetic pool partitioned by `scheme`.

    `kw` are the scheme's parameters; a None value means the scheme's default, and noniid1
    gets classes_per_client=2 unless given.
    """
    ds = synthetic(name, per_class, 0)
    kw = {k: v for k, v in kw.items() if v is not None}
    if scheme == "noniid1":
        kw.setdefault("classes_per_client", 2)
    part = make_partition(ds.labels, ds.num_classes, num_clients, scheme,
                          samples_per_client=samples_per_client, seed=seed, **kw)
    return ds, build_client_store(ds, part)


def import_torch():
    """torch; without it the calling test module is skipped, unless PFEDLA_REQUIRE_TORCH=1
    (CI), in which case a missing torch is an error. Call at module level."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        if os.environ.get("PFEDLA_REQUIRE_TORCH") == "1":
            raise ImportError("PFEDLA_REQUIRE_TORCH=1 but torch is not installed "
                              "(pip install -e '.[torch]')") from err
        pytest.skip("torch not installed (optional extra 'torch'); set PFEDLA_REQUIRE_TORCH=1 "
                    "to make this an error", allow_module_level=True)
    return torch


def one_error_line(main, argv, capfd) -> str:
    """Calls `main(argv)` in process and asserts what the program does on bad input: exit
    status 2 (SystemExit) and exactly one line on stderr, starting `error: `.

    `main` is a command's main (argv[0] the program, as `python -m` gives it) or a function
    of one that ends the program the same way (`experiments.cli.fail`). `capfd` is pytest's
    fixture (file-descriptor capture: output from outside Python counts too). Returns the
    line.
    """
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    err = capfd.readouterr().err
    assert exit_info.value.code == 2, (exit_info.value.code, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]
