"""The experiment: data -> partition -> clients -> rounds -> metrics.

`run_experiment(config, workdir, options)` is the library entry point the CLI wraps. It is
split the way the flax examples split `train_and_evaluate`, with one direction of flow:

  build_experiment   data, partition, model, trainer, algorithm, schedule, keys
  start_run          a fresh state, or the latest checkpoint of the workdir (resume)
  train_loop         the rounds: one compiled round each, then the periodic actions:
    evaluate_round     the algorithm's views on every client's test split (+ its exports)
    Progress           a progress line every --log_every rounds
    Run.checkpoint     every --checkpoint_every rounds and at the end
  finish             summary.json

Files in the workdir: see training/workdir/ (the package docstring); start_run also writes
partition.json, the clients' examples (data/partition_file.py), and refuses to resume on
another partition.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pfedla_jax.algorithms import FLContext, algorithm_class
from pfedla_jax.core import multihost
from pfedla_jax.core.evaluation import Evaluator, summarize
from pfedla_jax.core.local_training import ClientTrainer
from pfedla_jax.data import build_client_store, load_dataset, make_partition, scheme_parameters
from pfedla_jax.data import partition_file
from pfedla_jax.data.store import label_histogram
from pfedla_jax.data.validation import validation_split
from pfedla_jax.errors import RunInterrupted, UserInputError
from pfedla_jax.models import layer_names, make_cnn
from pfedla_jax.runtime import check_random_streams, enable_compilation_cache, set_host_devices
from pfedla_jax.training.config import ExperimentConfig, RunOptions, apply_overrides
from pfedla_jax.training.workdir import (Checkpoints, ExportLog, MetricsWriter, WorkdirLock,
                                         check_shared, kept_round, prepare_workdir, read_summary,
                                         remove_finished_outputs, write_config, write_summary)

__all__ = ["Experiment", "ExperimentConfig", "RunOptions", "apply_overrides", "build_experiment",
           "experiment_keys", "format_table", "participation_schedule", "run_experiment"]


class ExperimentKeys(NamedTuple):
    """The independent random streams of a run: fold_in(PRNGKey(seed), 0 / 1 / 2 / 3).

    Round t trains with fold_in(train, t) (client c with fold_in of that, c); the algorithm's
    evaluation after round t gets fold_in(evaluation, t).
    """

    init: jax.Array
    schedule: jax.Array
    train: jax.Array
    evaluation: jax.Array


def experiment_keys(seed: int) -> ExperimentKeys:
    root = jax.random.PRNGKey(seed)
    return ExperimentKeys(*(jax.random.fold_in(root, i) for i in range(4)))


def participation_schedule(key: jax.Array, num_clients: int, per_round: int, rounds: int) -> np.ndarray:
    """Pre-sampled participants [rounds, S] (sorted ids), from the seed only."""
    if per_round == num_clients:
        return np.tile(np.arange(num_clients, dtype=np.int32), (rounds, 1))
    draw = lambda t: jnp.sort(jax.random.choice(jax.random.fold_in(key, t), num_clients,
                                                (per_round,), replace=False))
    return np.asarray(jax.jit(jax.vmap(draw))(jnp.arange(rounds))).astype(np.int32)


@dataclasses.dataclass
class Experiment:
    """A built experiment: everything a run needs except its state."""

    config: ExperimentConfig
    algorithm: Any
    context: FLContext
    evaluator: Evaluator | None  # the test split's (None: --evaluate_test=false)
    partition: Any
    keys: ExperimentKeys
    schedule: np.ndarray  # [rounds, S]
    class_map: tuple[int, ...] | None = None  # the source's label of each class (None: identity)
    # the partition as written to WORKDIR/partition.json (data/partition_file.py)
    partition_record: dict | None = None
    validator: Evaluator | None = None  # the validation split's (None: no validation split)
    _round_keys: np.ndarray | None = None

    def round_key(self, t: int) -> np.ndarray:
        """fold_in(keys.train, t), from a table computed once (no dispatch per round)."""
        if self._round_keys is None:
            rounds = jnp.arange(self.config.rounds)
            self._round_keys = np.asarray(jax.vmap(lambda r: jax.random.fold_in(self.keys.train, r))(rounds))
        return self._round_keys[t]

    def evaluation_due(self, round_done: int) -> bool:
        return round_done % self.config.eval_every == 0 or round_done == self.config.rounds


def build_experiment(config: ExperimentConfig, options: RunOptions = RunOptions()) -> Experiment:
    """Loads data, partitions it, builds model, trainer and algorithm (configs are checked
    when they are built; here come the checks that need the data).

    The partition: `make_partition` of the config's scheme, or for ``file:PATH`` the file,
    checked against the dataset and num_clients (`partition_file.read_partition`).

    Raises:
      UserInputError: the dataset cannot be loaded, the partition is infeasible, or the
        algorithm's options do not fit the model.
    """
    dataset = load_dataset(config.dataset, options.data_dir,
                           synthetic_per_class=config.synthetic_per_class, seed=config.seed)
    path = partition_file.file_partition_path(config.partition)
    if path is not None:
        partition, stored = partition_file.load_partition(path, dataset, config.num_clients)
        # the file's description of how the split was made, and where this run read it
        params = stored.get("parameters")
        fields = dict(params if isinstance(params, dict) else {}, seed=stored.get("seed"),
                      source=path)
    else:
        # the chosen scheme's own parameters only (make_partition refuses the others)
        fields = {name: getattr(config, name) for name in scheme_parameters(config.partition)}
        fields.update(samples_per_client=config.samples_per_client or None,
                      train_fraction=_TRAIN_FRACTION, seed=config.seed)
        partition = make_partition(dataset.labels, dataset.num_classes, config.num_clients,
                                   config.partition, **fields)
    record = partition_file.partition_record(partition, dataset, fields)
    validation = None
    trained = partition
    if config.validation_fraction > 0:
        rest, validation = validation_split(partition.train_indices, dataset.labels,
                                            config.validation_fraction, config.seed)
        record = partition_file.with_validation(record, validation, config.validation_fraction)
        trained = dataclasses.replace(partition, train_indices=rest)
    if not config.evaluate_test:  # the test examples never reach the device
        trained = dataclasses.replace(
            trained, test_indices=[np.zeros(0, np.int64) for _ in partition.test_indices])
    store = build_client_store(dataset, trained, validation_indices=validation)
    # make_partition guarantees every client >= 1 train and >= 1 test example (and
    # validation_split >= 1 validation and >= 1 train example)
    assert np.all(np.asarray(store.train_count) > 0)
    assert not config.evaluate_test or np.all(np.asarray(store.test_count) > 0)
    use_bn = None if config.use_bn == "auto" else config.use_bn == "true"
    model = make_cnn(dataset.input_shape, dataset.num_classes, use_bn=use_bn)
    trainer = ClientTrainer(model, store, config.train, options.client_parallelism)
    ctx = FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                    num_clients=config.num_clients, input_shape=dataset.input_shape,
                    init=config.init, donate_state=True)
    algorithm = algorithm_class(config.algorithm)(ctx, config.algorithm_config)
    evaluator = Evaluator(model, store, trainer.strategy, mesh=trainer.mesh) if config.evaluate_test else None
    validator = (Evaluator(model, store, trainer.strategy, mesh=trainer.mesh, split="validation")
                 if validation is not None else None)
    keys = experiment_keys(config.seed)
    schedule = participation_schedule(keys.schedule, config.num_clients, config.clients_per_round,
                                      config.rounds)
    return Experiment(config, algorithm, ctx, evaluator, partition, keys, schedule,
                      class_map=dataset.class_map, partition_record=record, validator=validator)


# the train share make_partition uses (not a config field: the paper's 70/30 split)
_TRAIN_FRACTION = inspect.signature(make_partition).parameters["train_fraction"].default


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """True iff every floating-point leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


