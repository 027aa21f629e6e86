"""experiments.run: a smoke run writes the metrics contract; the flags are the configs'
fields (defaults, prefixes, aliases, grouped --help); bad input is one line (in process
through `config_from_argv` and `run_experiment`; the `error:` line and exit 2 of the wrapper
in a few subprocesses)."""

import json
import os
import re
import subprocess
import sys

import pytest

from pfedla_jax.algorithms import algorithm_class, algorithm_names, config_fields
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.command_line import CommandOptions, config_from_argv, help_text
from pfedla_jax.training.config import ExperimentConfig, RunOptions
from pfedla_jax.training.loop import run_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path=None, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,extra", [("fedavg", []), ("pfedla", ["--heur_k=1"])])
def test_smoke_run_writes_metrics(tmp_path, algorithm, extra):
    workdir = tmp_path / "run"
    flagfile = tmp_path / "flags"
    flagfile.write_text("--dataset=synthetic\n--synthetic_per_class=40\n--num_clients=4\n")
    p = _run([f"--flagfile={flagfile}", f"--algorithm={algorithm}", "--partition=noniid1",
              "--classes_per_client=2", "--rounds=2", "--local_epochs=1", "--batch_size=16",
              "--lr=0.05", "--participation=0.5", "--seed=0", f"--workdir={workdir}", *extra])
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        rec = json.loads(line)
        for key in ("round", "test_acc", "test_acc_unweighted", "test_acc_std", "train_loss", "round_seconds"):
            assert key in rec
        assert 0.0 <= rec["test_acc"] <= 1.0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["config"]["algorithm"] == algorithm
    assert "final test_acc" in p.stdout
    if algorithm == "pfedla":
        import numpy as np
        alpha = np.load(workdir / "alpha.npz")
        assert alpha["alpha"].shape == (2, 4, 5, 4)
        assert rec["bytes_down"] < rec["bytes_up"]


BAD = [
    (["--dataset=nosuch"], "dataset"),
    (["--algorithm=nosuch"], "algorithm"),
    (["--partition=weird"], "partition"),
    (["--rounds=0"], "rounds"),
    (["--lr=-1"], "lr"),
    (["--participation=1.5"], "participation"),
    (["--rounds=abc"], "rounds"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["--client_parallelism=magic"], "client_parallelism"),
    (["--classes_per_client=11"], "class"),
    (["--num_clients=10", "--samples_per_client=5000"], "samples_per_client"),
    (["--dataset=fmnist", "--data_dir=/nonexistent/dir"], "fashion-mnist|/nonexistent"),
    (["--algorithm=pfedla", "--heur_k=5"], "heur_k"),
    (["--algorithm=pfedla", "--hn_normalization=tanh"], "hn_normalization"),
    (["--algorithm=pfedla", "--round_semantics=async"], "round_semantics"),
    (["--weight_decay=nan"], "weight_decay"),
    (["--samples_per_client=4", "--classes_per_client=4"], "no test examples"),
    pytest.param(["--algorithm=pfedla", "--hn_cotangent=raw", "--hn_normalization=relu", "--hn_lr=1e30",
                  "--rounds=3"], "diverged", marks=pytest.mark.slow),
    (["--workdir=/proc/no/such/dir"], "workdir"),
    (["--checkpoint_every=-1"], "checkpoint_every"),
    (["--log_every=-2"], "log_every"),
    (["--partition=adjacent", "--classes_per_client=11"], "class"),
    (["--host_devices=-2"], "host_devices"),
    (["--algorithm=fedavg", "--pfedla_hn_lr=0.1"], "option of --algorithm=pfedla"),
    (["--import=no_such_module_xyz"], "no_such_module_xyz"),
    (["extra_argument"], "unexpected arguments"),
]


def _ids(value):
    return " ".join(value) if isinstance(value, list) else "-"


