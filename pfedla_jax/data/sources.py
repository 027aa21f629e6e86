"""Image-classification data sources: local Fashion-MNIST IDX files, TFDS, synthetic.

Every source returns one `Dataset` whose train and test splits are POOLED: the paper
(§5) re-splits each client's data 70/30, so the original split carries no meaning here
and `partition.make_partition` draws clients from the whole pool.

Names accepted by `load_dataset`:

* ``fmnist``: Fashion-MNIST from the four IDX ``.gz`` files of Debian's
  ``dataset-fashion-mnist`` package (or the same files from the Fashion-MNIST project).
* ``tfds:<name>``: a TFDS dataset already built in ``array_record`` format; ``<name>``
  is one of ``cifar10``, ``cifar100``, ``fashion_mnist``, ``mnist``, ``emnist/<config>``.
  Nothing is ever downloaded.
* ``synthetic`` / ``synthetic_rgb``: deterministic, learnable 10-class images
  (28x28x1 / 32x32x3) for tests and smoke runs.

Decoded datasets are cached per process and their arrays are read-only, so repeated
loads are free and a caller cannot corrupt the cache by writing into them.

Classes are the labels actually present: a source that declares more classes than its
labels use (TFDS's ``emnist/letters`` declares 37, its labels are 1..26) has the labels
present mapped, in order, to 0..K-1, recorded in `Dataset.class_map`, so that no scheme
or model sees a class without examples.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import re
import zlib

import numpy as np

from pfedla_jax.errors import UserInputError

DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"

# The two ways an IDX file can be accepted: the sha256 of the .gz exactly as Debian ships
# it, or the sha256 of the decompressed IDX payload (which the Fashion-MNIST project's
# own downloads share; they differ from Debian's only in the gzip header).
_FMNIST_FILES = {
    # key: (file name, gz sha256 (Debian), payload sha256, IDX magic, expected dims)
    "train_images": (
        "train-images-idx3-ubyte.gz",
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        0x00000803,
        (60000, 28, 28),
    ),
    "train_labels": (
        "train-labels-idx1-ubyte.gz",
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        0x00000801,
        (60000,),
    ),
    "test_images": (
        "t10k-images-idx3-ubyte.gz",
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        0x00000803,
        (10000, 28, 28),
    ),
    "test_labels": (
        "t10k-labels-idx1-ubyte.gz",
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        0x00000801,
        (10000,),
    ),
}

_FMNIST_HELP = (
    "install it with `apt-get install dataset-fashion-mnist` or point --data_dir at a "
    "folder holding the four Fashion-MNIST IDX .gz files"
)

TFDS_NAMES = ("cifar10", "cifar100", "fashion_mnist", "mnist", "emnist/<config>")
SYNTHETIC_NAMES = ("synthetic", "synthetic_rgb")
VALID_NAMES = ("fmnist",) + tuple(f"tfds:{n}" for n in TFDS_NAMES) + SYNTHETIC_NAMES


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A pooled (train + test) image-classification dataset held in host memory.

    `eq=False` because the fields are arrays: identity comparison and hashing are the
    only meaningful ones (a generated `__eq__`/`__hash__` would fail on arrays).

    Attributes:
        name: The name passed to `load_dataset`.
        images: uint8 [M, H, W, C], NHWC, train and test splits pooled (train first).
        labels: int32 [M], values in [0, num_classes); every class has >= 1 example
            (for datasets made by `load_dataset`).
        num_classes: Number of classes C_cls (>= 2 for `load_dataset`).
        mean: Per-channel mean of images/255, length C.
        std: Per-channel standard deviation of images/255, length C.
        class_map: None when `labels` are the source's own labels; otherwise the
            source's label of each class: class i here is label class_map[i] of the
            source (strictly increasing, length num_classes). Set when the source
            declares classes its data never uses (e.g. TFDS emnist/letters: 37 declared,
            labels 1..26 -> class_map = (1, ..., 26), num_classes = 26).
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_map: tuple[int, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(int(d) for d in self.images.shape[1:])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    synthetic_per_class: int = 600,
    seed: int = 0,
) -> Dataset:
    """Loads a dataset by name, pooling its train and test splits.

    Args:
        name: ``fmnist``, ``tfds:<name>`` (see module docstring), ``synthetic`` or
            ``synthetic_rgb``.
        data_dir: Folder of the IDX files (``fmnist``, default
            ``/usr/share/datasets/fashion-mnist``) or TFDS data dir (``tfds:``, default
            TFDS's own: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Ignored for
            synthetic data.
        synthetic_per_class: Examples per class for synthetic data.
        seed: Seed of synthetic data (same seed => identical arrays). Ignored otherwise.

    Returns:
        The pooled `Dataset` (cached per process; its arrays are read-only). Its classes
        are the labels present, mapped to 0..K-1 if they are not already (see
        `Dataset.class_map`).

    Raises:
        UserInputError: Unknown name, missing or corrupt files, dataset not built,
            labels outside the declared classes, or fewer than 2 classes present.
    """
    if not isinstance(name, str):
        raise UserInputError(f"dataset name must be a string, got {name!r}")
    if name == "fmnist":
        return _load_fmnist(DEFAULT_FMNIST_DIR if data_dir is None else data_dir)
    if name in SYNTHETIC_NAMES:
        if (
            isinstance(synthetic_per_class, bool)
            or not isinstance(synthetic_per_class, (int, np.integer))
            or synthetic_per_class < 1
        ):
            raise UserInputError(
                f"synthetic_per_class must be a positive integer, got {synthetic_per_class!r}"
            )
        return _synthetic(name, int(synthetic_per_class), int(seed))
    if name.startswith("tfds:"):
        return _load_tfds(name, data_dir)
    raise UserInputError(
        f"unknown dataset {name!r}; valid names: {', '.join(VALID_NAMES)}"
    )


def clear_cache() -> None:
    """Drops every cached dataset (tests use it around mocked TFDS loads)."""
    _load_fmnist_cached.cache_clear()
    _load_tfds_cached.cache_clear()
    _synthetic.cache_clear()


# ----------------------------------------------------------------------------- helpers


def _channel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of images/255 (population std, float64 accumulation).

    Works in chunks of ~1M values so that no float copy of the whole dataset is made
    (1.5 GB for CIFAR in float64); the sums of uint8 values are exact in float64.

    Args:
        images: uint8 [M, H, W, C].

    Returns:
        (mean, std), each a tuple of C floats.
    """
    c = images.shape[-1]
    flat = images.reshape(-1, c)
    total = np.zeros(c)
    total_sq = np.zeros(c)
    step = max(1, (1 << 20) // c)
    for start in range(0, flat.shape[0], step):
        chunk = flat[start:start + step].astype(np.float64)
        # BLAS products: much faster than axis-0 reductions on a [n, C] array.
        total += np.ones(chunk.shape[0]) @ chunk
        total_sq += np.diag(chunk.T @ chunk)
    n = flat.shape[0]
    mean = total / n
    var = np.maximum(total_sq / n - mean * mean, 0.0)
    return (tuple(float(m) / 255.0 for m in mean),
            tuple(float(np.sqrt(v)) / 255.0 for v in var))


def _make_dataset(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> Dataset:
    """Maps the labels present to 0..K-1 if some declared class is empty, freezes the
    arrays (the result is cached and shared) and computes mean/std.

    Args:
        name: The dataset name (also used in messages).
        images: uint8-convertible [M, H, W, C].
        labels: int [M] in [0, num_classes) (checked by the callers).
        num_classes: The classes the source declares.

    Raises:
        UserInputError: Fewer than 2 classes present.
    """
    labels = np.asarray(labels)
    present = np.unique(labels)
    if present.size < 2:
        raise UserInputError(
            f"{name}: all {labels.size} examples have label "
            f"{int(present[0]) if present.size else 'none'}; classification needs at "
            f"least 2 classes with examples"
        )
    class_map = None
    if present.size != num_classes:
        # Declared classes without a single example (phantom classes) would be handed to
        # clients and the model; keep only the classes present, in label order.
        class_map = tuple(int(c) for c in present)
        labels = np.searchsorted(present, labels)
        num_classes = present.size
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    mean, std = _channel_mean_std(images)
    return Dataset(name=name, images=images, labels=labels, num_classes=int(num_classes),
                   mean=mean, std=std, class_map=class_map)


# ----------------------------------------------------------------------------- fmnist


def _load_fmnist(data_dir: str) -> Dataset:
    data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
    if not os.path.isdir(data_dir):
        raise UserInputError(
            f"fmnist: data directory {data_dir} does not exist; {_FMNIST_HELP}"
        )
    # The cache key includes each file's identity so that a file replaced on disk is
    # re-read and re-verified instead of served stale from the cache.
    key = []
    for fname, *_ in _FMNIST_FILES.values():
        path = os.path.join(data_dir, fname)
        try:
            st = os.stat(path)
        except OSError:
            raise UserInputError(f"fmnist: missing file {path}; {_FMNIST_HELP}") from None
        key.append((path, st.st_size, st.st_mtime_ns, st.st_ino))
    return _load_fmnist_cached(data_dir, tuple(key))


@functools.lru_cache(maxsize=4)
def _load_fmnist_cached(data_dir: str, key: tuple) -> Dataset:
    del key  # Only part of the cache key.
    arrays = {}
    for what, (fname, gz_sha, payload_sha, magic, dims) in _FMNIST_FILES.items():
        path = os.path.join(data_dir, fname)
        payload = _read_verified_gz(path, gz_sha, payload_sha)
        arrays[what] = _parse_idx(payload, path, magic, dims)
    images = np.concatenate([arrays["train_images"], arrays["test_images"]])[..., None]
    labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]])
    if labels.max() > 9:
        raise UserInputError(f"fmnist: labels outside 0..9 in {data_dir}; {_FMNIST_HELP}")
    return _make_dataset("fmnist", images, labels, 10)


