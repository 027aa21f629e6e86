"""Checkpoint/resume: a killed and resumed run equals an uninterrupted one, bit for bit.

Also: a workdir made by another configuration is refused (unless --overwrite), and a
diverging run stops with a clear message while its last good checkpoint stays usable. The
kill is a real SIGKILL of a child process; the command-line checks run `experiments.run`'s
main in this process (what `python -m experiments.run` runs). Every test trains: all slow.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import run as run_tool
from pfedla_jax.algorithms.fedavg import FedAvg
from pfedla_jax.core.local_training import LocalTrainConfig
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.loop import ExperimentConfig, RunOptions, run_experiment
from pfedla_jax.training.workdir import read_scalar_events
from tests.helpers import one_error_line

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {"round_seconds", "eval_seconds"}

# A tiny pFedLA run (partial participation, so the schedule matters) driven from a child
# process; with KILL_AT set, the child SIGKILLs itself while logging that round: no
# cleanup, no final checkpoint, possibly an asynchronous checkpoint still in flight.
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pfedla_jax.core.local_training import LocalTrainConfig
    from pfedla_jax.training.loop import ExperimentConfig, RunOptions, run_experiment

    workdir, kill_at = sys.argv[1], int(sys.argv[2])

    def log(line):
        print(line, flush=True)
        if kill_at and line.startswith(f"round {kill_at:4d}/"):
            os.kill(os.getpid(), signal.SIGKILL)

    config = ExperimentConfig(
        algorithm="pfedla", dataset="synthetic", synthetic_per_class=40, num_clients=4,
        classes_per_client=2, rounds=6, eval_every=1, participation=0.5,
        train=LocalTrainConfig(batch_size=16, lr=0.05))
    run_experiment(config, workdir, log=log, options=RunOptions(checkpoint_every=2))
""")


