"""WORKDIR/run.lock: one command at a time writes a workdir.

A run holds an exclusive `fcntl.flock` on WORKDIR/run.lock from before it reads anything in
the workdir until it ends. The kernel releases the lock when the process exits, however it
exits (SIGKILL included), so a lock is never left behind by a dead run. The file itself stays
(an unlocked run.lock means nothing); it records who holds it, for the refusal a second
command prints: {"pid", "host", "started" (UTC, ISO 8601), "command", "token"}.

In a run over several processes the primary process takes the lock; `token` (a random
number the primary broadcasts to the others) lets every other process check that it sees the
same workdir (a filesystem the processes share), not a directory of the same name elsewhere.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys

from pfedla_jax.errors import UserInputError

LOCK_FILE = "run.lock"


class WorkdirBusy(UserInputError):
    """Another live process holds the workdir's lock (`holder`: its record, or {})."""

    def __init__(self, workdir: str, holder: dict):
        self.holder = holder
        super().__init__(f"--workdir {workdir!r} is in use by another run ({describe_holder(holder)}); "
                         "wait for it to end, or use another --workdir")


def describe_holder(holder: dict) -> str:
    """'pid 123 on host h since 2026-12-07T13:00:00Z' (parts the record lacks are left out)."""
    parts = []
    if holder.get("pid"):
        parts.append(f"pid {holder['pid']}")
    if holder.get("host"):
        parts.append(f"on host {holder['host']}")
    if holder.get("started"):
        parts.append(f"since {holder['started']}")
    return " ".join(parts) or "holder unknown"


def _read_record(path: str) -> dict:
    try:
        with open(path) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def lock_holder(workdir: str) -> dict | None:
    """The record of the live process that holds `workdir`'s lock, or None when no process
    holds it (no lock file, or an unlocked one). Takes no lock that outlives the call."""
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _read_record(path)
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class WorkdirLock:
    """The exclusive lock of one workdir, held by this process from `acquire` to `release`.

    Args:
      workdir: an existing directory.
      token: a number recorded in the lock file (see the module docstring).
    """

    def __init__(self, workdir: str, token: int = 0):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self.token = token
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock, then writes this process's record into the lock file.

        Raises:
          WorkdirBusy: another process holds it (the message names that process).
          UserInputError: the lock file cannot be created or written.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserInputError(f"cannot write to --workdir {self.workdir!r}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirBusy(self.workdir, _read_record(self.path)) from None
            raise UserInputError(f"cannot lock --workdir {self.workdir!r}: {e.strerror or e}") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "command": " ".join(sys.argv), "token": self.token}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as e:
            os.close(fd)
            raise UserInputError(f"cannot write {self.path!r}: {e.strerror or e}") from None
        self._fd = fd

    def release(self) -> None:
        """Releases the lock (the file stays); a second call does nothing."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_shared(workdir: str, token: int, process: int) -> None:
    """A non-primary process's check that it sees the primary's workdir: the lock file there
    is held and records `token`.

    Raises:
      UserInputError: it does not (the processes do not share the workdir's filesystem).
    """
    holder = lock_holder(workdir)
    if holder is None or holder.get("token") != token:
        raise UserInputError(
            f"process {process} does not see process 0's --workdir {workdir!r} (no lock of this "
            "run in it): every process of a run must see the same workdir, on a filesystem "
            "they share")
