"""Tests for the registry of partition schemes (pfedla_jax.data.partition.registry): the
built-in schemes and their parameters, a scheme module written here (outside the package)
usable through make_partition and the partition files, and the refusals."""

import importlib
import inspect
import sys

import numpy as np
import pytest

import pfedla_jax.data as data
from pfedla_jax.data import (load_dataset, make_partition, max_samples_per_client, partition,
                             partition_file, partition_record, scheme_parameters)
from pfedla_jax.data.partition import (TRAIN_FRACTION, Scheme, get_scheme, register_scheme,
                                       unregister_scheme)
from pfedla_jax.errors import UserInputError

BUILT_IN = ("noniid1", "noniid2", "adjacent", "fig5", "dirichlet", "iid")
# What partition files record per scheme (the file format: do not change).
FILE_PARAMETERS = {
    "noniid1": ("classes_per_client", "samples_per_client"),
    "adjacent": ("classes_per_client", "samples_per_client"),
    "fig5": ("classes_per_client", "samples_per_client"),
    "noniid2": ("dominant_classes", "dominant_share", "samples_per_client"),
    "dirichlet": ("dirichlet_alpha", "min_client_size", "samples_per_client"),
    "iid": ("samples_per_client",),
}
FILE_PARAMETER_NAMES = ("classes_per_client", "dominant_classes", "dominant_share",
                        "dirichlet_alpha", "min_client_size", "samples_per_client",
                        "train_fraction")
LABELS = np.repeat(np.arange(10), 12).astype(np.int32)

