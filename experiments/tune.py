r"""Every method at its best, chosen on validation data: one Optuna study per method.

Example (both methods' hyperparameters on the small FMNIST preset at the CPU budget, 12
trials each, two trials at a time):

  python -m experiments.tune --preset=table1_fmnist_n10_small --budget=cpu \
      --methods=pfedla,fedavg --trials=12 --jobs=2 --tune_dir=runs/tune_t1s_cpu \
      --run_flags='--host_devices=1 --client_parallelism=loop'

Then `experiments.table --params=runs/tune_t1s_cpu/best.json` runs the final seeds with the
chosen values on the full training split and evaluates them on the test split.

What is tuned: the search space each algorithm declares (`Algorithm.search_space`,
pfedla_jax/algorithms/search_space.py: the client lr for every method, the method's own
hyperparameters with the source of each range); a table row's fixed options (HeurpFedLA's
heur_k = 1) stay fixed, the rest of its algorithm's space is tuned. A module given with
`--import` takes part the same way (its rows, its algorithm's space).

A trial is one `python -m experiments.run` process (the command of `experiments.table`:
the preset's flags, the budget's, the imports, the row's flags) with the trial's values
(`override_flags`), then --run_flags, `--validation_fraction=F --evaluate_test=false
--seed=S` and its own workdir TUNE_DIR/trials/<method>/trial_<n>: a per-client validation
split is carved out of each client's training split (the same split, from the same seed, in
every trial) and the test split is never evaluated. Every trial uses the one seed --seed.
The objective is the mean validation accuracy (`val_acc`, the personalised models) over the
last 10% of the evaluated rounds (at least one: `experiments.table.last_fraction`); every
evaluated round's `val_acc` is reported to Optuna as it appears in WORKDIR/metrics.jsonl
(step = the round) and a successive-halving pruner (`SuccessiveHalvingPruner`; its first
rung at --pruner_min_resource rounds, default a tenth of the run's rounds, the next ones
--pruner_reduction_factor times further) stops the trials that fall behind: the run gets
SIGTERM (it finishes its round, checkpoints and exits) and the trial is PRUNED. Sampler:
TPE (multivariate, seeded with --seed; its random start-up trials: a third of --trials, at
most 10). A value the run refuses (a combination the config's validate() does not accept,
checked before any process starts, or a run that exits with an error) makes the trial
FAILED with its one error line; the study goes on (a method stops after max(10, --trials)
failures in one command). A study stops when its COMPLETE + PRUNED trials reach --trials (a study
that already has more from an earlier command runs none).

Parallel trials (--jobs=N): N threads of this process each drive one child process at a
time, sharing the study through one storage object (the children are the processes that
compute; a thread only waits for its child and reads its metrics, so Python's GIL costs
nothing, and one process owns the tune dir's lock and its children). A trial is asked for
only while COMPLETE + PRUNED + RUNNING trials are fewer than --trials, so a study ends with
exactly --trials (none started in excess, a failed one replaced). Each child dies with its
thread's process (Linux PR_SET_PDEATHSIG: SIGKILL), so a killed tune leaves no run behind.
Give each run one device and the loop strategy when trials run side by side on a small CPU
(--run_flags='--host_devices=1 --client_parallelism=loop').

Storage and resume: TUNE_DIR/studies.log, Optuna's journal file storage
(`JournalStorage(JournalFileBackend(...))`, safe for several processes on one host; no
SQLite), one study per method named by its row key. The tune holds an exclusive lock on
TUNE_DIR (TUNE_DIR/run.lock, `pfedla_jax.training.workdir.lock`: a second tune on the same
dir is one error line). A tune that was killed leaves RUNNING trials in the journal; the
same command again marks them FAIL (user attribute 'interrupted') and enqueues their values
as new trials (`study.enqueue_trial`) that resume the killed trial's run from its last
checkpoint (the same workdir, experiments.run's own resume), then goes on sampling: it ends
with the same number of COMPLETE + PRUNED trials as an uninterrupted command. The values
of the later trials may differ from an uninterrupted command's (the TPE sampler restarts
from its seed on the trials stored so far, and the interrupted trials are re-run in a new
order), so only the count is the same. TUNE_DIR/tune.json records the command; a command
with another preset, budget, validation fraction, seed or --run_flags on the same dir is
refused (one error line): its trials would not be comparable.

Writes into TUNE_DIR:
  best.json          the tune's preset, budget, validation fraction, seed and --run_flags
      (experiments.table --params refuses a table whose runs would compute on another setting);
      per method (every study in the dir): the chosen values (apply_overrides
      keys, exact values), their validation accuracy, the trial counts (complete, pruned,
      failed; interrupted trials are not counted), the best trial's number and the search
      space; rewritten atomically after every finished trial.
  plots/<method>.png validation accuracy of each trial against each tuned value (one panel
      per hyperparameter; a log axis for log ranges; pruned trials hollow, at their last
      reported val_acc; the chosen trial a star).
  trials/<method>/trial_<n>/   each trial's run (experiments.run's workdir).
  logs/<method>/trial_<n>.log  each trial's output.
  studies.log, tune.json, run.lock.

Progress: one line per finished trial (`tune pfedla trial 3/12 (#2): val_acc 0.8712
(train.lr=0.0412, pfedla.hn_lr=0.153) complete in 61 s`, `... pruned at round 40 in 20 s`,
`... failed: <error line>`), a summary line per method at the end. Bad input (unknown
method or preset, --trials < 1, a budget the preset lacks, a search space that does not fit
the config's validate(), a validation fraction outside (0, 1), --run_flags that set what
the tool sets) prints one line `error: ...` and exits with status 2; exit status 1 when a
method ends without a complete trial or short of --trials.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from absl import app, flags
from optuna.trial import TrialState

from experiments import table
from experiments.cli import fail, parse_flags
from experiments.plots import pyplot, save_figure
from pfedla_jax.algorithms import algorithm_class, config_fields
from pfedla_jax.algorithms.search_space import (Hyperparameter, check_search_space, override_flags,
                                                override_key, resolve_space, suggest)
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.command_line import config_from_argv
from pfedla_jax.training.workdir.files import replace_file
from pfedla_jax.training.workdir.lock import WorkdirBusy, WorkdirLock, describe_holder, lock_holder

BEST_FORMAT = 1
OBJECTIVE = "val_acc, mean over the last 10% of evaluated rounds"
STORAGE_FILE = "studies.log"
RECORD_FILE = "tune.json"
BEST_FILE = "best.json"
# Flags the tool sets for every trial: --run_flags may not give them.
OWN_FLAGS = (*table.OWN_FLAGS, "validation_fraction", "evaluate_test")
POLL_S = 0.5          # how often a running trial's metrics.jsonl is read
STOP_GRACE_S = 60.0   # a pruned run's time to finish its round and checkpoint, then SIGKILL
LOCK_WAIT_S = 120.0   # a resumed trial waits this long for its killed run's lock to go

# `python -c` launcher of every trial: the run gets SIGKILL when the thread that started it
# (and so this tool) dies (Linux prctl PR_SET_PDEATHSIG = 1), then becomes experiments.run
_LAUNCHER = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The tool's flags, defined when it runs as a program (importing the module defines none)."""
    flags.DEFINE_string("preset", None, "A preset name (experiments/presets/NAME.flags) or a .flags "
                        "path.", flag_values=flag_values)
    flags.DEFINE_string("methods", "all", "all | comma-separated rows of the table (" +
                        ",".join(table.methods()) + " and those of --import modules).",
                        flag_values=flag_values)
    flags.DEFINE_integer("trials", 12, "COMPLETE + PRUNED trials per method.", flag_values=flag_values)
    flags.DEFINE_string("budget", "paper", "paper (the preset's rounds and epochs) | cpu (the "
                        "preset's CPU budget line).", flag_values=flag_values)
    flags.DEFINE_string("tune_dir", None, "Output folder (default runs/tune/<preset>_<budget>).",
                        flag_values=flag_values)
    flags.DEFINE_integer("jobs", 1, "Trials at a time (each its own experiments.run process).",
                         flag_values=flag_values)
    flags.DEFINE_multi_string("import", [], "A module (my_package.my_algorithm, or path/to/file.py) "
                              "that registers algorithms: their rows can be tuned, and every trial "
                              "imports it too. Repeatable.", flag_values=flag_values)
    flags.DEFINE_float("validation_fraction", 0.15, "Share of each client's training split held "
                       "out for validation, in (0, 1).", flag_values=flag_values)
    flags.DEFINE_string("run_flags", "", "Extra experiments.run flags for every trial, e.g. "
                        "'--host_devices=1 --client_parallelism=loop' or '--data_dir=...'.",
                        flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "The runs' seed (partition, validation split, init) and the "
                         "sampler's.", flag_values=flag_values)
    flags.DEFINE_integer("pruner_min_resource", 0, "Rounds before the first pruning decision; 0 = "
                         "a tenth of the run's rounds.", flag_values=flag_values)
    flags.DEFINE_integer("pruner_reduction_factor", 3, "Successive halving: each rung keeps the "
                         "best 1/this of the trials that reach it.", flag_values=flag_values)


