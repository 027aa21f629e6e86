"""The experiment: data -> partition -> clients -> rounds -> metrics.

`run_experiment(config)` is the library entry point the CLI wraps. It writes
`metrics.jsonl` (one JSON object per evaluated round) and `summary.json` to the workdir,
and `alpha.npz` for pFedLA (alpha of every client and layer at every evaluated round).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pfedla_jax.algorithms import (
    ALGORITHMS,
    FedAvg,
    FLContext,
    Local,
    PFedLA,
    PFedLAConfig,
)
from pfedla_jax.algorithms.base import INITS
from pfedla_jax.core.evaluation import Evaluator, summarize
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.data import build_client_store, load_dataset, make_partition
from pfedla_jax.data.store import label_histogram
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import count_params, layer_names, make_cnn
from pfedla_jax.training.workdir import (
    Checkpoints,
    MetricsWriter,
    kept_round,
    load_alpha_log,
    prepare_workdir,
    save_alpha_log,
)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    algorithm: str = "fedavg"
    # data
    dataset: str = "fmnist"
    data_dir: str | None = None
    partition: str = "noniid1"
    classes_per_client: int = 4
    dominant_classes: int = 2
    dominant_share: float = 0.8
    dirichlet_alpha: float = 0.5
    min_client_size: int = 10
    samples_per_client: int = 0      # 0 = the largest the data allows
    synthetic_per_class: int = 600
    num_clients: int = 10
    # federated schedule
    rounds: int = 20
    participation: float = 1.0
    eval_every: int = 1
    seed: int = 0
    init: str = "common"
    # local training
    train: LocalTrainConfig = LocalTrainConfig()
    client_parallelism: str = "auto"
    use_bn: str = "auto"             # auto | true | false
    # pFedLA
    pfedla: PFedLAConfig = PFedLAConfig()

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise UserInputError(f"unknown --algorithm {self.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
        if self.num_clients < 1:
            raise UserInputError(f"--num_clients must be >= 1, got {self.num_clients}")
        if self.rounds < 1:
            raise UserInputError(f"--rounds must be >= 1, got {self.rounds}")
        if not (0 < self.participation <= 1) or math.isnan(self.participation):
            raise UserInputError(f"--participation must be in (0, 1], got {self.participation}")
        if self.eval_every < 1:
            raise UserInputError(f"--eval_every must be >= 1, got {self.eval_every}")
        if self.init not in INITS:
            raise UserInputError(f"unknown --init {self.init!r}; expected one of {', '.join(INITS)}")
        if self.use_bn not in ("auto", "true", "false"):
            raise UserInputError(f"--use_bn must be auto, true or false, got {self.use_bn!r}")
        if self.samples_per_client < 0:
            raise UserInputError(f"--samples_per_client must be >= 0, got {self.samples_per_client}")
        self.train.validate()

    @property
    def clients_per_round(self) -> int:
        return max(1, int(round(self.participation * self.num_clients)))


def experiment_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init, participation schedule, training) keys: fold_in(PRNGKey(seed), 0 / 1 / 2).

    Round t trains with fold_in(training key, t); client c with fold_in of that, c.
    """
    root = jax.random.PRNGKey(seed)
    return tuple(jax.random.fold_in(root, i) for i in range(3))


def participation_schedule(key: jax.Array, num_clients: int, per_round: int, rounds: int) -> np.ndarray:
    """Pre-sampled participants [rounds, S] (sorted ids), from the seed only."""
    if per_round == num_clients:
        return np.tile(np.arange(num_clients, dtype=np.int32), (rounds, 1))
    draw = lambda t: jnp.sort(jax.random.choice(jax.random.fold_in(key, t), num_clients,
                                                (per_round,), replace=False))
    return np.asarray(jax.jit(jax.vmap(draw))(jnp.arange(rounds))).astype(np.int32)


@dataclasses.dataclass
class Experiment:
    config: ExperimentConfig
    algorithm: Any
    context: FLContext
    evaluator: Evaluator
    partition: Any


