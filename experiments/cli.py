"""What every experiments/ command line shares and that defines no flag: the one-line error
exit, absl parsing that uses it, and the start of a tool's main (importing this module adds
nothing to a tool's flags)."""

from __future__ import annotations

import logging as std_logging
import os
import sys
import threading
import warnings

from absl import flags, logging

from pfedla_jax.errors import UserInputError
from pfedla_jax.runtime import set_host_devices


def fail(message: str) -> None:
    """Prints `error: message` on stderr and exits with status 2 (the project's bad-input rule)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_flags(argv):
    """absl parsing with a one-line error instead of absl's usage dump."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))


def start(argv, host_devices: int | None = None) -> None:
    """The common start of a tool's main: no stray arguments, the host's XLA devices
    (`pfedla_jax.runtime.set_host_devices`; None leaves them as they are) and JAX's
    backend-probe INFO lines kept off stderr. Runs before any device is used."""
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if host_devices is not None:
        try:
            set_host_devices(host_devices)
        except UserInputError as e:
            fail(str(e))
    if not flags.FLAGS.is_parsed():  # a tool that parses its own FlagValues: absl logging
        flags.FLAGS.mark_as_parsed()  # (orbax logs through it) then logs without a warning
    logging.set_verbosity(logging.WARNING)
    # orbax logs the traceback of a failed asynchronous save from its threads, then raises
    # the error again where the run waits for the save (which reports it in one line)
    logging.get_absl_logger().addFilter(_drop_orbax_thread_errors)
    # ... and, after a failed save, tensorstore's asyncio tasks and callbacks fail again (a
    # closed event loop, errors no one retrieves): the same failure, already reported
    std_logging.getLogger("asyncio").addFilter(_drop_unretrieved_task_errors)
    if not getattr(sys.excepthook, "drops_closed_loop_errors", False):
        sys.excepthook = _excepthook_without_closed_loop_errors(sys.excepthook)
    if not getattr(threading.excepthook, "drops_closed_loop_errors", False):
        threading.excepthook = _thread_excepthook_without_closed_loop_errors(threading.excepthook)
    # JAX's persistent compilation cache is an optimisation: an entry that cannot be written
    # (a full disk) or read (a cut file) costs compiling again; the run's own writes report
    # a full disk
    warnings.filterwarnings("ignore", message="Error (writing|reading) persistent compilation cache entry")


def _drop_orbax_thread_errors(record) -> bool:
    return not (record.levelno >= std_logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname
                and "thread" in record.getMessage())


def _drop_unretrieved_task_errors(record) -> bool:
    return "exception was never retrieved" not in record.getMessage()


def _thread_excepthook_without_closed_loop_errors(hook):
    def excepthook(args):
        if args.exc_type is RuntimeError and str(args.exc_value) == "Event loop is closed":
            return
        hook(args)

    excepthook.drops_closed_loop_errors = True
    return excepthook


def _excepthook_without_closed_loop_errors(hook):
    def excepthook(kind, value, tb):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        hook(kind, value, tb)

    excepthook.drops_closed_loop_errors = True
    return excepthook