class TuneError(Exception):
    """Bad input to the tuning tool (printed as one `error: ...` line, exit 2)."""


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class MethodPlan:
    """One method's study: what every trial runs.

    Attributes:
      key: the row key (the study's name).
      algorithm: the registered algorithm.
      space: the tuned hyperparameters (bounds resolved on `config`; the row's fixed
        options left out).
      head: experiments.run argv up to the trial's values (preset, budget, imports, row).
      tail: argv after them (--run_flags, validation, seed).
      config: the ExperimentConfig of head + tail (the defaults of the tuned values).
    """

    key: str
    algorithm: str
    space: tuple[Hyperparameter, ...]
    head: tuple[str, ...]
    tail: tuple[str, ...]
    config: Any

    def argv(self, params: dict[str, Any], workdir: str) -> list[str]:
        """The trial's experiments.run arguments (after the interpreter)."""
        return ["-m", "experiments.run", *self.head, *override_flags(params), *self.tail,
                f"--workdir={workdir}", "--quiet"]

    def check(self, params: dict[str, Any]) -> None:
        """Builds the trial's config as experiments.run will (UserInputError if refused)."""
        config_from_argv(["experiments.run", *self.head, *override_flags(params), *self.tail])


def tuned_flag_names(plans: Sequence[MethodPlan]) -> set[str]:
    """The experiments.run flags (and their other names) of every tuned hyperparameter."""
    names = set()
    for plan in plans:
        fields = {f.path: f for f in config_fields(plan.algorithm)}
        for h in plan.space:
            flag = override_flags({override_key(plan.algorithm, h.path): 0})[0]
            names.add(flag[2:].split("=", 1)[0])
            if h.path in fields and fields[h.path].alias:
                names.add(fields[h.path].alias)
    return names