def _read_verified_gz(path: str, gz_sha: str, payload_sha: str) -> bytes:
    """Reads and decompresses `path`, accepting either known digest."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserInputError(f"fmnist: cannot read {path} ({e.strerror}); {_FMNIST_HELP}") from None
    try:
        payload = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise UserInputError(
            f"fmnist: {path} is not a valid gzip file ({_one_line(e)}); {_FMNIST_HELP}"
        ) from None
    if hashlib.sha256(raw).hexdigest() != gz_sha and (
        hashlib.sha256(payload).hexdigest() != payload_sha
    ):
        raise UserInputError(
            f"fmnist: checksum mismatch for {path} (neither the .gz nor its decompressed "
            f"content has the expected sha256); {_FMNIST_HELP}"
        )
    return payload


def _parse_idx(payload: bytes, path: str, magic: int, dims: tuple[int, ...]) -> np.ndarray:
    """Parses an unsigned-byte IDX payload and checks magic number and dimensions.

    The checksum already pins the content; these checks give a readable message if the
    digests table and the files ever disagree about which file is which.
    """
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(payload) < header_len:
        raise UserInputError(f"fmnist: {path} is too short for an IDX header; {_FMNIST_HELP}")
    got_magic = int.from_bytes(payload[:4], "big")
    if got_magic != magic:
        raise UserInputError(
            f"fmnist: {path} has IDX magic 0x{got_magic:08x}, expected 0x{magic:08x}; "
            f"{_FMNIST_HELP}"
        )
    got_dims = tuple(
        int.from_bytes(payload[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)
    )
    if got_dims != dims or len(payload) != header_len + int(np.prod(dims)):
        raise UserInputError(
            f"fmnist: {path} has IDX dims {got_dims} and {len(payload) - header_len} data "
            f"bytes, expected dims {dims}; {_FMNIST_HELP}"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=header_len).reshape(dims)


def _one_line(e: BaseException) -> str:
    """First line of an exception's text, so our messages stay one line."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# ----------------------------------------------------------------------------- tfds

