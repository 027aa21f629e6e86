"""What a run keeps in its --workdir: config, checkpoints, metrics (JSONL, CSV, TensorBoard).

Layout:
  config.json          the ExperimentConfig that created the workdir (a re-run must match)
  partition.json       the clients' train/test examples (data/partition_file.py; training.loop
                       writes it and refuses to resume on another partition)
  checkpoints/<round>/ orbax checkpoints: the algorithm state plus the loop's own state
  metrics.jsonl        one JSON object per evaluated round (the contract tests read)
  metrics.csv          the same rows, scalar columns only
  tb/                  TensorBoard event files (per-round and per-evaluation scalars; written
                       with tensorboardX's protos: without tensorboardX installed a run warns
                       once on stderr and writes no events, everything else unchanged)
  <export>.npz         arrays the algorithm exports at evaluations (pFedLA: alpha.npz,
                       alpha of every client and layer at every evaluated round)
  summary.json         written when the run ends
  plots/               experiments.plots' default output (made from the files above)

Every file describes the one run config.json names, whatever sequence of commands made it.
Resuming: the latest committed checkpoint gives the round r to restart from; rows of
metrics.jsonl / metrics.csv / <export>.npz for rounds after r (written before an interruption)
are dropped, and so is the row of a final round that an extended run no longer ends at
(kept_round); the TensorBoard events are rewritten to match: per-round events up to r,
evaluation events of the kept rows only. So an interrupted, resumed or extended run leaves
the same files as one uninterrupted run. A command that runs rounds removes summary.json
and plots/ (they describe the run's end: finish writes the summary again, experiments.plots
remakes the plots); --overwrite removes everything the workdir's run wrote.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import socket
import struct
import sys
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pfedla_jax.errors import UserInputError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
TB_DIR = "tb"
PLOTS_DIR = "plots"  # experiments.plots writes here by default
SUMMARY_FILE = "summary.json"
OUTPUT_FILES = ("metrics.jsonl", "metrics.csv", SUMMARY_FILE, CONFIG_FILE, "partition.json")
OUTPUT_DIRS = (CHECKPOINT_DIR, TB_DIR, PLOTS_DIR)
# Fields that may change between an interrupted run and its resumption: more rounds extend
# a run; the others do not change what is computed.
RESUMABLE_CHANGES = ("rounds",)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for every differing (flattened) config field."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def prepare_workdir(workdir: str, config: Any, overwrite: bool, primary: bool = True) -> bool:
    """Creates or checks `workdir` for `config`; True if a run there may be resumed.

    config.json is not written here: write_config, once the run is known to go ahead (a
    command refused later, e.g. for fewer rounds than the checkpoint, leaves it as it was).
    In a multi-process run only the primary process (`primary`) removes files for
    `overwrite` (the others return False at once); without `overwrite` every process makes
    the same checks on what it finds, before any process writes there (the caller syncs).

    Raises:
      UserInputError: the workdir can't be written, or holds a run with another
        configuration (and `overwrite` is False).
    """
    new = json.loads(json.dumps(config.to_dict()))
    try:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, CONFIG_FILE)
        if overwrite and not primary:
            return False
        if overwrite:
            for name in OUTPUT_FILES + tuple(sorted(_export_names())):
                # with the temporary file an interrupted atomic write may have left
                for n in (name, _temporary(name)):
                    if os.path.exists(os.path.join(workdir, n)):
                        os.remove(os.path.join(workdir, n))
            for name in OUTPUT_DIRS:
                shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
        if os.path.exists(path):
            with open(path) as f:
                try:
                    old = json.load(f)
                except json.JSONDecodeError:
                    raise UserInputError(f"--workdir {workdir!r} holds an unreadable {CONFIG_FILE}; "
                                         "use another --workdir or --overwrite") from None
            diffs = [d for d in config_differences(old, new)
                     if d.split(":")[0] not in RESUMABLE_CHANGES]
            if diffs:
                shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
                raise UserInputError(
                    f"--workdir {workdir!r} holds a run with a different configuration ({shown}); "
                    "use another --workdir or --overwrite")
            resumable = True
        elif any(os.path.exists(os.path.join(workdir, n)) for n in ("metrics.jsonl", CHECKPOINT_DIR)):
            raise UserInputError(
                f"--workdir {workdir!r} holds results without a {CONFIG_FILE} (an older run?); "
                "use another --workdir or --overwrite")
        else:
            resumable = False
    except OSError as e:
        raise UserInputError(f"cannot write to --workdir {workdir!r}: {e.strerror or e}") from None
    return resumable


def write_config(workdir: str, config: Any) -> None:
    """WORKDIR/config.json: the configuration of the run the workdir holds (atomically)."""
    try:
        _replace_file(os.path.join(workdir, CONFIG_FILE),
                      lambda f: json.dump(config.to_dict(), f, indent=2))
    except OSError as e:
        raise UserInputError(f"cannot write to --workdir {workdir!r}: {e.strerror or e}") from None


class Checkpoints:
    """Orbax checkpoints of (algorithm state, loop state) every `every` rounds and at the end.

    The loop state is JSON (round, byte totals, round times) plus the arrays that make a
    resumed run reproduce an uninterrupted one (the participation schedule, the training key).
    """

    def __init__(self, workdir: str, every: int, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.every = every
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        self.manager = ocp.CheckpointManager(
            self.directory,
            # cleanup_tmp_directories: a save cut by an interruption leaves a temporary
            # directory that no later save of this run may replace
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True))

    def latest_round(self) -> int | None:
        return self.manager.latest_step()

    def due(self, round_done: int, final: bool) -> bool:
        """Whether to checkpoint after `round_done` rounds: every `every` rounds and at the end."""
        return final or (self.every > 0 and round_done % self.every == 0)

    def save(self, round_done: int, state: Any, arrays: dict, meta: dict) -> None:
        """Saves after `round_done` rounds (once per round: a re-save is skipped)."""
        if round_done in self.manager.all_steps():
            return
        ocp = self._ocp
        self.manager.save(round_done, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), arrays=ocp.args.StandardSave(arrays),
            meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        """Blocks until an asynchronous save in flight has committed."""
        self.manager.wait_until_finished()

    def restore(self, state_like: Any) -> tuple[int, Any, dict, dict]:
        """(round, state, arrays, meta) of the latest checkpoint; state shaped like `state_like`.

        Raises:
          UserInputError: the checkpoint's state does not have this algorithm's structure
            (e.g. written by an older version of the package with other state entries).
        """
        ocp = self._ocp
        step = self.manager.latest_step()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_restore_target(state_like)),
                arrays=ocp.args.StandardRestore(),
                meta=ocp.args.JsonRestore()))
        except ValueError as err:
            if "tree structures do not match" not in str(err):
                raise
            first = str(err).splitlines()[1:2]
            raise UserInputError(
                f"the checkpoint of round {step} in {self.directory} holds a state of another "
                f"structure than this run's ({first[0].strip().rstrip(':') if first else 'entries differ'}: "
                f"written by another version?); resume with that version or use a new --workdir") from None
        # Orbax returns arrays committed to a device; a fresh run's state is uncommitted and
        # may be placed anywhere (e.g. split over the host devices by the 'shard' strategy).
        # The host round trip copies the bits exactly.
        state = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), out["state"])
        return step, state, out["arrays"], out["meta"]

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _restore_target(state_like: Any) -> Any:
    """What orbax restores the state into. One process: `state_like` itself. Several: every
    array whole on every device of the run's mesh, so each process reads the checkpoint
    completely whatever number of processes wrote it (the caller pads and splits it over
    this run's mesh: a run resumes with another process count)."""
    if jax.process_count() == 1:
        return state_like
    from jax.sharding import NamedSharding, PartitionSpec

    from pfedla_jax.core.client_parallel import make_mesh

    whole = NamedSharding(make_mesh("shard"), PartitionSpec())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole), state_like)


