"""training/workdir/__init__.py, the workdir contract: a workdir's files describe exactly
one run, the one its config.json names.

Whatever sequence of commands made the workdir (interrupted and resumed, finished and
extended, overwritten by another algorithm, run twice), every file, TensorBoard event and
plot in it comes from that run: the same as one uninterrupted run of that config. The
writers' own tests: test_workdir_checkpoints.py, test_workdir_metrics.py (metrics, exports
and events on resume), test_workdir_exports.py, test_workdir_tensorboard.py,
test_workdir_tfrecord.py.
"""

import collections
import json
import os

import numpy as np
import pytest

from experiments import plots
from pfedla_jax.core.local_training import LocalTrainConfig
from pfedla_jax.errors import UserInputError
from pfedla_jax.training import workdir as wd
from pfedla_jax.training.workdir import LOCK_FILE
from pfedla_jax.training.loop import ExperimentConfig, RunOptions, run_experiment

TIMING_KEYS = {"round_seconds", "eval_seconds"}
TIMING_TAGS = {"round/seconds", "round/examples_per_second", "eval/round_seconds", "eval/eval_seconds"}


# ----------------------------------------------------------------------------- the contract


class _Config:
    """What prepare_workdir and write_config need of an ExperimentConfig."""

    def __init__(self, **fields):
        self.fields = {"algorithm": "pfedla", "rounds": 8, "train": {"lr": 0.05}, **fields}

    def to_dict(self):
        return json.loads(json.dumps(self.fields))


def test_unreadable_config_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text('{"algorithm": "pf')  # cut by an older, non-atomic write
    with pytest.raises(UserInputError, match="unreadable config.json.*--overwrite") as e:
        wd.prepare_workdir(str(tmp_path), _config(), overwrite=False)
    assert "\n" not in str(e.value)
    assert wd.prepare_workdir(str(tmp_path), _config(), overwrite=True) is False


def test_config_is_pinned_and_only_rounds_may_change(tmp_path):
    """A new workdir is not resumable; after write_config, the same config (or more rounds)
    resumes and another one is refused with the differing fields; results without a
    config.json are refused. config.json is indented JSON of to_dict(), written atomically."""
    w = str(tmp_path / "run")
    assert wd.prepare_workdir(w, _Config(), overwrite=False) is False
    assert os.listdir(w) == []  # prepare_workdir writes nothing
    wd.write_config(w, _Config())
    assert (tmp_path / "run" / "config.json").read_text() == json.dumps(_Config().to_dict(), indent=2)
    assert os.listdir(w) == ["config.json"]
    assert wd.prepare_workdir(w, _Config(rounds=20), overwrite=False) is True
    with pytest.raises(UserInputError, match=r"different configuration \(train.lr: 0.05 -> 0.1\); "
                                             "use another --workdir or --overwrite"):
        wd.prepare_workdir(w, _Config(rounds=20, train={"lr": 0.1}), overwrite=False)
    # nested fields by dotted name; a field added with the value None is no difference
    assert wd.config_differences({"a": 1, "b": {"c": 2}}, {"b": {"c": 3}, "d": 0, "e": None}) == [
        "a: 1 -> '<unset>'", "b.c: 2 -> 3", "d: '<unset>' -> 0"]
    os.remove(os.path.join(w, "config.json"))
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(UserInputError, match="results without a config.json"):
        wd.prepare_workdir(w, _Config(), overwrite=False)