def _refusal(args, tmp_path) -> str:
    """What experiments.run refuses, in process: the command line (`config_from_argv`), then
    the run (`run_experiment`); returns the UserInputError's message."""
    base = ["experiments.run", "--dataset=synthetic", "--synthetic_per_class=40", "--num_clients=4",
            "--rounds=1", f"--workdir={tmp_path}"]
    with pytest.raises(UserInputError) as e:
        command = config_from_argv(base + args)
        run_experiment(command.config, command.command.workdir, log=lambda s: None,
                       options=command.options)
    return str(e.value)


@pytest.mark.parametrize("args,pattern", BAD, ids=_ids)
def test_bad_input_is_one_line(args, pattern, tmp_path):
    message = _refusal(args, tmp_path)
    assert "\n" not in message, message
    assert re.search(pattern, message, re.IGNORECASE), message


# the wrapper: experiments.run prints the refusal as one `error:` line and exits 2, for a
# flag it cannot parse, a config it refuses and a run that fails after the data is loaded
WRAPPER = [(["--rounds=abc"], "rounds"), (["--algorithm=nosuch"], "algorithm"),
           pytest.param(["--classes_per_client=11"], "class", marks=pytest.mark.slow)]


@pytest.mark.parametrize("args,pattern", WRAPPER, ids=_ids)
def test_bad_input_one_error_line_exit_2(args, pattern, tmp_path):
    base = ["--dataset=synthetic", "--synthetic_per_class=40", "--num_clients=4", "--rounds=1",
            f"--workdir={tmp_path}"]
    p = _run(base + args, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    err = p.stderr.strip().splitlines()
    assert len(err) == 1, p.stderr[-2000:]
    assert err[0].startswith("error: ")
    assert re.search(pattern, err[0], re.IGNORECASE), err[0]
    assert "Traceback" not in p.stderr


def test_flags_are_the_config_defaults():
    """No default is written twice: the flags' defaults are the dataclasses' own."""
    command = config_from_argv(["experiments.run"])
    assert command.config == ExperimentConfig()
    assert command.options == RunOptions()
    assert command.command == CommandOptions()
    for name in algorithm_names():
        chosen = config_from_argv(["experiments.run", f"--algorithm={name}"]).config
        assert chosen.algorithm_config == algorithm_class(name).config_class(), name


def test_every_algorithm_option_is_prefixed_and_pfedla_keeps_its_names():
    for name in algorithm_names():
        assert all(f.flag.startswith(f"{name}_") for f in config_fields(name)), name
    by_prefix = config_from_argv(["experiments.run", "--algorithm=pfedla", "--pfedla_hn_lr=0.2",
                                  "--pfedla_hn_embed_dim=7", "--pfedla_heur_k=1"]).config
    by_alias = config_from_argv(["experiments.run", "--algorithm=pfedla", "--hn_lr=0.2",
                                 "--hn_embed_dim=7", "--heur_k=1"]).config
    assert by_prefix == by_alias
    assert (by_alias.algorithm_config.hn_lr, by_alias.algorithm_config.hn.embed_dim) == (0.2, 7)
    with pytest.raises(UserInputError, match="Did you mean: pfedla_hn_lr"):
        config_from_argv(["experiments.run", "--algorithm=pfedla", "--pfedla_hn_lrr=0.2"])
    with pytest.raises(UserInputError, match="--hn_lr is an option of --algorithm=pfedla"):
        config_from_argv(["experiments.run", "--algorithm=fedavg", "--hn_lr=0.2"])


def test_help_is_grouped_and_shows_the_chosen_algorithm_only():
    full = help_text("experiments.run", ["experiments.run", "--help"])
    for section in ("data:", "federated schedule:", "local training:", "run:", "several processes:"):
        assert f"\n{section}\n" in full, section
    for name in algorithm_names():
        assert f"(--algorithm={name}):" in full, name
    one = help_text("experiments.run", ["experiments.run", "--algorithm=pfedla", "--help"])
    assert "(--algorithm=pfedla):" in one and "(--algorithm=pfedhn):" not in one
    assert "--pfedla_hn_lr (or --hn_lr)" in one
    assert sum(line.endswith("):") for line in one.splitlines()) == 1  # one algorithm section
    # the module's example is the README's main job (make run)
    from experiments import run
    make = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    assert "--flagfile=experiments/presets/fmnist_quick.flags" in run.__doc__
    assert "experiments.run --flagfile=experiments/presets/fmnist_quick.flags" in make


@pytest.mark.slow
def test_help_exits_0_and_importing_a_tool_defines_no_flags():
    p = _run(["--algorithm=fedavg", "--help"], timeout=120)
    assert p.returncode == 0 and "local training:" in p.stdout and p.stderr == "", p.stderr[-2000:]
    # the libraries' own flags (absl's app and logging, orbax) are defined before `before`
    code = ("import absl.app, absl.logging, orbax.checkpoint, jax; from absl import flags; "
            "before = set(flags.FLAGS); "
            "import experiments.run, experiments.sweep, experiments.table, experiments.launch, "
            "experiments.plots, experiments.bench.benchmark, experiments.bench.gpu_check, "
            "experiments.bench.state_size, experiments.bench.conv_ops; "
            "print(sorted(set(flags.FLAGS) - before))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]", p.stdout


def test_progress_line_shows_the_last_evaluation_with_its_round():
    """No `nan` before the first evaluation: '-', then the last evaluated accuracy, with
    its round when that is not the current one."""
    from types import SimpleNamespace

    from pfedla_jax.training.loop import Progress

    lines = []
    progress = Progress(lines.append, every=1, rounds=5)
    run = SimpleNamespace(records=[], round_times=[2.0])
    progress(run, 1, False, 2.5, 100.0, 2.0)
    run.round_times.append(0.5)
    run.records.append({"round": 2, "test_acc": 0.25})
    progress(run, 2, True, 2.0, 100.0, 0.5)
    run.round_times.append(0.5)
    progress(run, 3, False, 1.5, 100.0, 0.5)
    assert lines[0].startswith("round    1/5  test_acc -  train_loss 2.5000"), lines[0]
    assert lines[1].startswith("round    2/5  test_acc 0.2500  train_loss 2.0000"), lines[1]
    assert lines[2].startswith("round    3/5  test_acc 0.2500 (round 2)  train_loss 1.5000"), lines[2]


def _make_dry_run(target, venv):
    """The commands `make TARGET` would run for a venv that does not exist yet."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    p = subprocess.run(["make", "-n", "--no-print-directory", "-C", ROOT, target, f"VENV={venv}"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def test_make_run_does_not_install_torch_but_test_and_bench_do(tmp_path):
    venv = tmp_path / "venv"
    # the arguments of every `pip install` the target runs
    installs = lambda lines: [line.split("/bin/pip install", 1)[1] for line in lines
                              if "/bin/pip install" in line]
    run = _make_dry_run("run", venv)
    assert " -q -e ." in installs(run), run
    assert not [args for args in installs(run) if "torch" in args or "test" in args], run
    assert run[-1].endswith("-m experiments.run --flagfile=experiments/presets/fmnist_quick.flags "
                            "--workdir=runs/pfedla_fmnist"), run
    for target in ("test", "bench"):
        lines = _make_dry_run(target, venv)
        assert ' -q -e ".[test,torch]"' in installs(lines), lines
    # CI (.ci/run) calls `make test`: still the README's test command
    assert _make_dry_run("test", venv)[-1] == f"PFEDLA_REQUIRE_TORCH=1 {venv}/bin/python -m pytest -q -n 2 --dist loadfile"


@pytest.mark.slow
def test_main_job_runs_without_torch(tmp_path):
    """What `make run` installs suffices: a run (TensorBoard on) with torch unimportable."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv[0] = 'experiments.run'; "
            "runpy.run_module('experiments.run', run_name='__main__', alter_sys=True)")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", code, "--algorithm=pfedla", "--dataset=synthetic",
                        "--synthetic_per_class=40", "--num_clients=3", "--classes_per_client=2",
                        "--rounds=2", "--local_steps=2", "--batch_size=16", "--quiet",
                        f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "final test_acc" in p.stdout
    assert os.listdir(tmp_path / "tb")