@dataclasses.dataclass
class Run:
    """The mutable part of a run: the state and what has been recorded so far.

    Attributes:
      state: the algorithm's state (per-client leaves padded to the mesh).
      next_round: the first round still to run (0-based).
      round_times: seconds of every round run so far (a resumed run continues the list).
      bytes_up_total, bytes_down_total: communication so far.
      records: the metrics rows written so far.
      resumed_from: the checkpoint round a resumed run started from (0 if fresh).
      first_rounds: the rounds (0-based) each attempt started with (they include compiling).
      earlier_seconds: wall seconds the earlier attempts spent up to the restored checkpoint.
      started: time.perf_counter() when this attempt's first round started.
      notes: lines for the run's log about how it started (e.g. a damaged checkpoint skipped).
    """

    state: Any
    next_round: int = 0
    round_times: list[float] = dataclasses.field(default_factory=list)
    bytes_up_total: int = 0
    bytes_down_total: int = 0
    records: list[dict] = dataclasses.field(default_factory=list)
    resumed_from: int = 0
    workdir: str | None = None
    checkpoints: Checkpoints | None = None
    writer: MetricsWriter | None = None
    exports: ExportLog | None = None
    lock: WorkdirLock | None = None
    first_rounds: list[int] = dataclasses.field(default_factory=list)
    earlier_seconds: float = 0.0
    started: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    def seconds_total(self) -> float:
        """Wall seconds of all attempts, up to now (earlier ones up to their checkpoint)."""
        return self.earlier_seconds + (time.perf_counter() - self.started)

    def checkpoint(self, exp: Experiment, round_done: int, force: bool = False) -> None:
        """Saves after `round_done` rounds when due (every --checkpoint_every and at the end),
        or now (`force`: a run stopped by a signal)."""
        if self.checkpoints is None or not (
                force or self.checkpoints.due(round_done, round_done == exp.config.rounds)):
            return
        if self.exports is not None:  # (the primary process's; core/multihost.py)
            self.exports.save()  # before the checkpoint commits
            self.writer.flush()
        self.checkpoints.save(round_done, exp.algorithm.to_checkpoint(self.state),
                              # numpy: process-local values, the same in every process
                              {"schedule": exp.schedule[:round_done],
                               "train_key": np.asarray(jax.random.key_data(exp.keys.train))},
                              {"round_times": list(self.round_times),
                               "bytes_up_total": self.bytes_up_total,
                               "bytes_down_total": self.bytes_down_total,
                               "first_rounds": list(self.first_rounds),
                               "seconds_total": self.seconds_total()})

    def interrupted(self, exp: Experiment, signum: int, round_done: int,
                    finished_round: bool) -> RunInterrupted:
        """The RunInterrupted a stop raises, once the checkpoint saved for it has committed."""
        last = None
        if self.checkpoints is not None:
            self.checkpoints.wait()
            last = self.checkpoints.latest_round()
        return RunInterrupted(signum, round_done, exp.config.rounds, last, finished_round)

    def divergence_hint(self) -> str:
        hint = " (lower --lr or --hn_lr"
        if self.checkpoints is None:
            return hint + ")"
        self.checkpoints.wait()
        last = self.checkpoints.latest_round()
        if last is None:
            return hint + " and use --overwrite or another --workdir)"
        # the workdir pins its configuration: a lower learning rate is a new run
        return (hint + " with --overwrite or another --workdir); the last good checkpoint "
                f"(round {last}) is kept in {self.workdir}")

    def close(self) -> None:
        """Writes what is pending and closes the writers; each is closed even when one fails
        (a full disk), and the first error is raised after."""
        steps = []
        if self.exports is not None:
            # the export history: at checkpoints and once at the end (rewriting the growing
            # history at every evaluation would cost O(evaluations^2) writes)
            steps += [self.exports.save, self.exports.close]
        if self.checkpoints is not None:
            steps.append(self.checkpoints.close)
        if self.writer is not None:
            steps.append(self.writer.close)
        errors = []
        for step in steps:
            try:
                step()
            except Exception as e:  # pylint: disable=broad-except  (raised below)
                errors.append(e)
        if errors:
            raise errors[0]

    def release(self) -> None:
        """Releases the workdir's lock (after the last file of the run is written)."""
        if self.lock is not None:
            self.lock.release()