TOY_MODULE = '''
"""A toy partition scheme: the label-sorted pool, `skip` examples dropped, cut into
consecutive equal blocks."""

import numpy as np

from pfedla_jax.data.partition import MIN_SPLIT, Scheme, register_scheme
from pfedla_jax.errors import UserInputError


def _largest(pool, skip):
    if not isinstance(skip, int) or skip < 0:
        raise UserInputError(f"toy_blocks: skip must be an integer >= 0, got {skip!r}")
    s = (pool.num_examples - skip) // pool.num_clients
    if s < MIN_SPLIT:
        raise UserInputError("toy_blocks: no samples_per_client is feasible")
    return s


def clients(pool, rng, samples_per_client, *, skip=0):
    s = _largest(pool, skip) if samples_per_client is None else samples_per_client
    order = np.argsort(pool.labels, kind="stable")[skip:]
    return [order[i * s:(i + 1) * s] for i in range(pool.num_clients)], s


def max_samples_per_client(pool, rng, *, skip=0):
    return _largest(pool, skip)


register_scheme(Scheme(name="toy_blocks", description="label-sorted blocks (a test scheme)",
                       parameters=("skip",), clients=clients,
                       max_samples_per_client=max_samples_per_client))
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy scheme module, imported from tmp_path (so registered); removed after."""
    (tmp_path / "toy_partition_scheme.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module("toy_partition_scheme")
    finally:
        unregister_scheme("toy_blocks")
        sys.modules.pop("toy_partition_scheme", None)


# ----------------------------------------------------------------------------- built-in schemes


def test_built_in_schemes_and_their_parameters():
    assert data.SCHEMES == partition.SCHEMES == BUILT_IN
    assert {name: scheme_parameters(name) for name in BUILT_IN} == {
        name: params[:-1] for name, params in FILE_PARAMETERS.items()}
    # partition files record exactly what they did before the registry existed
    assert partition_file.SCHEME_PARAMETERS == FILE_PARAMETERS
    assert list(partition_file.SCHEME_PARAMETERS) == list(BUILT_IN)
    assert partition_file.PARAMETER_NAMES == FILE_PARAMETER_NAMES
    for name in BUILT_IN:
        description = get_scheme(name).description
        assert description and "\n" not in description


def test_train_fraction_default_is_the_papers_split():
    # the experiment loop reads the default from the signature
    for fn in (make_partition, max_samples_per_client):
        assert inspect.signature(fn).parameters["train_fraction"].default == TRAIN_FRACTION == 0.7


def test_unknown_scheme_is_one_line_listing_the_schemes():
    msg = ("unknown partition scheme 'noniid3'; valid: noniid1, noniid2, adjacent, fig5, "
           "dirichlet, iid")
    for call in (lambda: scheme_parameters("noniid3"),
                 lambda: make_partition(LABELS, 10, 2, "noniid3"),
                 lambda: max_samples_per_client(LABELS, 10, 2, "noniid3")):
        with pytest.raises(UserInputError) as e:
            call()
        assert str(e.value) == msg


@pytest.mark.parametrize("scheme,kw,match", [
    ("iid", {"classes_per_client": 4},
     r"^iid: the iid partition does not take classes_per_client; its parameters: none \(every "
     r"scheme takes samples_per_client, train_fraction and seed\)$"),
    ("noniid1", {"classes_per_client": 2, "dominant_share": 0.8, "dirichlet_alpha": 1.0},
     r"^noniid1: the noniid1 partition does not take dominant_share, dirichlet_alpha; its "
     r"parameters: classes_per_client \("),
    ("dirichlet", {"classes_per_client": None},
     r"does not take classes_per_client; its parameters: dirichlet_alpha, min_client_size \("),
])
def test_a_parameter_the_scheme_does_not_take_is_refused(scheme, kw, match):
    for fn in (make_partition, max_samples_per_client):
        with pytest.raises(UserInputError, match=match):
            fn(LABELS, 10, 2, scheme, **kw)


# ----------------------------------------------------------------------------- a scheme module


def test_a_registered_scheme_is_usable_like_the_built_in_ones(toy):
    ds = load_dataset("synthetic", synthetic_per_class=12, seed=0)
    assert data.SCHEMES == partition.SCHEMES == BUILT_IN + ("toy_blocks",)
    assert scheme_parameters("toy_blocks") == ("skip",)
    assert partition_file.SCHEME_PARAMETERS["toy_blocks"] == ("skip", "samples_per_client")
    assert partition_file.PARAMETER_NAMES == FILE_PARAMETER_NAMES[:5] + (
        "skip", "samples_per_client", "train_fraction")

    p = make_partition(ds.labels, 10, 4, "toy_blocks", skip=8, seed=1)
    assert (p.scheme, p.samples_per_client, p.num_clients) == ("toy_blocks", 28, 4)
    assert max_samples_per_client(ds.labels, 10, 4, "toy_blocks", skip=8) == 28
    order = np.argsort(ds.labels, kind="stable")[8:]
    for i in range(4):  # the scheme's clients, then the common per-class 70/30 split
        np.testing.assert_array_equal(np.sort(p.client_indices(i)), np.sort(order[28 * i:28 * (i + 1)]))
        counts = np.bincount(ds.labels[p.client_indices(i)], minlength=10)
        train = np.bincount(ds.labels[p.train_indices[i]], minlength=10)
        np.testing.assert_array_equal(p.client_classes[i], np.flatnonzero(counts))
        np.testing.assert_array_equal(
            train, [min(max(int(np.floor(0.7 * c + 0.5 + 1e-9)), 1), c - 1) if c >= 2 else c
                    for c in counts])
    again = make_partition(ds.labels, 10, 4, "toy_blocks", skip=8, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(p.train_indices, again.train_indices))
    with pytest.raises(UserInputError, match="toy_blocks: skip must be an integer >= 0, got -1"):
        make_partition(ds.labels, 10, 4, "toy_blocks", skip=-1)
    with pytest.raises(UserInputError, match="does not take classes_per_client; its parameters: skip"):
        make_partition(ds.labels, 10, 4, "toy_blocks", classes_per_client=2)

    # its partition file records its own parameter (and none of the others)
    fields = {"skip": 8, "classes_per_client": 2, "samples_per_client": None, "seed": 1}
    record = partition_record(p, ds, fields)
    assert record["scheme"] == "toy_blocks" and record["samples_per_client"] == 28
    assert record["parameters"] == {"skip": 8, "samples_per_client": None}

    importlib.reload(toy)  # the same module registering again replaces its scheme
    assert partition.SCHEMES.count("toy_blocks") == 1

    unregister_scheme("toy_blocks")
    assert data.SCHEMES == BUILT_IN
    assert "toy_blocks" not in partition_file.SCHEME_PARAMETERS
    assert partition_file.PARAMETER_NAMES == FILE_PARAMETER_NAMES
    with pytest.raises(UserInputError, match="unknown partition scheme 'toy_blocks'"):
        make_partition(ds.labels, 10, 4, "toy_blocks", skip=8)


def _toy_clients(pool, rng, samples_per_client, *, skip=0):
    raise AssertionError("not called")


def _toy_max(pool, rng, *, skip=0):
    raise AssertionError("not called")


@pytest.mark.parametrize("changes,error,match", [
    ({"name": "file:x"}, ValueError, "a scheme name must be a non-empty string without ':'"),
    ({"name": ""}, ValueError, "a scheme name must be"),
    ({"parameters": ("seed",)}, ValueError, "seed is an argument of every scheme"),
    ({"parameters": ("skip", "skip")}, ValueError, "parameters repeat"),
    ({"parameters": ["skip"]}, TypeError, "parameters must be a tuple of identifiers"),
    ({"parameters": ("skip", "width")}, TypeError, "_toy_clients does not take width"),
    ({"name": "noniid1"}, ValueError,
     "'noniid1' is already registered by pfedla_jax.data.partition.noniid1"),
])
def test_malformed_schemes_are_refused(changes, error, match):
    scheme = Scheme(**dict(dict(name="toy_bad", description="a test scheme",
                                parameters=("skip",), clients=_toy_clients,
                                max_samples_per_client=_toy_max), **changes))
    try:
        with pytest.raises(error, match=match):
            register_scheme(scheme)
    finally:
        if changes.get("name") != "noniid1":
            unregister_scheme(scheme.name)
    assert data.SCHEMES == BUILT_IN
    assert get_scheme("noniid1").clients.__module__ == "pfedla_jax.data.partition.noniid1"