def parse_run_flags(text: str) -> list[str]:
    """--run_flags as a list of --name=value flags (none of the tool's own or a row's).

    Raises:
      TuneError: it does not parse, or sets a flag the tool sets.
    """
    try:
        items = shlex.split(text)
    except ValueError as e:
        raise TuneError(f"--run_flags does not parse: {e}") from None
    own = set(OWN_FLAGS) | table.method_flag_names()
    for item in items:
        if not item.startswith("--"):
            raise TuneError(f"--run_flags takes --name=value flags, got {item!r}")
        name = item[2:].split("=", 1)[0]
        if name in own or name.removeprefix("no") in own:
            raise TuneError(f"--run_flags may not set --{name}: the tuning tool sets it for each trial"
                            + (" (use the tool's --import)" if name == "import" else ""))
    return items


def budget_flags(preset: table.Preset, budget: str) -> tuple[str, ...]:
    """The budget's flags (table.plan_runs's checks: an unknown budget, a preset without it).

    Raises:
      TableError: as `experiments.table.plan_runs`.
    """
    table.plan_runs(preset, [], [], budget, [], ".")
    return tuple(preset.cpu_budget or ()) if budget == "cpu" else ()


def plan_methods(preset: table.Preset, keys: Sequence[str], budget: str, run_flags: Sequence[str],
                 imports: Sequence[str], validation_fraction: float, seed: int) -> list[MethodPlan]:
    """Each method's plan, its config built and its search space checked against it.

    Raises:
      TuneError: a config experiments.run refuses, or a search space that does not fit it.
    """
    rows = table.methods()
    plans = []
    for key in keys:
        method = rows[key]
        cls = algorithm_class(method.algorithm)
        fixed = {path for row in cls.rows() if row.key == key for path, _ in row.options}
        head = (f"--flagfile={preset.path}", *budget_flags(preset, budget),
                *(f"--import={p}" for p in imports), *method.flags)
        tail = (*run_flags, f"--validation_fraction={validation_fraction!r}", "--evaluate_test=false",
                f"--seed={seed}")
        try:
            config = config_from_argv(["experiments.run", *head, *tail]).config
            space = tuple(h for h in resolve_space(config, cls.search_space) if h.path not in fixed)
            check_search_space(config, space)
        except UserInputError as e:
            raise TuneError(f"{key}: {e}") from None
        plans.append(MethodPlan(key, method.algorithm, space, head, tail, config))
    return plans


