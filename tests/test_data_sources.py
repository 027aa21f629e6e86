"""Tests for pfedla_jax.data.sources: Fashion-MNIST files, TFDS (mocked), synthetic."""

import gzip
import hashlib
import io
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from pfedla_jax.core.local_training import LocalTrainConfig
from pfedla_jax.data import SCHEMES, make_partition, sources
from pfedla_jax.data.sources import load_dataset, synthetic_templates
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.config import ExperimentConfig, RunOptions
from pfedla_jax.training.loop import run_experiment

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
needs_fmnist = pytest.mark.skipif(
    not all(os.path.exists(os.path.join(FMNIST_DIR, f)) for f in FILES),
    reason="dataset-fashion-mnist is not installed",
)


def _decode_independently(path, offset):
    """Reads an IDX .gz with plain gzip + numpy, skipping a header of `offset` bytes."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def _copy_dir(tmp_path, rewrite=None):
    """A data dir whose files link to the real ones, except those in `rewrite`.

    Args:
        rewrite: {file name: function(payload bytes) -> gz bytes}.
    """
    rewrite = rewrite or {}
    for name in FILES:
        dst = tmp_path / name
        src = os.path.join(FMNIST_DIR, name)
        if name in rewrite:
            with gzip.open(src, "rb") as f:
                dst.write_bytes(rewrite[name](f.read()))
        else:
            os.symlink(src, dst)
    return str(tmp_path)


def _regzip(payload, mtime=1234567890, fname="something-else"):
    """gzip with another header (file name, mtime) than Debian's, same payload."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename=fname, mode="wb", fileobj=buf, mtime=mtime, compresslevel=1) as f:
        f.write(payload)
    return buf.getvalue()


# ----------------------------------------------------------------------------- fmnist


@needs_fmnist
def test_fmnist_real_matches_independent_decode():
    ds = load_dataset("fmnist")
    assert ds.images.shape == (70000, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (70000,) and ds.labels.dtype == np.int32
    assert ds.num_classes == 10 and ds.input_shape == (28, 28, 1) and len(ds) == 70000
    assert ds.class_map is None
    assert np.array_equal(np.bincount(ds.labels), np.full(10, 7000))
    # Pool order: train then test, each exactly as in the IDX files.
    train_labels = _decode_independently(os.path.join(FMNIST_DIR, FILES[1]), 8)
    test_labels = _decode_independently(os.path.join(FMNIST_DIR, FILES[3]), 8)
    assert np.array_equal(ds.labels, np.concatenate([train_labels, test_labels]))
    test_images = _decode_independently(os.path.join(FMNIST_DIR, FILES[2]), 16)
    assert np.array_equal(ds.images[60000:].reshape(-1), test_images)
    # Mean/std from a pixel histogram (cheaper than a 440 MB float copy, and a
    # different method from the loader's).
    hist = np.bincount(ds.images.reshape(-1), minlength=256)
    v = np.arange(256) / 255.0
    mean = hist @ v / hist.sum()
    assert ds.mean[0] == pytest.approx(mean, abs=1e-9)
    assert ds.std[0] == pytest.approx(np.sqrt(hist @ (v - mean) ** 2 / hist.sum()), abs=1e-9)
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-3)


@needs_fmnist
def test_fmnist_cached_and_read_only():
    a = load_dataset("fmnist")
    t = time.perf_counter()
    b = load_dataset("fmnist", FMNIST_DIR)
    assert time.perf_counter() - t < 0.1
    assert a is b
    with pytest.raises(ValueError):
        a.images[0, 0, 0, 0] = 1  # The cache is shared: writes must be impossible.


@needs_fmnist
def test_fmnist_other_gzip_header_same_payload_is_accepted(tmp_path):
    names = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    data_dir = _copy_dir(tmp_path, {n: _regzip for n in names})
    for n in names:  # Precondition: the file digests really differ from Debian's.
        assert (hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()
                != sources._FMNIST_FILES["test_labels" if "labels" in n else "test_images"][1])
    ds = load_dataset("fmnist", data_dir)
    ref = load_dataset("fmnist")
    assert np.array_equal(ds.images, ref.images) and np.array_equal(ds.labels, ref.labels)