class StopRequests:
    """SIGINT and SIGTERM during a run, as a context manager around the round loop.

    The first signal asks the loop to stop after the round in progress (train_loop then
    checkpoints that round and raises RunInterrupted); a second one abandons the round at
    once (RunInterrupted from the handler). Handlers are installed only in the main thread of
    a one-process run (a run over several processes is stopped by experiments.launch, which
    resumes it from its latest periodic checkpoint); the previous handlers come back on exit.

    Attributes:
      signum: the first signal received (None: none).
    """

    def __init__(self, exp: Experiment, run: Run):
        self.exp, self.run = exp, run
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread() and multihost.process_count() == 1:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
        if self.signum is None:
            self.signum = signum
            return
        # (no call into orbax from a signal handler: run_experiment fills in the checkpoint
        # round once the writers are closed)
        raise RunInterrupted(self.signum, len(self.run.round_times), self.exp.config.rounds, None,
                             finished_round=False)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def lock_workdir(workdir: str) -> WorkdirLock:
    """Takes `workdir`'s lock for this command (creating the directory): one command at a
    time writes a workdir. In a run over several processes the primary takes it and every
    other process checks that it sees the workdir the primary locked (and gets a lock object
    it does not hold). Every process of a run calls it (it broadcasts and syncs).

    Raises:
      WorkdirBusy: another live command holds it (the message names it).
      UserInputError: the directory cannot be created, or (another process) it is not the
        primary's.
    """
    token = multihost.broadcast_int(int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF)
    lock = WorkdirLock(workdir, token)
    refused = None
    if multihost.is_primary():
        try:
            try:
                os.makedirs(workdir, exist_ok=True)
            except OSError as e:
                raise UserInputError(f"cannot write to --workdir {workdir!r}: {e.strerror or e}") from None
            lock.acquire()
        except UserInputError as e:
            refused = e
    # every process learns the primary's outcome (none waits in a barrier for a refused one)
    if not multihost.all_true(refused is None):
        if refused is not None:
            raise refused
        raise UserInputError(f"process 0 could not lock --workdir {workdir!r} (its error names why)")
    try:
        multihost.sync("workdir locked")
        if not multihost.is_primary():
            check_shared(workdir, token, multihost.process_index())
    except BaseException:
        lock.release()
        raise
    return lock