# ----------------------------------------------------------------------------- storage


def storage_at(tune_dir: str) -> optuna.storages.JournalStorage:
    """The journal file storage of TUNE_DIR/studies.log (shared safely by processes on one host)."""
    return optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(os.path.join(tune_dir, STORAGE_FILE)))


def make_study(storage, plan: MethodPlan, trials: int, jobs: int, seed: int, min_resource: int,
               reduction_factor: int) -> optuna.Study:
    """The method's study (created or loaded), with its sampler and pruner, its search space
    recorded as user attributes.

    The sampler's seed is --seed plus the trials the study already holds: a resumed command
    does not draw the killed command's first values again (TPE's random start-up trials would
    restart from the same seed)."""
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource,
                                                    reduction_factor=reduction_factor)
    study = optuna.create_study(study_name=plan.key, storage=storage, direction="maximize",
                                pruner=pruner, load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(
            seed=seed + len(study.get_trials(deepcopy=False)), multivariate=True,
            constant_liar=jobs > 1, n_startup_trials=max(1, min(10, trials // 3)))
    study.set_user_attr("algorithm", plan.algorithm)
    study.set_user_attr("search_space", [h.describe() for h in plan.space])
    study.set_user_attr("log_params", [override_key(plan.algorithm, h.path) for h in plan.space
                                       if h.log])
    return study


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Marks the study's RUNNING trials (those of a killed tune: this one holds the dir's
    lock) FAIL, with user attribute 'interrupted', and enqueues their values with their
    workdir, so the next trials asked for resume them. Returns their numbers."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        optuna.trial.Trial(study, t._trial_id).set_user_attr("interrupted", True)  # pylint: disable=protected-access
        study.tell(t.number, state=TrialState.FAIL)
        attrs = {"workdir": t.user_attrs.get("workdir", trial_workdir(study.study_name, t.number)),
                 "resumes": t.number}
        study.enqueue_trial(dict(t.params), user_attrs=attrs)
    return [t.number for t in stale]


def trial_workdir(method: str, number: int) -> str:
    """A trial's workdir, relative to the tune dir."""
    return os.path.join("trials", method, f"trial_{number}")


def counts(trials: Sequence[optuna.trial.FrozenTrial]) -> dict[str, int]:
    """{'complete', 'pruned', 'failed' (FAIL less the interrupted), 'running'}."""
    states = [t.state for t in trials]
    return {"complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
            "failed": sum(1 for t in trials if t.state == TrialState.FAIL
                          and not t.user_attrs.get("interrupted")),
            "running": states.count(TrialState.RUNNING)}


def best_of(trials: Sequence[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
    """The COMPLETE trial of the highest value (the lowest number among equals), or None."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
            and not math.isnan(t.value)]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def best_record(storage, meta: dict[str, Any]) -> dict[str, Any]:
    """best.json's content: every study of the storage, in table order."""
    order = list(table.methods())
    names = sorted(optuna.study.get_all_study_names(storage),
                   key=lambda n: (order.index(n) if n in order else len(order), n))
    methods = {}
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        c = counts(trials)
        best = best_of(trials)
        methods[name] = {
            "algorithm": study.user_attrs.get("algorithm", name),
            "params": dict(best.params) if best else None,
            "val_acc": float(best.value) if best else None,
            "trials": c["complete"] + c["pruned"], "complete": c["complete"], "pruned": c["pruned"],
            "failed": c["failed"], "best_trial": best.number if best else None,
            "search_space": list(study.user_attrs.get("search_space", [])),
        }
    return {"format": BEST_FORMAT, **meta, "objective": OBJECTIVE, "methods": methods}


def write_best(tune_dir: str, storage, meta: dict[str, Any]) -> str:
    """Writes TUNE_DIR/best.json atomically; returns its path."""
    path = os.path.join(tune_dir, BEST_FILE)
    record = best_record(storage, meta)
    replace_file(path, lambda f: f.write(json.dumps(record, indent=1) + "\n"))
    return path


# ----------------------------------------------------------------------------- one trial


def read_rows(path: str) -> list[dict[str, Any]]:
    """The complete rows of a metrics.jsonl (a line being written is left for later)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return []
    rows = []
    for line in text.split("\n")[:-1]:  # the part after the last newline is not complete yet
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def error_line(log: str, start: int, code: int) -> str:
    """The last `error:` line a run printed after offset `start` of its log, else its last line."""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [f"exit status {code}, no output"])[-1]


_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()


def _stop_children(signum, frame):  # pylint: disable=unused-argument
    """SIGINT/SIGTERM/SIGHUP: stop the running trials too (each finishes its round and
    checkpoints, within STOP_GRACE_S; the same command resumes them), then exit."""
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for proc in children:
        proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in children:  # they die with this process (PR_SET_PDEATHSIG): let them save first
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"error: stopped by signal {signum}; the same command resumes", file=sys.stderr, flush=True)
    os._exit(128 + signum)


@dataclasses.dataclass
class Outcome:
    """A finished trial: state 'complete' | 'pruned' | 'failed', value, round, why, seconds."""

    state: str
    value: float | None = None
    round: int | None = None
    why: str = ""
    seconds: float = 0.0


def run_trial(trial: optuna.Trial, params: dict[str, Any], plan: MethodPlan, tune_dir: str) -> Outcome:
    """Runs one trial's experiments.run process with `params` (the trial's values),
    reporting each evaluated round's val_acc and stopping the run when the pruner says so."""
    start = time.perf_counter()
    rel = trial.user_attrs.get("workdir") or trial_workdir(plan.key, trial.number)
    trial.set_user_attr("workdir", rel)
    try:
        plan.check(params)
    except UserInputError as e:
        return Outcome("failed", why=f"error: {e}", seconds=time.perf_counter() - start)
    workdir = os.path.join(tune_dir, rel)
    log = os.path.join(tune_dir, "logs", plan.key, os.path.basename(rel) + ".log")
    deadline = time.monotonic() + LOCK_WAIT_S
    while lock_holder(workdir) is not None and time.monotonic() < deadline:
        time.sleep(POLL_S)  # a killed tune's run of this trial, finishing its round
    argv = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *plan.argv(params, workdir)]
    os.makedirs(os.path.dirname(log), exist_ok=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    reported = -1
    pruned_at = None
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{shlex.join([sys.executable, *argv[4:]])}\n")
        out.flush()
        offset = out.tell()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with _CHILDREN_LOCK:
            _CHILDREN.add(proc)
        try:
            while True:
                code = proc.poll()
                for row in read_rows(metrics):
                    rnd = int(row.get("round", -1))
                    if rnd <= reported or "val_acc" not in row:
                        continue
                    trial.report(float(row["val_acc"]), rnd)
                    reported = rnd
                    # (a run that has ended is complete: the pruner only records its rungs)
                    if trial.should_prune() and code is None:
                        pruned_at = rnd
                        proc.terminate()  # experiments.run checkpoints after the round, exits
                        break
                if code is not None or pruned_at is not None:
                    break
                time.sleep(POLL_S)
            if pruned_at is not None:
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                return Outcome("pruned", round=pruned_at, seconds=time.perf_counter() - start)
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)
    seconds = time.perf_counter() - start
    if code != 0:
        return Outcome("failed", why=error_line(log, offset, code), seconds=seconds)
    values = [float(r["val_acc"]) for r in read_rows(metrics) if "val_acc" in r]
    if not values:
        return Outcome("failed", why=f"error: no val_acc in {metrics}", seconds=seconds)
    return Outcome("complete", value=table.last_fraction(values), seconds=seconds)


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ----------------------------------------------------------------------------- one study


class StudyRunner:
    """Runs one method's study to --trials COMPLETE + PRUNED trials with `jobs` threads.

    Args:
      study, plan: the study and what its trials run.
      trials: the COMPLETE + PRUNED trials to reach.
      jobs: trials at a time.
      tune_dir: the tune dir.
      after_trial: called (under the runner's lock) after each finished trial.
      log: prints one line.
    """

    def __init__(self, study: optuna.Study, plan: MethodPlan, trials: int, jobs: int, tune_dir: str,
                 after_trial: Callable[[], None], log: Callable[[str], None]):
        self.study, self.plan, self.trials, self.jobs = study, plan, trials, jobs
        self.tune_dir, self.after_trial, self.log = tune_dir, after_trial, log
        self.lock = threading.Lock()
        self.failures = 0

    def _next(self) -> tuple[optuna.Trial, dict[str, Any]] | None:
        """A new trial and its values, or None when the study has enough (or too many
        failures). The values are drawn under the lock: one sampler call at a time, in the
        order the trials are asked for."""
        while True:
            with self.lock:
                if self.failures >= max(10, self.trials):
                    return None
                c = counts(self.study.get_trials(deepcopy=False))
                if c["complete"] + c["pruned"] >= self.trials:
                    return None
                if c["complete"] + c["pruned"] + c["running"] < self.trials:
                    trial = self.study.ask()
                    return trial, suggest(trial, self.plan.algorithm, self.plan.space)
            time.sleep(POLL_S)  # the running trials may still fail: wait for them

    def _finish(self, trial: optuna.Trial, outcome: Outcome) -> None:
        with self.lock:
            if outcome.state == "complete":
                self.study.tell(trial, outcome.value)
            elif outcome.state == "pruned":
                self.study.tell(trial, state=TrialState.PRUNED)
            else:
                trial.set_user_attr("error", outcome.why)
                self.study.tell(trial, state=TrialState.FAIL)
                self.failures += 1
            c = counts(self.study.get_trials(deepcopy=False))
            done = c["complete"] + c["pruned"]
            head = f"tune {self.plan.key} trial {done}/{self.trials} (#{trial.number})"
            params = format_params(trial.params)
            if outcome.state == "complete":
                line = f"{head}: val_acc {outcome.value:.4f} ({params}) complete in {outcome.seconds:.0f} s"
            elif outcome.state == "pruned":
                line = f"{head}: ({params}) pruned at round {outcome.round} in {outcome.seconds:.0f} s"
            else:
                line = (f"tune {self.plan.key} trial #{trial.number} (not counted): ({params}) failed: "
                        f"{outcome.why.removeprefix('error: ')}")
            self.log(line)
            self.after_trial()

    def _worker(self) -> None:
        while True:
            asked = self._next()
            if asked is None:
                return
            trial, params = asked
            try:
                outcome = run_trial(trial, params, self.plan, self.tune_dir)
            except OSError as e:  # e.g. the log or workdir cannot be written
                outcome = Outcome("failed", why=f"error: {type(e).__name__}: {e}")
            except Exception as e:  # pylint: disable=broad-except  (a thread that dies would leave
                # its trial RUNNING and the other threads waiting for it forever)
                outcome = Outcome("failed", why=f"error: {type(e).__name__}: {e}")
            self._finish(trial, outcome)

    def run(self) -> None:
        threads = [threading.Thread(target=self._worker, name=f"tune-{self.plan.key}-{i}", daemon=True)
                   for i in range(self.jobs)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)


# ----------------------------------------------------------------------------- plots


def plot_study(study: optuna.Study, space: Sequence[Hyperparameter], algorithm: str, path: str) -> str | None:
    """Validation accuracy against each tuned value, one panel per hyperparameter."""
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.value is not None]
    if not trials or not space:
        return None
    best = best_of(trials)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(space), figsize=(4.2 * len(space), 3.6), squeeze=False)
    for ax, h in zip(axes[0], space):
        key = override_key(algorithm, h.path)
        def x_of(t):
            value = t.params.get(key)
            if h.kind == "choice":
                return list(h.choices).index(value) if value in h.choices else np.nan
            return np.nan if value is None else float(value)
        for state, style in ((TrialState.COMPLETE, dict(color="C0", label="complete")),
                             (TrialState.PRUNED, dict(facecolors="none", edgecolors="C1",
                                                      label="pruned (last val_acc)"))):
            mine = [t for t in trials if t.state == state]
            if mine:
                ax.scatter([x_of(t) for t in mine], [100 * t.value for t in mine], s=30, **style)
        if best is not None:
            ax.scatter([x_of(best)], [100 * best.value], marker="*", s=160, color="C3", label="chosen")
        if h.kind == "choice":
            ax.set_xticks(range(len(h.choices)), [str(c) for c in h.choices])
            ax.set_xlim(-0.5, len(h.choices) - 0.5)
        else:  # the whole range: where the trials lie in it
            if h.log:
                ax.set_xscale("log")
                ax.set_xlim(h.low / 1.3, h.high * 1.3)
            else:
                pad = 0.5 if h.kind == "int" else 0.03 * (h.high - h.low)
                ax.set_xlim(h.low - pad, h.high + pad)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{study.study_name}: {OBJECTIVE}", fontsize=9)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- the app


def command_record(preset: table.Preset, budget: str, bflags: Sequence[str], validation_fraction: float,
                   seed: int, run_flags: Sequence[str]) -> dict[str, Any]:
    """What a tune dir's trials have in common (a later command must agree)."""
    return {"preset": preset.name, "preset_flags": list(preset.flags), "budget": budget,
            "budget_flags": list(bflags), "validation_fraction": validation_fraction, "seed": seed,
            "run_flags": list(run_flags)}


def check_record(path: str, record: dict[str, Any]) -> None:
    """Refuses a tune dir made by another command (its recorded fields differ).

    Raises:
      TuneError: naming the first field that differs.
    """
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, json.JSONDecodeError) as e:
        raise TuneError(f"cannot read {path}: {e}") from None
    for key, value in record.items():
        if old.get(key) != value:
            raise TuneError(f"--tune_dir {os.path.dirname(path)!r} holds studies made with {key} "
                            f"{old.get(key)!r}, not {value!r}: use another --tune_dir")


