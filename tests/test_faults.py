"""Faults a run meets on a shared machine, each ending in one line and a resumable workdir.

Kinds (README "Resuming an interrupted run"; BUILD_NOTES, faults): a second command on a
workdir in use (WORKDIR/run.lock), damaged checkpoints (fallback to the newest intact one),
write errors at each writer (a full disk, a file size limit), SIGINT and SIGTERM mid-run,
and the participation rounding rule. The equality checks compare with one uninterrupted run
of the same configuration (`reference`, shared by the tests of this module).
"""

import dataclasses
import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from pfedla_jax.core.local_training import LocalTrainConfig
from pfedla_jax.errors import RunInterrupted, UserInputError
from pfedla_jax.training.config import ExperimentConfig, RunOptions, cohort_size
from pfedla_jax.training.loop import run_experiment
from pfedla_jax.training.workdir import (LOCK_FILE, WorkdirBusy, WorkdirLock, describe_holder,
                                         lock_holder, read_scalar_events)
from pfedla_jax.training.workdir import checkpoints as checkpoints_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {"round_seconds", "eval_seconds"}
# pFedLA (it exports alpha.npz) with half the clients per round (the schedule matters)
FLAGS = ["--algorithm=pfedla", "--dataset=synthetic", "--synthetic_per_class=40", "--num_clients=4",
         "--classes_per_client=2", "--rounds=5", "--eval_every=1", "--participation=0.5",
         "--batch_size=16", "--local_steps=2", "--lr=0.05", "--seed=1", "--checkpoint_every=1",
         "--host_devices=1", "--client_parallelism=loop", "--quiet"]
CONFIG = ExperimentConfig(algorithm="pfedla", dataset="synthetic", synthetic_per_class=40,
                          num_clients=4, classes_per_client=2, rounds=5, eval_every=1,
                          participation=0.5, seed=1,
                          train=LocalTrainConfig(batch_size=16, local_steps=2, lr=0.05))
OPTIONS = RunOptions(checkpoint_every=1, client_parallelism="loop")


def _env():
    return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}


def _run_cli(args, timeout=180, **kwargs):
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def _assert_same_run(a, b):
    assert _metrics(a) == _metrics(b)
    with np.load(os.path.join(a, "alpha.npz")) as fa, np.load(os.path.join(b, "alpha.npz")) as fb:
        assert sorted(fa.files) == sorted(fb.files)
        for k in fa.files:
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    with open(os.path.join(a, "summary.json")) as fa, open(os.path.join(b, "summary.json")) as fb:
        sa, sb = json.load(fa), json.load(fb)
    drop = lambda final: {k: v for k, v in final.items() if k not in TIMING_KEYS}
    assert drop(sa["final"]) == drop(sb["final"])
    assert (sa["best_test_acc"], sa["best_round"]) == (sb["best_test_acc"], sb["best_round"])


REFERENCE_LOG: list[str] = []   # the reference run's log lines


def _events(workdir):
    """TensorBoard scalars (tag, step, value) but wall-clock ones, sorted."""
    return sorted((tag, step, value) for tag, step, value, _ in read_scalar_events(os.path.join(workdir, "tb"))
                  if "seconds" not in tag and "per_second" not in tag)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 5-round run (in this process), its workdir."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    run_experiment(CONFIG, workdir, log=REFERENCE_LOG.append, options=OPTIONS)
    return workdir


# ----------------------------------------------------------------------------- participation

@pytest.mark.parametrize("participation,num_clients,expected", [
    (1.0, 10, 10), (0.5, 10, 5), (0.25, 10, 2), (0.35, 10, 3), (0.45, 10, 4), (0.05, 10, 1),
    (0.01, 10, 1), (0.1, 100, 10), (0.29, 100, 29), (0.3, 10, 3), (0.7, 10, 7), (2 / 3, 3, 2),
    (0.5, 5, 2), (0.5, 7, 3), (0.999, 10, 9), (0.15, 20, 3), (1e-9, 1, 1), (1.0, 1, 1)])
def test_cohort_size_is_fedavgs_floor_rule(participation, num_clients, expected):
    """m = max(floor(C K), 1), with decimal products exact (0.29 x 100 is 28.999999999999996
    in binary: 29 clients) and half-way cases not rounded up (0.25 x 10: 2, 0.35 x 10: 3)."""
    assert cohort_size(participation, num_clients) == expected
    config = ExperimentConfig(dataset="synthetic", num_clients=num_clients, participation=participation)
    assert config.clients_per_round == expected