def start_run(exp: Experiment, workdir: str | None, options: RunOptions,
              lock: WorkdirLock | None = None) -> Run:
    """A fresh run, or the latest checkpoint of `workdir` when it holds this configuration.

    `lock`: the workdir's lock, taken by the caller (lock_workdir); without one, start_run
    takes it. The run holds it until `Run.release`.
    """
    config, algo = exp.config, exp.algorithm
    state = algo.init(exp.keys.init)
    run = Run(state=state, workdir=workdir)
    if not workdir:
        return run
    own = lock is None
    run.lock = lock_workdir(workdir) if own else lock
    try:
        _open_workdir(exp, run, options)
    except BaseException:
        try:
            run.close()
        finally:
            if own:
                run.release()
        raise
    return run


def _open_workdir(exp: Experiment, run: Run, options: RunOptions) -> None:
    """start_run's part in a locked workdir: checks it, restores the latest checkpoint, opens
    the writers (the primary's)."""
    config, algo, workdir, state = exp.config, exp.algorithm, run.workdir, run.state
    # Several processes: each checks the workdir as it finds it (a refusal is the same in
    # all of them), the primary alone removes what --overwrite discards, and nobody creates
    # anything in it (checkpoints/) before every process has looked.
    primary = multihost.is_primary()
    resumable = prepare_workdir(workdir, config, options.overwrite, primary=primary)
    multihost.sync("workdir checked")
    run.checkpoints = Checkpoints(workdir, options.checkpoint_every)
    resume_round = run.checkpoints.latest_round() if resumable else None
    keep = None
    if resume_round is not None and resume_round > config.rounds:
        raise UserInputError(f"--workdir {workdir!r} holds a run already at round {resume_round}, "
                             f"past --rounds={config.rounds}; use --overwrite or more rounds")
    partition_path = os.path.join(workdir, partition_file.FILE_NAME)
    if resume_round is not None:
        _check_same_partition(partition_path, exp.partition_record, workdir)
    if resume_round is not None and resume_round == config.rounds and read_summary(workdir) is not None:
        # a finished run found again: nothing runs and `finish` returns its summary as it was
        # written, so the state is not read back (a checkpoint of another state layout, e.g.
        # from an older version, does not stop the run's results from being read)
        run.next_round = run.resumed_from = resume_round
        keep = lambda r: kept_round(r, resume_round=resume_round, eval_every=config.eval_every,
                                    rounds=config.rounds)
    elif resume_round is not None:
        step, saved, arrays, meta, damaged = run.checkpoints.restore(algo.to_checkpoint(state))
        run.notes += [f"the checkpoint of round {bad} is damaged ({why}): deleted; resuming from "
                      f"round {step}, rounds {step + 1}-{bad} are recomputed" for bad, why in damaged]
        resume_round = step  # (events after the restored round are rewritten too)
        saved_schedule = np.asarray(arrays["schedule"])
        if not np.array_equal(saved_schedule, exp.schedule[:saved_schedule.shape[0]]) or not np.array_equal(
                np.asarray(arrays["train_key"]), np.asarray(jax.random.key_data(exp.keys.train))):
            raise UserInputError(f"the checkpoint in {workdir!r} does not match this seed's "
                                 "participation schedule or keys; use --overwrite")
        run.state = algo.from_checkpoint(saved)
        run.next_round = run.resumed_from = step
        run.round_times = list(meta["round_times"])
        # (checkpoints written before these entries existed: one attempt, no other waits)
        run.first_rounds = list(meta.get("first_rounds", [0]))
        run.earlier_seconds = float(meta.get("seconds_total", sum(run.round_times)))
        run.bytes_up_total, run.bytes_down_total = int(meta["bytes_up_total"]), int(meta["bytes_down_total"])
        keep = lambda r: kept_round(r, resume_round=step, eval_every=config.eval_every,
                                    rounds=config.rounds)
    if not primary:
        return  # files are the primary process's; the others keep the rows in memory
    # only now, after every check of the resumed state: a refused command leaves the workdir
    # as it was
    write_config(workdir, config)
    # a workdir resumed without a partition.json (written before partition files existed) does
    # not get one: this version's split need not be the one that run was trained on
    if exp.partition_record is not None and (resume_round is None or os.path.exists(partition_path)):
        partition_file.write_partition(partition_path, exp.partition_record)
    if run.next_round < config.rounds:
        remove_finished_outputs(workdir)  # this command changes the run's end
    run.writer = MetricsWriter(workdir, keep, resume_round, options.tensorboard)
    run.records = run.writer.records
    run.exports = ExportLog(workdir, algo.export_name, algo.export_metadata(), keep)


