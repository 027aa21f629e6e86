"""Tests for pfedla_jax.data.store."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfedla_jax.data import (
    Partition,
    build_client_store,
    label_histogram,
    load_dataset,
    make_partition,
    normalize_images,
)
from pfedla_jax.errors import UserInputError


@pytest.fixture(scope="module")
def data():
    ds = load_dataset("synthetic", synthetic_per_class=40, seed=1)
    # Dirichlet on a subset: ragged client sizes (padding) and unused examples.
    p = make_partition(ds.labels, 10, 5, "dirichlet", samples_per_client=50,
                       min_client_size=5, seed=2)
    return ds, p, build_client_store(ds, p)


def test_tables_reproduce_partition(data):
    ds, p, st = data
    used = np.unique(np.concatenate(p.train_indices + p.test_indices))
    assert st.images.shape == (used.size, 28, 28, 1) and st.images.dtype == jnp.uint8
    assert st.labels.dtype == jnp.int32 and st.train_idx.dtype == jnp.int32
    sizes = [len(t) for t in p.train_indices]
    assert len(set(sizes)) > 1  # Precondition: padding is exercised.
    assert st.num_clients == 5 and st.num_classes == 10
    assert st.max_train == max(sizes) and st.train_idx.shape == (5, max(sizes))
    assert st.max_test == max(len(t) for t in p.test_indices)
    for table, count, rows in ((st.train_idx, st.train_count, p.train_indices),
                               (st.test_idx, st.test_count, p.test_indices)):
        table, count = np.asarray(table), np.asarray(count)
        assert np.array_equal(count, [len(r) for r in rows])
        for i, r in enumerate(rows):
            assert np.array_equal(used[table[i, :count[i]]], r)  # Same indices, same order.
            assert not table[i, count[i]:].any()  # Padding is 0.
            # Images/labels gathered through the store are the dataset's.
            got = np.asarray(st.images[table[i, :count[i]]])
            assert np.array_equal(got, ds.images[r])
            assert np.array_equal(np.asarray(st.labels)[table[i, :count[i]]], ds.labels[r])
    np.testing.assert_allclose(np.asarray(st.mean), ds.mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st.std), ds.std, rtol=1e-6)


def test_store_is_a_pytree_usable_under_jit(data):
    _, p, st = data
    assert len(jax.tree_util.tree_leaves(st)) == 8  # Static fields are not leaves.

    @jax.jit
    def first_batch_labels(s):
        return s.labels[s.train_idx[:, :3]]

    got = np.asarray(first_batch_labels(st))
    want = np.stack([np.asarray(st.labels)[np.asarray(st.train_idx)[i, :3]] for i in range(5)])
    assert np.array_equal(got, want)


def test_label_histogram(data):
    ds, p, st = data
    want = np.stack([np.bincount(ds.labels[p.client_indices(i)], minlength=10) for i in range(5)])
    assert np.array_equal(label_histogram(st), want)
    assert np.array_equal(label_histogram(p, ds), want)
    assert np.array_equal(label_histogram(p, ds.labels, 10), want)
    train = np.stack([np.bincount(ds.labels[t], minlength=10) for t in p.train_indices])
    assert np.array_equal(label_histogram(st, split="train"), train)
    assert np.array_equal(label_histogram(p, ds, split="test"), want - train)
    with pytest.raises(UserInputError, match="needs the dataset's labels"):
        label_histogram(p)


def test_normalize_images_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2, 3, 4, 5, 3), dtype=np.uint8)
    mean, std = np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.3, 0.25])
    want = (x.astype(np.float64) / 255.0 - mean) / std
    got = jax.jit(normalize_images)(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(std))
    assert got.dtype == jnp.float32 and got.shape == x.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_store_full_noniid1_partition():
    ds = load_dataset("synthetic", synthetic_per_class=20)
    p = make_partition(ds.labels, 10, 4, "noniid1", classes_per_client=2)
    st = build_client_store(ds, p)
    assert (np.asarray(st.train_count) == 28).all() and (np.asarray(st.test_count) == 12).all()
    hist = label_histogram(st)
    assert ((hist == 20) | (hist == 0)).all() and ((hist > 0).sum(1) == 2).all()


def test_partition_of_another_dataset_is_rejected():
    ds = load_dataset("synthetic", synthetic_per_class=2)  # 20 examples.
    big = Partition([np.array([0, 25])], [np.array([3])], [np.array([0])], "iid", 3)
    with pytest.raises(UserInputError,
                       match="indexes examples up to 25 but dataset synthetic has 20"):
        build_client_store(ds, big)
