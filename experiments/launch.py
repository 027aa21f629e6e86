r"""Start one run as N processes on this host (JAX's distributed runtime, one global mesh).

  python -m experiments.launch --processes=2 [--devices_per_process=1] -- \
      --algorithm=pfedla --dataset=synthetic --num_clients=8 --rounds=5 --workdir=runs/mp

Everything after `--` is experiments.run's flags; the launcher adds --coordinator_address
(127.0.0.1 and a free port), --num_processes, --process_id and --host_devices (the CPU devices
of each process: the launcher simulates hosts on the CPU platform, JAX_PLATFORMS=cpu unless
set; --processes=1 is a plain run). Process 0's output is shown as it comes; every process's
output is appended to LAUNCH_LOGS/process_<i>.log (--launch_logs, default WORKDIR/launch, or
a temporary folder without --workdir). Workers die with the launcher (Linux).

If a process fails (an error, a crash, a kill), the others are stopped at once and the
launcher prints ONE line `error: ...` naming the process and what it printed last, and exits
non-zero (2 with a process's own `error:` line, e.g. refused input). Re-running the same
command (without --overwrite) resumes the run from its latest checkpoint, with this or
another number of processes. On a cluster, start experiments.run on every host with --num_processes=N
--process_id=I --coordinator_address=HOST0:PORT (or --num_processes=auto under SLURM /
Open MPI / Kubernetes), not this launcher.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

from experiments.cli import fail, parse_flags
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.command_line import RunCommand, config_from_argv



def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The launcher's flags, defined when it runs as a program (importing defines none)."""
    flags.DEFINE_integer("processes", 2, "Processes to start on this host.", flag_values=flag_values)
    flags.DEFINE_integer("devices_per_process", 1, "XLA CPU devices of each process (--host_devices).",
                         flag_values=flag_values)
    flags.DEFINE_string("launch_logs", None, "Folder for process_<i>.log (default WORKDIR/launch).",
                        flag_values=flag_values)
    flags.DEFINE_integer("distributed_timeout_s", 60, "Seconds for every process to join the run "
                         "(passed on).", flag_values=flag_values)
    flags.DEFINE_float("stop_grace_s", 5.0, "Seconds the other processes get to stop after one "
                       "failed.", flag_values=flag_values)


# set by the launcher: a run flag that names one of these is refused
LAUNCHER_FLAGS = ("coordinator_address", "num_processes", "process_id", "host_devices",
                  "distributed_timeout_s")
TAIL_LINES = 40


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the small window before process 0 binds it is harmless:
    a port taken meanwhile fails the join with one error line)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_run_flags(run_flags: list[str]) -> RunCommand:
    """The run's flags as experiments.run reads them (`config_from_argv`), checked before any
    process starts: flags the launcher sets are refused, and so is the one-device strategy."""
    for arg in run_flags:
        name = arg.lstrip("-").split("=", 1)[0]
        if arg.startswith("-") and name in LAUNCHER_FLAGS:
            fail(f"--{name} is set by experiments.launch (use --processes / --devices_per_process)")
    try:
        command = config_from_argv(["experiments.run", *run_flags])
    except UserInputError as e:
        fail(str(e))
    if command.options.client_parallelism == "loop":
        fail("--client_parallelism=loop runs on one device; a launched run needs shard, vmap or auto")
    return command