@needs_fmnist
def test_fmnist_changed_payload_byte_is_rejected(tmp_path):
    def corrupt(payload):
        b = bytearray(payload)
        b[100] = (b[100] + 1) % 10  # Still a valid label, so only the checksum can tell.
        return _regzip(bytes(b))

    data_dir = _copy_dir(tmp_path, {"t10k-labels-idx1-ubyte.gz": corrupt})
    with pytest.raises(UserInputError, match="checksum mismatch.*t10k-labels") as e:
        load_dataset("fmnist", data_dir)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "\n" not in str(e.value)


@needs_fmnist
def test_fmnist_changed_gz_byte_is_rejected(tmp_path):
    for name in FILES:
        if name != "t10k-labels-idx1-ubyte.gz":
            os.symlink(os.path.join(FMNIST_DIR, name), tmp_path / name)
    raw = bytearray(open(os.path.join(FMNIST_DIR, "t10k-labels-idx1-ubyte.gz"), "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(raw))
    with pytest.raises(UserInputError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("fmnist", str(tmp_path))


def test_fmnist_missing_dir_and_file(tmp_path):
    with pytest.raises(UserInputError,
                       match="does not exist.*apt-get install dataset-fashion-mnist"):
        load_dataset("fmnist", str(tmp_path / "nope"))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(UserInputError,
                       match="missing file .*train-labels-idx1-ubyte.gz.*--data_dir"):
        load_dataset("fmnist", str(tmp_path))


def test_idx_header_checks():
    good = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2, 3, 3))
    arr = sources._parse_idx(good + bytes(range(18)), "f", 0x803, (2, 3, 3))
    assert arr.shape == (2, 3, 3) and arr[1, 2, 2] == 17
    with pytest.raises(UserInputError, match="magic"):
        sources._parse_idx(good + bytes(18), "f", 0x801, (2, 3, 3))
    with pytest.raises(UserInputError, match="dims"):
        sources._parse_idx(good + bytes(17), "f", 0x803, (2, 3, 3))


def test_unknown_names():
    with pytest.raises(UserInputError,
                       match="unknown dataset 'cifar'.*fmnist.*tfds:cifar10.*synthetic"):
        load_dataset("cifar")
    with pytest.raises(UserInputError, match="unknown TFDS dataset 'imagenet2012'"):
        load_dataset("tfds:imagenet2012")
    with pytest.raises(UserInputError, match="synthetic_per_class"):
        load_dataset("synthetic", synthetic_per_class=0)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_learnable():
    a = load_dataset("synthetic", synthetic_per_class=100, seed=3)
    sources.clear_cache()
    b = load_dataset("synthetic", synthetic_per_class=100, seed=3)
    assert a is not b
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    c = load_dataset("synthetic", synthetic_per_class=100, seed=4)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (1000, 28, 28, 1) and a.images.dtype == np.uint8
    assert a.labels.dtype == np.int32 and a.num_classes == 10 and a.class_map is None
    assert np.array_equal(np.bincount(a.labels), np.full(10, 100))
    assert len(np.unique(a.images.reshape(1000, -1), axis=0)) == 1000  # Noise: all distinct.
    x = a.images.reshape(1000, -1).astype(np.float64)
    # The true templates classify well but not perfectly ...
    t = synthetic_templates("synthetic", seed=3).reshape(10, -1)
    acc = np.mean(((x[:, None] - t[None]) ** 2).sum(-1).argmin(1) == a.labels)
    assert 0.6 < acc < 0.97, acc
    # ... and so do class means estimated from half of the data (learnable from samples).
    half = np.arange(1000) % 2 == 0
    means = np.stack([x[half & (a.labels == k)].mean(0) for k in range(10)])
    pred = ((x[~half, None] - means[None]) ** 2).sum(-1).argmin(1)
    acc_learned = np.mean(pred == a.labels[~half])
    assert 0.5 < acc_learned < 0.97, acc_learned
    assert a.mean[0] == pytest.approx(x.mean() / 255, abs=1e-9)
    assert a.std[0] == pytest.approx(x.std() / 255, abs=1e-9)


def test_synthetic_rgb():
    d = load_dataset("synthetic_rgb", synthetic_per_class=30)
    assert d.images.shape == (300, 32, 32, 3) and d.input_shape == (32, 32, 3)
    assert len(d.mean) == 3 and len(d.std) == 3
    x = d.images.reshape(300, -1).astype(np.float64)
    t = synthetic_templates("synthetic_rgb").reshape(10, -1)
    acc = np.mean(((x[:, None] - t[None]) ** 2).sum(-1).argmin(1) == d.labels)
    assert 0.6 < acc < 0.99, acc


# ----------------------------------------------------------------------------- tfds


class NetworkAttempt(BaseException):
    """BaseException so no library's `except Exception` can swallow it and retry."""


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise NetworkAttempt(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    sources.clear_cache()
    yield
    sources.clear_cache()  # Mocked data must not outlive the mock in the cache.


@pytest.mark.parametrize(
    "name,shape",
    [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3)), ("emnist/digits", (28, 28, 1))],
)
def test_tfds_mocked(no_network, tmp_path, name, shape):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=5):
        ds = load_dataset(f"tfds:{name}", str(tmp_path))
        # The reference: read the same mocked sources directly.
        train, test = tfds.data_source(name, split=["train", "test"], data_dir=str(tmp_path),
                                       download=False,
                                       builder_kwargs={"file_format": "array_record"})
        ref = [train[i] for i in range(5)] + [test[i] for i in range(5)]
    assert ds.images.shape == (10,) + shape and ds.images.dtype == np.uint8
    assert ds.labels.shape == (10,) and ds.labels.dtype == np.int32
    assert ds.name == f"tfds:{name}"
    assert np.array_equal(ds.images, np.stack([r["image"] for r in ref]))
    # 10 random mock labels rarely cover all 10 classes: the classes are those present.
    raw = np.array([r["label"] for r in ref])
    present = np.unique(raw)
    assert ds.num_classes == present.size
    assert ds.class_map == (None if present.size == 10 else tuple(present.tolist()))
    assert np.array_equal(ds.labels, np.searchsorted(present, raw))
    x = ds.images.reshape(-1, shape[-1]).astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, x.mean(0), atol=1e-9)
    np.testing.assert_allclose(ds.std, x.std(0), atol=1e-9)


