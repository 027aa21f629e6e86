r"""Train a federated algorithm and write per-round metrics.

Example (the README's main job):

  python -m experiments.run --algorithm=pfedla --dataset=fmnist --partition=noniid1 \
      --classes_per_client=4 --num_clients=10 --rounds=20 --local_epochs=1 \
      --batch_size=32 --lr=0.005 --participation=1.0 --seed=0 --workdir=runs/pfedla

Writes WORKDIR/metrics.jsonl (one JSON object per evaluated round), metrics.csv, TensorBoard
events (tb/), summary.json, and for pFedLA alpha.npz; checkpoints every --checkpoint_every
rounds. Re-running the same command with the same --workdir resumes from the latest
checkpoint. Flags can come from a file: --flagfile=FILE.

Every registered algorithm's options are flags generated from its config dataclass:
--<algorithm>_<field> (pFedLA keeps its names: --hn_lr, --heur_k, ...); giving an option
of another algorithm than --algorithm is an error.
Bad flags or inputs print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from experiments.cli import fail, parse_flags  # noqa: F401  (re-exported: the other apps import them from here)
from pfedla_jax.algorithms import algorithm_names  # registers every algorithm (no device is touched)
from pfedla_jax.algorithms.registry import config_fields

_A = flags.DEFINE_string("algorithm", "fedavg", f"{' | '.join(algorithm_names())} "
                         "(HeurpFedLA: pfedla with --heur_k>0).")
_DATASET = flags.DEFINE_string("dataset", "fmnist", "fmnist | synthetic | synthetic_rgb | tfds:<name>.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset directory (fmnist IDX files or TFDS data_dir).")
_PARTITION = flags.DEFINE_string("partition", "noniid1", "noniid1 | noniid2 | adjacent (paper Fig. 6) | fig5 (paper Fig. 5) | dirichlet | iid | "
                                 "file:PATH (a run's WORKDIR/partition.json, or a file in its format).")
_K = flags.DEFINE_integer("classes_per_client", 4, "noniid1 / adjacent / fig5: classes per client.")
_DOM = flags.DEFINE_integer("dominant_classes", 2, "noniid2: dominant classes per client.")
_SHARE = flags.DEFINE_float("dominant_share", 0.8, "noniid2: share of a client's data in its dominant classes.")
_DIR_ALPHA = flags.DEFINE_float("dirichlet_alpha", 0.5, "dirichlet: concentration.")
_MIN_SIZE = flags.DEFINE_integer("min_client_size", 10, "dirichlet: minimum examples per client.")
_SPC = flags.DEFINE_integer("samples_per_client", 0, "Examples per client (train+test); 0 = the largest the data allows.")
_SYN = flags.DEFINE_integer("synthetic_per_class", 600, "synthetic datasets: examples per class.")
_N = flags.DEFINE_integer("num_clients", 10, "Number of clients.")
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Communication rounds.")
_E = flags.DEFINE_integer("local_epochs", 1, "Local epochs per round.")
_STEPS = flags.DEFINE_integer("local_steps", 0, "If > 0: local SGD steps per round instead of epochs.")
_B = flags.DEFINE_integer("batch_size", 32, "Local batch size.")
_LR = flags.DEFINE_float("lr", 0.005, "Client SGD learning rate.")
_MOM = flags.DEFINE_float("momentum", 0.0, "Client SGD momentum.")
_WD = flags.DEFINE_float("weight_decay", 0.0, "Client weight decay.")
_P = flags.DEFINE_float("participation", 1.0, "Fraction of clients per round.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for partition, init, schedule and shuffling.")
_EVAL = flags.DEFINE_integer("eval_every", 1, "Evaluate every this many rounds (and at the end).")
_INIT = flags.DEFINE_string("init", "common", "common | independent client initialisation.")
_PAR = flags.DEFINE_string("client_parallelism", "auto", "auto | vmap | loop | shard.")
_HOST_DEV = flags.DEFINE_integer(
    "host_devices", -1,
    "CPU only: split the host into this many XLA devices, one per core, for the 'shard' "
    "strategy (-1 = one per available core; 0 = leave XLA's default of one device).")
_BN = flags.DEFINE_string("use_bn", "auto", "auto (BN iff 3 input channels) | true | false.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_QUIET = flags.DEFINE_bool("quiet", False, "Only print the final table (no per-round progress lines).")
_CKPT = flags.DEFINE_integer("checkpoint_every", 10, "Checkpoint every this many rounds (and at the end); 0 = only at the end. Re-running with the same --workdir resumes.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Discard what --workdir holds (another run's config, checkpoints, metrics) and start over.")
_TB = flags.DEFINE_bool("tensorboard", True, "Write TensorBoard event files to WORKDIR/tb.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 1, "One progress line every this many rounds (0 = only at evaluations).")
_COORD = flags.DEFINE_string(
    "coordinator_address", "",
    "Multi-process runs: host:port of process 0, the same for every process (process 0 "
    "listens there). experiments.launch sets it for local processes.")
_NPROC = flags.DEFINE_string(
    "num_processes", "1",
    "Processes of the run, each with its own devices, all on one global mesh: 1 | N | auto "
    "(jax.distributed detects SLURM, Open MPI, Kubernetes, Cloud TPU).")
_PID = flags.DEFINE_integer("process_id", 0, "Multi-process runs: this process, 0..num_processes-1.")
_DIST_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", 60,
    "Multi-process runs: seconds for every process to join (then one error line and exit 2).")
_CACHE = flags.DEFINE_string(
    "compilation_cache", None,
    "JAX's persistent compilation cache directory, shared by all runs (default: "
    "$PFEDLA_JAX_COMPILATION_CACHE, else ~/.cache/pfedla_jax/jax); '' turns it off.")


def define_algorithm_flags(flag_values=flags.FLAGS) -> None:
    """One flag per field of every registered algorithm's config (registry.config_fields):
    --<algorithm>_<field>, or the name the field's metadata gives (pFedLA: --hn_lr, ...)."""
    owner: dict[str, str] = {}
    for name in algorithm_names():
        for field in config_fields(name):
            if field.flag in owner or field.flag in flag_values:
                raise ValueError(f"flag --{field.flag} of algorithm {name!r} is already defined "
                                 f"(by {owner.get(field.flag, 'experiments.run')})")
            owner[field.flag] = name
            define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                      float: flags.DEFINE_float}.get(type(field.default), flags.DEFINE_string)
            define(field.flag, field.default, field.help, flag_values=flag_values)


