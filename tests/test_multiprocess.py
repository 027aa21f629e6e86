"""One run over several processes (JAX's distributed runtime) = one process with as many devices.

The equality tests start real processes on 127.0.0.1 through `experiments.launch` (or
`experiments.run` with the multi-process flags) and compare their files with a
one-process run of the same configuration on the same number of XLA devices: the same
global mesh, the same programs, so the numbers must be identical (the collectives only
move or add exact zeros: core/client_parallel.py). Runs that several tests compare are made
once (module fixtures): the 2-round pFedLA run, launched and in one process, is also the
start of the resume-with-another-process-count tests. Bad multi-process input is checked in
process (`experiments.run.main`, `experiments.launch.check_run_flags`) where it is refused
before any process joins a cluster, and in real processes where the refusal is about joining
or about the launcher's own flags.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import launch as launch_tool
from experiments import run as run_tool
from pfedla_jax.algorithms import algorithm_class, algorithm_names
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.command_line import config_from_argv
from pfedla_jax.training.config import RunOptions
from pfedla_jax.training.loop import build_experiment
from tests.helpers import one_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--dataset=synthetic", "--synthetic_per_class=24", "--num_clients=4", "--local_steps=2",
          "--batch_size=8", "--tensorboard=false", "--seed=3", "--quiet"]
# wall-clock of the run, not what it computes
TIMING_KEYS = {"round_seconds", "eval_seconds"}


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _launch(processes, devices, flags, timeout=240, **kwargs):
    return subprocess.run([sys.executable, "-m", "experiments.launch", f"--processes={processes}",
                           f"--devices_per_process={devices}", "--", *flags],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def _single(devices, flags, timeout=240):
    """One process with `devices` XLA CPU devices (the 'shard' strategy, as the launched runs)."""
    return subprocess.run([sys.executable, "-m", "experiments.run", f"--host_devices={devices}",
                           "--client_parallelism=shard", *flags],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    return proc


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _assert_same_run(a, b, exact=True):
    """The files of runs a and b hold the same numbers: bitwise (`exact`), else within 1e-6
    (relative and absolute), with every accuracy and the rounds equal."""
    ra, rb = _metrics(a), _metrics(b)
    assert [r["round"] for r in ra] == [r["round"] for r in rb]
    assert [sorted(r) for r in ra] == [sorted(r) for r in rb]
    for x, y in zip(ra, rb):
        if exact:
            assert x == y, {k: (x[k], y.get(k)) for k in x if x[k] != y.get(k)}
            continue
        for k in x:
            if "acc" in k:
                assert x[k] == y[k], (k, x[k], y[k])
            else:
                np.testing.assert_allclose(x[k], y[k], rtol=1e-6, atol=1e-6, err_msg=k)
    for name in ("alpha.npz", "affinity.npz"):
        if os.path.exists(os.path.join(a, name)):
            with np.load(os.path.join(a, name)) as fa, np.load(os.path.join(b, name)) as fb:
                assert sorted(fa.files) == sorted(fb.files)
                for k in fa.files:
                    if exact or not np.issubdtype(fa[k].dtype, np.floating):
                        np.testing.assert_array_equal(fa[k], fb[k], err_msg=f"{name}:{k}")
                    else:
                        np.testing.assert_allclose(fa[k], fb[k], rtol=1e-6, atol=1e-6, err_msg=f"{name}:{k}")


# The 2-round pFedLA run with half the clients per round: launched on 2 processes of 1 device
# and in one process of 2 devices (compared in test_launched_run_equals_one_process), each
# the start of a resume in test_checkpoint_resumes_with_another_process_count.
PFEDLA_HALF = COMMON + ["--algorithm=pfedla", "--participation=0.5"]


@pytest.fixture(scope="module")
def pfedla_two_rounds(tmp_path_factory):
    """{'mp': launched workdir, 'one': one-process workdir, 'stdout': the launcher's output}."""
    base = tmp_path_factory.mktemp("pfedla_two_rounds")
    mp, one = str(base / "mp"), str(base / "one")
    out = _ok(_launch(2, 1, PFEDLA_HALF + ["--rounds=2", f"--workdir={mp}"]))
    _ok(_single(2, PFEDLA_HALF + ["--rounds=2", f"--workdir={one}"]))
    return {"mp": mp, "one": one, "stdout": out.stdout}


@pytest.fixture(scope="module")
def pfedla_four_rounds(tmp_path_factory):
    """The uninterrupted 4-round run (one process, 2 devices) the resumed runs must equal."""
    one = str(tmp_path_factory.mktemp("pfedla_four_rounds") / "one")
    _ok(_single(2, PFEDLA_HALF + ["--rounds=4", f"--workdir={one}"]))
    return one


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,processes,devices", [
    ("pfedla", 2, 1), ("fedavg", 2, 1), ("pfedla", 2, 2), ("fedavg", 2, 2)])