def _mock_sources(labels_per_split, shape=(28, 28, 1)):
    """An `as_data_source` replacement serving the given labels (one list per split)."""

    def as_data_source(self, split, **kwargs):
        del self, kwargs
        rng = np.random.default_rng(0)
        out = []
        for labels in labels_per_split:
            out.append([{"image": rng.integers(0, 256, shape, dtype=np.uint8),
                         "label": np.int64(y)} for y in labels])
        return out if isinstance(split, (list, tuple)) else out[0]

    return as_data_source


# TFDS emnist/letters declares 37 classes; its labels are 1..26.
LETTERS = np.tile(np.arange(1, 27), 60)  # 60 examples of each of labels 1..26, per split


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tfds_labels_not_filling_declared_classes_are_mapped(no_network, tmp_path, scheme):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(as_data_source_fn=_mock_sources([LETTERS, LETTERS[::-1]])):
        # Precondition: the installed metadata declares the 37 classes of the real dataset.
        declared = tfds.builder("emnist/letters", data_dir=str(tmp_path)).info
        assert declared.features["label"].num_classes == 37
        ds = load_dataset("tfds:emnist/letters", str(tmp_path))
    raw = np.concatenate([LETTERS, LETTERS[::-1]])
    assert ds.num_classes == 26  # Not 37: no phantom classes.
    assert ds.class_map == tuple(range(1, 27))
    assert np.array_equal(np.asarray(ds.class_map)[ds.labels], raw)  # The map undoes it.
    assert np.array_equal(np.bincount(ds.labels), np.full(26, 120))
    # Every scheme partitions it (formerly noniid1, adjacent and fig5 failed on the empty
    # class 0 and noniid2 on the empty classes 0, 27..36).
    kw = {"classes_per_client": 4} if scheme in ("noniid1", "adjacent", "fig5") else {}
    p = make_partition(ds.labels, ds.num_classes, 4, scheme, seed=0, **kw)
    for i in range(4):
        tr, te = p.train_indices[i], p.test_indices[i]
        assert tr.size >= 1 and te.size >= 1
        held = np.unique(ds.labels[np.concatenate([tr, te])])
        assert np.array_equal(held, p.client_classes[i])
        if kw:
            assert held.size == 4
            assert np.array_equal(np.unique(ds.labels[te]), held)
    if scheme == "noniid2":
        assert all(c.size == 26 for c in p.client_classes)


