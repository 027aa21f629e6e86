r"""Train a federated algorithm and write per-round metrics.

Example (the README's main job):

  python -m experiments.run --algorithm=pfedla --dataset=fmnist --partition=noniid1 \
      --classes_per_client=4 --num_clients=10 --rounds=20 --local_epochs=1 \
      --batch_size=32 --lr=0.005 --participation=1.0 --seed=0 --workdir=runs/pfedla

Writes WORKDIR/metrics.jsonl (one JSON object per evaluated round), metrics.csv, TensorBoard
events (tb/), summary.json, and for pFedLA alpha.npz; checkpoints every --checkpoint_every
rounds. Re-running the same command with the same --workdir resumes from the latest
checkpoint. Flags can come from a file: --flagfile=FILE.
Bad flags or inputs print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

_A = flags.DEFINE_string("algorithm", "fedavg", "local | fedavg | pfedla (HeurpFedLA: pfedla with --heur_k>0).")
_DATASET = flags.DEFINE_string("dataset", "fmnist", "fmnist | synthetic | synthetic_rgb | tfds:<name>.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset directory (fmnist IDX files or TFDS data_dir).")
_PARTITION = flags.DEFINE_string("partition", "noniid1", "noniid1 | noniid2 | adjacent (paper Fig. 6) | dirichlet | iid.")
_K = flags.DEFINE_integer("classes_per_client", 4, "noniid1 / adjacent: classes per client.")
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
# pFedLA
_HN_LR = flags.DEFINE_float("hn_lr", 0.5, "pFedLA: hypernetwork learning rate (public code: 5e-3, which leaves alpha near uniform; BUILD_NOTES).")
_HN_OPT = flags.DEFINE_string("hn_optimizer", "sgd", "pFedLA: sgd | adam.")
_HN_MOM = flags.DEFINE_float("hn_momentum", 0.0, "pFedLA: hypernetwork SGD momentum.")
_HN_EMB = flags.DEFINE_integer("hn_embed_dim", 100, "pFedLA: embedding size.")
_HN_HID = flags.DEFINE_integer("hn_hidden_dim", 100, "pFedLA: hidden width.")
_HN_LAYERS = flags.DEFINE_integer("hn_num_hidden", 3, "pFedLA: hidden layers.")
_HN_NORM = flags.DEFINE_string("hn_normalization", "relu", "pFedLA: relu (ReLU then divide by sum) | softmax.")
_HN_HEAD = flags.DEFINE_string("hn_head_init", "uniform", "pFedLA: uniform (U(0,1) heads) | torch.")
_GRAN = flags.DEFINE_string("alpha_granularity", "layer", "pFedLA: layer (BN separate) | tensor.")
_SEM = flags.DEFINE_string("round_semantics", "synchronous", "pFedLA: synchronous | sequential.")
_SIGN = flags.DEFINE_string("hn_sign", "descent", "pFedLA: descent (derivation) | flbench (public code's sign).")
_HEUR = flags.DEFINE_integer("heur_k", 0, "HeurpFedLA: layers kept local per client (0 = pFedLA).")


def _config():
    from pfedla_jax.algorithms.pfedla import PFedLAConfig
    from pfedla_jax.core.local_training import LocalTrainConfig
    from pfedla_jax.models.hypernetwork import HNConfig
    from pfedla_jax.training.loop import ExperimentConfig

    return ExperimentConfig(
        algorithm=_A.value, dataset=_DATASET.value, data_dir=_DATA_DIR.value,
        partition=_PARTITION.value, classes_per_client=_K.value, dominant_classes=_DOM.value,
        dominant_share=_SHARE.value, dirichlet_alpha=_DIR_ALPHA.value,
        min_client_size=_MIN_SIZE.value, samples_per_client=_SPC.value,
        synthetic_per_class=_SYN.value, num_clients=_N.value, rounds=_ROUNDS.value,
        participation=_P.value, eval_every=_EVAL.value, seed=_SEED.value, init=_INIT.value,
        train=LocalTrainConfig(batch_size=_B.value, local_epochs=_E.value, local_steps=_STEPS.value,
                               lr=_LR.value, momentum=_MOM.value, weight_decay=_WD.value),
        client_parallelism=_PAR.value, use_bn=_BN.value,
        pfedla=PFedLAConfig(
            hn=HNConfig(embed_dim=_HN_EMB.value, hidden_dim=_HN_HID.value,
                        num_hidden=_HN_LAYERS.value, normalization=_HN_NORM.value,
                        head_init=_HN_HEAD.value),
            hn_lr=_HN_LR.value, hn_optimizer=_HN_OPT.value, hn_momentum=_HN_MOM.value,
            granularity=_GRAN.value, semantics=_SEM.value, hn_sign=_SIGN.value,
            heur_k=_HEUR.value),
    )


def _run_options():
    from pfedla_jax.training.loop import RunOptions

    return RunOptions(checkpoint_every=_CKPT.value, overwrite=_OVERWRITE.value,
                      tensorboard=_TB.value, log_every=_LOG_EVERY.value)


def set_host_devices(count: int) -> None:
    """One XLA CPU device per core (measured faster than XLA's intra-op threads, BUILD_NOTES).

    Must run before jax is imported; a no-op if XLA_FLAGS already sets a device count.
    Only affects the CPU platform (GPU/TPU runs are unchanged).
    """
    if count < -1:
        fail(f"--host_devices must be -1, 0 or a positive count, got {count}")
    if count == -1:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    flags_now = os.environ.get("XLA_FLAGS", "")
    if count > 1 and "xla_force_host_platform_device_count" not in flags_now:
        os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={count}".strip()


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def start(argv) -> None:
    """Common start of every experiments/ app: no stray arguments, host devices, quiet logs.

    Runs before jax is imported (host devices must be set first).
    """
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    set_host_devices(_HOST_DEV.value)
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend-probe INFO lines off stderr


def main(argv):
    start(argv)
    from pfedla_jax.errors import UserInputError
    from pfedla_jax.training.loop import format_table, run_experiment

    quiet = _QUIET.value
    try:
        summary = run_experiment(_config(), _WORKDIR.value,
                                 log=(lambda s: None) if quiet else None, options=_run_options())
    except UserInputError as e:
        fail(str(e))
    print(format_table(summary), flush=True)
    if _WORKDIR.value:
        print(f"metrics: {os.path.join(_WORKDIR.value, 'metrics.jsonl')}", flush=True)


def parse_flags(argv):
    """absl parsing with a one-line error instead of absl's usage dump."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
