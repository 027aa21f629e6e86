"""Partitions as files: a client split written to JSON and read back, checked.

Every run with a workdir writes WORKDIR/partition.json, and ``--partition=file:PATH`` runs
on such a file, so results can be compared across runs, schemes and other frameworks on
the very same split. The file (format tag ``pfedla_jax.partition/1``) is one JSON object:

  format              "pfedla_jax.partition/1"
  dataset             {"name", "num_examples" (M), "num_classes", "fingerprint"}
  scheme              the scheme that made the split (``noniid1``, ..., or another name)
  parameters          that scheme's parameters (its own, e.g. classes_per_client for
                      noniid1, then samples_per_client as requested and train_fraction:
                      `scheme_parameter_table()`, derived from the registry of schemes;
                      also readable as SCHEME_PARAMETERS and PARAMETER_NAMES)
  samples_per_client  the per-client total the scheme produced (None: sizes vary)
  seed                the partition's seed
  num_clients         N
  source              the file a ``file:`` partition was read from, else null
  clients             N objects {"train": [...], "test": [...]}: indices into the pooled
                      dataset (`sources.Dataset`: train split first, then test), in their
                      exact order (the order decides the batches)

A run with a validation split (``--validation_fraction``, data/validation.py) adds
``validation_fraction`` and, per client, ``"validation": [...]``: the part of "train" held
out (the client trains on "train" without it). "train" stays the whole training split, so
the file describes the same partition as a run without validation; reading a file ignores
"validation" (a run carves its own from its seed and fraction: the same seed and fraction
give the same split).

The dataset's fingerprint (`dataset_fingerprint`) is the sha256 of its pooled images and
labels, so a file is only accepted for the very data it indexes.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import weakref
from typing import Any

import numpy as np

from pfedla_jax.data.partition import Partition, scheme_names, scheme_parameters
from pfedla_jax.data.sources import Dataset
from pfedla_jax.errors import UserInputError

FORMAT = "pfedla_jax.partition/1"
FILE_NAME = "partition.json"  # the copy every run writes to its workdir
FILE_PREFIX = "file:"  # --partition=file:PATH


def scheme_parameter_table() -> dict[str, tuple[str, ...]]:
    """The parameters each registered scheme depends on (besides seed, num_clients and
    train_fraction): its own (`scheme_parameters`), then samples_per_client."""
    return {name: scheme_parameters(name) + ("samples_per_client",) for name in scheme_names()}


def parameter_names() -> tuple[str, ...]:
    """Every parameter a partition file records: the schemes' own parameters (in the
    order of `scheme_names()`, each once), then samples_per_client and train_fraction."""
    names = dict.fromkeys(p for name in scheme_names() for p in scheme_parameters(name))
    return tuple(names) + ("samples_per_client", "train_fraction")


def __getattr__(name: str):
    # The tables follow the registry of schemes (a scheme registered later is included).
    if name == "SCHEME_PARAMETERS":
        return scheme_parameter_table()
    if name == "PARAMETER_NAMES":
        return parameter_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def dataset_fingerprint(dataset: Dataset) -> str:
    """The sha256 (64 lowercase hex digits) of a dataset's pooled images and labels.

    Hashed, in this order: the ASCII line ``images uint8 M,H,W,C\\n`` (the image shape),
    the images' bytes (uint8, C order), the line ``labels int32le M\\n``, and the labels as
    little-endian int32. The name, mean/std and class_map are not part of it. Cached per
    `Dataset` object (datasets are cached per process, so real data is hashed once).

    Args:
        dataset: The pooled dataset: images uint8 [M, H, W, C], labels int [M].

    Returns:
        The hex digest, a str.
    """
    cached = _FINGERPRINTS.get(dataset)
    if cached is not None:
        return cached
    images = np.ascontiguousarray(dataset.images, dtype=np.uint8)
    labels = np.ascontiguousarray(dataset.labels, dtype="<i4")
    h = hashlib.sha256()
    h.update(f"images uint8 {','.join(str(d) for d in images.shape)}\n".encode())
    h.update(memoryview(images).cast("B"))
    h.update(f"labels int32le {labels.shape[0]}\n".encode())
    h.update(memoryview(labels).cast("B"))
    digest = h.hexdigest()
    _FINGERPRINTS[dataset] = digest
    return digest


def partition_record(partition: Partition, dataset: Dataset, config_fields: dict) -> dict:
    """The JSON-able record of `partition` (the content of a partition file; module docstring).

    Args:
        partition: The split; its indices (int [n_i]) index `dataset`.
        dataset: The pooled dataset the partition was made from.
        config_fields: ``seed`` (int), optionally ``source`` (the file a ``file:``
            partition was read from), and the scheme's parameters (any of
            `parameter_names()`; for a registered scheme only its own ones
            (`scheme_parameter_table()`) and train_fraction are kept, for any other scheme
            all that are given). Other keys are ignored.

    Returns:
        A dict with the keys of the module docstring; indices as Python int lists.
    """
    names = parameter_names()
    relevant = scheme_parameter_table().get(partition.scheme, names) + ("train_fraction",)
    parameters = {k: _plain(config_fields[k]) for k in names
                  if k in relevant and k in config_fields}
    seed = config_fields.get("seed")
    return {
        "format": FORMAT,
        "dataset": {"name": dataset.name, "num_examples": len(dataset),
                    "num_classes": int(dataset.num_classes),
                    "fingerprint": dataset_fingerprint(dataset)},
        "scheme": partition.scheme,
        "parameters": parameters,
        "samples_per_client": _plain(partition.samples_per_client),
        "seed": _plain(seed),
        "num_clients": partition.num_clients,
        "source": config_fields.get("source"),
        "clients": [{"train": np.asarray(tr, dtype=np.int64).tolist(),
                     "test": np.asarray(te, dtype=np.int64).tolist()}
                    for tr, te in zip(partition.train_indices, partition.test_indices)],
    }


def with_validation(record: dict, validation: list[np.ndarray], fraction: float) -> dict:
    """`record` (a `partition_record`) with the clients' validation splits: the header
    ``validation_fraction`` and per client ``"validation"``, indices into the dataset (each
    a subset of the client's "train")."""
    clients = [dict(c, validation=np.asarray(v, dtype=np.int64).tolist())
               for c, v in zip(record["clients"], validation)]
    head = {k: v for k, v in record.items() if k != "clients"}
    return {**head, "validation_fraction": float(fraction), "clients": clients}


def write_partition(path: str, record: dict) -> None:
    """Writes `record` to `path` as JSON, atomically (a temporary file, then os.replace).

    The header fields take one line each and every client one line, so the file reads
    (and diffs) well and stays compact.

    Raises:
        UserInputError: the file cannot be written.
    """
    lines = ["{"]
    for key, value in record.items():
        if key != "clients":
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    clients = record.get("clients", [])
    lines.append('  "clients": [')
    lines += [f"    {json.dumps(c, separators=(', ', ': '))}" + ("," if i + 1 < len(clients) else "")
              for i, c in enumerate(clients)]
    lines += ["  ]", "}"]
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UserInputError(f"cannot write the partition file {path!r}: {e.strerror or e}") from None


def read_record(path: str) -> dict:
    """The JSON object of a partition file, with its format tag checked (nothing else).

    Raises:
        UserInputError: the file is missing or unreadable, not JSON, or not a partition
            file of this format.
    """
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise UserInputError(f"cannot read the partition file {path!r}: {why}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserInputError(f"the partition file {path!r} is not JSON ({e.msg} at line "
                             f"{e.lineno})") from None
    found = record.get("format") if isinstance(record, dict) else None
    if found != FORMAT:
        raise UserInputError(f"{path!r} is not a partition file: format {found!r}, expected "
                             f"{FORMAT!r}")
    return record


def load_partition(path: str, dataset: Dataset, num_clients: int) -> tuple[Partition, dict]:
    """`read_partition`, also returning the file's record (its JSON object, unchanged)."""
    record = read_record(path)
    where = f"partition file {path!r}"

    meta = record.get("dataset")
    if not isinstance(meta, dict):
        raise UserInputError(f"the {where} has no 'dataset' object")
    ours, m = dataset_fingerprint(dataset), len(dataset)
    theirs = meta.get("fingerprint")
    if meta.get("num_examples") != m or theirs != ours:
        size = meta.get("num_examples")
        raise UserInputError(
            f"the {where} was made from dataset {meta.get('name')!r} ({size} examples, "
            f"fingerprint {str(theirs)[:12]}) but this run's dataset is {dataset.name!r} "
            f"({m} examples, fingerprint {ours[:12]}); run on the dataset the file was made from")

    clients = record.get("clients")
    if not isinstance(clients, list):
        raise UserInputError(f"the {where} has no 'clients' list")
    if len(clients) != num_clients:
        raise UserInputError(f"the {where} has {len(clients)} clients but --num_clients="
                             f"{num_clients}; pass --num_clients={len(clients)}")

    train, test = [], []
    for i, client in enumerate(clients):
        if not isinstance(client, dict):
            raise UserInputError(f"the {where}: client {i} is not an object with 'train' and "
                                 "'test' lists")
        for split, out in (("train", train), ("test", test)):
            values = client.get(split)
            if not isinstance(values, list):
                raise UserInputError(f"the {where}: client {i} has no '{split}' list")
            if not values:
                raise UserInputError(f"the {where}: client {i} has no {split} examples (every "
                                     "client needs at least one train and one test example)")
            for j, v in enumerate(values):
                if not isinstance(v, int) or isinstance(v, bool):
                    raise UserInputError(f"the {where}: client {i}'s {split} index {j} is "
                                         f"{json.dumps(v)}, not an integer")
                if not 0 <= v < m:
                    raise UserInputError(f"the {where}: client {i}'s {split} index {j} is {v}, "
                                         f"outside the dataset's [0, {m})")
            out.append(np.asarray(values, dtype=np.int64))

    # no example twice: over train and test of all clients
    every = np.concatenate([a for pair in zip(train, test) for a in pair])
    counts = np.bincount(every, minlength=m)
    if counts.max() > 1:
        example = int(np.argmax(counts > 1))
        owners = [i for i in range(num_clients)
                  for _ in range(int(np.sum(train[i] == example) + np.sum(test[i] == example)))]
        if len(set(owners)) == 1:
            raise UserInputError(f"the {where}: example {example} appears {len(owners)} times "
                                 f"in client {owners[0]}")
        shown = sorted(set(owners))
        raise UserInputError(f"the {where}: example {example} is on clients "
                             f"{', '.join(map(str, shown[:-1]))} and {shown[-1]} (no example "
                             "may be on two clients)")

    labels = np.asarray(dataset.labels)
    classes = [np.unique(labels[np.concatenate([a, b])]).astype(np.int64)
               for a, b in zip(train, test)]
    totals = {int(a.size + b.size) for a, b in zip(train, test)}
    spc = record.get("samples_per_client")
    if not (isinstance(spc, numbers.Integral) and not isinstance(spc, bool)):
        spc = totals.pop() if len(totals) == 1 else None
    scheme = record.get("scheme")
    partition = Partition(train_indices=train, test_indices=test, client_classes=classes,
                          scheme=scheme if isinstance(scheme, str) and scheme else "file",
                          samples_per_client=None if spc is None else int(spc))
    return partition, record


def read_partition(path: str, dataset: Dataset, num_clients: int) -> Partition:
    """Reads a partition file (module docstring) and checks it against this run.

    Args:
        path: The JSON file.
        dataset: This run's pooled dataset.
        num_clients: This run's N.

    Returns:
        The `Partition`: indices int64 [n_i] in the file's order, client_classes from the
        dataset's labels (int64, sorted), scheme and samples_per_client from the file
        (samples_per_client: the file's value, else the common client total if all are
        equal, else None).

    Raises:
        UserInputError: (one line naming the file and the problem) the file is missing,
            unreadable, not JSON or of another format; it was made from another dataset
            (number of examples or fingerprint differ); it has another number of clients
            than `num_clients`; an index is not an integer or lies outside [0, M); an
            example is on two clients or twice on one; a client has no train or no test
            examples.
    """
    return load_partition(path, dataset, num_clients)[0]


def file_partition_path(partition: str) -> str | None:
    """PATH of ``--partition=file:PATH``; None for a scheme name."""
    return partition[len(FILE_PREFIX):] if partition.startswith(FILE_PREFIX) else None


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers (JSON)."""
    return value.item() if isinstance(value, np.generic) else value