@pytest.mark.slow
def test_the_summary_and_first_log_line_state_clients_per_round(reference):
    assert REFERENCE_LOG[0].startswith("pfedla: synthetic noniid1, 4 clients (2/round),"), REFERENCE_LOG[0]
    with open(os.path.join(reference, "summary.json")) as f:
        assert json.load(f)["clients_per_round"] == 2


# ----------------------------------------------------------------------------- one writer

HOLD = textwrap.dedent("""
    import sys, time
    from pfedla_jax.training.workdir import WorkdirLock
    lock = WorkdirLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    workdir = str(tmp_path)
    assert lock_holder(workdir) is None
    with WorkdirLock(workdir, token=7):
        holder = lock_holder(workdir)
        assert holder["pid"] == os.getpid() and holder["token"] == 7 and holder["host"]
        with pytest.raises(WorkdirBusy, match=rf"in use by another run \(pid {os.getpid()} on host"):
            WorkdirLock(workdir).acquire()   # another open file description: refused
    assert lock_holder(workdir) is None   # released; the file stays
    assert os.path.exists(os.path.join(workdir, LOCK_FILE))
    assert describe_holder({}) == "holder unknown"


@pytest.mark.slow
def test_a_second_command_on_a_workdir_in_use_is_refused_and_touches_nothing(tmp_path, reference):
    """A process holds the workdir's lock: a run there exits at once with one line naming it
    and changes no file; once the holder is killed (SIGKILL: the kernel drops its lock) the
    run goes ahead, to the uninterrupted run's numbers."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, workdir], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {n: os.path.getmtime(os.path.join(workdir, n)) for n in os.listdir(workdir)}
        p = _run_cli(FLAGS + [f"--workdir={workdir}"])
        assert p.returncode == 2, p.stderr[-2000:]
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert f"is in use by another run (pid {holder.pid} on host" in lines[0]
        assert {n: os.path.getmtime(os.path.join(workdir, n)) for n in os.listdir(workdir)} == before
        # the Python API refuses the same way
        with pytest.raises(WorkdirBusy):
            run_experiment(CONFIG, workdir, log=lambda s: None, options=OPTIONS)
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(workdir) is None
    run_experiment(CONFIG, workdir, log=lambda s: None, options=OPTIONS)
    _assert_same_run(workdir, reference)


# ----------------------------------------------------------------------------- damaged checkpoints

def _damage(step_dir, how):
    """Damages an orbax step folder: 'truncate' cuts every file to half its size (a crash
    during the write-back, a full disk); 'swap' puts another step's state files in place of
    its own (a bad copy: every file readable, other values)."""
    if how == "swap":
        other = os.path.join(os.path.dirname(step_dir), str(int(os.path.basename(step_dir)) - 1))
        shutil.rmtree(os.path.join(step_dir, "state"))
        shutil.copytree(os.path.join(other, "state"), os.path.join(step_dir, "state"))
        return
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "swap"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, reference, how):
    """Rounds 1-3 run and checkpoint (2 and 3 kept); round 3's checkpoint is damaged; the
    extended run says so, resumes from round 2 and ends with the uninterrupted run's files."""
    workdir = str(tmp_path / "run")
    run_experiment(_with_rounds(CONFIG, 3), workdir, log=lambda s: None, options=OPTIONS)
    _damage(os.path.join(workdir, "checkpoints", "3"), how)
    lines = []
    summary = run_experiment(CONFIG, workdir, log=lines.append, options=OPTIONS)
    assert summary["resumed_from_round"] == 2
    notes = [line for line in lines if "damaged" in line]
    assert len(notes) == 1 and "the checkpoint of round 3 is damaged" in notes[0], lines
    assert "resuming from round 2, rounds 3-3 are recomputed" in notes[0]
    if how == "swap":
        assert "its state differs from the state that was saved" in notes[0]
    _assert_same_run(workdir, reference)
    # TensorBoard's events too: the recomputed round's are not doubled
    assert _events(workdir) == _events(reference)