def _check_same_partition(path: str, record: dict | None, workdir: str) -> None:
    """Refuses to resume on another partition than the one the workdir's run was trained on.

    Compares the dataset fingerprint and every client's train, test and validation indices
    (in order) of WORKDIR/partition.json with `record`; a workdir without the file (an older
    run) passes.

    Raises:
      UserInputError: they differ, or the workdir's partition.json cannot be read.
    """
    if record is None or not os.path.exists(path):
        return
    hint = f"; use --overwrite or another --workdir than {workdir!r}"
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserInputError(f"cannot read {path!r}, the partition this workdir was trained "
                             f"on" + hint) from None
    meta = stored.get("dataset") if isinstance(stored, dict) else None
    fingerprint = meta.get("fingerprint") if isinstance(meta, dict) else None
    clients = stored.get("clients") if isinstance(stored, dict) else None
    why = None
    if fingerprint != record["dataset"]["fingerprint"]:
        why = (f"dataset fingerprint {str(fingerprint)[:12]} there, "
               f"{record['dataset']['fingerprint'][:12]} now")
    elif not isinstance(clients, list) or len(clients) != len(record["clients"]):
        why = (f"{len(clients) if isinstance(clients, list) else 'no'} clients there, "
               f"{len(record['clients'])} now")
    else:
        for i, (old, new) in enumerate(zip(clients, record["clients"])):
            if not isinstance(old, dict) or any(old.get(k) != new.get(k) for k in ("train", "test", "validation")):
                why = f"client {i}'s examples differ"
                break
    if why is not None:
        raise UserInputError(f"the partition differs from the one this workdir was trained on "
                             f"({path}: {why})" + hint)