def test_launched_run_equals_one_process(tmp_path, request, algorithm, processes, devices):
    flags = COMMON + [f"--algorithm={algorithm}", "--rounds=2", "--participation=0.5"]
    if devices == 2:
        # 6 clients on 4 devices: the state is padded to 8 rows (process 1 holds the padding),
        # the cohorts of 3 to 4
        flags += ["--num_clients=6"]
    if (algorithm, processes, devices) == ("pfedla", 2, 1):  # the shared runs (same flags)
        runs = request.getfixturevalue("pfedla_two_rounds")
        mp, one, stdout = runs["mp"], runs["one"], runs["stdout"]
    else:
        mp, one = str(tmp_path / "mp"), str(tmp_path / "one")
        stdout = _ok(_launch(processes, devices, flags + [f"--workdir={mp}"])).stdout
        _ok(_single(processes * devices, flags + [f"--workdir={one}"]))
    assert f"{algorithm}: final test_acc" in stdout  # process 0 reports, once
    assert stdout.count("final test_acc") == 1
    # On 2 devices every cross-device sum has 2 terms (a + b = b + a): bitwise equal. On 4,
    # a sum that XLA splits over the devices adds 4 partial sums, and Gloo's all-reduce
    # (several processes) adds them in another order than XLA:CPU's in-process one:
    # float32 rounding differs (measured: 1e-7 relative in test_loss).
    _assert_same_run(mp, one, exact=processes * devices == 2)
    with open(os.path.join(mp, "summary.json")) as f:
        summary = json.load(f)
    assert summary["devices"] == processes * devices
    # only process 0 wrote the run's files; each process's output is kept
    assert sorted(os.listdir(os.path.join(mp, "launch"))) == [f"process_{i}.log" for i in range(processes)]


# Every registered algorithm but the two above runs over two processes. By default those
# whose state has an entry FedAvg's has not, or that export arrays (e.g. pFedHN's replicated
# server hypernetwork, FedFomo's replicated N x N affinity exported through a host read,
# pFedMe's second per-client model); with PFEDLA_FULL_MULTIPROCESS=1 also those whose state
# is FedAvg's entries (tested above: Local, Per-FedAvg, FedRep, FedBN; all passed when last
# run so, BUILD_NOTES (multi-process runs)).
LAUNCHED_ABOVE = ("pfedla", "fedavg")
_FULL = os.environ.get("PFEDLA_FULL_MULTIPROCESS") == "1"


def _algorithm_flags(algorithm):
    """The run's flags: COMMON; the BatchNorm model for an algorithm whose table row needs
    it (FedBN is FedAvg without BN layers); local epochs instead of steps for an algorithm
    whose options refuse steps (FedRep splits epochs into head and body epochs)."""
    flags = COMMON + [f"--algorithm={algorithm}", "--rounds=2"]
    if any(row.needs_batchnorm for row in algorithm_class(algorithm).rows()):
        flags += ["--use_bn=true"]
    try:
        config_from_argv(["experiments.run", *flags])
    except UserInputError:  # e.g. "set --local_epochs (not --local_steps)"; else the run says
        flags = [f for f in flags if not f.startswith("--local_steps")] + ["--local_epochs=1"]
    return flags


def _state_entries(algorithm):
    """The entries of the algorithm's state (shapes only: nothing is computed)."""
    command = config_from_argv(["experiments.run", *_algorithm_flags(algorithm)])
    exp = build_experiment(command.config, RunOptions(client_parallelism="loop"))
    return set(jax.eval_shape(exp.algorithm.init_state, jax.random.key(0)))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", [a for a in algorithm_names() if a not in LAUNCHED_ABOVE])