_TFDS_PLAIN = ("cifar10", "cifar100", "fashion_mnist", "mnist")
_EMNIST_RE = re.compile(r"^emnist/([a-z0-9_]+)$")


def _tfds_build_help(tfds_name: str) -> str:
    return (
        f"build it first: `pip install .[tfds-build]` then "
        f"`tfds build {tfds_name} --file_format=array_record` (with --data_dir if you "
        f"pass one here)"
    )


def _load_tfds(name: str, data_dir: str | None) -> Dataset:
    tfds_name = name[len("tfds:"):]
    if tfds_name not in _TFDS_PLAIN and not _EMNIST_RE.match(tfds_name):
        raise UserInputError(
            f"unknown TFDS dataset {tfds_name!r}; supported: "
            f"{', '.join('tfds:' + n for n in TFDS_NAMES)}"
        )
    if data_dir is not None:
        data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
    return _load_tfds_cached(tfds_name, data_dir)


@functools.lru_cache(maxsize=4)
def _load_tfds_cached(tfds_name: str, data_dir: str | None) -> Dataset:
    # Imported lazily: tensorflow_datasets is only needed for tfds: names.
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise UserInputError(
            f"tfds:{tfds_name} needs tensorflow-datasets, which is not installed (pip install "
            "tensorflow-datasets array-record); fmnist, synthetic and synthetic_rgb work without it"
        ) from None

    if tfds_name.startswith("emnist/"):
        # Validate the config ourselves: TFDS's own error is many lines long.
        configs = sorted(tfds.builder_cls("emnist").builder_configs)
        config = tfds_name.split("/", 1)[1]
        if config not in configs:
            raise UserInputError(
                f"unknown EMNIST config {config!r}; valid: "
                f"{', '.join('tfds:emnist/' + c for c in configs)}"
            )

    where = data_dir if data_dir is not None else "the default TFDS data dir"
    try:
        # download=False: TFDS must never try the network (an offline download attempt
        # hangs for minutes). An unbuilt dataset then fails below, on our terms.
        sources = tfds.data_source(
            tfds_name,
            split=["train", "test"],
            data_dir=data_dir,
            download=False,
            try_gcs=False,
            builder_kwargs={"file_format": "array_record"},
        )
    except (KeyError, FileNotFoundError) as e:
        # TFDS reports an unbuilt dataset as "splits is empty" (KeyError) or missing files.
        raise UserInputError(
            f"tfds:{tfds_name} is not prepared in {where} ({_one_line(e)}); "
            f"{_tfds_build_help(tfds_name)}"
        ) from None
    except (NotImplementedError, ValueError) as e:
        # E.g. the dataset exists but was built as tfrecord (no random access).
        raise UserInputError(
            f"tfds:{tfds_name} in {where} cannot be read as array_record "
            f"({_one_line(e)}); {_tfds_build_help(tfds_name)}"
        ) from None

    info = getattr(sources[0], "dataset_info", None)
    if info is None:
        info = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record").info
    num_classes = int(info.features["label"].num_classes)

    lengths = [len(s) for s in sources]
    total = sum(lengths)
    if total == 0:
        raise UserInputError(
            f"tfds:{tfds_name} in {where} has no examples; {_tfds_build_help(tfds_name)}"
        )
    images = labels = None
    pos = 0
    for src, n in zip(sources, lengths):
        # One index at a time: batched __getitems__ is not supported by every source
        # (TFDS's own mock among them).
        for i in range(n):
            ex = src[i]
            img = np.asarray(ex["image"])
            if img.ndim == 2:
                img = img[..., None]
            if images is None:
                images = np.empty((total,) + img.shape, dtype=np.uint8)
                labels = np.empty((total,), dtype=np.int64)
            if img.shape != images.shape[1:]:
                raise UserInputError(
                    f"tfds:{tfds_name}: image {i} has shape {img.shape}, expected "
                    f"{images.shape[1:]}; only fixed-size image datasets are supported"
                )
            images[pos] = img
            labels[pos] = int(ex["label"])
            pos += 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserInputError(
            f"tfds:{tfds_name}: labels outside [0, {num_classes}) in {where}"
        )
    return _make_dataset(f"tfds:{tfds_name}", images, labels, num_classes)


