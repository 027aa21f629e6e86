"""The per-client validation split (data/validation.py) and the runs that use it: disjoint
from training and test, deterministic, stratified; `val_acc` against a plain forward pass;
with --evaluate_test=false the test split is never read."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from experiments import run as run_tool
from pfedla_jax.core import evaluation
from pfedla_jax.data import label_histogram, load_dataset, normalize_images, validation_split
from pfedla_jax.data.partition.common import round_half_up
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.config import ExperimentConfig, RunOptions
from pfedla_jax.training.loop import build_experiment, evaluate_round, run_experiment
from pfedla_jax.training.workdir import config_differences
from tests.helpers import one_error_line

PER_CLASS = 40


def _config(**kw):
    base = dict(algorithm="fedavg", dataset="synthetic", synthetic_per_class=PER_CLASS,
                num_clients=4, samples_per_client=60, rounds=2, eval_every=1,
                validation_fraction=0.2)
    return ExperimentConfig(**{**base, **kw})


def _split(seed=0, fraction=0.2):
    dataset = load_dataset("synthetic", synthetic_per_class=PER_CLASS, seed=0)
    rng = np.random.default_rng(5)
    trains = [rng.choice(400, size=n, replace=False) for n in (42, 7, 2, 30)]
    rest, val = validation_split(trains, dataset.labels, fraction, seed)
    return dataset, trains, rest, val


def test_split_is_disjoint_complete_ordered_and_stratified():
    dataset, trains, rest, val = _split()
    for train, r, v in zip(trains, rest, val):
        assert len(np.intersect1d(r, v)) == 0
        assert sorted(np.concatenate([r, v])) == sorted(train)
        assert len(r) >= 1 and len(v) >= 1
        # both parts keep the training split's order
        pos = {int(x): i for i, x in enumerate(train)}
        assert [pos[int(x)] for x in r] == sorted(pos[int(x)] for x in r)
        assert [pos[int(x)] for x in v] == sorted(pos[int(x)] for x in v)
        labels = dataset.labels[train]
        held = np.bincount(dataset.labels[v], minlength=10)
        expect = np.array([min(round_half_up(0.2 * n), n - 1) if n >= 2 else 0
                           for n in np.bincount(labels, minlength=10)])
        if expect.sum() > 0:  # stratified: round_half_up(f * n_c) of each class with >= 2
            np.testing.assert_array_equal(held, expect)
        else:  # too few per class: exactly one example held out
            assert held.sum() == 1


def test_split_is_deterministic_per_seed():
    _, _, rest0, val0 = _split(seed=0)
    _, _, rest0b, val0b = _split(seed=0)
    _, _, _, val1 = _split(seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(val0, val0b))
    assert all(np.array_equal(a, b) for a, b in zip(rest0, rest0b))
    assert not all(np.array_equal(a, b) for a, b in zip(val0, val1))


def test_split_refuses_what_it_cannot_do():
    labels = np.arange(10)
    with pytest.raises(UserInputError, match="validation split needs >= 2"):
        validation_split([np.array([0, 1]), np.array([2])], labels, 0.2, 0)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(UserInputError, match="validation_fraction"):
            validation_split([np.array([0, 1])], labels, bad, 0)


def test_experiment_trains_on_the_rest_and_records_the_split(tmp_path):
    config = _config()
    exp = build_experiment(config)
    record = exp.partition_record
    assert record["validation_fraction"] == 0.2
    store = exp.context.store
    np.testing.assert_array_equal(np.asarray(store.val_count),
                                  [len(c["validation"]) for c in record["clients"]])
    for i, client in enumerate(record["clients"]):
        train, test, val = (set(client[k]) for k in ("train", "test", "validation"))
        assert val and val < train and not val & test
        # the device tables: training = train minus validation (FedFomo's own validation
        # split is then carved from what remains)
        assert int(store.train_count[i]) == len(train) - len(val)
    # the label histogram counts the validation examples with the train split they come from
    np.testing.assert_array_equal(label_histogram(store, split="train").sum(1),
                                  [len(c["train"]) for c in record["clients"]])
    # another seed, another split; the same seed, the same record
    assert build_experiment(config).partition_record == record
    other = build_experiment(_config(seed=1)).partition_record
    assert other["clients"] != record["clients"]


def test_val_acc_is_a_plain_forward_pass_over_the_validation_examples():
    exp = build_experiment(_config(algorithm="local", init="independent"))
    state = exp.algorithm.init(jax.random.key(3))
    row, _ = evaluate_round(exp, state, 0)
    dataset = load_dataset("synthetic", synthetic_per_class=PER_CLASS, seed=0)
    params = exp.algorithm.to_checkpoint(state)["client_params"]
    correct = total = 0
    loss = 0.0
    for i, client in enumerate(exp.partition_record["clients"]):
        idx = np.asarray(client["validation"])
        x = normalize_images(dataset.images[idx], dataset.mean, dataset.std)
        logits = exp.context.model.apply({"params": jax.tree.map(lambda a: a[i], params)}, x, train=False)
        logp = jax.nn.log_softmax(logits)
        y = dataset.labels[idx]
        correct += int(np.sum(np.argmax(logits, -1) == y))
        loss -= float(np.sum(np.take_along_axis(np.asarray(logp), y[:, None], 1)))
        total += len(idx)
    assert row["val_acc"] == pytest.approx(correct / total, abs=1e-9)
    assert row["val_loss"] == pytest.approx(loss / total, rel=1e-5)
    assert "test_acc" in row


def test_without_test_evaluation_the_test_split_is_never_read(tmp_path, monkeypatch):
    splits = []
    original = evaluation.Evaluator.evaluate

    def spy(self, *args, **kwargs):
        splits.append(self.split)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(evaluation.Evaluator, "evaluate", spy)
    config = _config(algorithm="fedavg", evaluate_test=False)
    exp = build_experiment(config)
    assert exp.evaluator is None
    assert not np.asarray(exp.context.store.test_count).any()  # no test example on device
    summary = run_experiment(config, str(tmp_path / "w"), log=lambda s: None,
                             options=RunOptions(tensorboard=False))
    assert splits and set(splits) == {"validation"}
    rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    assert len(rows) == 2 and all("val_acc" in r and not any(k.endswith("test_acc") for k in r)
                                  for r in rows)
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert "best_test_acc" not in summary


def test_bad_options_are_one_line(capfd):
    base = ["run", "--dataset=synthetic", "--rounds=1"]
    assert "needs a validation split" in one_error_line(run_tool.main, base + ["--evaluate_test=false"], capfd)
    assert "--validation_fraction must be in [0, 1)" in one_error_line(
        run_tool.main, base + ["--validation_fraction=1.0"], capfd)


def test_a_workdir_from_before_the_split_existed_resumes():
    config = _config(validation_fraction=0.0)
    old = config.to_dict()
    for key in ("validation_fraction", "evaluate_test"):
        del old[key]
    assert config_differences(old, config.to_dict(), config.default_dict()) == []
    assert config_differences(old, _config().to_dict(), config.default_dict()) == [
        "validation_fraction: 0.0 -> 0.2"]