def test_tfds_single_class_is_refused(no_network, tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(as_data_source_fn=_mock_sources([[3] * 4, [3] * 2])):
        with pytest.raises(UserInputError,
                           match="tfds:mnist: all 6 examples have label 3; classification "
                                 "needs at least 2 classes with examples") as e:
            load_dataset("tfds:mnist", str(tmp_path))
    assert "\n" not in str(e.value)


def test_labels_with_gaps_are_mapped_in_order():
    # Any source path (the loaders all end in _make_dataset): gaps anywhere, order kept.
    images = np.zeros((6, 2, 2, 1), dtype=np.uint8)
    ds = sources._make_dataset("x", images, np.array([9, 2, 5, 2, 9, 0]), 12)
    assert ds.num_classes == 4 and ds.class_map == (0, 2, 5, 9)
    assert ds.labels.tolist() == [3, 1, 2, 1, 3, 0] and ds.labels.dtype == np.int32
    full = sources._make_dataset("y", images, np.array([0, 1, 2, 2, 1, 0]), 3)
    assert full.num_classes == 3 and full.class_map is None
    assert full.labels.tolist() == [0, 1, 2, 2, 1, 0]


def test_tfds_not_prepared_fails_fast(no_network, tmp_path, monkeypatch):
    from tensorflow_datasets.core import dataset_builder

    def no_download(*args, **kwargs):
        raise NetworkAttempt("download_and_prepare called")

    monkeypatch.setattr(dataset_builder.DatasetBuilder, "download_and_prepare", no_download)
    t = time.perf_counter()
    with pytest.raises(
            UserInputError,
            match=r"tfds:mnist is not prepared.*tfds build mnist --file_format=array_record") as e:
        load_dataset("tfds:mnist", str(tmp_path))
    assert time.perf_counter() - t < 20
    assert "\n" not in str(e.value) and "pip install .[tfds-build]" in str(e.value)
    with pytest.raises(UserInputError, match="unknown EMNIST config 'bogus'.*tfds:emnist/digits"):
        load_dataset("tfds:emnist/bogus", str(tmp_path))


@pytest.mark.slow  # starts a process
def test_tfds_imported_lazily():
    code = ("import sys, pfedla_jax.data as d; d.load_dataset('synthetic', synthetic_per_class=1);"
            " assert 'tensorflow_datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow  # trains (one round)
def test_class_map_reaches_the_summary(no_network, tmp_path):
    import tensorflow_datasets as tfds  # optional dependency

    cfg = ExperimentConfig(algorithm="local", dataset="tfds:emnist/letters", num_clients=4,
                           rounds=1, train=LocalTrainConfig(batch_size=16, local_steps=1))
    with tfds.testing.mock_data(as_data_source_fn=_mock_sources([LETTERS, LETTERS[::-1]])):
        summary = run_experiment(cfg, str(tmp_path / "run"),
                                 options=RunOptions(data_dir=str(tmp_path), tensorboard=False))
    assert summary["class_map"] == list(range(1, 27))
    assert len(summary["label_histogram"][0]) == 26