def tune(preset_name: str | None, methods_text: str, trials: int, budget: str, tune_dir: str | None,
         jobs: int = 1, imports: Sequence[str] = (), validation_fraction: float = 0.15,
         run_flags_text: str = "", seed: int = 0, pruner_min_resource: int = 0,
         pruner_reduction_factor: int = 3, log: Callable[[str], None] = print,
         enqueue: dict[str, Sequence[dict[str, Any]]] | None = None) -> int:
    """Checks the input, then runs (or resumes) one study per method; returns the exit status
    (0; 1 when a method ends without a complete trial or short of `trials`).

    `enqueue`: {method: [params, ...]} trials to run first (apply_overrides keys), e.g. known
    values; they join a new study only (a resumed one has them already).

    Raises:
      TuneError, TableError, UserInputError: bad input (nothing is run).
    """
    imports = table.import_plugins(imports)
    preset = table.read_preset(table.resolve_preset(preset_name))
    if trials < 1:
        raise TuneError(f"--trials must be >= 1, got {trials}")
    if jobs < 1:
        raise TuneError(f"--jobs must be >= 1, got {jobs}")
    if not 0 < validation_fraction < 1:
        raise TuneError(f"--validation_fraction must be in (0, 1), got {validation_fraction}")
    if pruner_min_resource < 0 or pruner_reduction_factor < 2:
        raise TuneError(f"--pruner_min_resource must be >= 0 and --pruner_reduction_factor >= 2, got "
                        f"{pruner_min_resource} and {pruner_reduction_factor}")
    bflags = budget_flags(preset, budget)
    run_flags = parse_run_flags(run_flags_text)
    keys = table.parse_methods(methods_text, table.model_has_bn([*preset.flags, *bflags, *run_flags]))
    plans = plan_methods(preset, keys, budget, run_flags, imports, validation_fraction, seed)
    clash = sorted(tuned_flag_names(plans) & {f[2:].split("=", 1)[0].removeprefix("no") for f in run_flags})
    if clash:
        raise TuneError(f"--run_flags may not set --{clash[0]}: a tuned hyperparameter")
    tune_dir = tune_dir or os.path.join("runs", "tune", f"{preset.name}_{budget}")
    if os.path.exists(tune_dir) and not os.path.isdir(tune_dir):
        raise TuneError(f"--tune_dir {tune_dir!r} is a file, not a folder")
    try:
        os.makedirs(tune_dir, exist_ok=True)
    except OSError as e:
        raise TuneError(f"cannot create --tune_dir {tune_dir!r}: {e.strerror}") from None
    tune_dir = os.path.abspath(tune_dir)
    lock = WorkdirLock(tune_dir)
    try:
        lock.acquire()
    except WorkdirBusy as e:
        raise TuneError(f"--tune_dir {tune_dir!r} is in use by another tune ({describe_holder(e.holder)}); "
                        "wait for it to end, or use another --tune_dir") from None
    try:
        return _tune_locked(preset, plans, trials, budget, bflags, tune_dir, jobs, imports,
                            validation_fraction, run_flags, run_flags_text, seed, pruner_min_resource,
                            pruner_reduction_factor, log, enqueue or {}, methods_text)
    finally:
        lock.release()