def evaluate_round(exp: Experiment, state: Any, round_done: int) -> tuple[dict, Any]:
    """The metrics of every view the algorithm names, and its Evaluation (scalars, arrays).

    Test split: every view ('test_acc', '<view>_test_acc', ...), unless --evaluate_test=false.
    Validation split (with --validation_fraction): the personalised models, the '' view
    ('val_acc', 'val_loss', ...).
    """
    evaluation = exp.algorithm.evaluate(state, round_done, jax.random.fold_in(exp.keys.evaluation, round_done))
    record: dict[str, Any] = {"round": round_done}
    for name, view in evaluation.views.items():
        if exp.evaluator is not None:
            result = exp.evaluator.evaluate(view.params, view.batch_stats, shared=view.shared)
            record.update(summarize(result, "test" if not name else f"{name}_test"))
        if exp.validator is not None and not name:
            result = exp.validator.evaluate(view.params, view.batch_stats, shared=view.shared)
            record.update(summarize(result, "val"))
    return record, evaluation


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One progress line every `every` rounds and at evaluations."""

    def __init__(self, log: Callable[[str], None], every: int, rounds: int, metric: str = "test_acc"):
        self.log, self.every, self.rounds, self.metric = log, every, rounds, metric

    def __call__(self, run: Run, round_done: int, evaluated: bool, train_loss: float, seen: float,
                 dt: float) -> None:
        if not (evaluated or (self.every and round_done % self.every == 0)):
            return
        # the last evaluation, with its round when it is not this one; '-' before the first
        last = run.records[-1] if run.records else None
        acc = "-" if last is None else f"{last[self.metric]:.4f}" + (
            "" if last["round"] == round_done else f" (round {last['round']})")
        recent = statistics.median(run.round_times[-20:][1:] or run.round_times[-1:])
        self.log(f"round {round_done:4d}/{self.rounds}  {self.metric} {acc}  train_loss "
                 f"{train_loss:.4f}  {dt:.2f}s  {1.0 / recent:.2f} rounds/s  "
                 f"{seen / dt:,.0f} ex/s  ETA {_eta(recent * (self.rounds - round_done))}")


def train_loop(exp: Experiment, run: Run, progress: Progress, stop: StopRequests) -> None:
    """Rounds run.next_round .. config.rounds - 1, with their periodic actions.

    Raises:
      RunInterrupted: `stop` saw a signal: the round in progress finished and was
        checkpointed (a second signal abandons it).
    """
    algo = exp.algorithm
    run.started = time.perf_counter()
    if run.next_round < exp.config.rounds:
        run.first_rounds.append(run.next_round)
    for t in range(run.next_round, exp.config.rounds):
        t0 = time.perf_counter()
        run.state, info = algo.round(run.state, t, exp.schedule[t], exp.round_key(t))
        info = multihost.host_tree(info)  # the round's one read of device values
        dt = time.perf_counter() - t0
        run.round_times.append(dt)
        up, down = int(np.sum(info["bytes_up"], dtype=np.int64)), int(np.sum(info["bytes_down"], dtype=np.int64))
        run.bytes_up_total += up
        run.bytes_down_total += down
        seen = float(np.sum(info["num_examples"]))
        train_loss = float(np.sum(info["loss_sum"])) / max(seen, 1.0)
        evaluated = exp.evaluation_due(t + 1)
        due = run.checkpoints is not None and run.checkpoints.due(t + 1, t + 1 == exp.config.rounds)
        # the state is checked before anything is evaluated or saved from it
        if not math.isfinite(train_loss) or ((evaluated or due) and not bool(_all_finite(run.state))):
            raise UserInputError(f"training diverged at round {t + 1}: train loss {train_loss:.4g}, "
                                 "non-finite values in the model or server state" + run.divergence_hint())
        if run.writer:
            run.writer.round_scalars(t + 1, {"train_loss": train_loss, "seconds": dt,
                                             "examples_per_second": seen / dt,
                                             "bytes_up": up, "bytes_down": down})
        if evaluated:
            t1 = time.perf_counter()
            record, evaluation = evaluate_round(exp, run.state, t + 1)
            record.update(train_loss=train_loss, round_seconds=dt,
                          eval_seconds=time.perf_counter() - t1, bytes_up=up, bytes_down=down,
                          bytes_up_total=run.bytes_up_total, bytes_down_total=run.bytes_down_total)
            record.update(evaluation.scalars)
            arrays = evaluation.arrays
            bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
            bad += [k for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating)
                    and not np.all(np.isfinite(a))]
            if bad:
                raise UserInputError(f"training diverged at round {t + 1}: non-finite "
                                     f"{', '.join(bad[:3])} at evaluation" + run.divergence_hint())
            if run.exports is not None:
                run.exports.append(t + 1, arrays)
            if run.writer:
                run.writer.evaluation(record)
            else:
                run.records.append(record)
        progress(run, t + 1, evaluated, train_loss, seen, dt)
        run.checkpoint(exp, t + 1, force=stop.signum is not None)
        if stop.signum is not None and t + 1 < exp.config.rounds:
            raise run.interrupted(exp, stop.signum, t + 1, finished_round=True)


def finish(exp: Experiment, run: Run, seconds: float) -> dict[str, Any]:
    """The run's summary (written to WORKDIR/summary.json); also returns the metrics rows."""
    config, ctx, records = exp.config, exp.context, run.records
    if not multihost.is_primary():
        return {"records": records}  # the primary process writes and reports the summary
    stored = read_summary(run.workdir) if run.workdir and run.resumed_from == config.rounds else None
    if stored is not None and records:
        # a finished run found again: its summary stays as it was written
        stored["records"] = records
        return stored
    if not records:
        raise UserInputError(f"--workdir {run.workdir!r} holds a finished run without metrics.jsonl rows; "
                             "use --overwrite to run it again")
    # steady rounds: all but each attempt's first (compiling)
    steady = [s for i, s in enumerate(run.round_times) if i not in run.first_rounds] or run.round_times
    metric = config.headline_metric
    final, best = records[-1], max(records, key=lambda r: r[metric])
    first = run.round_times[run.first_rounds[-1]] if run.first_rounds else run.round_times[0]
    summary = {
        "config": config.to_dict(),
        "algorithm": exp.algorithm.name,
        "final": {k: v for k, v in final.items() if not k.endswith("per_client")},
        f"best_{metric}": best[metric],
        "best_round": best["round"],
        # this attempt's first round (with its compiling), the total over all attempts
        "first_round_seconds": first,
        "median_round_seconds": statistics.median(steady),
        "compile_seconds_estimate": max(0.0, first - statistics.median(steady)),
        "total_seconds": run.earlier_seconds + seconds,
        "attempt_seconds": seconds,
        "resumed_from_round": run.resumed_from,
        "clients_per_round": config.clients_per_round,
        "client_parallelism": ctx.trainer.strategy,
        "local_steps_per_round": ctx.trainer.num_steps,
        "train_examples_per_client": np.asarray(ctx.store.train_count).tolist(),
        "test_examples_per_client": np.asarray(ctx.store.test_count).tolist(),
        **({"validation_examples_per_client": np.asarray(ctx.store.val_count).tolist()}
           if ctx.store.val_count is not None else {}),
        "label_histogram": label_histogram(ctx.store).tolist(),
        "samples_per_client": exp.partition.samples_per_client,
        # the file a --partition=file:PATH run read its split from (None: made by the scheme)
        "partition_source": (exp.partition_record or {}).get("source"),
        # class i of this run is label class_map[i] of the source (labels that did not fill
        # 0..C-1 were mapped in order); None: the source's labels as they are
        "class_map": None if exp.class_map is None else [int(c) for c in exp.class_map],
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "jax_version": jax.__version__,
    }
    if run.workdir:
        write_summary(run.workdir, summary)
    summary["records"] = records
    return summary