def worker_env() -> dict[str, str]:
    """The workers' environment: no *_proxy variables (gRPC would send the coordination
    traffic through them: every process times out), and no host device count in XLA_FLAGS
    (each worker gets --host_devices=--devices_per_process instead)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    xla = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(xla)
    # the launcher simulates hosts with CPU devices (--devices_per_process); on a GPU machine
    # every worker would otherwise claim every GPU (JAX_PLATFORMS set by the user is kept)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _die_with_parent() -> None:
    """In the worker before exec (Linux): SIGKILL when the launcher dies, however it dies
    (SIGKILL, OOM, a timeout), so no worker goes on writing to the workdir alone."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Worker:
    """One process of the run: its output goes to its log file (and to stdout for process 0)."""

    def __init__(self, index: int, command: list[str], log_path: str, echo: bool):
        self.index, self.log_path = index, log_path
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.error_seen: float | None = None  # when the worker printed its `error:` line
        self.failed_at: float | None = None
        # appended: a re-run keeps the earlier attempt's output above a marker
        self._log = open(log_path, "a", buffering=1)  # pylint: disable=consider-using-with
        self._log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=worker_env(), start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self._thread = threading.Thread(target=self._pump, args=(echo,), daemon=True)
        self._thread.start()

    def _pump(self, echo: bool) -> None:
        with self._log as log:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace")
                log.write(line)
                self.tail.append(line.rstrip("\n"))
                if line.startswith("error: ") and self.error_seen is None:
                    self.error_seen = time.monotonic()
                if echo and not line.startswith("error: "):  # the launcher reports it, once
                    sys.stdout.write(line)
                    sys.stdout.flush()

    def finish_output(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    def stop(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)  # the worker and anything it started
            except ProcessLookupError:
                pass

    def error_line(self) -> str | None:
        """The worker's own `error: ...` line, if it printed one."""
        for line in reversed(self.tail):
            if line.startswith("error: "):
                return line[len("error: "):]
        return None

    def last_output(self) -> str:
        # skip the C++ stack frames an abort prints; the line above them says why
        lines = [l for l in self.tail if l.strip() and not l.lstrip().startswith("@ ")
                 and "Check failure stack trace" not in l]
        return lines[-1].strip() if lines else "(no output)"


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def stop_all(workers: list[Worker], grace: float) -> None:
    for w in workers:
        w.stop(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for w in workers:
        try:
            w.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.stop(signal.SIGKILL)
            w.proc.wait()


def launch(processes: int, devices: int, run_flags: list[str], log_dir: str, timeout_s: int,
           grace: float, overwrites: bool = False) -> int:
    """Runs the N processes; returns the exit status (0: every process finished)."""
    stopping = []
    workers: list[Worker] = []

    def forward(signum, frame):  # pylint: disable=unused-argument
        stopping.append(signum)
        for w in workers:
            w.stop(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # before any worker exists
        signal.signal(sig, forward)
    # one process: a plain run (no cluster to join)
    distributed = processes > 1
    address = f"127.0.0.1:{free_port()}" if distributed else ""
    for i in range(processes):
        if stopping:
            break
        extra = ([f"--coordinator_address={address}", f"--num_processes={processes}",
                  f"--process_id={i}", f"--distributed_timeout_s={timeout_s}"] if distributed else [])
        command = [sys.executable, "-m", "experiments.run", *run_flags, *extra,
                   f"--host_devices={devices}"]
        try:
            workers.append(Worker(i, command, os.path.join(log_dir, f"process_{i}.log"), echo=i == 0))
        except OSError as e:
            stop_all(workers, grace)
            print(f"error: cannot start process {i}: {e.strerror or e}", file=sys.stderr, flush=True)
            return 1
    resume_hint = ("re-run the command without --overwrite to resume from the latest checkpoint"
                   if overwrites else
                   "re-run the same command to resume from the latest checkpoint")

    while not stopping:
        now = time.monotonic()
        for w in workers:
            code = w.proc.poll()
            # a worker that printed its `error:` line and has not ended 1 s later may be held
            # in JAX's shutdown while the others wait in a collective: failed all the same
            if w.failed_at is None and ((code not in (None, 0)) or (
                    code is None and w.error_seen is not None and now - w.error_seen > 1.0)):
                w.failed_at = now
        if any(w.failed_at is not None for w in workers) or all(w.proc.poll() is not None for w in workers):
            break
        time.sleep(0.1)
    if stopping:
        stop_all(workers, grace)
        for w in workers:
            w.finish_output()
        print(f"error: stopped by {signal.Signals(stopping[0]).name}; {resume_hint}",
              file=sys.stderr, flush=True)
        return 128 + stopping[0]
    failed = sorted((w for w in workers if w.failed_at is not None), key=lambda w: (w.failed_at, w.index))
    if not failed:
        for w in workers:
            w.finish_output()
        return 0
    # a refused input ends every process with the same line: give the others a moment to end
    # by themselves, then stop them
    first = failed[0]
    end = time.monotonic() + 1.0
    while time.monotonic() < end and any(w.proc.poll() is None for w in workers):
        time.sleep(0.05)
    stop_all(workers, grace)
    for w in workers:
        w.finish_output()
    refused = [w for w in workers if w.error_line()]
    if refused:  # a process's own error line (the lowest process's), status 2
        w = refused[0]
        message = w.error_line()
        if processes > 1 and not message.startswith("process "):
            message += f" (process {w.index})"
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    print(f"error: process {first.index} of {processes} {describe_exit(first.proc.returncode)}; "
          f"its last output: {first.last_output()!r}; the others were stopped; logs: {log_dir}; "
          f"{resume_hint}", file=sys.stderr, flush=True)
    return 1


def main(argv):
    run_flags = argv[1:]
    f = flags.FLAGS
    if f.processes < 1:
        fail(f"--processes must be >= 1, got {f.processes}")
    if f.devices_per_process < 1:
        fail(f"--devices_per_process must be >= 1, got {f.devices_per_process}")
    if f.distributed_timeout_s < 1:
        fail(f"--distributed_timeout_s must be >= 1, got {f.distributed_timeout_s}")
    if f.stop_grace_s < 0:
        fail(f"--stop_grace_s must be >= 0, got {f.stop_grace_s}")
    if run_flags and not run_flags[0].startswith("-"):
        fail(f"unexpected argument {run_flags[0]!r}: experiments.run's flags go after '--'")
    command = check_run_flags(run_flags)
    log_dir = f.launch_logs
    workdir = command.command.workdir
    if not log_dir:
        log_dir = os.path.join(workdir, "launch") if workdir else tempfile.mkdtemp(prefix="pfedla_launch_")
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the log folder {log_dir!r}: {e.strerror or e}")
    sys.exit(launch(f.processes, f.devices_per_process, run_flags, log_dir, f.distributed_timeout_s,
                    f.stop_grace_s, overwrites=command.options.overwrite))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