# ----------------------------------------------------------------------------- synthetic

# Generator constants. Templates and the per-example "structured" noise are drawn from
# the same smooth random-field distribution (a GxG Gaussian grid bilinearly upsampled),
# so the noise looks like other classes' templates and cannot be averaged away over
# pixels; SIGMA sets how far the noise reaches. Chosen so the nearest-true-template
# classifier (about Bayes-optimal here) gets ~85% (gray) / ~89% (RGB): learnable,
# not trivially 100%.
_SYN_GRID = 5
_SYN_CONTRAST = 48.0  # std (in 0..255 units) of template + structured noise around 128
_SYN_PIXEL_NOISE = 10.0  # iid per-pixel noise std, so no two examples coincide
_SYN_SIGMA = {"synthetic": 1.5, "synthetic_rgb": 2.5}
_SYN_SHAPE = {"synthetic": (28, 28, 1), "synthetic_rgb": (32, 32, 3)}
_SYN_CLASSES = 10


def _upsample_matrix(grid: int, size: int) -> np.ndarray:
    """Linear-interpolation matrix [size, grid] mapping grid points onto `size` pixels."""
    pos = np.linspace(0.0, grid - 1.0, size)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, grid - 1)
    w = pos - lo
    u = np.zeros((size, grid))
    np.add.at(u, (np.arange(size), lo), 1.0 - w)
    np.add.at(u, (np.arange(size), hi), w)
    return u