def build_experiment(config: ExperimentConfig) -> Experiment:
    """Loads data, partitions it, builds the model, trainer and algorithm."""
    config.validate()
    dataset = load_dataset(config.dataset, config.data_dir,
                           synthetic_per_class=config.synthetic_per_class, seed=config.seed)
    partition = make_partition(
        dataset.labels, dataset.num_classes, config.num_clients, config.partition,
        classes_per_client=config.classes_per_client, dominant_classes=config.dominant_classes,
        dominant_share=config.dominant_share, dirichlet_alpha=config.dirichlet_alpha,
        min_client_size=config.min_client_size,
        samples_per_client=config.samples_per_client or None, seed=config.seed)
    store = build_client_store(dataset, partition)
    empty = np.flatnonzero(np.asarray(store.test_count) == 0)
    if empty.size:
        raise UserInputError(
            f"{empty.size} client(s) get no test examples from the 70/30 per-class split "
            f"(e.g. client {int(empty[0])}); use a larger --samples_per_client")
    use_bn = None if config.use_bn == "auto" else config.use_bn == "true"
    model = make_cnn(dataset.input_shape, dataset.num_classes, use_bn=use_bn)
    trainer = ClientTrainer(model, store, config.train, config.client_parallelism)
    ctx = FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                    num_clients=config.num_clients, input_shape=dataset.input_shape,
                    init=config.init)
    if config.algorithm == "local":
        algorithm = Local(ctx)
    elif config.algorithm == "fedavg":
        algorithm = FedAvg(ctx)
    else:
        algorithm = PFedLA(ctx, config.pfedla)
    evaluator = Evaluator(model, store, config.client_parallelism)
    return Experiment(config, algorithm, ctx, evaluator, partition)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """True iff every floating-point leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _alpha_stats(alpha: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    """Mean self-weight per layer (the paper's Fig. 7 reading), averaged over clients."""
    n = alpha.shape[0]
    self_w = alpha[np.arange(n), :, np.arange(n)]  # [N, L]
    out = {f"alpha_self/{name}": float(self_w[:, l].mean()) for l, name in enumerate(names)}
    out["alpha_self_mean"] = float(self_w.mean())
    return out


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run is executed and recorded (not part of what it computes).

    Attributes:
      checkpoint_every: save a checkpoint every this many rounds (and at the end); 0 = only
        at the end. Needs a workdir.
      overwrite: start from scratch in a workdir that holds another run.
      tensorboard: write TensorBoard event files to WORKDIR/tb.
      log_every: one progress line every this many rounds (0 = only evaluations).
    """

    checkpoint_every: int = 10
    overwrite: bool = False
    tensorboard: bool = True
    log_every: int = 1

    def validate(self) -> None:
        if self.checkpoint_every < 0:
            raise UserInputError(f"--checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.log_every < 0:
            raise UserInputError(f"--log_every must be >= 0, got {self.log_every}")


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_experiment(config: ExperimentConfig, workdir: str | None = None,
                   log: Callable[[str], None] | None = None,
                   options: RunOptions = RunOptions()) -> dict[str, Any]:
    """Runs the experiment; returns the summary (also written to workdir/summary.json).

    With a workdir, the run checkpoints every `options.checkpoint_every` rounds and a
    second call with the same config and workdir resumes from the latest checkpoint,
    giving the same metrics as an uninterrupted run (README "Resuming").
    """
    log = log or (lambda s: print(s, flush=True))
    options.validate()
    exp = build_experiment(config)
    algo, ctx = exp.algorithm, exp.context
    resumable = bool(workdir) and prepare_workdir(workdir, config, options.overwrite)

    key_init, key_sched, key_train = experiment_keys(config.seed)
    schedule = participation_schedule(key_sched, config.num_clients, config.clients_per_round,
                                      config.rounds)
    state = algo.init(key_init)
    train_counts = np.asarray(ctx.store.train_count)
    test_counts = np.asarray(ctx.store.test_count)
    layer_names_ = getattr(getattr(algo, "layer_map", None), "names", ())

    checkpoints = Checkpoints(workdir, options.checkpoint_every) if workdir else None
    start_round, round_times, bytes_up_total, bytes_down_total = 0, [], 0, 0
    alpha_log: dict[str, list] = {"round": [], "alpha": [], "retained": []}
    resume_round = checkpoints.latest_round() if (checkpoints and resumable) else None
    if resume_round is not None:
        if resume_round > config.rounds:
            raise UserInputError(f"--workdir {workdir!r} holds a run already at round {resume_round}, "
                                 f"past --rounds={config.rounds}; use --overwrite or more rounds")
        start_round, state, arrays, meta = checkpoints.restore(state)
        saved_schedule = np.asarray(arrays["schedule"])
        if not np.array_equal(saved_schedule, schedule[:saved_schedule.shape[0]]) or not np.array_equal(
                np.asarray(arrays["train_key"]), np.asarray(jax.random.key_data(key_train))):
            raise UserInputError(f"the checkpoint in {workdir!r} does not match this seed's "
                                 "participation schedule or keys; use --overwrite")
        round_times = list(meta["round_times"])
        bytes_up_total, bytes_down_total = int(meta["bytes_up_total"]), int(meta["bytes_down_total"])
    keep = (functools.partial(kept_round, resume_round=start_round, eval_every=config.eval_every,
                              rounds=config.rounds) if resume_round is not None else None)
    if keep is not None:
        alpha_log = load_alpha_log(workdir, keep)
    writer = MetricsWriter(workdir, keep, resume_round, options.tensorboard) if workdir else None
    records = writer.records if writer else []

    log(f"{algo.name}: {config.dataset} {config.partition}, {config.num_clients} clients "
        f"({config.clients_per_round}/round), train/test per client {int(train_counts.mean())}/"
        f"{int(test_counts.mean())}, {count_params(jax.tree.map(lambda a: a[0], state['client_params']))} "
        f"params, {ctx.trainer.num_steps} local steps/round, strategy={ctx.trainer.strategy}"
        + (f"; resumed after round {start_round}" if start_round else ""))

    def save_checkpoint(round_done: int) -> None:
        if checkpoints is None or not checkpoints.due(round_done, final=round_done == config.rounds):
            return
        save_alpha_log(workdir, alpha_log, layer_names_)  # before the checkpoint commits
        if writer:
            writer.flush()
        checkpoints.save(round_done, state,
                         {"schedule": schedule[:round_done],
                          "train_key": jax.random.key_data(key_train)},
                         # a copy: orbax serialises asynchronously while rounds go on
                         {"round_times": list(round_times), "bytes_up_total": bytes_up_total,
                          "bytes_down_total": bytes_down_total})

    def _divergence_hint() -> str:
        hint = " (lower --lr or --hn_lr"
        if checkpoints is None:
            return hint + ")"
        checkpoints.wait()
        last = checkpoints.latest_round()
        if last is None:
            return hint + " and use --overwrite or another --workdir)"
        # the workdir pins its configuration: a lower learning rate is a new run
        return (hint + " with --overwrite or another --workdir); the last good checkpoint "
                f"(round {last}) is kept in {workdir}")

    t_start = time.perf_counter()
    last_acc = records[-1]["test_acc"] if records else float("nan")
    try:
        for t in range(start_round, config.rounds):
            t0 = time.perf_counter()
            state, info = algo.round(state, t, schedule[t], jax.random.fold_in(key_train, t))
            jax.block_until_ready(state)
            dt = time.perf_counter() - t0
            round_times.append(dt)
            loss_sum = float(np.sum(np.asarray(info["loss_sum"])))
            seen = float(np.sum(np.asarray(info["num_examples"])))
            bytes_up_total += int(info["bytes_up"])
            bytes_down_total += int(info["bytes_down"])
            train_loss = loss_sum / max(seen, 1.0)
            if not math.isfinite(train_loss) or not bool(_all_finite(state)):
                raise UserInputError(f"training diverged at round {t + 1}: train loss {train_loss:.4g}, "
                                     "non-finite values in the model or hypernetwork state "
                                     + _divergence_hint())
            if writer:
                writer.round_scalars(t + 1, {"train_loss": train_loss, "seconds": dt,
                                             "examples_per_second": seen / dt,
                                             "bytes_up": int(info["bytes_up"]),
                                             "bytes_down": int(info["bytes_down"])})
            evaluate = (t + 1) % config.eval_every == 0 or t + 1 == config.rounds
            if evaluate:
                t1 = time.perf_counter()
                record: dict[str, Any] = {"round": t + 1}
                views, exports = algo.evaluation(state)
                for view, (params, stats) in views.items():
                    result = exp.evaluator.evaluate(params, stats)
                    record.update(summarize(result, "test" if not view else f"{view}_test"))
                record.update(train_loss=train_loss, round_seconds=dt,
                              eval_seconds=time.perf_counter() - t1,
                              bytes_up=int(info["bytes_up"]), bytes_down=int(info["bytes_down"]),
                              bytes_up_total=bytes_up_total, bytes_down_total=bytes_down_total)
                if "alpha" in exports:
                    record.update(_alpha_stats(exports["alpha"], algo.layer_map.names))
                bad = [k for k, v in record.items()
                       if isinstance(v, float) and not math.isfinite(v)]
                if bad or ("alpha" in exports and not np.all(np.isfinite(exports["alpha"]))):
                    raise UserInputError(
                        f"training diverged at round {t + 1}: non-finite "
                        f"{', '.join(bad[:3]) or 'alpha'} at evaluation" + _divergence_hint())
                if "alpha" in exports:
                    alpha_log["round"].append(t + 1)
                    alpha_log["alpha"].append(exports["alpha"])
                    alpha_log["retained"].append(exports["retained"])
                last_acc = record["test_acc"]
                if writer:
                    writer.evaluation(record)
                else:
                    records.append(record)
            if evaluate or (options.log_every and (t + 1) % options.log_every == 0):
                recent = statistics.median(round_times[-20:][1:] or round_times[-1:])
                log(f"round {t + 1:4d}/{config.rounds}  test_acc {last_acc:.4f}  train_loss "
                    f"{train_loss:.4f}  {dt:.2f}s  {1.0 / recent:.2f} rounds/s  "
                    f"{seen / dt:,.0f} ex/s  ETA {_eta(recent * (config.rounds - t - 1))}")
            save_checkpoint(t + 1)
    finally:
        # alpha.npz: at checkpoints and once at the end (rewriting the growing history at
        # every evaluation would cost O(evaluations^2) writes).
        if workdir:
            save_alpha_log(workdir, alpha_log, layer_names_)
        if checkpoints:
            checkpoints.close()
        if writer:
            writer.close()

    if not records:
        raise UserInputError(f"--workdir {workdir!r} holds a finished run without metrics.jsonl rows; "
                             "use --overwrite to run it again")
    steady = round_times[1:] or round_times
    final = records[-1]
    best = max(records, key=lambda r: r["test_acc"])
    summary = {
        "config": dataclasses.asdict(config),
        "algorithm": algo.name,
        "final": {k: v for k, v in final.items() if not k.endswith("per_client")},
        "best_test_acc": best["test_acc"],
        "best_round": best["round"],
        "first_round_seconds": round_times[0],
        "median_round_seconds": statistics.median(steady),
        "compile_seconds_estimate": max(0.0, round_times[0] - statistics.median(steady)),
        "total_seconds": time.perf_counter() - t_start,
        "resumed_from_round": start_round,
        "client_parallelism": ctx.trainer.strategy,
        "local_steps_per_round": ctx.trainer.num_steps,
        "train_examples_per_client": train_counts.tolist(),
        "test_examples_per_client": test_counts.tolist(),
        "label_histogram": label_histogram(ctx.store).tolist(),
        "samples_per_client": exp.partition.samples_per_client,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "jax_version": jax.__version__,
    }
    if workdir:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    summary["records"] = records
    return summary


def format_table(summary: dict[str, Any], max_rows: int = 10) -> str:
    """A short text table of the evaluated rounds and the final result."""
    records = summary["records"]
    views = [k[: -len("_test_acc")] for k in records[-1] if k.endswith("_test_acc") and not k.startswith("test")]
    head = ["round", "test_acc", "acc_unw", "acc_std"] + [f"{v}_acc" for v in views] + ["train_loss", "round_s"]
    rows = records if len(records) <= max_rows else records[:: max(1, len(records) // max_rows)]
    if rows[-1] is not records[-1]:
        rows = rows + [records[-1]]
    lines = ["  ".join(f"{h:>10}" for h in head)]
    for r in rows:
        vals = [f"{r['round']:>10d}", f"{r['test_acc']:>10.4f}", f"{r['test_acc_unweighted']:>10.4f}",
                f"{r['test_acc_std']:>10.4f}"]
        vals += [f"{r[v + '_test_acc']:>10.4f}" for v in views]
        vals += [f"{r['train_loss']:>10.4f}", f"{r['round_seconds']:>10.3f}"]
        lines.append("  ".join(vals))
    lines.append(f"{summary['algorithm']}: final test_acc {records[-1]['test_acc']:.4f} "
                 f"(best {summary['best_test_acc']:.4f} at round {summary['best_round']}); "
                 f"median round {summary['median_round_seconds']:.3f}s, first round "
                 f"{summary['first_round_seconds']:.2f}s (incl. compile)")
    return "\n".join(lines)
