"""WORKDIR/metrics.jsonl and WORKDIR/metrics.csv: one row per evaluated round.

metrics.jsonl holds each evaluation record as one JSON object per line (json.dumps, the
row the contract tests and experiments.plots read); metrics.csv the same rows with their
scalar columns only (int and float values, bool excluded), columns those of the first
row. MetricsWriter also sends the values to TensorBoard (tensorboard.EventLog).

On resume both files keep the rows a predicate keeps (training.workdir.kept_round) and
are rewritten atomically before any new round; a line cut by an interruption ends the
rows read back.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from typing import Any

from pfedla_jax.training.workdir import files
from pfedla_jax.training.workdir.tensorboard import EVAL_PREFIX, ROUND_PREFIX, EventLog


def scalar_items(record: dict) -> dict[str, Any]:
    """The record's int and float entries (bool excluded): its CSV columns and TensorBoard scalars."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _evaluation_scalars(record: dict) -> dict[str, Any]:
    return {k: v for k, v in scalar_items(record).items() if k != "round"}


def _append(path: str, write: Callable[[Any], Any]) -> None:
    """Appends what `write(f)` writes to the text file `path`, all or nothing: on an OSError
    (a full disk) the file is cut back to its length before the append, so no half row stays.

    Raises:
      OSError: the append failed (the file is as it was).
    """
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "a", newline="") as f:
            write(f)
    except OSError:
        try:
            os.truncate(path, size)
        except OSError:
            pass  # the read on resume stops at a cut line all the same
        raise


class MetricsWriter:
    """metrics.jsonl + metrics.csv + TensorBoard, truncated to the kept rows on resume.

    Args:
      workdir: the run directory.
      keep: None for a fresh run (existing metrics, TensorBoard events, summary.json and
        export files are discarded), else a predicate on the round of an existing row (resume).
      resume_round: the round the run resumes after (later TensorBoard events are dropped);
        required with `keep`.
      tensorboard: write event files to WORKDIR/tb (existing events are truncated on resume
        either way). Without tensorboardX installed: one warning line on stderr
        (tensorboard.TENSORBOARDX_MISSING, once per process), no events written or truncated
        (a resumed run's WORKDIR/tb is left as it was); metrics.jsonl and metrics.csv as always.

    Attributes:
      records: the rows so far (kept ones first), in order.

    Raises:
      ValueError: `keep` without `resume_round`.
      OSError: a file of the workdir cannot be read or written.
    """

    def __init__(self, workdir: str, keep: Callable[[int], bool] | None = None,
                 resume_round: int | None = None, tensorboard: bool = True):
        if keep is not None and resume_round is None:
            raise ValueError("MetricsWriter: a resume (keep) needs its resume_round")
        self.workdir = workdir
        self.jsonl = os.path.join(workdir, files.METRICS_JSONL)
        self.csv = os.path.join(workdir, files.METRICS_CSV)
        self.records: list[dict] = []
        if keep is not None and os.path.exists(self.jsonl):
            rows = []
            with open(self.jsonl) as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a line cut by an interruption: it and anything after are redone
            self.records = [r for r in rows if keep(r["round"])]
        if keep is None:  # a fresh start: what an earlier attempt wrote goes
            for name in (files.SUMMARY_FILE, *files.export_file_names()):
                files.remove_if_present(os.path.join(workdir, name))
        files.replace_file(self.jsonl, lambda f: f.writelines(json.dumps(r) + "\n" for r in self.records))
        self._csv_columns: list[str] | None = None
        self._rewrite_csv()
        self._events = EventLog(
            os.path.join(workdir, files.TB_DIR), tensorboard, resume_round if keep is not None else None,
            [(r["round"], _evaluation_scalars(r)) for r in self.records])

    def flush(self) -> None:
        """Called at checkpoints: events up to the checkpoint are on disk before it commits."""
        self._events.sync()

    def _rewrite_csv(self) -> None:
        def write(f):
            if not self.records:
                return
            self._csv_columns = list(scalar_items(self.records[0]))
            w = csv.DictWriter(f, self._csv_columns, extrasaction="ignore")
            w.writeheader()
            for r in self.records:
                w.writerow(scalar_items(r))

        files.replace_file(self.csv, write)

    def round_scalars(self, round_done: int, scalars: dict[str, float]) -> None:
        """Per-round values (train loss, seconds, bytes) for TensorBoard (tags round/<name>)."""
        self._events.add(ROUND_PREFIX, scalars, round_done)

    def evaluation(self, record: dict) -> None:
        """Appends the evaluation row `record` (with its 'round') to both files and TensorBoard
        (tags eval/<name>)."""
        _append(self.jsonl, lambda f: f.write(json.dumps(record) + "\n"))
        self.records.append(record)
        if self._csv_columns is None:
            self._rewrite_csv()
        else:
            _append(self.csv, lambda f: csv.DictWriter(f, self._csv_columns, extrasaction="ignore")
                    .writerow(scalar_items(record)))
        self._events.add(EVAL_PREFIX, _evaluation_scalars(record), record["round"])

    def close(self) -> None:
        self._events.close()

