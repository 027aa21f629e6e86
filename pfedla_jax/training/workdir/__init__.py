"""What a run keeps in its --workdir, and the rules that make the files describe one run.

Layout (names in files.py; the module that writes each):
  config.json          the ExperimentConfig that created the workdir (a re-run must match):
                       prepare_workdir, write_config (this module)
  partition.json       the clients' train/test examples (data/partition_file.py; training.loop
                       writes it and refuses to resume on another partition)
  checkpoints/<round>/ orbax checkpoints: the algorithm state plus the loop's own state
                       (checkpoints.py)
  metrics.jsonl        one JSON object per evaluated round (the contract tests read)
  metrics.csv          the same rows, scalar columns only (metrics.py)
  tb/                  TensorBoard event files (per-round and per-evaluation scalars;
                       tensorboard.py, framing in tfrecord.py). Without tensorboardX installed
                       a run warns once on stderr and writes no events, everything else unchanged
  <export>.npz         arrays the algorithm exports at evaluations (exports.py; pFedLA:
                       alpha.npz, alpha of every client and layer at every evaluated round)
  summary.json         written when the run ends (write_summary, this module)
  run.lock             held (fcntl.flock) by the one command that runs in the workdir
                       (lock.py); a second command is refused with the holder's pid and host
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

Files written whole (config.json, summary.json, metrics.jsonl/csv on resume, <export>.npz,
rewritten event files) go through a temporary file and os.replace.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from pfedla_jax.errors import UserInputError
from pfedla_jax.training.workdir.checkpoints import Checkpoints
from pfedla_jax.training.workdir.exports import ExportLog
from pfedla_jax.training.workdir.files import (CHECKPOINT_DIR, CONFIG_FILE, METRICS_CSV,
                                                   METRICS_JSONL, OUTPUT_DIRS, OUTPUT_FILES,
                                                   PARTITION_FILE, PLOTS_DIR, SUMMARY_FILE, TB_DIR,
                                                   export_file_names, remove_if_present,
                                                   replace_file, temporary_name)
from pfedla_jax.training.workdir.lock import (LOCK_FILE, WorkdirBusy, WorkdirLock, check_shared,
                                                  describe_holder, lock_holder)
from pfedla_jax.training.workdir.metrics import MetricsWriter
from pfedla_jax.training.workdir.tensorboard import (TENSORBOARDX_MISSING, EventFile,
                                                         event_files, read_scalar_events,
                                                         tensorboardx_available)

__all__ = [
    "CHECKPOINT_DIR", "CONFIG_FILE", "LOCK_FILE", "METRICS_CSV", "METRICS_JSONL", "PARTITION_FILE",
    "PLOTS_DIR", "RESUMABLE_CHANGES", "SUMMARY_FILE", "TB_DIR", "TENSORBOARDX_MISSING",
    "Checkpoints", "EventFile", "ExportLog", "MetricsWriter", "WorkdirBusy", "WorkdirLock",
    "check_shared", "config_differences", "describe_holder", "event_files", "kept_round",
    "lock_holder", "prepare_workdir", "read_scalar_events",
    "read_summary", "remove_finished_outputs", "tensorboardx_available", "write_config",
    "write_summary",
]

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


def config_differences(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """'field: old -> new' for every differing (flattened, dotted) config field, sorted.

    A field `old` lacks (a config.json written before the field existed) counts as its
    value in `defaults` (a config dict), when given."""
    a, b = _flatten(old), _flatten(new)
    if defaults is not None:
        a = {**{k: v for k, v in _flatten(defaults).items() if k in b}, **a}
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _defaults_of(config: Any) -> dict | None:
    """`config.default_dict()` (every field at its default) when the config has one."""
    defaults = getattr(config, "default_dict", None)
    return json.loads(json.dumps(defaults())) if defaults is not None else None


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
            for name in OUTPUT_FILES + tuple(export_file_names()):
                # with the temporary file an interrupted atomic write may have left
                for n in (name, temporary_name(name)):
                    remove_if_present(os.path.join(workdir, n))
            for name in OUTPUT_DIRS:
                shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
        if os.path.exists(path):
            with open(path) as f:
                try:
                    old = json.load(f)
                except json.JSONDecodeError:
                    raise UserInputError(f"--workdir {workdir!r} holds an unreadable {CONFIG_FILE}; "
                                         "use another --workdir or --overwrite") from None
            diffs = [d for d in config_differences(old, new, _defaults_of(config))
                     if d.split(":")[0] not in RESUMABLE_CHANGES]
            if diffs:
                shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
                raise UserInputError(
                    f"--workdir {workdir!r} holds a run with a different configuration ({shown}); "
                    "use another --workdir or --overwrite")
            resumable = True
        elif any(os.path.exists(os.path.join(workdir, n)) for n in (METRICS_JSONL, CHECKPOINT_DIR)):
            raise UserInputError(
                f"--workdir {workdir!r} holds results without a {CONFIG_FILE} (an older run?); "
                "use another --workdir or --overwrite")
        else:
            resumable = False
    except OSError as e:
        raise UserInputError(f"cannot write to --workdir {workdir!r}: {e.strerror or e}") from None
    return resumable


def write_config(workdir: str, config: Any) -> None:
    """WORKDIR/config.json: `config.to_dict()` as indented JSON (atomically).

    Raises:
      UserInputError: the file cannot be written.
    """
    try:
        replace_file(os.path.join(workdir, CONFIG_FILE),
                     lambda f: json.dump(config.to_dict(), f, indent=2))
    except OSError as e:
        raise UserInputError(f"cannot write to --workdir {workdir!r}: {e.strerror or e}") from None


def kept_round(round_done: int, resume_round: int, eval_every: int, rounds: int) -> bool:
    """Whether an evaluation row of `round_done` survives resuming from `resume_round`.

    Rows after the checkpoint are recomputed. A row that exists only because it was the
    last round of a shorter run (evaluated although not an `eval_every` round) is dropped
    when the run is extended, so the files equal those of one uninterrupted run.
    """
    return round_done <= resume_round and (round_done % eval_every == 0 or round_done == rounds)


def write_summary(workdir: str, summary: dict) -> None:
    """WORKDIR/summary.json: `summary` as indented JSON (atomically).

    Raises:
      OSError: the file cannot be written.
    """
    replace_file(os.path.join(workdir, SUMMARY_FILE), lambda f: json.dump(summary, f, indent=2))


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
    remove_if_present(os.path.join(workdir, SUMMARY_FILE))
    shutil.rmtree(os.path.join(workdir, PLOTS_DIR), ignore_errors=True)