define_algorithm_flags()


def algorithm_config_from_flags(name: str, flag_values=flags.FLAGS):
    """The config of algorithm `name` with every field taken from its flag."""
    from pfedla_jax.algorithms import algorithm_class
    from pfedla_jax.algorithms.registry import replace_path

    config = algorithm_class(name).config_class()
    for field in config_fields(name):
        config = replace_path(config, field.path, flag_values[field.flag].value)
    return config


def _config(strict: bool = True):
    """The ExperimentConfig of the parsed flags.

    With `strict`, an option flag of an algorithm other than --algorithm is an error (it
    would silently do nothing); experiments.sweep passes strict=False (its runs switch
    algorithms and take each algorithm's options from the flags).
    """
    from pfedla_jax.core.local_training import LocalTrainConfig
    from pfedla_jax.training.config import ExperimentConfig

    chosen = _A.value
    if chosen not in algorithm_names():
        fail(f"unknown --algorithm {chosen!r}; expected one of {', '.join(algorithm_names())}")
    if strict:
        for other in algorithm_names():
            for field in config_fields(other) if other != chosen else ():
                if flags.FLAGS[field.flag].present:
                    fail(f"--{field.flag} is an option of --algorithm={other}, not of --algorithm={chosen}")
    return ExperimentConfig(
        algorithm=chosen, dataset=_DATASET.value,
        partition=_PARTITION.value, classes_per_client=_K.value, dominant_classes=_DOM.value,
        dominant_share=_SHARE.value, dirichlet_alpha=_DIR_ALPHA.value,
        min_client_size=_MIN_SIZE.value, samples_per_client=_SPC.value,
        synthetic_per_class=_SYN.value, num_clients=_N.value, rounds=_ROUNDS.value,
        participation=_P.value, eval_every=_EVAL.value, seed=_SEED.value, init=_INIT.value,
        train=LocalTrainConfig(batch_size=_B.value, local_epochs=_E.value, local_steps=_STEPS.value,
                               lr=_LR.value, momentum=_MOM.value, weight_decay=_WD.value),
        use_bn=_BN.value, algorithm_config=algorithm_config_from_flags(chosen))


