"""What a run keeps in its --workdir: config, checkpoints, metrics (JSONL, CSV, TensorBoard).

Layout:
  config.json          the ExperimentConfig that created the workdir (a re-run must match)
  checkpoints/<round>/ orbax checkpoints: the algorithm state plus the loop's own state
  metrics.jsonl        one JSON object per evaluated round (the contract tests read)
  metrics.csv          the same rows, scalar columns only
  tb/                  TensorBoard event files (per-round and per-evaluation scalars)
  <export>.npz         arrays the algorithm exports at evaluations (pFedLA: alpha.npz,
                       alpha of every client and layer at every evaluated round)
  summary.json         written when the run ends

Resuming: the latest committed checkpoint gives the round r to restart from; rows of
metrics.jsonl / metrics.csv / <export>.npz for rounds after r (written before an interruption)
are dropped, and TensorBoard purges its events after r, so an interrupted and resumed run
leaves the same files as an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pfedla_jax.errors import UserInputError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
OUTPUT_FILES = ("metrics.jsonl", "metrics.csv", "summary.json", CONFIG_FILE)
OUTPUT_DIRS = (CHECKPOINT_DIR, "tb")
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


def prepare_workdir(workdir: str, config: Any, overwrite: bool) -> bool:
    """Creates or checks `workdir` for `config`; True if a run there may be resumed.

    Raises:
      UserInputError: the workdir can't be written, or holds a run with another
        configuration (and `overwrite` is False).
    """
    new = json.loads(json.dumps(config.to_dict()))
    try:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, CONFIG_FILE)
        if overwrite:
            for name in OUTPUT_FILES + tuple(sorted(_export_names())):
                if os.path.exists(os.path.join(workdir, name)):
                    os.remove(os.path.join(workdir, name))
            for name in OUTPUT_DIRS:
                shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
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
        with open(path, "w") as f:
            json.dump(new, f, indent=2)
    except OSError as e:
        raise UserInputError(f"cannot write to --workdir {workdir!r}: {e.strerror or e}") from None
    return resumable


class Checkpoints:
    """Orbax checkpoints of (algorithm state, loop state) every `every` rounds and at the end.

    The loop state is JSON (round, byte totals, round times) plus the arrays that make a
    resumed run reproduce an uninterrupted one (the participation schedule, the training key).
    """

    def __init__(self, workdir: str, every: int, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.every = every
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True))

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
        """(round, state, arrays, meta) of the latest checkpoint; state shaped like `state_like`."""
        ocp = self._ocp
        step = self.manager.latest_step()
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state_like), arrays=ocp.args.StandardRestore(),
            meta=ocp.args.JsonRestore()))
        # Orbax returns arrays committed to a device; a fresh run's state is uncommitted and
        # may be placed anywhere (e.g. split over the host devices by the 'shard' strategy).
        # The host round trip copies the bits exactly.
        state = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), out["state"])
        return step, state, out["arrays"], out["meta"]

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _scalar_items(record: dict) -> dict[str, Any]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def kept_round(round_done: int, resume_round: int, eval_every: int, rounds: int) -> bool:
    """Whether an evaluation row of `round_done` survives resuming from `resume_round`.

    Rows after the checkpoint are recomputed. A row that exists only because it was the
    last round of a shorter run (evaluated although not an `eval_every` round) is dropped
    when the run is extended, so the files equal those of one uninterrupted run.
    """
    return round_done <= resume_round and (round_done % eval_every == 0 or round_done == rounds)


def _replace_file(path: str, write) -> None:
    """Writes `path` through a temporary file, so an interruption never leaves half of it."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)


class MetricsWriter:
    """metrics.jsonl + metrics.csv + TensorBoard, truncated to the kept rows on resume.

    Args:
      workdir: the run directory.
      keep: None for a fresh run (existing metrics and TensorBoard events are discarded),
        else a predicate on the round of an existing row (resume).
      resume_round: the round the run resumes after (TensorBoard purges later events).
      tensorboard: write event files to WORKDIR/tb.
    """

    def __init__(self, workdir: str, keep=None, resume_round: int | None = None,
                 tensorboard: bool = True):
        self.workdir = workdir
        self.jsonl = os.path.join(workdir, "metrics.jsonl")
        self.csv = os.path.join(workdir, "metrics.csv")
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
        if keep is None:
            # nothing to resume: events of an earlier attempt would show as duplicate curves
            shutil.rmtree(os.path.join(workdir, "tb"), ignore_errors=True)
            for name in ("summary.json", *sorted(_export_names())):
                if os.path.exists(os.path.join(workdir, name)):
                    os.remove(os.path.join(workdir, name))
        _replace_file(self.jsonl, lambda f: f.writelines(json.dumps(r) + "\n" for r in self.records))
        self._csv_columns: list[str] | None = None
        self._rewrite_csv()
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: events of rounds after the checkpoint (from the interrupted
            # attempt) are discarded by TensorBoard.
            self.tb = SummaryWriter(os.path.join(workdir, "tb"),
                                    purge_step=None if resume_round is None else resume_round + 1,
                                    flush_secs=30)

    def flush(self) -> None:
        """Called at checkpoints: events up to the checkpoint are on disk before it commits."""
        if self.tb is not None:
            self.tb.flush()

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
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"round/{k}", v, round_done)

    def evaluation(self, record: dict) -> None:
        self.records.append(record)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._csv_columns is None:
            self._rewrite_csv()
        else:
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, self._csv_columns, extrasaction="ignore").writerow(_scalar_items(record))
        if self.tb is not None:
            for k, v in _scalar_items(record).items():
                if k != "round":
                    self.tb.add_scalar(f"eval/{k}", v, record["round"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _export_names() -> set[str]:
    """The export files any registered algorithm may write (removed by a fresh start)."""
    from pfedla_jax.algorithms import algorithm_class, algorithm_names

    return {f"{algorithm_class(n).export_name}.npz" for n in algorithm_names()
            if algorithm_class(n).export_name}


class ExportLog:
    """WORKDIR/<name>.npz: the arrays an algorithm exports at every evaluated round.

    Keys: 'round' [E], each exported array stacked over evaluations [E, ...], plus the
    algorithm's constant metadata (e.g. pFedLA's alpha.npz: round [E], alpha [E, N, L, N],
    retained [E, N, L], layers [L]). Rewritten atomically at checkpoints and at the end.

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
        if self.path and keep is not None and os.path.exists(self.path):
            with np.load(self.path) as z:
                names = [k for k in z.files if k != "round" and k not in metadata]
                for i, r in enumerate(z["round"]):
                    if keep(int(r)):
                        self.append(int(r), {k: z[k][i] for k in names})

    def append(self, round_done: int, arrays: dict[str, np.ndarray]) -> None:
        if self.path is None or not arrays:
            return
        self.rounds.append(round_done)
        for k, v in arrays.items():
            self.arrays.setdefault(k, []).append(np.asarray(v))

    def save(self) -> None:
        if self.path is None or not self.rounds:
            return
        tmp = self.path[: -len(".npz")] + ".tmp.npz"
        np.savez(tmp, round=np.array(self.rounds), **{k: np.stack(v) for k, v in self.arrays.items()},
                 **self.metadata)
        os.replace(tmp, self.path)  # never a half-written file


def write_summary(workdir: str, summary: dict) -> None:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
