"""A workdir's files describe exactly one run: the one its config.json names.

Whatever sequence of commands made the workdir (interrupted and resumed, finished and
extended, overwritten by another algorithm, run twice), every file, TensorBoard event and
plot in it comes from that run: the same as one uninterrupted run of that config.
"""

import collections
import json
import os

import numpy as np
import pytest

from pfedla_jax.training import workdir as wd

TIMING_KEYS = {"round_seconds", "eval_seconds"}
TIMING_TAGS = {"round/seconds", "round/examples_per_second", "eval/round_seconds", "eval/eval_seconds"}


# ----------------------------------------------------------------------------- TensorBoard files


def test_event_files_are_tensorboards_format(tmp_path):
    """EventFile writes the records tensorboardX's SummaryWriter writes (byte for byte), and
    read_scalar_events reads both, stopping at a record cut by an interruption."""
    from tensorboardX import SummaryWriter

    scalars = [("round/train_loss", 2.25, 1, 1000.5), ("eval/test_acc", 0.125, 2, 1001.25),
               ("eval/alpha_self/FC1", 0.5, 2, 1002.0)]
    ref = SummaryWriter(str(tmp_path / "ref"))
    for tag, value, step, wall in scalars:
        ref.add_scalar(tag, value, step, walltime=wall)
    ref.close()
    (ours_dir := tmp_path / "ours").mkdir()
    ours = wd.EventFile(str(ours_dir / "events.out.tfevents.0000000001.host"))
    for tag, value, step, wall in scalars:
        ours.scalar(tag, value, step, wall)
    ours.close()
    expected = [(tag, step, value, wall) for tag, value, step, wall in scalars]
    assert wd.read_scalar_events(str(tmp_path / "ref")) == expected
    assert wd.read_scalar_events(str(ours_dir)) == expected
    ref_bytes = (tmp_path / "ref" / wd.event_files(str(tmp_path / "ref"))[0]).read_bytes()
    our_bytes = (ours_dir / wd.event_files(str(ours_dir))[0]).read_bytes()
    first = lambda b: 16 + int.from_bytes(b[:8], "little")  # after the file_version record
    assert our_bytes[first(our_bytes):] == ref_bytes[first(ref_bytes):]
    # a record cut short: it and what follows are not read; the file's other events are
    path = ours_dir / wd.event_files(str(ours_dir))[0]
    path.write_bytes(our_bytes[:-3])
    assert wd.read_scalar_events(str(ours_dir)) == expected[:2]


def test_unreadable_config_is_a_one_line_error(tmp_path):
    from pfedla_jax.errors import UserInputError

    (tmp_path / "config.json").write_text('{"algorithm": "pf')  # cut by an older, non-atomic write
    with pytest.raises(UserInputError, match="unreadable config.json.*--overwrite") as e:
        wd.prepare_workdir(str(tmp_path), _config(), overwrite=False)
    assert "\n" not in str(e.value)
    assert wd.prepare_workdir(str(tmp_path), _config(), overwrite=True) is False


def _write_attempt(workdir, rounds, eval_every, start=0, keep=None, resume_round=None,
                   tensorboard=True):
    """What the loop writes for rounds start+1..rounds (no training): returns the writer."""
    writer = wd.MetricsWriter(str(workdir), keep, resume_round, tensorboard)
    exports = wd.ExportLog(str(workdir), "alpha", {"layers": np.array(["a"])}, keep)
    for t in range(start + 1, rounds + 1):
        writer.round_scalars(t, {"train_loss": 1.0 / t})
        if t % eval_every == 0 or t == rounds:
            writer.evaluation({"round": t, "test_acc": t / 10, "test_acc_per_client": [t / 10]})
            exports.append(t, {"alpha": np.full((2,), float(t))})
    exports.save()
    writer.close()
    return writer


def _steps(workdir):
    """{tag: [steps]} of the workdir's TensorBoard events (every occurrence)."""
    out = collections.defaultdict(list)
    for tag, step, _, _ in wd.read_scalar_events(os.path.join(workdir, "tb")):
        out[tag].append(step)
    return {k: sorted(v) for k, v in out.items()}


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["round"] for line in f]