def _with_rounds(config, rounds):
    return dataclasses.replace(config, rounds=rounds)


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_error_line(tmp_path):
    workdir = str(tmp_path / "run")
    run_experiment(_with_rounds(CONFIG, 2), workdir, log=lambda s: None, options=OPTIONS)
    for step in ("1", "2"):
        _damage(os.path.join(workdir, "checkpoints", step), "truncate")
    p = _run_cli([f for f in FLAGS if not f.startswith("--rounds")] + ["--rounds=4", f"--workdir={workdir}"])
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no intact checkpoint in "), lines
    assert "the newest, of round 2" in lines[0] and "--overwrite" in lines[0]


def test_tensorstore_write_errors_become_oserror():
    """tensorstore's failed-write message (as orbax raises it, a ValueError) is re-raised as
    the OSError it stands for; other errors pass unchanged."""
    message = ('OUT_OF_RANGE: Error writing "a/0" in OCDBT database at local file "/w/": Failed '
               'writing: "/w/checkpoints/2.orbax-checkpoint-tmp/d/ab": Failed to write 367902 '
               "bytes to file 13: No space left on device [os_error_code='28']")
    with pytest.raises(OSError) as e:
        with checkpoints_module._write_errors_as_oserror():
            raise ValueError(message)
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/w/checkpoints/2.orbax-checkpoint-tmp/d/ab"
    assert e.value.strerror == os.strerror(errno.ENOSPC)
    with pytest.raises(ValueError, match="tree structures"):
        with checkpoints_module._write_errors_as_oserror():
            raise ValueError("tree structures do not match")


def test_the_checksum_sees_every_element_and_not_the_sharding():
    import jax
    import jax.numpy as jnp
    x = {"a": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones(5, jnp.int32),
         "c": jnp.array([True, False]), "d": jnp.ones(3, jnp.bfloat16)}
    base = checkpoints_module.tree_checksum(x)
    assert len(base) == 4
    for key, change in [("a", lambda a: a.at[2, 3].set(-0.0)), ("b", lambda b: b.at[0].set(2)),
                        ("c", lambda c: c[::-1]), ("d", lambda d: d.at[1].set(2))]:
        changed = dict(x, **{key: change(x[key])})
        assert checkpoints_module.tree_checksum(changed) != base, key
    swapped = dict(x, a=x["a"][::-1])   # the same values in another order
    assert checkpoints_module.tree_checksum(swapped) != base
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("clients",))
    split = jax.device_put(x["b"][:4], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("clients")))
    assert checkpoints_module.tree_checksum({"b": split}) == checkpoints_module.tree_checksum({"b": x["b"][:4]})


# ----------------------------------------------------------------------------- write errors