def _scalar_items(record: dict) -> dict[str, Any]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def kept_round(round_done: int, resume_round: int, eval_every: int, rounds: int) -> bool:
    """Whether an evaluation row of `round_done` survives resuming from `resume_round`.

    Rows after the checkpoint are recomputed. A row that exists only because it was the
    last round of a shorter run (evaluated although not an `eval_every` round) is dropped
    when the run is extended, so the files equal those of one uninterrupted run.
    """
    return round_done <= resume_round and (round_done % eval_every == 0 or round_done == rounds)


def _temporary(name: str) -> str:
    """The temporary file an atomic write of `name` goes through (x.npz: x.tmp.npz, as np.savez
    appends .npz)."""
    return name[: -len(".npz")] + ".tmp.npz" if name.endswith(".npz") else name + ".tmp"


def _replace_file(path: str, write) -> None:
    """Writes `path` through a temporary file, so an interruption never leaves half of it."""
    tmp = _temporary(path)
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)


def event_files(tb_dir: str) -> list[str]:
    """The TensorBoard event files in `tb_dir` (names, sorted: TensorBoard's reading order)."""
    if not os.path.isdir(tb_dir):
        return []
    return sorted(n for n in os.listdir(tb_dir)
                  if "tfevents" in n and os.path.isfile(os.path.join(tb_dir, n)))