def _child(workdir, kill_at=0):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", SCRIPT, str(workdir), str(kill_at)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def _metrics(workdir):
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_kill_and_resume_is_bit_identical(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    p = _child(straight)
    assert p.returncode == 0, p.stderr[-3000:]

    p = _child(resumed, kill_at=5)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-3000:])
    assert not (resumed / "summary.json").exists()
    # the interrupted attempt already logged round 5's metrics, which the resumed run must
    # replace (not duplicate)
    assert [r["round"] for r in _metrics(resumed)] == [1, 2, 3, 4, 5]

    p = _child(resumed)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed after round" in p.stdout
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from_round"] in (2, 4)

    a, b = _metrics(straight), _metrics(resumed)
    assert [r["round"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert a == b  # exact equality of every accuracy, loss, alpha statistic and byte count
    za, zb = np.load(straight / "alpha.npz"), np.load(resumed / "alpha.npz")
    np.testing.assert_array_equal(za["round"], zb["round"])
    np.testing.assert_array_equal(za["alpha"], zb["alpha"])
    # the CSV mirrors the JSONL rows
    with open(resumed / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert float(rows[-1]["test_acc"]) == b[-1]["test_acc"]
    # TensorBoard: the events the killed attempt wrote past its checkpoint are gone; every
    # round and evaluation appears once, with the uninterrupted run's values
    ea, eb = _events(straight), _events(resumed)
    assert len({(tag, step) for tag, step, _ in eb}) == len(eb)
    assert sorted({step for tag, step, _ in eb if tag == "round/train_loss"}) == [1, 2, 3, 4, 5, 6]
    assert ea == eb


def _events(workdir):
    """Sorted (tag, step, value) of a run's TensorBoard scalars (timing values left out)."""
    timing = ("round/seconds", "round/examples_per_second", "eval/round_seconds", "eval/eval_seconds")
    return sorted((tag, step, value) for tag, step, value, _ in read_scalar_events(str(workdir / "tb"))
                  if tag not in timing)


def _cli(args, capfd):
    """`python -m experiments.run ARGS` run in this process: its (stdout, stderr); a refusal
    raises SystemExit (see tests.helpers.one_error_line)."""
    capfd.readouterr()
    run_tool.main(["experiments.run", *args])
    return capfd.readouterr()


BASE = ["--dataset=synthetic", "--synthetic_per_class=40", "--num_clients=4",
        "--classes_per_client=2", "--rounds=2", "--batch_size=16", "--quiet"]


def test_mismatched_workdir_is_refused_unless_overwrite(tmp_path, capfd):
    workdir = f"--workdir={tmp_path / 'run'}"
    _cli(BASE + ["--lr=0.05", workdir], capfd)
    # the same command again: the finished run is found and reported, not recomputed
    out = _cli(BASE + ["--lr=0.05", workdir], capfd)
    assert "final test_acc" in out.out, out.err[-2000:]
    err = one_error_line(run_tool.main, ["experiments.run", *BASE, "--lr=0.1", workdir], capfd)
    assert "different configuration" in err and "0.05 -> 0.1" in err, err
    _cli(BASE + ["--lr=0.1", "--overwrite", workdir], capfd)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["lr"] == 0.1


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = ExperimentConfig(algorithm="fedavg", dataset="synthetic", synthetic_per_class=40,
                              num_clients=4, classes_per_client=2, rounds=5, eval_every=1,
                              train=LocalTrainConfig(batch_size=16, lr=0.05))
    workdir = str(tmp_path / "run")
    original = FedAvg.round

    def exploding_round(self, state, round_idx, participants, round_key):
        state, info = original(self, state, round_idx, participants, round_key)
        if round_idx == 3:  # the 4th round blows up, as a huge learning rate would
            state = jax.tree.map(lambda a: a * jnp.inf, state)
        return state, info

    monkeypatch.setattr(FedAvg, "round", exploding_round)
    with pytest.raises(UserInputError, match=r"diverged at round 4.*last good checkpoint \(round 2\)"):
        run_experiment(config, workdir, log=lambda s: None, options=RunOptions(checkpoint_every=2))
    monkeypatch.setattr(FedAvg, "round", original)
    # the kept checkpoint resumes (round 3 onwards) and finishes with finite metrics
    summary = run_experiment(config, workdir, log=lambda s: None, options=RunOptions(checkpoint_every=2))
    assert summary["resumed_from_round"] == 2
    assert [r["round"] for r in summary["records"]] == [1, 2, 3, 4, 5]
    assert np.isfinite(summary["final"]["test_acc"])


def test_diverging_cli_run_is_one_line_error(tmp_path, capfd):
    err = one_error_line(run_tool.main, ["experiments.run", *BASE, "--algorithm=pfedla", "--hn_cotangent=raw",
                                         "--hn_normalization=relu", "--hn_lr=1e30", "--rounds=3",
                                         f"--workdir={tmp_path}"], capfd)
    assert err.startswith("error: training diverged"), err


def test_extending_rounds_equals_one_longer_run(tmp_path):
    """rounds=3 (last round evaluated although eval_every=2), then --rounds=4 in the same
    workdir: the files equal a straight 4-round run (rows 2 and 4, not 2, 3, 4)."""
    def config(rounds):
        return ExperimentConfig(algorithm="pfedla", dataset="synthetic", synthetic_per_class=40,
                                num_clients=3, classes_per_client=2, rounds=rounds, eval_every=2,
                                train=LocalTrainConfig(batch_size=16, local_steps=2, lr=0.05))

    opts = RunOptions(checkpoint_every=2, tensorboard=False)
    straight, extended = str(tmp_path / "straight"), str(tmp_path / "extended")
    run_experiment(config(4), straight, log=lambda s: None, options=opts)
    first = run_experiment(config(3), extended, log=lambda s: None, options=opts)
    assert [r["round"] for r in first["records"]] == [2, 3]
    run_experiment(config(4), extended, log=lambda s: None, options=opts)
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "extended")
    assert [r["round"] for r in b] == [2, 4]
    assert a == b
    np.testing.assert_array_equal(np.load(f"{straight}/alpha.npz")["alpha"],
                                  np.load(f"{extended}/alpha.npz")["alpha"])
