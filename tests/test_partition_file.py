"""Partitions as files: every run writes WORKDIR/partition.json, --partition=file:PATH runs on one.

A run on another run's partition.json gives that run's numbers; a file of another scheme
gives that file's clients; a tampered file (overlap, out of range, not an integer, another
dataset, another client count, not JSON) is refused with one line naming the problem; a
resume on a partition that no longer matches the workdir's is refused and changes nothing.
"""

import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from experiments import run as run_tool
from pfedla_jax.core.local_training import LocalTrainConfig
from pfedla_jax.data import (dataset_fingerprint, load_dataset, make_partition, partition_file,
                             partition_record, read_partition, scheme_parameters, write_partition)
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.workdir import LOCK_FILE
from pfedla_jax.training.loop import (ExperimentConfig, RunOptions, build_experiment, run_experiment,
                                      start_run)
from tests.helpers import one_error_line

TIMING_KEYS = {"round_seconds", "eval_seconds"}
PER_CLASS = 40  # synthetic: 10 classes x 40 = 400 pooled examples
N = 3


def _config(**kw):
    kw = dict(dict(algorithm="fedavg", dataset="synthetic", synthetic_per_class=PER_CLASS,
                   num_clients=N, classes_per_client=2, rounds=2, eval_every=1, participation=2 / 3,
                   train=LocalTrainConfig(batch_size=16, local_steps=2, lr=0.05)), **kw)
    return ExperimentConfig(**kw)