def read_scalar_events(tb_dir: str) -> list[tuple[str, int, float, float]]:
    """(tag, step, value, wall_time) of every scalar event in `tb_dir`, file by file.

    Reads TFRecord framing (length, masked CRC-32C of it, event proto, masked CRC-32C of it);
    a record cut short or damaged (an interrupted write) ends its file.
    """
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    out = []
    for name in event_files(tb_dir):
        with open(os.path.join(tb_dir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            header, (header_crc,) = data[pos:pos + 8], struct.unpack("<I", data[pos + 8:pos + 12])
            end = pos + 12 + struct.unpack("<Q", header)[0]
            if header_crc != masked_crc32c(header) or end + 4 > len(data):
                break
            body = data[pos + 12:end]
            if struct.unpack("<I", data[end:end + 4])[0] != masked_crc32c(body):
                break
            event = Event.FromString(body)
            out += [(v.tag, event.step, v.simple_value, event.wall_time)
                    for v in event.summary.value if v.WhichOneof("value") == "simple_value"]
            pos = end + 4
    return out


class EventFile:
    """A TensorBoard event file written synchronously: once flush(sync=True) returns, every
    event added so far is on disk (tensorboardX's SummaryWriter queues events for a thread,
    and its flush does not wait for the queue)."""

    def __init__(self, path: str):
        from tensorboardX.proto.event_pb2 import Event

        self._f = open(path, "wb")
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        from tensorboardX.record_writer import masked_crc32c

        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._f.write(header + struct.pack("<I", masked_crc32c(header)) + data
                      + struct.pack("<I", masked_crc32c(data)))

    def scalar(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        self._write(Event(wall_time=time.time() if wall_time is None else wall_time, step=step,
                          summary=scalar(tag, float(value))))

    def flush(self, sync: bool = False) -> None:
        self._f.flush()
        if sync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self.flush(sync=True)
        self._f.close()


TENSORBOARDX_MISSING = ("warning: tensorboardX is not installed: no TensorBoard events are "
                        "written (pip install tensorboardX)")


@functools.lru_cache(maxsize=None)
def tensorboardx_available() -> bool:
    """Whether the parts of tensorboardX this module uses import (checked once per process).

    tensorboardX is optional at run time: a bare machine (jax, flax, optax, numpy, absl,
    orbax) runs experiments without it and writes no events (`MetricsWriter` warns once)."""
    try:
        import tensorboardX.proto.event_pb2  # noqa: F401  pylint: disable=unused-import
        import tensorboardX.record_writer  # noqa: F401  pylint: disable=unused-import
        import tensorboardX.summary  # noqa: F401  pylint: disable=unused-import
    except ImportError:
        return False
    return True


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """One line on stderr, the first time per process that `key` warns."""
    if key not in _warned:
        _warned.add(key)
        print(message, file=sys.stderr, flush=True)


def _eval_tag(key: str) -> str:
    from tensorboardX.summary import scalar

    return scalar(f"eval/{key}", 0.0).value[0].tag  # the tag as TensorBoard stores it


def truncate_tensorboard(tb_dir: str, resume_round: int, records: list[dict]) -> None:
    """Rewrites `tb_dir`'s events as those of the run resumed after `resume_round`.

    Keeps the per-round events of rounds <= resume_round (their values exist only here) and
    writes the evaluation events from `records`, the kept metrics rows, so events of rounds
    past the checkpoint (an interrupted attempt) and of a final round that an extended run no
    longer ends at are gone. The result goes through a temporary file and replaces the first
    event file; the others are then removed (an interruption in between leaves copies of the
    same events, merged by the next resume).
    """
    names = event_files(tb_dir)
    if not names:
        return
    latest: dict[tuple[str, int], tuple[float, float]] = {}
    for tag, step, value, wall in read_scalar_events(tb_dir):
        latest[(tag, step)] = (value, wall)
    wall_of_step = {step: wall for (_, step), (_, wall) in latest.items()}
    events = [(step, wall, tag, value) for (tag, step), (value, wall) in latest.items()
              if step <= resume_round and not tag.startswith("eval/")]
    for r in records:
        for key, value in _scalar_items(r).items():
            if key != "round":
                tag, step = _eval_tag(key), r["round"]
                wall = latest.get((tag, step), (None, wall_of_step.get(step, time.time())))[1]
                events.append((step, wall, tag, value))
    tmp = os.path.join(tb_dir, ".rewrite.tmp")  # no "tfevents" in the name: TensorBoard skips it
    out = EventFile(tmp)
    for step, wall, tag, value in sorted(events):
        out.scalar(tag, value, step, wall)
    out.close()
    os.replace(tmp, os.path.join(tb_dir, names[0]))
    for name in names[1:]:
        os.remove(os.path.join(tb_dir, name))


class MetricsWriter:
    """metrics.jsonl + metrics.csv + TensorBoard, truncated to the kept rows on resume.

    Args:
      workdir: the run directory.
      keep: None for a fresh run (existing metrics and TensorBoard events are discarded),
        else a predicate on the round of an existing row (resume).
      resume_round: the round the run resumes after (later TensorBoard events are dropped).
      tensorboard: write event files to WORKDIR/tb (existing events are truncated on resume
        either way). Without tensorboardX installed: one warning line on stderr
        (TENSORBOARDX_MISSING, once per process), no events written or truncated (a resumed
        run's WORKDIR/tb is left as it was); metrics.jsonl and metrics.csv as always.
    """

    def __init__(self, workdir: str, keep=None, resume_round: int | None = None,
                 tensorboard: bool = True):
        self.workdir = workdir
        self.jsonl = os.path.join(workdir, "metrics.jsonl")
        self.csv = os.path.join(workdir, "metrics.csv")
        self.records: list[dict] = []
        tb_dir = os.path.join(workdir, TB_DIR)
        if keep is not None and os.path.exists(self.jsonl):
            rows = []
            with open(self.jsonl) as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a line cut by an interruption: it and anything after are redone
            self.records = [r for r in rows if keep(r["round"])]
        if keep is None:
            # nothing to resume: events of an earlier attempt would show as duplicate curves
            shutil.rmtree(tb_dir, ignore_errors=True)
            for name in (SUMMARY_FILE, *sorted(_export_names())):
                if os.path.exists(os.path.join(workdir, name)):
                    os.remove(os.path.join(workdir, name))
        _replace_file(self.jsonl, lambda f: f.writelines(json.dumps(r) + "\n" for r in self.records))
        self._csv_columns: list[str] | None = None
        self._rewrite_csv()
        old_events = keep is not None and bool(event_files(tb_dir))
        if (tensorboard or old_events) and not tensorboardx_available():
            _warn_once("tensorboardX", TENSORBOARDX_MISSING + (
                f"; the events already in {tb_dir} are left as they were" if old_events else ""))
            tensorboard = old_events = False
        if old_events:
            truncate_tensorboard(tb_dir, resume_round, self.records)
        # the event file is opened at the first event (a finished run found again adds none);
        # its own name: tensorboardX names files by the second, and a same name would truncate
        self._tb_path = os.path.join(tb_dir, f"events.out.tfevents.{int(time.time()):010d}."
                                             f"{socket.gethostname()}.{uuid.uuid4().hex[:8]}") \
            if tensorboard else None
        self._tb: EventFile | None = None

    def _event_file(self) -> EventFile:
        if self._tb is None:
            os.makedirs(os.path.dirname(self._tb_path), exist_ok=True)
            self._tb = EventFile(self._tb_path)
        return self._tb

    def flush(self) -> None:
        """Called at checkpoints: events up to the checkpoint are on disk before it commits."""
        if self._tb is not None:
            self._tb.flush(sync=True)

    def _rewrite_csv(self) -> None:
        def write(f):
            if not self.records:
                return
            self._csv_columns = list(_scalar_items(self.records[0]))
            w = csv.DictWriter(f, self._csv_columns, extrasaction="ignore")
            w.writeheader()
            for r in self.records:
                w.writerow(_scalar_items(r))

        _replace_file(self.csv, write)

    def round_scalars(self, round_done: int, scalars: dict[str, float]) -> None:
        """Per-round values (train loss, seconds, bytes) for TensorBoard."""
        if self._tb_path is not None:
            tb = self._event_file()
            for k, v in scalars.items():
                tb.scalar(f"round/{k}", v, round_done)
            tb.flush()  # visible to a running TensorBoard (not synced to disk)

    def evaluation(self, record: dict) -> None:
        self.records.append(record)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._csv_columns is None:
            self._rewrite_csv()
        else:
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, self._csv_columns, extrasaction="ignore").writerow(_scalar_items(record))
        if self._tb_path is not None:
            tb = self._event_file()
            for k, v in _scalar_items(record).items():
                if k != "round":
                    tb.scalar(f"eval/{k}", v, record["round"])
            tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._tb_path = None


def _export_names() -> set[str]:
    """The export files any registered algorithm may write (removed by a fresh start)."""
    from pfedla_jax.algorithms import algorithm_class, algorithm_names

    return {f"{algorithm_class(n).export_name}.npz" for n in algorithm_names()
            if algorithm_class(n).export_name}


class ExportLog:
    """WORKDIR/<name>.npz: the arrays an algorithm exports at every evaluated round.

    Keys: 'round' [E], each exported array stacked over evaluations [E, ...], plus the
    algorithm's constant metadata (e.g. pFedLA's alpha.npz: round [E], alpha [E, N, L, N],
    retained [E, N, L], layers [L]). Rewritten atomically at checkpoints and at the end (when
    rows were added), and on resume when rows were dropped.

    Args:
      workdir: the run directory.
      name: the file's name without .npz; None = the algorithm exports nothing (no-op).
      metadata: constant arrays stored beside.
      keep: on resume, a predicate on the rounds of the existing file to keep (None: fresh).
    """

    def __init__(self, workdir: str, name: str | None, metadata: dict, keep=None):
        self.path = os.path.join(workdir, f"{name}.npz") if name else None
        self.metadata = metadata
        self.rounds: list[int] = []
        self.arrays: dict[str, list[np.ndarray]] = {}
        self._saved = 0  # rows in the file (rows are only appended: same count, same file)
        if self.path and keep is not None and os.path.exists(self.path):
            with np.load(self.path) as z:
                names = [k for k in z.files if k != "round" and k not in metadata]
                self._saved = len(z["round"])
                for i, r in enumerate(z["round"]):
                    if keep(int(r)):
                        self.append(int(r), {k: z[k][i] for k in names})
            self.save()  # rows dropped by the resume leave the file now, not at a checkpoint

    def append(self, round_done: int, arrays: dict[str, np.ndarray]) -> None:
        if self.path is None or not arrays:
            return
        self.rounds.append(round_done)
        for k, v in arrays.items():
            self.arrays.setdefault(k, []).append(np.asarray(v))

    def save(self) -> None:
        if self.path is None or len(self.rounds) == self._saved:
            return
        if not self.rounds:  # a resume that kept no row
            os.remove(self.path)
        else:
            tmp = _temporary(self.path)
            np.savez(tmp, round=np.array(self.rounds),
                     **{k: np.stack(v) for k, v in self.arrays.items()}, **self.metadata)
            os.replace(tmp, self.path)  # never a half-written file
        self._saved = len(self.rounds)


def write_summary(workdir: str, summary: dict) -> None:
    _replace_file(os.path.join(workdir, SUMMARY_FILE), lambda f: json.dump(summary, f, indent=2))


def read_summary(workdir: str) -> dict | None:
    """summary.json of a finished run, or None when absent or unreadable."""
    try:
        with open(os.path.join(workdir, SUMMARY_FILE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def remove_finished_outputs(workdir: str) -> None:
    """Removes summary.json and plots/, which describe a run's end: called by a command that
    runs rounds (a fresh start, a resume, an extension), so neither outlives its run."""
    if os.path.exists(os.path.join(workdir, SUMMARY_FILE)):
        os.remove(os.path.join(workdir, SUMMARY_FILE))
    shutil.rmtree(os.path.join(workdir, PLOTS_DIR), ignore_errors=True)