def _no_space(path=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _fail_at(monkeypatch, target, name, after, with_path=True):
    """Patches target.name to raise ENOSPC from its call number `after` + 1 on."""
    original = getattr(target, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            path = next((a for a in args if isinstance(a, str) and os.sep in a), None)
            raise _no_space(path if with_path else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["partition", "metrics", "export", "tensorboard", "summary",
                                    "checkpoint"])
def test_a_write_error_is_one_line_and_the_rerun_resumes(tmp_path, reference, monkeypatch, writer):
    from pfedla_jax.training import loop as loop_module
    from pfedla_jax.training.workdir import exports, metrics, tensorboard
    workdir = str(tmp_path / "run")
    with monkeypatch.context() as m:
        if writer == "partition":    # while the run starts (partition.json)
            _fail_at(m, loop_module.partition_file, "write_partition", after=0)
        elif writer == "metrics":    # the third row's append
            _fail_at(m, metrics, "_append", after=4)   # (jsonl and csv: two calls a row)
        elif writer == "export":     # alpha.npz at the third checkpoint
            _fail_at(m, exports.zipfile, "ZipFile", after=2)
        elif writer == "tensorboard":  # an event written into the buffered file
            _fail_at(m, tensorboard.tfrecord, "encode", after=40, with_path=False)
        elif writer == "summary":
            _fail_at(m, loop_module, "write_summary", after=0)
        else:                        # the third checkpoint's save, as tensorstore fails
            original = checkpoints_module.ocp.CheckpointManager.save
            calls = []

            def save(self, step, *args, **kwargs):
                calls.append(step)
                if len(calls) > 2:
                    raise ValueError(f'OUT_OF_RANGE: Failed writing: "{workdir}/checkpoints/{step}'
                                     '.orbax-checkpoint-tmp/d/0": No space left on device '
                                     "[os_error_code='28']")
                return original(self, step, *args, **kwargs)

            m.setattr(checkpoints_module.ocp.CheckpointManager, "save", save)
        with pytest.raises(UserInputError) as e:
            run_experiment(CONFIG, workdir, log=lambda s: None, options=OPTIONS)
    message = str(e.value)
    assert message.startswith("cannot write ") and "No space left on device" in message, message
    assert "\n" not in message and "re-run the same command to resume" in message
    if writer == "tensorboard":
        assert os.path.join(workdir, "tb") in message   # the buffered file's error names it
    assert "keeps the checkpoint of round" in message or "no checkpoint was saved yet" in message
    # nothing half-written: every metrics line parses (a run that failed as it started has none)
    if writer != "partition":
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                json.loads(line)
    run_experiment(CONFIG, workdir, log=lambda s: None, options=OPTIONS)
    _assert_same_run(workdir, reference)


# experiments.run in a process whose files may not exceed 64 KiB (the write fails with EFBIG
# instead of SIGXFSZ killing the process); the run's flags follow
FILE_SIZE_LIMIT = textwrap.dedent("""
    import resource, runpy, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    sys.argv = ["experiments.run", *sys.argv[1:]]
    runpy.run_module("experiments.run", run_name="__main__")
""")


@pytest.mark.slow
def test_a_file_size_limit_in_a_real_process_is_one_line_and_resumable(tmp_path, reference):
    """The OS refuses a write (RLIMIT_FSIZE: a file over 64 KiB, EFBIG): here the first
    checkpoint's data file, written by tensorstore in orbax's thread. One `error:` line (the
    last), status 2, and the same command without the limit ends with the uninterrupted run's
    files."""
    workdir = str(tmp_path / "run")
    # (no compilation cache: JAX would leave cut entries in the session's shared cache)
    p = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, *FLAGS, "--compilation_cache=",
                        f"--workdir={workdir}"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    # one error line (tensorstore's own asyncio threads may print tracebacks of the same
    # failure before it or, at the interpreter's exit, after it: BUILD_NOTES, faults)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    assert errors[0].startswith("error: cannot write ")
    assert "File too large" in errors[0] and os.path.join(workdir, "checkpoints") in errors[0]
    p = _run_cli(FLAGS + [f"--workdir={workdir}"])
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_run(workdir, reference)


# ----------------------------------------------------------------------------- signals

# experiments.run's main in a child that sends itself `sig` when round `at` is logged
# (mid-run, deterministically); the run's flags follow.
SIGNAL_SELF = textwrap.dedent("""
    import os, signal, sys
    from experiments import run
    from pfedla_jax.training import loop
    sig, at = int(sys.argv[1]), int(sys.argv[2])
    progress = loop.Progress.__call__
    def call(self, run_, round_done, *args):
        progress(self, run_, round_done, *args)
        if round_done == at:
            os.kill(os.getpid(), sig)
    loop.Progress.__call__ = call
    run.main(["experiments.run", *sys.argv[3:]])
""")


@pytest.mark.slow
def test_sigint_stops_after_the_round_with_a_checkpoint_and_one_line(tmp_path, reference):
    """Ctrl-C at round 2 of 5 (the checkpoint grid off): the round finishes, is checkpointed,
    one line names the stop and the command, exit 130; that command resumes to the
    uninterrupted run's files."""
    workdir = str(tmp_path / "run")
    flags = FLAGS + ["--checkpoint_every=0", f"--workdir={workdir}", "--overwrite"]
    p = subprocess.run([sys.executable, "-c", SIGNAL_SELF, str(int(signal.SIGINT)), "2", *flags],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 130, (p.returncode, p.stderr[-3000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("stopped by SIGINT after round 2 of 5; checkpoint of round 2 in "), lines
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[:3] == [sys.executable, "-m", "experiments.run"]
    assert "--overwrite" not in command   # it would discard the checkpoint
    assert [r["round"] for r in _metrics(workdir)] == [1, 2]
    p = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_run(workdir, reference)


@pytest.mark.slow
def test_sigterm_in_the_python_api_raises_run_interrupted_and_resumes(tmp_path, reference, monkeypatch):
    """A scheduler's SIGTERM at round 3 of 5 (in this process, through run_experiment): the
    run stops after that round with its checkpoint (RunInterrupted), experiments.run's line for
    it, and a second call resumes to the uninterrupted run's files; the summary has this
    attempt's first round and the total over both."""
    from experiments.run import stopped_line
    from pfedla_jax.training import loop as loop_module
    workdir = str(tmp_path / "run")
    progress = loop_module.Progress.__call__

    def call(self, run, round_done, *args):
        progress(self, run, round_done, *args)
        if round_done == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    assert threading.current_thread() is threading.main_thread()   # (pytest and its xdist workers)
    previous = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        m.setattr(loop_module.Progress, "__call__", call)
        with pytest.raises(RunInterrupted) as e:
            run_experiment(CONFIG, workdir, log=lambda s: None,
                           options=dataclasses.replace(OPTIONS, checkpoint_every=0))
    assert signal.getsignal(signal.SIGTERM) is previous   # the run's handler is gone
    stop = e.value
    assert (stop.signum, stop.round_done, stop.rounds, stop.checkpoint_round, stop.finished_round) == (
        signal.SIGTERM, 3, 5, 3, True)
    line = stopped_line(stop, workdir, ["experiments.run", "--flagfile=f", "--overwrite=true"])
    assert line == (f"stopped by SIGTERM after round 3 of 5; checkpoint of round 3 in {workdir}; "
                    f"resume with: {shlex.join([sys.executable, '-m', 'experiments.run', '--flagfile=f'])}")
    summary = run_experiment(CONFIG, workdir, log=lambda s: None, options=OPTIONS)
    _assert_same_run(workdir, reference)
    assert summary["resumed_from_round"] == 3
    assert summary["total_seconds"] > summary["attempt_seconds"] > 0
    assert summary["first_round_seconds"] > 0


def test_table_and_sweep_report_a_locked_workdir_as_running_elsewhere(tmp_path, capsys):
    """experiments.table does not start a run whose workdir another command holds (status
    'elsewhere', with the holder); experiments.sweep leaves it out of its table, says so, and
    exits 2 after the runs it could do (here none)."""
    from experiments import sweep, table
    workdir = str(tmp_path / "t")
    os.makedirs(workdir)
    spec = table.RunSpec(method="fedavg", seed=0, workdir=workdir, log=str(tmp_path / "t.log"),
                         argv=("-c", "raise SystemExit(3)"))
    with WorkdirLock(workdir):
        status, why = table.execute(spec)
        assert status == "elsewhere" and why.startswith(f"pid {os.getpid()} on host ")
        assert not os.path.exists(spec.log)   # nothing was started
        sweep_dir = tmp_path / "s"
        os.makedirs(sweep_dir / "a" / "seed_0")
        with WorkdirLock(str(sweep_dir / "a" / "seed_0")):
            with pytest.raises(SystemExit) as e:
                sweep.main(["experiments.sweep", "--dataset=synthetic", "--synthetic_per_class=20",
                            "--num_clients=4", "--classes_per_client=2", "--rounds=1",
                            "--local_steps=1", "--batch_size=8", f"--sweep_dir={sweep_dir}",
                            "--run=a:algorithm=fedavg"])
    out, err = capsys.readouterr()
    assert e.value.code == 2
    assert "running elsewhere" in out
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: 1 run(s) left out, "
                                                                        "running elsewhere: a seed 0")
    assert table.execute(spec)[0] == "failed"   # free again: it runs (and this argv fails)


def test_a_process_that_does_not_see_the_primarys_lock_is_refused(tmp_path):
    """check_shared (every process but the primary, in a launched run): the workdir it sees
    must hold the primary's lock with the token the primary broadcast."""
    from pfedla_jax.training.workdir import check_shared
    workdir = str(tmp_path)
    with pytest.raises(UserInputError, match="process 1 does not see process 0's --workdir"):
        check_shared(workdir, 5, 1)   # no lock: another filesystem
    with WorkdirLock(workdir, token=6):
        with pytest.raises(UserInputError, match="on a filesystem they share"):
            check_shared(workdir, 5, 1)   # another run's lock
        check_shared(workdir, 6, 1)
