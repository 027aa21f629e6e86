"""WORKDIR/tb: the run's TensorBoard scalars, written synchronously and rewritten on resume.

Tags: 'round/<name>' for the per-round values (train loss, seconds, ...) and
'eval/<name>' for the scalar columns of each evaluation row, each at step = round.
Event files are TFRecord files (tfrecord.py) of TensorBoard's Event protos, named
events.out.tfevents.<seconds>.<host>.<8 hex> (one per command that writes events).

tensorboardX is optional at run time: it provides the Event and Summary protos
(tensorboardX.proto, the messages its public FileWriter.add_event/add_summary take).
Without it, EventLog prints TENSORBOARDX_MISSING once per process on stderr and writes or
rewrites no event (metrics.jsonl and metrics.csv are written as always).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Mapping

from pfedla_jax.training.workdir import tfrecord

ROUND_PREFIX = "round/"
EVAL_PREFIX = "eval/"
TENSORBOARDX_MISSING = ("warning: tensorboardX is not installed: no TensorBoard events are "
                        "written (pip install tensorboardX)")
# TensorBoard's rule for summary names (tf.summary and tensorboardX's scalar apply it):
# a character outside [-/\w.] becomes '_' and leading slashes go.
_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w.]")


@functools.lru_cache(maxsize=None)
def tensorboardx_available() -> bool:
    """Whether tensorboardX's protos import (checked once per process).

    A bare machine (jax, flax, optax, numpy, absl, orbax) runs experiments without
    tensorboardX and writes no events (EventLog warns once)."""
    try:
        _protos()
    except ImportError:
        return False
    return True


def _protos():
    """(Event, Summary): TensorBoard's event.proto and summary.proto messages.

    Raises:
      ImportError: tensorboardX is not installed.
    """
    # function-level: tensorboardX is an optional dependency (see the module docstring)
    from tensorboardX.proto.event_pb2 import Event  # pylint: disable=import-outside-toplevel
    from tensorboardX.proto.summary_pb2 import Summary  # pylint: disable=import-outside-toplevel

    return Event, Summary


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """`message` as one line on stderr, the first time per process that `key` warns."""
    if key not in _warned:
        _warned.add(key)
        print(message, file=sys.stderr, flush=True)


def stored_tag(name: str) -> str:
    """The tag TensorBoard stores for the summary name `name` (as tensorboardX's
    SummaryWriter.add_scalar stores it)."""
    return _INVALID_TAG_CHARACTERS.sub("_", name).lstrip("/")


def event_files(tb_dir: str) -> list[str]:
    """The TensorBoard event files in `tb_dir` (names, sorted: TensorBoard's reading order)."""
    if not os.path.isdir(tb_dir):
        return []
    return sorted(n for n in os.listdir(tb_dir)
                  if "tfevents" in n and os.path.isfile(os.path.join(tb_dir, n)))


def new_event_file_name() -> str:
    """A name no other command's event file has: tensorboardX names files by the second, and
    a second file of the same name would replace the first."""
    return f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{uuid.uuid4().hex[:8]}"


def read_scalar_events(tb_dir: str) -> list[tuple[str, int, float, float]]:
    """(tag, step, value, wall_time) of every scalar event in `tb_dir`, file by file.

    A record cut short or damaged (an interrupted write) ends its file.

    Raises:
      ImportError: tensorboardX is not installed.
    """
    event_cls, _ = _protos()
    out = []
    for name in event_files(tb_dir):
        with open(os.path.join(tb_dir, name), "rb") as f:
            data = f.read()
        for record in tfrecord.decode(data):
            event = event_cls.FromString(record)
            out += [(v.tag, event.step, v.simple_value, event.wall_time)
                    for v in event.summary.value if v.WhichOneof("value") == "simple_value"]
    return out


class EventFile:
    """A TensorBoard event file written synchronously: once flush(sync=True) returns, every
    event added so far is on disk (tensorboardX's SummaryWriter queues events for a thread,
    and its flush does not wait for the queue). The bytes are those SummaryWriter writes
    for the same scalars.

    Raises:
      ImportError: tensorboardX is not installed.
      OSError: the file cannot be created or written.
    """

    def __init__(self, path: str):
        self.path = path
        self._event, self._summary = _protos()
        self._f = open(path, "wb")  # pylint: disable=consider-using-with  (closed by close())
        self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        with self._named_errors():
            self._f.write(tfrecord.encode(event.SerializeToString()))

    @contextlib.contextmanager
    def _named_errors(self):
        """An OSError of the buffered file (raised by a flush, without a file name) names it."""
        try:
            yield
        except OSError as e:
            if e.filename is None:
                raise OSError(e.errno, e.strerror, self.path) from e
            raise

    def scalar(self, name: str, value: float, step: int, wall_time: float | None = None) -> None:
        """Adds `value` under stored_tag(name) at `step` (wall time: now unless given)."""
        summary = self._summary(value=[self._summary.Value(tag=stored_tag(name), simple_value=float(value))])
        self._write(self._event(wall_time=time.time() if wall_time is None else wall_time,
                                step=step, summary=summary))

    def flush(self, sync: bool = False) -> None:
        """Hands the events to the OS (a running TensorBoard sees them); `sync`: and to disk."""
        with self._named_errors():
            self._f.flush()
            if sync:
                os.fsync(self._f.fileno())

    def close(self) -> None:
        try:
            self.flush(sync=True)
        finally:
            try:
                self._f.close()
            except OSError:
                pass  # (the flush above raised the same error, with the path)


def truncate_tensorboard(tb_dir: str, resume_round: int,
                         evaluations: Iterable[tuple[int, Mapping[str, float]]]) -> None:
    """Rewrites `tb_dir`'s events as those of the run resumed after `resume_round`.

    Keeps the per-round events of rounds <= resume_round (their values exist only here) and
    writes the evaluation events from `evaluations`, (round, {name: value}) of the kept
    metrics rows, so events of rounds past the checkpoint (an interrupted attempt) and of a
    final round that an extended run no longer ends at are gone. An evaluation event keeps
    the wall time it had (else its round's, else now). The result goes through a temporary
    file and replaces the first event file; the others are then removed (an interruption in
    between leaves copies of the same events, merged by the next resume).

    Raises:
      ImportError: tensorboardX is not installed.
    """
    names = event_files(tb_dir)
    if not names:
        return
    latest: dict[tuple[str, int], tuple[float, float]] = {}
    for tag_, step, value, wall in read_scalar_events(tb_dir):
        latest[(tag_, step)] = (value, wall)
    wall_of_step = {step: wall for (_, step), (_, wall) in latest.items()}
    events = [(step, wall, tag_, value) for (tag_, step), (value, wall) in latest.items()
              if step <= resume_round and not tag_.startswith(EVAL_PREFIX)]
    for step, scalars in evaluations:
        for key, value in scalars.items():
            stored = stored_tag(EVAL_PREFIX + key)
            wall = latest.get((stored, step), (None, wall_of_step.get(step, time.time())))[1]
            events.append((step, wall, stored, value))
    tmp = os.path.join(tb_dir, ".rewrite.tmp")  # no "tfevents" in the name: TensorBoard skips it
    out = EventFile(tmp)
    for step, wall, tag_, value in sorted(events):
        out.scalar(tag_, value, step, wall)
    out.close()
    os.replace(tmp, os.path.join(tb_dir, names[0]))
    for name in names[1:]:
        os.remove(os.path.join(tb_dir, name))


class EventLog:
    """The events one command adds to WORKDIR/tb, after making the directory match the run.

    Args:
      tb_dir: WORKDIR/tb.
      write: add this command's events (--tensorboard).
      resume_round: None for a fresh run (an earlier attempt's events are removed: they would
        show as duplicate curves), else the round the run resumes after: the existing events
        are rewritten by truncate_tensorboard(tb_dir, resume_round, evaluations), whether or
        not this command writes events.
      evaluations: on resume, (round, {name: value}) of the kept evaluation rows.

    Without tensorboardX: one TENSORBOARDX_MISSING line on stderr (once per process, saying
    that the existing events are left as they were when there are some) and no event written
    or rewritten; a fresh run still removes an earlier attempt's events. The event file is created at the first event (a finished run found
    again adds no file).
    """

    def __init__(self, tb_dir: str, write: bool, resume_round: int | None = None,
                 evaluations: Iterable[tuple[int, Mapping[str, float]]] = ()):
        if resume_round is None:
            shutil.rmtree(tb_dir, ignore_errors=True)
        old_events = resume_round is not None and bool(event_files(tb_dir))
        if (write or old_events) and not tensorboardx_available():
            _warn_once("tensorboardX", TENSORBOARDX_MISSING + (
                f"; the events already in {tb_dir} are left as they were" if old_events else ""))
            write = old_events = False
        if old_events:
            truncate_tensorboard(tb_dir, resume_round, evaluations)
        self._path = os.path.join(tb_dir, new_event_file_name()) if write else None
        self._file: EventFile | None = None

    def add(self, prefix: str, scalars: Mapping[str, float], step: int) -> None:
        """Events prefix + name for `scalars` at `step`, handed to the OS (a running TensorBoard
        sees them; not synced to disk)."""
        if self._path is None:
            return
        if self._file is None:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            self._file = EventFile(self._path)
        for name, value in scalars.items():
            self._file.scalar(prefix + name, value, step)
        self._file.flush()

    def sync(self) -> None:
        """Every event added so far is on disk when this returns (called at checkpoints)."""
        if self._file is not None:
            self._file.flush(sync=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._path = None