def test_resume_rewrites_events_exports_and_rows_at_once(tmp_path):
    """Extending a finished run drops its final row everywhere as soon as the run resumes
    (TensorBoard, metrics, CSV, alpha), before any new round; an interrupted attempt's
    events past the checkpoint go too, also when TensorBoard is off for the resumed run."""
    w = str(tmp_path)
    _write_attempt(w, rounds=5, eval_every=2)  # a finished 5-round run: evaluations 2, 4, 5
    assert _steps(w)["eval/test_acc"] == [2, 4, 5]
    keep = lambda r: wd.kept_round(r, resume_round=5, eval_every=2, rounds=8)
    # --rounds=8 resumes after round 5; it is interrupted before writing anything
    writer = wd.MetricsWriter(w, keep, 5, tensorboard=True)
    wd.ExportLog(w, "alpha", {"layers": np.array(["a"])}, keep)
    writer.close()
    assert _rows(w) == [2, 4]
    assert [int(r.split(",")[0]) for r in (tmp_path / "metrics.csv").read_text().split()[1:]] == [2, 4]
    assert np.load(tmp_path / "alpha.npz")["round"].tolist() == [2, 4]
    assert _steps(w) == {"eval/test_acc": [2, 4], "round/train_loss": [1, 2, 3, 4, 5]}
    assert len(wd.event_files(os.path.join(w, "tb"))) == 1  # a run found again adds no file
    # the extension runs rounds 6..8 but is killed after round 8's evaluation, before its
    # checkpoint (the last is round 6): the resume drops round 7 and 8's events
    _write_attempt(w, rounds=8, eval_every=2, start=5, keep=keep, resume_round=5)
    assert _steps(w)["eval/test_acc"] == [2, 4, 6, 8]
    keep6 = lambda r: wd.kept_round(r, resume_round=6, eval_every=2, rounds=8)
    wd.MetricsWriter(w, keep6, 6, tensorboard=False).close()
    wd.ExportLog(w, "alpha", {"layers": np.array(["a"])}, keep6)
    assert _steps(w) == {"eval/test_acc": [2, 4, 6], "round/train_loss": [1, 2, 3, 4, 5, 6]}
    assert _rows(w) == [2, 4, 6]
    assert np.load(tmp_path / "alpha.npz")["round"].tolist() == [2, 4, 6]
    # an extension of a 1-round run keeps no alpha row: the file goes
    w1 = str(tmp_path / "one")
    os.makedirs(w1)
    _write_attempt(w1, rounds=1, eval_every=2)
    wd.ExportLog(w1, "alpha", {}, lambda r: wd.kept_round(r, resume_round=1, eval_every=2, rounds=3))
    assert not os.path.exists(os.path.join(w1, "alpha.npz"))


# ----------------------------------------------------------------------------- real runs


def _config(algorithm="pfedla", rounds=8, eval_every=2):
    from pfedla_jax.core.local_training import LocalTrainConfig
    from pfedla_jax.training.loop import ExperimentConfig

    return ExperimentConfig(algorithm=algorithm, dataset="synthetic", synthetic_per_class=40,
                            num_clients=3, classes_per_client=2, rounds=rounds, eval_every=eval_every,
                            participation=2 / 3, train=LocalTrainConfig(batch_size=16, local_steps=2, lr=0.05))


def _run(config, workdir, log=None, **options):
    from pfedla_jax.training.loop import RunOptions, run_experiment

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
    from experiments import plots

    return plots.make_plots(str(workdir), which=list(which))


class Interrupt(Exception):
    pass


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
    """Bytes of every file but TensorBoard's (whose events are compared as values)."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            if os.path.relpath(path, workdir).split(os.sep)[0] != "tb":
                with open(path, "rb") as f:
                    out[os.path.relpath(path, workdir)] = f.read()
    return out


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
    from pfedla_jax.errors import UserInputError
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
                                     "partition.json", "summary.json", "tb"]
    assert sorted(os.listdir(w / "checkpoints")) == ["3"]
    assert json.loads((w / "summary.json").read_text())["algorithm"] == "fedavg"
    steps = _steps(w)
    assert not [t for t in steps if "alpha" in t], sorted(steps)
    assert all(s == [1, 2, 3] for s in steps.values()), steps
    assert len(wd.event_files(str(w / "tb"))) == 1
    paths = _plot(w, which=())
    assert sorted(os.listdir(w / "plots")) == ["accuracy.png", "label_histogram.png"], paths


def test_checkpoint_of_another_state_structure_is_a_one_line_error(tmp_path):
    """A checkpoint written with other state entries (e.g. by an older version that kept
    pFedLA's delta_ref) is refused with a UserInputError naming the entry, not a raw orbax
    ValueError."""
    import jax.numpy as jnp

    from pfedla_jax.errors import UserInputError

    old = wd.Checkpoints(str(tmp_path), every=1)
    old.save(1, {"client_params": jnp.ones(3), "delta_ref": jnp.zeros(2)}, {"k": np.ones(1)}, {"round": 1})
    old.close()
    new = wd.Checkpoints(str(tmp_path), every=1)
    with pytest.raises(UserInputError, match="delta_ref.*another version"):
        new.restore({"client_params": jnp.ones(3)})
    step, state, _, _ = new.restore({"client_params": jnp.ones(3), "delta_ref": jnp.zeros(2)})
    assert step == 1 and float(state["delta_ref"].sum()) == 0.0
    new.close()
