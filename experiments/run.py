r"""Train a federated algorithm and write per-round metrics.

Example (the README's main job, `make run`):

  python -m experiments.run --flagfile=experiments/presets/fmnist_quick.flags \
      --workdir=runs/pfedla_fmnist

Writes WORKDIR/metrics.jsonl (one JSON object per evaluated round), metrics.csv, TensorBoard
events (tb/), summary.json, partition.json, and for pFedLA alpha.npz; checkpoints every
--checkpoint_every rounds. Re-running the same command with the same --workdir resumes from
the latest checkpoint. Flags can come from a file: --flagfile=FILE.

The flags are generated from the config dataclasses (pfedla_jax/training/command_line.py):
`--help` lists them by section; `--algorithm=NAME --help` shows that algorithm's options
only. Every algorithm's options are `--<algorithm>_<field>` (pFedLA's historical names,
e.g. --hn_lr, are aliases); an option of another algorithm than --algorithm is an error.
`--import=MODULE` imports a module that registers an algorithm of one's own.
Bad flags or inputs print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys

from experiments.cli import fail, start
from pfedla_jax.core import multihost
from pfedla_jax.errors import RunInterrupted, UserInputError
from pfedla_jax.training.command_line import RunCommand, config_from_argv, help_text, wants_help
from pfedla_jax.training.loop import format_table, run_experiment


def join_processes(command: RunCommand) -> None:
    """Multi-process runs (--num_processes): joins the cluster before any device is used.

    Bad combinations of the flags fail here, before anything waits for other processes."""
    opts = command.command
    try:
        count = multihost.parse_num_processes(opts.num_processes)
        multihost.check_arguments(opts.coordinator_address, count, opts.process_id,
                                  command.config.clients_per_round)
        multihost.initialize(opts.coordinator_address, count, opts.process_id,
                             opts.distributed_timeout_s)
        if count is None:  # auto: the count is known only now
            multihost.check_arguments("", None, 0, command.config.clients_per_round,
                                      joined=multihost.process_count())
    except UserInputError as e:
        fail(str(e))


def resume_command(argv: list[str]) -> str:
    """The command that resumes the run `argv` started: the same flags, less --overwrite (which
    would discard the checkpoint), as one shell line."""
    kept = [a for a in argv[1:] if a.split("=")[0] not in ("--overwrite", "-overwrite")]
    return shlex.join([sys.executable, "-m", "experiments.run", *kept])


def stopped_line(stop: RunInterrupted, workdir: str | None, argv: list[str]) -> str:
    """The one line a run stopped by a signal prints: where it stopped, what is saved, and
    the command that resumes it."""
    name = signal.Signals(stop.signum).name
    where = (f"after round {stop.round_done} of {stop.rounds}" if stop.finished_round
             else f"during round {stop.round_done + 1} of {stop.rounds} (abandoned)")
    if not workdir:
        return f"stopped by {name} {where}; nothing was saved (no --workdir)"
    if stop.checkpoint_round is None:
        return (f"stopped by {name} {where}; no checkpoint yet, the same command starts again: "
                f"{resume_command(argv)}")
    return (f"stopped by {name} {where}; checkpoint of round {stop.checkpoint_round} in "
            f"{workdir}; resume with: {resume_command(argv)}")


def main(argv) -> None:
    if wants_help(argv):
        print(help_text("experiments.run", argv, __doc__.split("\n\n")[0]))
        return
    try:
        command = config_from_argv(argv)
    except UserInputError as e:
        fail(str(e))
    start(argv[:1], command.options.host_devices)
    join_processes(command)
    # one process speaks for the run (the others' output: experiments.launch's log files)
    primary = multihost.is_primary()
    quiet = command.command.quiet or not primary
    workdir = command.command.workdir
    try:
        summary = run_experiment(command.config, workdir, log=(lambda s: None) if quiet else None,
                                 options=command.options)
    except RunInterrupted as stop:  # (one process: see StopRequests)
        print(stopped_line(stop, workdir, argv), file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt:  # outside the rounds (loading data, compiling, or finishing)
        print("stopped by SIGINT outside the rounds; the same command resumes from the latest "
              f"checkpoint, if any: {resume_command(argv)}", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    except UserInputError as e:
        if multihost.process_count() == 1:
            fail(str(e))
        # several processes: the others may be waiting in a collective; exit at once rather
        # than in JAX's shutdown barrier (experiments.launch stops them on this line)
        print(f"error: {e}" if primary else f"error: process {multihost.process_index()}: {e}",
              file=sys.stderr, flush=True)
        os._exit(2)
    if not primary:
        return
    print(format_table(summary), flush=True)
    if workdir:
        print(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