def _run(config, workdir):
    return run_experiment(config, str(workdir), log=lambda s: None,
                          options=RunOptions(checkpoint_every=1, tensorboard=False))


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def _snapshot(workdir):
    """{relative path: bytes} of every file under `workdir` but the lock (whose record names
    the last command that held it)."""
    out = {}
    for top, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(top, name)
            if os.path.relpath(path, workdir) == LOCK_FILE:
                continue
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = f.read()
    return out


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A finished noniid1 run (its workdir) and a second run on its partition.json."""
    base = tmp_path_factory.mktemp("runs")
    a = base / "a"
    _run(_config(), a)
    source = base / "source.json"  # a copy: the tests below may change it
    shutil.copy(a / "partition.json", source)
    b = base / "b"
    _run(_config(partition=f"file:{source}"), b)
    return a, b, source


def _dataset(name="synthetic", per_class=PER_CLASS, seed=0):
    return load_dataset(name, synthetic_per_class=per_class, seed=seed)


# ----------------------------------------------------------------------------- writing


@pytest.mark.slow  # two experiment runs (the `first` fixture)
def test_run_writes_its_partition(first):
    a, _, _ = first
    record = json.loads((a / "partition.json").read_text())
    ds = _dataset()
    # independently: the same make_partition call, and the fingerprint as documented
    part = make_partition(ds.labels, ds.num_classes, N, "noniid1", classes_per_client=2, seed=0)
    assert len(record["clients"]) == N
    for client, train, test in zip(record["clients"], part.train_indices, part.test_indices):
        np.testing.assert_array_equal(np.asarray(client["train"]), train)  # order included
        np.testing.assert_array_equal(np.asarray(client["test"]), test)
    h = hashlib.sha256(b"images uint8 400,28,28,1\n" + np.asarray(ds.images, np.uint8).tobytes()
                       + b"labels int32le 400\n" + np.asarray(ds.labels).astype("<i4").tobytes())
    assert record["dataset"] == {"name": "synthetic", "num_examples": 400, "num_classes": 10,
                                 "fingerprint": h.hexdigest()}
    assert record["format"] == "pfedla_jax.partition/1"
    assert (record["scheme"], record["seed"], record["num_clients"], record["source"]) == (
        "noniid1", 0, N, None)
    assert record["parameters"] == {"classes_per_client": 2, "samples_per_client": None,
                                    "train_fraction": 0.7}
    assert record["samples_per_client"] == part.samples_per_client == 80
    assert not os.path.exists(a / "partition.json.tmp")


@pytest.mark.parametrize("scheme,kw,parameters", [
    ("noniid1", {}, {"classes_per_client": 2, "samples_per_client": None, "train_fraction": 0.7}),
    ("adjacent", {"samples_per_client": 40},
     {"classes_per_client": 2, "samples_per_client": 40, "train_fraction": 0.7}),
    ("noniid2", {"dominant_share": 0.6}, {"dominant_classes": 2, "dominant_share": 0.6,
                                          "samples_per_client": None, "train_fraction": 0.7}),
    ("dirichlet", {"min_client_size": 30}, {"dirichlet_alpha": 0.5, "min_client_size": 30,
                                            "samples_per_client": None, "train_fraction": 0.7}),
    ("iid", {}, {"samples_per_client": None, "train_fraction": 0.7}),
])
def test_experiment_records_its_schemes_parameters(scheme, kw, parameters):
    # what a run writes to partition.json: the scheme's own parameters, in the file's order
    record = build_experiment(_config(partition=scheme, **kw)).partition_record
    assert (record["scheme"], record["seed"], record["source"]) == (scheme, 0, None)
    assert list(record["parameters"].items()) == list(parameters.items())
    ds = _dataset()
    part = make_partition(ds.labels, ds.num_classes, N, scheme, seed=0,
                          samples_per_client=parameters["samples_per_client"],
                          **{k: parameters[k] for k in scheme_parameters(scheme)})
    assert record["clients"] == partition_record(part, ds, {})["clients"]


def test_fingerprint_is_cached_per_dataset_and_sees_every_label(monkeypatch):
    ds = _dataset()
    fp = dataset_fingerprint(ds)
    # a second call does not hash again
    monkeypatch.setattr(partition_file.hashlib, "sha256", lambda *a: pytest.fail("hashed twice"))
    assert dataset_fingerprint(ds) == fp
    monkeypatch.undo()
    labels = np.array(ds.labels)
    labels[7] = (labels[7] + 1) % 10
    assert dataset_fingerprint(dataclasses.replace(ds, labels=labels)) != fp
    assert dataset_fingerprint(dataclasses.replace(ds, labels=np.array(ds.labels))) == fp


# ----------------------------------------------------------------------------- running on a file


@pytest.mark.slow  # two experiment runs (the `first` fixture)
def test_run_on_another_runs_file_gives_its_numbers(first):
    a, b, source = first
    assert _metrics(b) == _metrics(a)
    assert len(_metrics(a)) == 2
    ra, rb = (json.loads((d / "partition.json").read_text()) for d in (a, b))
    assert rb["clients"] == ra["clients"] and rb["dataset"] == ra["dataset"]
    # the copy in b's workdir says how the split was made and where b read it
    assert (rb["scheme"], rb["seed"], rb["parameters"]) == (ra["scheme"], ra["seed"], ra["parameters"])
    assert rb["source"] == str(source)
    assert json.loads((b / "summary.json").read_text())["partition_source"] == str(source)
    assert json.loads((a / "summary.json").read_text())["partition_source"] is None


@pytest.mark.slow  # start_run builds the algorithm's state (compiles)
def test_run_on_a_file_of_another_scheme_uses_its_clients(tmp_path):
    ds = _dataset()
    part = make_partition(ds.labels, ds.num_classes, N, "dirichlet", dirichlet_alpha=0.5,
                          min_client_size=30, seed=5)
    path = tmp_path / "dirichlet.json"
    write_partition(str(path), partition_record(part, ds, {"seed": 5, "dirichlet_alpha": 0.5,
                                                          "min_client_size": 30,
                                                          "classes_per_client": 2}))
    # the run's start (its data and workdir) only: its rounds would compile a program for
    # these client sizes, as long as everything else in this file together
    exp = build_experiment(_config(partition=f"file:{path}"))
    run = start_run(exp, str(tmp_path / "run"), RunOptions(tensorboard=False))
    run.close()
    run.release()
    store = exp.context.store
    assert np.asarray(store.train_count).tolist() == [len(t) for t in part.train_indices]
    assert np.asarray(store.test_count).tolist() == [len(t) for t in part.test_indices]
    for i in range(N):  # the very examples, in the file's order
        np.testing.assert_array_equal(
            np.asarray(store.labels)[np.asarray(store.train_idx)[i, :len(part.train_indices[i])]],
            ds.labels[part.train_indices[i]])
    assert len({len(t) for t in part.train_indices}) > 1  # really not noniid1's equal sizes
    written = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert written["scheme"] == "dirichlet" and written["seed"] == 5
    assert written["parameters"] == {"dirichlet_alpha": 0.5, "min_client_size": 30}
    assert written["clients"] == json.loads(path.read_text())["clients"]


def test_read_partition_gives_the_files_partition(tmp_path):
    ds = _dataset()
    part = make_partition(ds.labels, ds.num_classes, N, "iid", samples_per_client=50, seed=3)
    record = partition_record(part, ds, {"seed": 3})
    record["samples_per_client"] = None  # then: the common client total
    path = _write(tmp_path, record)
    got = read_partition(path, ds, N)
    assert got.scheme == "iid" and got.samples_per_client == 50
    for name in ("train_indices", "test_indices"):
        for x, y in zip(getattr(got, name), getattr(part, name)):
            assert x.dtype == np.int64
            np.testing.assert_array_equal(x, y)
    for x, i in zip(got.client_classes, range(N)):
        np.testing.assert_array_equal(x, np.unique(ds.labels[part.client_indices(i)]))


# ----------------------------------------------------------------------------- refused files


def _record():
    ds = _dataset()
    part = make_partition(ds.labels, ds.num_classes, N, "noniid1", classes_per_client=2, seed=0)
    return partition_record(part, ds, {"seed": 0, "classes_per_client": 2})


def _write(directory, record, name="p.json"):
    path = str(directory / name)
    write_partition(path, record)
    return path


def _overlap(r):  # an example of client 0 also on client 1
    r["clients"][1]["test"].append(r["clients"][0]["train"][3])


def _twice(r):
    r["clients"][2]["test"].append(r["clients"][2]["train"][0])


def _set(client, split, pos, value):
    def change(r):
        r["clients"][client][split][pos] = value
    return change


def _no_test(r):
    r["clients"][1]["test"] = []


def _fewer_clients(r):
    r["clients"].pop()


def _format(r):
    r["format"] = "something/else"


def _fingerprint(r):
    r["dataset"]["fingerprint"] = "0" * 64


TAMPERED = [
    (_overlap, r"example \d+ is on clients 0 and 1"),
    (_twice, r"example \d+ appears 2 times in client 2"),
    (_set(1, "train", 4, 400), r"client 1's train index 4 is 400, outside the dataset's \[0, 400\)"),
    (_set(0, "test", 0, -1), r"client 0's test index 0 is -1, outside"),
    (_set(2, "train", 1, 3.0), r"client 2's train index 1 is 3.0, not an integer"),
    (_set(2, "train", 1, "7"), r"client 2's train index 1 is \"7\", not an integer"),
    (_set(2, "test", 1, True), r"client 2's test index 1 is true, not an integer"),
    (_no_test, r"client 1 has no test examples"),
    (_fewer_clients, r"has 2 clients but --num_clients=3; pass --num_clients=2"),
    (_format, r"not a partition file: format 'something/else'"),
    (_fingerprint, r"made from dataset 'synthetic' \(400 examples, fingerprint 000000000000\) "
                   r"but this run's dataset is 'synthetic' \(400 examples, fingerprint [0-9a-f]{12}\)"),
]


@pytest.mark.parametrize("change,pattern", TAMPERED, ids=[p for _, p in TAMPERED])
def test_tampered_file_is_refused(change, pattern, tmp_path):
    record = _record()
    read_partition(_write(tmp_path, record, "good.json"), _dataset(), N)  # untouched: accepted
    change(record)
    path = _write(tmp_path, record)
    with pytest.raises(UserInputError, match=pattern) as err:
        read_partition(path, _dataset(), N)
    assert "\n" not in str(err.value) and path in str(err.value)


@pytest.mark.parametrize("other,pattern", [
    (dict(name="synthetic_rgb"), r"'synthetic' \(400 examples, fingerprint \w{12}\) but this run's "
                                 r"dataset is 'synthetic_rgb' \(400 examples"),
    (dict(seed=1), r"'synthetic' \(400 examples, fingerprint \w{12}\) but this run's dataset is "
                   r"'synthetic' \(400 examples, fingerprint \w{12}\)"),
    (dict(per_class=50), r"but this run's dataset is 'synthetic' \(500 examples"),
])
def test_file_of_another_dataset_is_refused(other, pattern, tmp_path):
    path = _write(tmp_path, _record())
    with pytest.raises(UserInputError, match=pattern) as err:
        read_partition(path, _dataset(**other), N)
    assert "\n" not in str(err.value) and "run on the dataset the file was made from" in str(err.value)


@pytest.mark.parametrize("text,pattern", [
    (None, r"cannot read the partition file .*No such file"),
    ('{"format": "pfedla_jax.partition/1", "clients": [', r"is not JSON \(.* at line 1\)"),
    ("[1, 2]", r"not a partition file: format None"),
])
def test_unreadable_file_is_refused(text, pattern, tmp_path):
    path = str(tmp_path / "p.json")
    if text is not None:
        with open(path, "w") as f:
            f.write(text)
    with pytest.raises(UserInputError, match=pattern) as err:
        read_partition(path, _dataset(), N)
    assert "\n" not in str(err.value) and path in str(err.value)


def test_empty_file_path_is_a_config_error():
    with pytest.raises(UserInputError, match="--partition=file: needs the path"):
        _config(partition="file:").validate()
    _config(partition="file:x.json").validate()  # the file itself is read with the data


def test_bad_file_is_refused_before_the_workdir_is_touched(tmp_path):
    record = _record()
    _overlap(record)
    path = _write(tmp_path, record)
    with pytest.raises(UserInputError, match="is on clients 0 and 1"):
        _run(_config(partition=f"file:{path}"), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_cli_bad_file_is_one_line_error(tmp_path, capfd):
    """experiments.run's main, in process: one `error:` line naming the file, exit 2."""
    record = _record()
    _set(1, "train", 4, 10**6)(record)
    bad = tmp_path / "bad.json"
    write_partition(str(bad), record)
    line = one_error_line(run_tool.main, ["experiments.run", f"--partition=file:{bad}", "--dataset=synthetic",
                                          f"--synthetic_per_class={PER_CLASS}", f"--num_clients={N}",
                                          "--rounds=1", f"--workdir={tmp_path / 'run'}"], capfd)
    assert str(bad) in line and "1000000" in line, line
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- resuming