def run_experiment(config: ExperimentConfig, workdir: str | None = None,
                   log: Callable[[str], None] | None = None,
                   options: RunOptions = RunOptions()) -> dict[str, Any]:
    """Runs the experiment; returns the summary (also written to workdir/summary.json).

    With a workdir, the run checkpoints every `options.checkpoint_every` rounds and a
    second call with the same config and workdir resumes from the latest checkpoint,
    giving the same metrics as an uninterrupted run (README "Resuming").

    Devices are set up as on the command line: `options.host_devices` (default: one XLA CPU
    device per core) applies if JAX has not computed anything yet in this process, and
    `options.client_parallelism='auto'` then picks `shard` on a multi-core CPU.

    Args:
      config: the experiment (checked when it was built).
      workdir: the run's directory (None: nothing is written and nothing resumes).
      log: where progress lines go (default: print).
      options: how the run executes (RunOptions).

    Returns:
      the summary dict (see README "Outputs"), with the metrics rows under 'records'.

    Raises:
      UserInputError: data that cannot be loaded or partitioned, an incompatible workdir,
        or divergence.
    """
    log = log or (lambda s: print(s, flush=True))
    set_host_devices(options.host_devices)
    check_random_streams()
    enable_compilation_cache(options.compilation_cache_dir)
    # an existing workdir's lock first: a second command on it stops before loading anything
    # (a new workdir is created and locked by start_run, once the configuration has loaded:
    # a refused command leaves no folder). The primary's view decides, for every process.
    exists = bool(workdir) and bool(multihost.broadcast_int(int(os.path.isdir(workdir))))
    lock = lock_workdir(workdir) if exists else None
    run, writing = None, False
    try:
        exp = build_experiment(config, options)
        writing = True  # (from here an OSError is a file of the run that could not be written)
        run = start_run(exp, workdir, options, lock)
        ctx = exp.context
        train_counts, test_counts = np.asarray(ctx.store.train_count), np.asarray(ctx.store.test_count)
        log(f"{exp.algorithm.name}: {config.dataset} {config.partition}, {config.num_clients} clients "
            f"({config.clients_per_round}/round), train/test per client {int(train_counts.mean())}/"
            f"{int(test_counts.mean())}, {ctx.model_params} params, {ctx.trainer.num_steps} local "
            f"steps/round, strategy={ctx.trainer.strategy}"
            + (f"; {exp.algorithm.describe()}" if exp.algorithm.describe() else "")
            + (f"; resumed after round {run.resumed_from}" if run.resumed_from else ""))
        for note in run.notes:
            log(note)
        t_start = time.perf_counter()
        try:
            with StopRequests(exp, run) as stop:
                train_loop(exp, run, Progress(log, options.log_every, config.rounds, config.headline_metric), stop)
        finally:
            run.close()
        return finish(exp, run, time.perf_counter() - t_start)
    except OSError as e:  # (a full disk, while starting, training or finishing)
        if not writing:
            raise
        raise UserInputError(write_failure(e, run)) from None
    except RunInterrupted as stop:
        if stop.checkpoint_round is None and run is not None and run.checkpoints is not None:
            stop.checkpoint_round = run.checkpoints.committed_round()
        raise
    finally:
        if run is not None:
            run.release()
        elif lock is not None:
            lock.release()


