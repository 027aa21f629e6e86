"""experiments.plots: every PNG from a tiny real pFedLA + FedAvg run; bad input -> one line, exit 2.

The tests that read the two real runs (a module fixture) are slow; bad command lines are
checked in process (the tool's flags parsed as its program parses them, then `make_plots`
as its main calls it) and one through the program.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags

from experiments import plots
from pfedla_jax.core.local_training import LocalTrainConfig
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.loop import ExperimentConfig, RunOptions, run_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PNGS = ("accuracy.png", "alpha_heatmap_fc1.png", "self_weight_per_layer.png",
            "self_weight_over_training.png", "group_weights.png", "label_histogram.png")


def _quiet_options():
    """No periodic checkpoints or TensorBoard files."""
    return {"options": RunOptions(checkpoint_every=0, tensorboard=False, client_parallelism="vmap")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny real runs (synthetic data, 3 clients, 2 rounds): pFedLA and FedAvg."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for algo in ("pfedla", "fedavg"):
        cfg = ExperimentConfig(
            algorithm=algo, dataset="synthetic", synthetic_per_class=20, partition="adjacent",
            classes_per_client=2, num_clients=3, rounds=2, seed=0,
            train=LocalTrainConfig(batch_size=16, local_steps=2, lr=0.05))
        out[algo] = str(base / algo)
        run_experiment(cfg, out[algo], log=lambda s: None, **_quiet_options())
    return out


def _plots_cli(args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.plots", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _assert_png(path):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC, (path, head)
    assert os.path.getsize(path) > 5000, (path, os.path.getsize(path))


@pytest.mark.slow  # the runs fixture; starts a process
def test_cli_writes_every_png(runs, tmp_path):
    out = tmp_path / "plots"
    p = _plots_cli([f"--workdir={runs['pfedla']}", f"--compare={runs['fedavg']}", f"--out={out}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    for name in ALL_PNGS:
        _assert_png(out / name)
        assert str(out / name) in p.stdout
    # Default output folder: WORKDIR/plots (what the program does without --out: make_plots
    # with out=None); FedAvg alone has no alpha plots.
    plots.make_plots(runs["fedavg"])
    got = sorted(os.listdir(os.path.join(runs["fedavg"], "plots")))
    assert got == ["accuracy.png", "label_histogram.png"]


@pytest.mark.slow  # the runs fixture
def test_library_functions_and_layer_choice(runs, tmp_path):
    run = plots.load_run(runs["pfedla"])
    a = run.alpha
    assert a["alpha"].shape == (2, 3, 5, 3) and list(a["layers"])[2] == "FC1"
    sw = plots.self_weights(a["alpha"])
    assert sw.shape == (2, 3, 5)
    assert sw[1, 2, 4] == a["alpha"][1, 2, 4, 2]
    assert np.allclose(sw[-1].mean(0), [run.metrics[-1][f"alpha_self/{n}"] for n in a["layers"]])
    assert plots.pick_layer(a["layers"], None) == 2
    assert plots.pick_layer(a["layers"], "conv2") == 1
    paths = plots.make_plots(runs["pfedla"], out=str(tmp_path), layer="FC3",
                             which=["alpha_heatmap", "label_histogram"])
    assert [os.path.basename(x) for x in paths] == ["alpha_heatmap_fc3.png", "label_histogram.png"]
    for x in paths:
        _assert_png(x)
    # Without summary.json's label_histogram, the partition is rebuilt from the config: the
    # run's adjacent partition, client i holds classes {i, i+1}, 10 examples of each.
    bare = plots.Run(run.workdir, run.metrics,
                     {k: v for k, v in run.summary.items() if k != "label_histogram"}, None)
    hist = plots.label_histogram_of(bare)
    assert hist.shape == (3, 10)
    for i in range(3):
        assert np.flatnonzero(hist[i]).tolist() == [i, i + 1]
    assert set(hist[hist > 0].tolist()) == {10}  # 20 examples / class shared by 2 clients
    if "label_histogram" in run.summary:  # the loop's own histogram agrees with the rebuild
        assert np.array_equal(plots.label_histogram_of(run), hist)
    # A histogram stored in summary.json is used as is (no rebuild).
    summary = dict(run.summary, label_histogram=[[1, 2], [3, 4]])
    stored = plots.Run(run.workdir, run.metrics, summary, None)
    assert plots.label_histogram_of(stored).tolist() == [[1, 2], [3, 4]]


@pytest.mark.slow  # the runs fixture
@pytest.mark.parametrize("case,pattern", [
    ("missing_workdir", "does not exist"),
    ("no_metrics", "no metrics.jsonl"),
    ("unknown_layer", "unknown --layer 'FC9'; this run's layers: Conv1, Conv2, FC1, FC2, FC3"),
    ("no_alpha", "has no alpha.npz"),
])
def test_bad_input_in_library(runs, tmp_path, case, pattern):
    kw = {"workdir": runs["pfedla"], "out": str(tmp_path)}
    if case == "missing_workdir":
        kw["workdir"] = str(tmp_path / "nope")
    elif case == "no_metrics":
        kw["workdir"] = str(tmp_path)
    elif case == "unknown_layer":
        kw["layer"] = "FC9"
    else:
        kw.update(workdir=runs["fedavg"], which=["alpha_heatmap"])
    with pytest.raises(UserInputError, match=pattern) as e:
        plots.make_plots(**kw)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.rglob("*.png"))  # nothing half-written


def test_bad_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1, "test_acc": 0.5}\n{oops\n')
    with pytest.raises(UserInputError, match="line 2 is not JSON"):
        plots.load_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserInputError, match="no evaluated rounds"):
        plots.load_run(str(tmp_path))


def _cli_arguments(runs, tmp_path):
    """(flags, pattern) of bad command lines; the workdirs of `runs` as a dict of paths."""
    return [
        ([f"--workdir={tmp_path / 'nope'}"], "does not exist"),
        ([f"--workdir={runs['fedavg']}", "--layer=FC1"], "no alpha.npz"),
        ([f"--workdir={runs['pfedla']}", "--layer=FC9", f"--out={tmp_path}"], "unknown --layer"),
        ([], "--workdir is required"),
    ]


@pytest.mark.slow  # the runs fixture
def test_cli_bad_input_is_one_line(runs, tmp_path):
    """In process: the flags parsed as the program parses them, then make_plots as its main
    calls it; the UserInputError is what the program prints as one `error:` line."""
    for args, pattern in _cli_arguments(runs, tmp_path):
        values = flags.FlagValues()
        plots.define_flags(values)
        values(["experiments.plots", *args])
        with pytest.raises(UserInputError, match=pattern) as e:
            plots.make_plots(values.workdir, values.compare, values.out, values.layer, values.plots,
                             target=values.target)
        assert "\n" not in str(e.value)
    assert not list(tmp_path.rglob("*.png"))  # nothing half-written


@pytest.mark.slow  # the runs fixture; starts a process
def test_cli_bad_input_one_line_exit_2(runs, tmp_path):
    args, pattern = _cli_arguments(runs, tmp_path)[2]   # through the program: unknown --layer
    p = _plots_cli(args)
    assert p.returncode == 2, (args, p.returncode, p.stderr[-2000:])
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


@pytest.mark.slow  # the runs fixture
def test_label_histogram_skipped_with_warning_when_not_rebuildable(runs, tmp_path):
    workdir = tmp_path / "copy"
    workdir.mkdir()
    source = Path(runs["pfedla"])
    for name in ("metrics.jsonl", "alpha.npz"):
        (workdir / name).write_bytes((source / name).read_bytes())
    summary = json.loads((source / "summary.json").read_text())
    summary["config"]["dataset"] = "nosuch"
    summary.pop("label_histogram", None)
    (workdir / "summary.json").write_text(json.dumps(summary))
    warnings = []
    paths = plots.make_plots(str(workdir), warn=warnings.append)
    names = [os.path.basename(x) for x in paths]
    assert len(paths) == 4 and "label_histogram.png" not in names and "group_weights.png" not in names
    assert len(warnings) == 2 and all("unknown dataset 'nosuch'" in w for w in warnings)
    with pytest.raises(UserInputError, match="unknown dataset"):
        plots.make_plots(str(workdir), which=["label_histogram"])


def test_group_weights_by_hand():
    # target 0 holds classes {0,1,2,3}; client 1 the same; client 2 shares 3; 3 and 4 fewer
    hist = np.zeros((5, 10), int)
    for i, classes in enumerate([(0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 9), (0, 5, 6, 7), (4, 5, 6, 7)]):
        hist[i, list(classes)] = 10
    groups = plots.client_groups(hist, 0)
    assert groups.tolist() == [0, 1, 2, 3, 3]
    assert plots.client_groups(hist, 2).tolist() == [2, 2, 0, 3, 3]
    alpha = np.random.default_rng(0).dirichlet(np.ones(5), size=(3, 5, 2))   # [E, N, L, N]
    w = plots.group_weights(alpha, groups, 0)
    assert w.shape == (3, 4, 2)
    np.testing.assert_allclose(w[:, 0], alpha[:, 0, :, 0])
    np.testing.assert_allclose(w[:, 3], alpha[:, 0, :, 3] + alpha[:, 0, :, 4])
    np.testing.assert_allclose(w.sum(1), 1.0)