def test_every_algorithm_runs_over_two_processes(tmp_path, algorithm):
    fedavg_like = (_state_entries(algorithm) <= _state_entries("fedavg")
                   and algorithm_class(algorithm).export_name is None)
    if fedavg_like and not _FULL:
        pytest.skip("its state is FedAvg's entries (tested by test_launched_run_equals_one_process); "
                    "PFEDLA_FULL_MULTIPROCESS=1 runs it")
    flags = _algorithm_flags(algorithm)
    mp, one = str(tmp_path / "mp"), str(tmp_path / "one")
    _ok(_launch(2, 1, flags + [f"--workdir={mp}"]))
    _ok(_single(2, flags + [f"--workdir={one}"]))
    _assert_same_run(mp, one)


def _pids_of(marker):
    """Processes whose command line contains `marker` (our own children only)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and "experiments.run" in cmd:
            pids.append(int(pid))
    return pids


def _rows(workdir):
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


# the run a killed launch resumes to: pFedLA, 16 rounds, checkpoints every 2
KILLED = COMMON + ["--algorithm=pfedla", "--rounds=16", "--checkpoint_every=2"]


@pytest.fixture(scope="module")
def killed_reference(tmp_path_factory):
    """The uninterrupted run of KILLED in one process with 2 devices: its workdir."""
    one = str(tmp_path_factory.mktemp("killed_reference") / "one")
    _ok(_single(2, KILLED + [f"--workdir={one}"]))
    return one


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_killed_worker_is_one_error_line_and_the_rerun_resumes(tmp_path, killed_reference, victim):
    """SIGKILL of one process of a 2-process launch mid-run (process 1, or process 0: the
    coordinator, which also holds the workdir's lock): one `error:` line naming it, no
    process left, and the same command resumes to the uninterrupted run's files."""
    workdir = str(tmp_path / "mp")
    flags = KILLED + [f"--workdir={workdir}"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "experiments.launch", "--processes=2", "--devices_per_process=1", "--",
         *flags], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while _rows(workdir) < 3 and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert launcher.poll() is None, "the run ended before a worker could be killed"
        victims = [p for p in _pids_of(f"--workdir={workdir}") if p != launcher.pid]
        victims = [p for p in victims
                   if f"--process_id={victim}" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")]
        assert len(victims) == 1, victims
        killed = time.monotonic()
        os.kill(victims[0], signal.SIGKILL)
        out, err = launcher.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("error: ")]) == 1, err
    assert lines[-1].startswith(f"error: process {victim} of 2 was killed by SIGKILL"), err
    assert not _pids_of(f"--workdir={workdir}"), "a worker outlived the launcher"
    assert 3 <= _rows(workdir) < 16
    # the same command again resumes from the latest checkpoint, to the uninterrupted numbers
    _ok(_launch(2, 1, flags))
    _assert_same_run(workdir, killed_reference)