def _run_options():
    from pfedla_jax.training.config import RunOptions

    return RunOptions(checkpoint_every=_CKPT.value, overwrite=_OVERWRITE.value,
                      tensorboard=_TB.value, log_every=_LOG_EVERY.value,
                      client_parallelism=_PAR.value, data_dir=_DATA_DIR.value,
                      compilation_cache_dir=_CACHE.value)


def set_host_devices(count: int) -> None:
    """One XLA CPU device per core (measured faster than XLA's intra-op threads, BUILD_NOTES).

    Must run before JAX initialises its CPU backend (jax may already be imported: importing
    touches no device); a no-op if XLA_FLAGS already sets a device count.
    Only affects the CPU platform (GPU/TPU runs are unchanged).
    """
    if count < -1:
        fail(f"--host_devices must be -1, 0 or a positive count, got {count}")
    if count == -1:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    flags_now = os.environ.get("XLA_FLAGS", "")
    if count > 1 and "xla_force_host_platform_device_count" not in flags_now:
        os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={count}".strip()


def start(argv) -> None:
    """Common start of every experiments/ app: no stray arguments, host devices, quiet logs.

    Runs before any device is used (host devices must be set first).
    """
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    set_host_devices(_HOST_DEV.value)
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend-probe INFO lines off stderr


def join_processes(config) -> None:
    """Multi-process runs (--num_processes): joins the cluster before any device is used.

    Bad combinations of the flags fail here, before anything waits for other processes."""
    from pfedla_jax.core import multihost
    from pfedla_jax.errors import UserInputError

    try:
        count = multihost.parse_num_processes(_NPROC.value)
        if count != 1:
            config.validate()  # its own errors before the process count's
        multihost.check_arguments(_COORD.value, count, _PID.value, config.clients_per_round)
        multihost.initialize(_COORD.value, count, _PID.value, _DIST_TIMEOUT.value)
        if count is None:  # auto: the count is known only now
            multihost.check_arguments("", None, 0, config.clients_per_round,
                                      joined=multihost.process_count())
    except UserInputError as e:
        fail(str(e))


def main(argv):
    start(argv)
    from pfedla_jax.core import multihost
    from pfedla_jax.errors import UserInputError
    from pfedla_jax.training.loop import format_table, run_experiment

    try:
        config = _config()
    except UserInputError as e:
        fail(str(e))
    join_processes(config)
    # one process speaks for the run (the others' output: experiments.launch's log files)
    primary = multihost.is_primary()
    quiet = _QUIET.value or not primary
    try:
        summary = run_experiment(config, _WORKDIR.value,
                                 log=(lambda s: None) if quiet else None, options=_run_options())
    except UserInputError as e:
        if multihost.process_count() == 1:
            fail(str(e))
        # several processes: the others may be waiting in a collective; exit at once rather
        # than in JAX's shutdown barrier (experiments.launch stops them on this line)
        print(f"error: {e}" if primary else f"error: process {multihost.process_index()}: {e}",
              file=sys.stderr, flush=True)
        os._exit(2)
    if not primary:
        return
    print(format_table(summary), flush=True)
    if _WORKDIR.value:
        print(f"metrics: {os.path.join(_WORKDIR.value, 'metrics.jsonl')}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