def write_failure(error: OSError, run: Run | None) -> str:
    """The one line for a file the run could not write (a full disk, a quota, a lost mount):
    the path and the system's reason, what the workdir keeps, and how to go on."""
    where = error.filename or "a file of the run"
    last = None
    if run is not None and run.checkpoints is not None:
        try:
            last = run.checkpoints.latest_round()
        except Exception:  # pylint: disable=broad-except  (the directory itself may be gone)
            last = None
    kept = (f"the workdir keeps the checkpoint of round {last} and the metrics up to it"
            if last is not None else "no checkpoint was saved yet")
    return (f"cannot write {where}: {error.strerror or error}; {kept}; free space (or fix the "
            "path) and re-run the same command to resume")


def format_table(summary: dict[str, Any], max_rows: int = 10) -> str:
    """A short text table of the evaluated rounds and the final result (test accuracy, or
    validation accuracy for a run without test evaluation)."""
    records = summary["records"]
    split = "test" if "test_acc" in records[-1] else "val"
    metric = f"{split}_acc"
    views = [k[: -len("_test_acc")] for k in records[-1] if k.endswith("_test_acc") and not k.startswith("test")]
    extra = ["val_acc"] if split == "test" and "val_acc" in records[-1] else []
    head = ["round", metric, "acc_unw", "acc_std"] + [f"{v}_acc" for v in views] + extra + ["train_loss", "round_s"]
    rows = records if len(records) <= max_rows else records[:: max(1, len(records) // max_rows)]
    if rows[-1] is not records[-1]:
        rows = rows + [records[-1]]
    lines = ["  ".join(f"{h:>10}" for h in head)]
    for r in rows:
        vals = [f"{r['round']:>10d}", f"{r[metric]:>10.4f}", f"{r[metric + '_unweighted']:>10.4f}",
                f"{r[metric + '_std']:>10.4f}"]
        vals += [f"{r[v + '_test_acc']:>10.4f}" for v in views]
        vals += [f"{r[k]:>10.4f}" for k in extra]
        vals += [f"{r['train_loss']:>10.4f}", f"{r['round_seconds']:>10.3f}"]
        lines.append("  ".join(vals))
    lines.append(f"{summary['algorithm']}: final {metric} {records[-1][metric]:.4f} "
                 f"(best {summary['best_' + metric]:.4f} at round {summary['best_round']}); "
                 f"median round {summary['median_round_seconds']:.3f}s, first round "
                 f"{summary['first_round_seconds']:.2f}s (incl. compile)")
    return "\n".join(lines)