@pytest.mark.slow
@pytest.mark.parametrize("first", ["two_processes", "one_process"])
def test_checkpoint_resumes_with_another_process_count(tmp_path, first, pfedla_two_rounds,
                                                       pfedla_four_rounds):
    """A checkpoint written by 2 processes resumes in 1 (and vice versa): the extended run's
    files equal one uninterrupted run's. The 2-round runs are copies of the shared ones
    (PFEDLA_HALF --rounds=2, launched or in one process)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(pfedla_two_rounds["mp" if first == "two_processes" else "one"], workdir)
    full = PFEDLA_HALF + ["--rounds=4", f"--workdir={workdir}"]
    out = _ok(_single(2, full)) if first == "two_processes" else _ok(_launch(2, 1, full))
    assert "final test_acc" in out.stdout
    _assert_same_run(workdir, pfedla_four_rounds)
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["resumed_from_round"] == 2


def _run_cli(args, timeout=60):
    return subprocess.run([sys.executable, "-m", "experiments.run", *COMMON, "--rounds=1", *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# refused before the process joins a cluster or touches a device: in process
@pytest.mark.parametrize("args,fragments", [
    (["--num_processes=2", "--process_id=2", "--coordinator_address=127.0.0.1:1"], ["--process_id must be in 0..1"]),
    (["--num_processes=2", "--process_id=-1", "--coordinator_address=127.0.0.1:1"], ["--process_id"]),
    (["--num_processes=0"], ["--num_processes"]),
    (["--num_processes=two"], ["--num_processes"]),
    (["--num_processes=2", "--coordinator_address=nohostport"], ["host:port"]),
    (["--process_id=1"], ["need --num_processes > 1"]),
    (["--num_processes=5", "--process_id=0", "--coordinator_address=127.0.0.1:1"], ["more than the 4 clients per round"]),
    (["--num_processes=2", "--process_id=0", "--coordinator_address=127.0.0.1:1",
      "--participation=0"], ["--participation"]),  # the config's own error comes first
])
def test_bad_multiprocess_flags_are_one_error_line(args, fragments, capfd):
    t0 = time.monotonic()
    line = one_error_line(run_tool.main, ["experiments.run", *COMMON, "--rounds=1", *args], capfd)
    for fragment in fragments:
        assert fragment in line, line
    assert time.monotonic() - t0 < 30


# refused while joining (the process's own deadline, JAX's cluster detection): real processes
@pytest.mark.slow
@pytest.mark.parametrize("args,fragments", [
    (["--num_processes=2", "--process_id=1", "--coordinator_address=127.0.0.1:1",
      "--distributed_timeout_s=2"], ["cannot reach the coordinator 127.0.0.1:1 within 2 s"]),
    (["--num_processes=auto"], ["cannot join the run"]),  # no cluster manager here
])
def test_a_failed_join_is_one_error_line(args, fragments):
    t0 = time.monotonic()
    _one_error_line(_run_cli(args), *fragments)
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_launcher_with_one_process_is_a_plain_run(tmp_path):
    out = _ok(_launch(1, 2, COMMON + ["--algorithm=fedavg", "--rounds=1", f"--workdir={tmp_path / 'w'}"]))
    assert "fedavg: final test_acc" in out.stdout
    with open(tmp_path / "w" / "summary.json") as f:
        assert json.load(f)["devices"] == 2


@pytest.mark.slow
def test_a_process_that_never_joins_is_one_error_line_within_the_timeout():
    # process 0 of 2 alone: nobody else joins (a free port)
    port = launch_tool.free_port()
    t0 = time.monotonic()
    proc = _run_cli(["--num_processes=2", "--process_id=0", f"--coordinator_address=127.0.0.1:{port}",
                     "--distributed_timeout_s=3"])
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "not every process joined" in errors[0], proc.stderr[-2000:]


# the run's flags, checked by the launcher before any process starts: in process
@pytest.mark.parametrize("run_args,fragments", [
    (["--host_devices=2"], ["--host_devices is set by experiments.launch"]),
    (["--process_id=1"], ["--process_id is set by experiments.launch"]),
    (["--client_parallelism=loop"], ["loop runs on one device"]),
    (["--rounds=1", "--algorithm=nope"], ["unknown --algorithm 'nope'"]),
])
def test_launcher_refuses_bad_run_flags(tmp_path, run_args, fragments, capfd):
    line = one_error_line(launch_tool.check_run_flags, [*COMMON, *run_args, f"--workdir={tmp_path / 'w'}"],
                          capfd)
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / "w").exists()


# the launcher's own flags, and a refusal of the started processes that it reports: the program
@pytest.mark.slow
@pytest.mark.parametrize("launch_args,run_args,fragments", [
    (["--processes=0"], [], ["--processes must be >= 1"]),
    (["--devices_per_process=0"], [], ["--devices_per_process"]),
    (["--processes=5"], ["--rounds=1"], ["more than the 4 clients per round"]),
    ([], ["--client_parallelism=loop"], ["loop runs on one device"]),
])
def test_launcher_bad_input_is_one_error_line(tmp_path, launch_args, run_args, fragments):
    proc = subprocess.run([sys.executable, "-m", "experiments.launch", *launch_args, "--", *COMMON,
                           *run_args, f"--workdir={tmp_path / 'w'}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    _one_error_line(proc, *fragments)