def test_overwrite_removes_what_the_run_wrote_and_nothing_else(tmp_path):
    """--overwrite: the run's files, every algorithm's export file, the temporary files of an
    interrupted atomic write and the checkpoints/, tb/, plots/ folders go; other files stay.
    Only the primary process removes anything."""
    run_files = ["config.json", "metrics.jsonl", "metrics.csv", "summary.json", "partition.json",
                 "alpha.npz", "metrics.jsonl.tmp", "config.json.tmp", "alpha.tmp.npz"]
    for name in run_files + ["notes.txt"]:
        (tmp_path / name).write_text("{}")
    for name in ("checkpoints/1", "tb", "plots"):
        os.makedirs(tmp_path / name)
    assert wd.prepare_workdir(str(tmp_path), _Config(), overwrite=True, primary=False) is False
    assert len(os.listdir(tmp_path)) == len(run_files) + 4
    assert wd.prepare_workdir(str(tmp_path), _Config(), overwrite=True) is False
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_kept_round_summaries_and_finished_outputs(tmp_path):
    # resuming after round 5 of a run extended to 8 (eval_every 2): rows 2, 4 stay, the old
    # final row 5 and anything after the checkpoint go; the final round of the run stays
    assert [r for r in range(1, 9) if wd.kept_round(r, resume_round=5, eval_every=2, rounds=8)] == [2, 4]
    assert [r for r in range(1, 9) if wd.kept_round(r, resume_round=8, eval_every=3, rounds=8)] == [3, 6, 8]
    assert wd.read_summary(str(tmp_path)) is None
    wd.write_summary(str(tmp_path), {"final": {"round": 2}, "x": [1.5]})
    assert (tmp_path / "summary.json").read_text() == json.dumps({"final": {"round": 2}, "x": [1.5]}, indent=2)
    assert wd.read_summary(str(tmp_path)) == {"final": {"round": 2}, "x": [1.5]}
    (tmp_path / "summary.json").write_text('{"fin')
    assert wd.read_summary(str(tmp_path)) is None  # unreadable: as absent
    os.makedirs(tmp_path / "plots")
    (tmp_path / "plots" / "accuracy.png").write_bytes(b"")
    (tmp_path / "metrics.jsonl").write_text("")
    wd.remove_finished_outputs(str(tmp_path))
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def _steps(workdir):
    """{tag: [steps]} of the workdir's TensorBoard events (every occurrence)."""
    out = collections.defaultdict(list)
    for tag, step, _, _ in wd.read_scalar_events(os.path.join(workdir, "tb")):
        out[tag].append(step)
    return {k: sorted(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- real runs


def _config(algorithm="pfedla", rounds=8, eval_every=2):
    return ExperimentConfig(algorithm=algorithm, dataset="synthetic", synthetic_per_class=40,
                            num_clients=3, classes_per_client=2, rounds=rounds, eval_every=eval_every,
                            participation=2 / 3, train=LocalTrainConfig(batch_size=16, local_steps=2, lr=0.05))


def _run(config, workdir, log=None, **options):
    options.setdefault("checkpoint_every", 3)
    return run_experiment(config, str(workdir), log=log or (lambda s: None), options=RunOptions(**options))


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def _events(workdir):
    """Sorted (tag, step, value) of the run's TensorBoard scalars, timing tags left out."""
    return sorted((tag, step, value) for tag, step, value, _ in wd.read_scalar_events(os.path.join(workdir, "tb"))
                  if tag not in TIMING_TAGS)


def _plot(workdir, which=("accuracy", "alpha_heatmap")):
    return plots.make_plots(str(workdir), which=list(which))


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_finished_run_extended_and_interrupted_equals_one_run(tmp_path):
    """--rounds=5 --eval_every=2 (evaluated at 2, 4 and its final round 5), plotted; then
    --rounds=8 in the same workdir, interrupted after round 8's evaluation (before its
    checkpoint: the resume restarts from round 6, earlier than the last metrics row), then
    run again: every file equals a straight 8-round run, TensorBoard's evaluations are at
    2, 4, 6, 8 (no 5) and its per-round events at 1..8, once each."""
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    _run(_config(rounds=8), straight)
    lines = []
    _run(_config(rounds=5), extended, log=lines.append)
    assert [r["round"] for r in _metrics(extended)] == [2, 4, 5]
    assert _steps(extended)["eval/test_acc"] == [2, 4, 5]
    # the progress line: no accuracy before the first evaluation, then the last one with its round
    assert "test_acc -  train_loss" in lines[1] and lines[1].startswith("round    1/5"), lines[1]
    assert " (round 2)  train_loss" in lines[3] and lines[3].startswith("round    3/5"), lines[3]
    assert "nan" not in "\n".join(lines)
    _plot(extended)
    assert (extended / "plots" / "accuracy.png").exists()

    def interrupt_at_8(line):
        if line.startswith("round    8/"):
            raise Interrupt
    with pytest.raises(Interrupt):
        _run(_config(rounds=8), extended, log=interrupt_at_8)
    # meanwhile, nothing in the workdir belongs to the 5-round run: no summary, no plots
    # made from its files, no evaluation of round 5 anywhere
    assert not (extended / "summary.json").exists()
    assert not (extended / "plots").exists()
    assert [r["round"] for r in _metrics(extended)] == [2, 4, 6, 8]
    assert np.load(extended / "alpha.npz")["round"].tolist() == [2, 4, 6, 8]
    assert _steps(extended)["eval/test_acc"] == [2, 4, 6, 8]

    summary = _run(_config(rounds=8), extended)
    assert summary["resumed_from_round"] == 6
    assert _metrics(extended) == _metrics(straight)
    a, b = np.load(straight / "alpha.npz"), np.load(extended / "alpha.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    assert _events(extended) == _events(straight)
    steps = _steps(extended)
    assert steps["eval/test_acc"] == [2, 4, 6, 8]
    assert steps["round/train_loss"] == steps["round/seconds"] == list(range(1, 9))
    assert steps == _steps(straight)
    got = json.loads((extended / "summary.json").read_text())
    assert got["config"]["rounds"] == 8 and got["final"]["round"] == 8 and got["resumed_from_round"] == 6
    # the CSV mirrors the JSONL rows
    assert [line.split(",")[0] for line in (extended / "metrics.csv").read_text().split()[1:]] == ["2", "4", "6", "8"]


def _snapshot(workdir):
    """Bytes of every file but TensorBoard's (whose events are compared as values) and the
    lock's (whose record names the last command that held it)."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            if os.path.relpath(path, workdir).split(os.sep)[0] not in ("tb", LOCK_FILE):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, workdir)] = f.read()
    return out


@pytest.mark.slow
def test_same_command_twice_then_overwrite_with_another_algorithm(tmp_path):
    """A finished run found again changes nothing (summary, metrics, plots, checkpoints,
    events); --overwrite with FedAvg then leaves nothing of the pFedLA run: no alpha.npz, no
    alpha plots, no pFedLA events or checkpoints, no temporary files."""
    w = tmp_path / "run"
    first = _run(_config(rounds=2, eval_every=1), w, checkpoint_every=1)
    _plot(w)
    before, events = _snapshot(w), _events(w)
    assert {"summary.json", "alpha.npz", "plots/alpha_heatmap_fc1.png"} <= set(before)
    # what a save cut by a kill leaves behind
    os.makedirs(w / "checkpoints" / "3.orbax-checkpoint-tmp" / "state")
    again = _run(_config(rounds=2, eval_every=1), w, checkpoint_every=1)
    assert again["total_seconds"] == first["total_seconds"]
    assert again["resumed_from_round"] == 0  # the stored summary, not this call's
    assert _snapshot(w) == before
    assert _events(w) == events
    assert sorted(os.listdir(w / "checkpoints")) == ["1", "2"]
    # fewer rounds than the checkpoint: refused, and the workdir still names its 2-round run
    with pytest.raises(UserInputError, match="already at round 2, past --rounds=1"):
        _run(_config(rounds=1, eval_every=1), w, checkpoint_every=1)
    assert json.loads((w / "config.json").read_text())["rounds"] == 2
    assert _snapshot(w) == before
    # a finished run is found again without reading its state back: a checkpoint that cannot
    # be restored here (e.g. another state layout, written by an older version) still gives
    # the run's summary and metrics
    for root, _, files in os.walk(w / "checkpoints" / "2"):
        for name in files:
            open(os.path.join(root, name), "wb").close()
    third = _run(_config(rounds=2, eval_every=1), w, checkpoint_every=1)
    assert third["total_seconds"] == first["total_seconds"]
    assert third["records"] == first["records"]

    (w / "metrics.jsonl.tmp").write_text("{}")  # an interrupted atomic write
    (w / "alpha.tmp.npz").write_bytes(b"")
    _run(_config("fedavg", rounds=3, eval_every=1), w, checkpoint_every=0, overwrite=True)
    assert sorted(os.listdir(w)) == ["checkpoints", "config.json", "metrics.csv", "metrics.jsonl",
                                     "partition.json", LOCK_FILE, "summary.json", "tb"]
    assert sorted(os.listdir(w / "checkpoints")) == ["3"]
    assert json.loads((w / "summary.json").read_text())["algorithm"] == "fedavg"
    steps = _steps(w)
    assert not [t for t in steps if "alpha" in t], sorted(steps)
    assert all(s == [1, 2, 3] for s in steps.values()), steps
    assert len(wd.event_files(str(w / "tb"))) == 1
    paths = _plot(w, which=())
    assert sorted(os.listdir(w / "plots")) == ["accuracy.png", "label_histogram.png"], paths