@pytest.mark.slow  # experiment runs (the `first` fixture, then resumes)
def test_resume_on_another_partition_is_refused(first, tmp_path):
    a, b, source = first
    # 1. the workdir's partition.json no longer matches what the config makes (same sets,
    #    another order: the order decides the batches)
    c = tmp_path / "c"
    shutil.copytree(a, c)
    record = json.loads((c / "partition.json").read_text())
    record["clients"][1]["train"] = record["clients"][1]["train"][::-1]
    write_partition(str(c / "partition.json"), record)
    before = _snapshot(c)
    assert "metrics.jsonl" in before and any(k.startswith("checkpoints") for k in before)
    with pytest.raises(UserInputError, match=r"the partition differs from the one this workdir was "
                                             r"trained on \(.*client 1's examples differ\); use --overwrite"):
        _run(_config(), c)
    assert _snapshot(c) == before

    # 2. the file a file: run was made from has changed since (still a valid partition)
    d = tmp_path / "d"
    shutil.copytree(b, d)  # b ran on `source`; the copy's config names the same file
    saved = source.read_text()
    try:
        record = json.loads(saved)
        c0 = record["clients"][0]
        c0["train"][0], c0["test"][0] = c0["test"][0], c0["train"][0]
        write_partition(str(source), record)
        before = _snapshot(d)
        with pytest.raises(UserInputError, match=r"partition differs.*client 0's examples differ"):
            _run(_config(partition=f"file:{source}"), d)
        assert _snapshot(d) == before
    finally:
        source.write_text(saved)
    # with the file as it was, the finished run is found again
    _run(_config(partition=f"file:{source}"), d)
    assert _metrics(d) == _metrics(b)