def _tune_locked(preset, plans, trials, budget, bflags, tune_dir, jobs, imports, validation_fraction,
                 run_flags, run_flags_text, seed, pruner_min_resource, pruner_reduction_factor, log,
                 enqueue, methods_text) -> int:
    record = command_record(preset, budget, bflags, validation_fraction, seed, run_flags)
    record_path = os.path.join(tune_dir, RECORD_FILE)
    check_record(record_path, record)
    command = (["python -m experiments.tune", f"--preset={preset.name}", f"--methods={methods_text}",
                f"--trials={trials}", f"--budget={budget}", f"--tune_dir={tune_dir}",
                f"--validation_fraction={validation_fraction!r}", f"--seed={seed}"]
               + ([f"--run_flags={shlex.quote(run_flags_text)}"] if run_flags_text else [])
               + ([f"--jobs={jobs}"] if jobs > 1 else []) + [f"--import={p}" for p in imports])
    replace_file(record_path, lambda f: f.write(json.dumps({**record, "command": " ".join(command)},
                                                           indent=1) + "\n"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_at(tune_dir)
    meta = {"preset": preset.name, "budget": budget, "validation_fraction": validation_fraction, "seed": seed,
            "run_flags": list(run_flags)}
    write_lock = threading.Lock()

    def after_trial():
        with write_lock:
            write_best(tune_dir, storage, meta)

    log(f"tune {preset.name}, budget {budget}: {len(plans)} methods x {trials} trials, "
        f"{jobs} at a time -> {tune_dir}")
    status = 0
    for plan in plans:
        start = time.perf_counter()
        min_resource = pruner_min_resource or max(1, plan.config.rounds // 10)
        study = make_study(storage, plan, trials, jobs, seed, min_resource, pruner_reduction_factor)
        resumed = requeue_interrupted(study)
        if resumed:
            log(f"tune {plan.key}: trials {', '.join(f'#{n}' for n in resumed)} were interrupted: "
                "run again (resumed from their checkpoints)")
        if not study.get_trials(deepcopy=False):
            for params in enqueue.get(plan.key, ()):
                study.enqueue_trial(dict(params))
        log(f"tune {plan.key}: {len(plan.space)} hyperparameters: "
            + "; ".join(h.describe() for h in plan.space))
        runner = StudyRunner(study, plan, trials, jobs, tune_dir, after_trial, log)
        runner.run()
        after_trial()
        all_trials = study.get_trials(deepcopy=False)
        c = counts(all_trials)
        best = best_of(all_trials)
        plot_study(study, plan.space, plan.algorithm, os.path.join(tune_dir, "plots", f"{plan.key}.png"))
        minutes = (time.perf_counter() - start) / 60
        summary = (f"{c['complete'] + c['pruned']} trials: {c['complete']} complete, {c['pruned']} pruned, "
                   f"{c['failed']} failed; {minutes:.1f} min")
        if best is None:
            status = 1
            log(f"tune {plan.key}: no complete trial ({summary})")
        else:
            if c["complete"] + c["pruned"] < trials:
                status = 1
            log(f"tune {plan.key}: best val_acc {best.value:.4f} at trial #{best.number} "
                f"({format_params(best.params)}); {summary}")
    log(f"best: {os.path.join(tune_dir, BEST_FILE)}")
    return status


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_children)
    try:
        code = tune(f.preset, f.methods, f.trials, f.budget, f.tune_dir, f.jobs, f["import"].value,
                    f.validation_fraction, f.run_flags, f.seed, f.pruner_min_resource,
                    f.pruner_reduction_factor)
    except (TuneError, table.TableError, UserInputError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{type(e).__name__}: {e}")
    sys.exit(code)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