def _smooth_fields(rng: np.random.Generator, k: int, shape: tuple[int, int, int]) -> np.ndarray:
    """k smooth random fields, float32 [k, H, W, C], unit std overall."""
    h, w, c = shape
    # float32: the example batch is large (float64 would be 1.5 GB at 6,000/class RGB).
    g = rng.standard_normal((k, c, _SYN_GRID, _SYN_GRID), dtype=np.float32)
    uh = _upsample_matrix(_SYN_GRID, h).astype(np.float32)
    uw = _upsample_matrix(_SYN_GRID, w).astype(np.float32)
    f = uh @ g @ uw.T  # [k, C, H, W]
    f = f.transpose(0, 2, 3, 1)
    return f / f.std()


def synthetic_templates(name: str = "synthetic", seed: int = 0) -> np.ndarray:
    """The noiseless class templates of a synthetic dataset (for tests and sanity checks).

    Args:
        name: ``synthetic`` or ``synthetic_rgb``.
        seed: The dataset seed.

    Returns:
        float32 [10, H, W, C] in 0..255 units (before noise and clipping).
    """
    if name not in SYNTHETIC_NAMES:
        raise UserInputError(
            f"unknown synthetic dataset {name!r}; valid: {', '.join(SYNTHETIC_NAMES)}")
    rng = np.random.default_rng(seed)
    return _template_field(rng, name)


def _template_field(rng: np.random.Generator, name: str) -> np.ndarray:
    sigma = _SYN_SIGMA[name]
    amp = _SYN_CONTRAST / np.sqrt(1.0 + sigma**2)
    # Templates are drawn first from the generator, so `synthetic_templates` can
    # reproduce them without generating the examples.
    return 128.0 + amp * _smooth_fields(rng, _SYN_CLASSES, _SYN_SHAPE[name])


@functools.lru_cache(maxsize=8)
def _synthetic(name: str, per_class: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    shape = _SYN_SHAPE[name]
    sigma = _SYN_SIGMA[name]
    amp = _SYN_CONTRAST / np.sqrt(1.0 + sigma**2)
    templates = _template_field(rng, name)
    labels = np.repeat(np.arange(_SYN_CLASSES, dtype=np.int32), per_class)
    # Shuffled so that any prefix of the pool is class-balanced in expectation, like
    # real data, rather than sorted by class.
    labels = labels[rng.permutation(labels.shape[0])]
    x = templates.astype(np.float32)[labels]
    x += amp * sigma * _smooth_fields(rng, labels.shape[0], shape)
    x += _SYN_PIXEL_NOISE * rng.standard_normal(x.shape, dtype=np.float32)
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return _make_dataset(name, images, labels, _SYN_CLASSES)
