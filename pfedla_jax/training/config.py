"""What an experiment computes (`ExperimentConfig`) and how a run is executed (`RunOptions`).

The one place options are defined and checked. Every field carries its default, its help
text and its command-line section in the field's metadata; `training/command_line.py`
generates `experiments.run`'s flags from these dataclasses (and from each algorithm's
config), so a default is written once. Each config is checked when it is built
(`__post_init__` runs `validate`): a config that exists is valid, and the engine trusts it.

`ExperimentConfig` is pinned in the workdir (a resumed run must match it); `RunOptions`
(checkpoint cadence, logging, client parallelism, devices, data directory, compilation
cache) change how a run executes, not what it computes, and are not pinned.

The config holds only the chosen algorithm's options (`algorithm_config`, an instance of
the class the algorithm registered). `apply_overrides` sets fields by dotted name:
`rounds=50`, `train.lr=0.01`, `pfedla.hn_lr=0.1`, `pfedla.hn.normalization=softmax` (the
algorithm's own fields are prefixed with its name), `algorithm=local` (which switches to
that algorithm's config).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

from pfedla_jax.algorithms.base import INITS
from pfedla_jax.algorithms.registry import algorithm_class, algorithm_names, replace_paths
from pfedla_jax.core.client_parallel import STRATEGIES
from pfedla_jax.core.local_training import LocalTrainConfig
from pfedla_jax.errors import UserInputError

# command-line sections, in --help order (the algorithms' sections come after "local training")
DATA, SCHEDULE, TRAINING, MODEL, RUN = "data", "federated schedule", "local training", "model", "run"


def option(default: Any, help_text: str, section: str, flag: str | None = None) -> Any:
    """A config field with its help text, command-line section and (if not the field's
    name) flag name, read by `training/command_line.py`."""
    metadata = {"help": help_text, "section": section}
    if flag is not None:
        metadata["flag"] = flag
    return dataclasses.field(default=default, metadata=metadata)


def cohort_size(participation: float, num_clients: int) -> int:
    """Clients per round: m = max(floor(C * K), 1), FedAvg's rule (McMahan et al., AISTATS
    2017, Algorithm 1: "m <- max(C * K, 1)", a whole number of clients; its reference codes
    take `max(int(C * K), 1)`). C * K within 1e-9 of a whole number counts as that number,
    so a fraction written in decimal gives its exact product (0.29 x 100 = 29, although the
    binary product is 28.999999999999996).

    Args:
      participation: C, the fraction of clients per round, in (0, 1].
      num_clients: K >= 1.

    Returns:
      m, between 1 and K: 0.25 x 10 -> 2, 0.35 x 10 -> 3, 0.05 x 10 -> 1, 1.0 x K -> K.
    """
    return max(1, math.floor(participation * num_clients + 1e-9))


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything that determines a run's numbers (pinned in WORKDIR/config.json).

    `algorithm_config` is the chosen algorithm's config (None: its defaults).

    Raises (constructor): UserInputError on any bad setting, before any data is loaded
    (e.g. `ExperimentConfig(rounds=0)`); the data-dependent checks (a partition the
    dataset cannot fill, a dataset that is not there) come when the experiment is built.
    """

    algorithm: str = option("fedavg", "The method (see the algorithm sections below; "
                            "HeurpFedLA: pfedla with --pfedla_heur_k > 0).", "algorithm")
    # data
    dataset: str = option("fmnist", "fmnist | synthetic | synthetic_rgb | tfds:<name>.", DATA)
    partition: str = option(
        "noniid1", "A partition scheme (data/partition/), or file:PATH (a run's "
        "WORKDIR/partition.json, or a file in its format).", DATA)
    classes_per_client: int = option(4, "noniid1 / adjacent / fig5: classes per client.", DATA)
    dominant_classes: int = option(2, "noniid2: dominant classes per client.", DATA)
    dominant_share: float = option(0.8, "noniid2: share of a client's data in its dominant "
                                   "classes.", DATA)
    dirichlet_alpha: float = option(0.5, "dirichlet: concentration.", DATA)
    min_client_size: int = option(10, "dirichlet: minimum examples per client.", DATA)
    samples_per_client: int = option(0, "Examples per client (train+test); 0 = the largest "
                                     "the data allows.", DATA)
    synthetic_per_class: int = option(600, "synthetic datasets: examples per class.", DATA)
    num_clients: int = option(10, "Number of clients.", DATA)
    validation_fraction: float = option(
        0.0, "Hold out this share of each client's training split (per class) as its "
        "validation split: training uses the rest, evaluations add val_acc and val_loss of "
        "the personalised models (data/validation.py). 0 = none.", DATA)
    # federated schedule
    rounds: int = option(20, "Communication rounds.", SCHEDULE)
    participation: float = option(1.0, "Fraction C of the clients per round: max(floor(C * "
                                  "num_clients), 1) clients (FedAvg's rule).", SCHEDULE)
    eval_every: int = option(1, "Evaluate every this many rounds (and at the end).", SCHEDULE)
    evaluate_test: bool = option(True, "Evaluate on the test split. false (needs "
                                 "--validation_fraction > 0): the test split is not even "
                                 "loaded to the device; the run reports val_acc only (tuning).",
                                 SCHEDULE)
    seed: int = option(0, "Seed for partition, init, schedule and shuffling.", SCHEDULE)
    init: str = option("common", "common | independent client initialisation.", SCHEDULE)
    # local training (flags: the fields of LocalTrainConfig)
    train: LocalTrainConfig = dataclasses.field(default=LocalTrainConfig(),
                                                metadata={"section": TRAINING})
    use_bn: str = option("auto", "auto (BatchNorm iff 3 input channels) | true | false.", MODEL)
    # the chosen algorithm's options (flags: --<algorithm>_<field>)
    algorithm_config: Any = None

    def __post_init__(self) -> None:
        cls = algorithm_class(self.algorithm)  # unknown name -> UserInputError
        if self.algorithm_config is None:
            object.__setattr__(self, "algorithm_config", cls.config_class())
        self.validate()

    def validate(self) -> None:
        """Raises UserInputError on any bad setting (run by the constructor)."""
        cls = algorithm_class(self.algorithm)
        if not isinstance(self.algorithm_config, cls.config_class):
            raise UserInputError(f"--algorithm={self.algorithm} takes a {cls.config_class.__name__}, "
                                 f"got {type(self.algorithm_config).__name__}")
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
        if self.partition.startswith("file:") and not self.partition[len("file:"):].strip():
            raise UserInputError("--partition=file: needs the path of a partition file "
                                 "(--partition=file:PATH.json)")
        if not (0.0 <= self.validation_fraction < 1.0):
            raise UserInputError(f"--validation_fraction must be in [0, 1), got "
                                 f"{self.validation_fraction}")
        if not self.evaluate_test and self.validation_fraction == 0:
            raise UserInputError("--evaluate_test=false needs a validation split to report "
                                 "(--validation_fraction > 0)")
        if self.samples_per_client < 0:
            raise UserInputError(f"--samples_per_client must be >= 0, got {self.samples_per_client}")
        # the algorithm's options that must fit the local training (e.g. FedRep's epoch split)
        self.algorithm_config.validate_training(self.train)

    @property
    def clients_per_round(self) -> int:
        """m = max(floor(C * K), 1) clients per round, C = participation, K = num_clients:
        FedAvg's rule (McMahan et al., AISTATS 2017, Algorithm 1), as the reference codes
        (`max(int(C * K), 1)`) apply it. See `cohort_size`."""
        return cohort_size(self.participation, self.num_clients)

    @property
    def headline_metric(self) -> str:
        """The metric a run reports first: 'test_acc', or 'val_acc' without test evaluation."""
        return "test_acc" if self.evaluate_test else "val_acc"

    def default_dict(self) -> dict[str, Any]:
        """`to_dict()` of this algorithm's config with every field at its default (a
        workdir made before a field existed counts it at its default)."""
        return ExperimentConfig(algorithm=self.algorithm).to_dict()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; the algorithm's options under the algorithm's name."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "algorithm_config"}
        out["train"] = dataclasses.asdict(self.train)
        out[self.algorithm] = dataclasses.asdict(self.algorithm_config)
        return out


def with_algorithm(config: ExperimentConfig, name: str, algorithm_config: Any = None) -> ExperimentConfig:
    """`config` for algorithm `name` with `algorithm_config` (default: that algorithm's defaults)."""
    return dataclasses.replace(config, algorithm=name, algorithm_config=algorithm_config)


def apply_overrides(config: ExperimentConfig, overrides: Iterable[tuple[str, Any]] | dict[str, Any],
                    algorithm_config_for: Callable[[str], Any] | None = None) -> ExperimentConfig:
    """`config` with dotted fields set (values may be strings: converted to the field's type).

    All overrides are applied at once (the result is checked once, so their order does not
    matter).

    Args:
      config: the base config.
      overrides: {name: value} or (name, value) pairs: 'rounds', 'train.lr',
        '<algorithm>.<field>' (e.g. 'pfedla.hn_lr', 'pfedla.hn.embed_dim'), 'algorithm'
        (switches to that algorithm's config).
      algorithm_config_for: the config an `algorithm=NAME` override starts from (e.g. the
        command line's options for NAME); default: NAME's defaults.

    Raises:
      UserInputError: unknown field or algorithm, a value of the wrong type, options of an
        algorithm other than the chosen one, or a resulting config that is invalid.
    """
    items = list(overrides.items() if isinstance(overrides, dict) else overrides)
    name = config.algorithm
    algorithm_config = config.algorithm_config
    for key, value in items:
        if key == "algorithm":
            name = str(value)
            algorithm_class(name)  # unknown -> UserInputError
            algorithm_config = algorithm_config_for(name) if algorithm_config_for else None
    own: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for key, value in items:
        if key == "algorithm":
            continue
        head, _, rest = key.partition(".")
        if head == "algorithm_config":
            raise UserInputError(f"set the algorithm's options as {name}.FIELD=..., not {key}")
        if head in algorithm_names() and not hasattr(config, head):
            if head != name:
                raise UserInputError(f"{key!r} is an option of --algorithm={head}, but the algorithm "
                                     f"is {name}")
            if not rest:
                raise UserInputError(f"{key!r}: name a field ({head}.FIELD=...)")
            own[rest] = value
        else:
            fields[key] = value
    if own:
        base = algorithm_config if algorithm_config is not None else algorithm_class(name).config_class()
        algorithm_config = replace_paths(base, own)
    fields["algorithm"] = name
    fields["algorithm_config"] = algorithm_config
    return replace_paths(config, fields)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run is executed and recorded (not part of what it computes; not pinned).

    Attributes:
      checkpoint_every: save a checkpoint every this many rounds (and at the end); 0 = only
        at the end. Needs a workdir.
      overwrite: start from scratch in a workdir that holds another run.
      tensorboard: write TensorBoard event files to WORKDIR/tb.
      log_every: one progress line every this many rounds (0 = only evaluations).
      client_parallelism: auto | vmap | loop | shard (core/client_parallel.py).
      host_devices: CPU only: XLA devices to split the host into, one per core, for the
        `shard` strategy (-1 = one per available core; 0 = XLA's default of one device).
        Takes effect only before JAX's first computation in the process
        (`pfedla_jax.runtime.set_host_devices`).
      data_dir: dataset directory (fmnist IDX files or TFDS data_dir); None = the default.
      compilation_cache_dir: JAX's persistent compilation cache, shared by all runs (a
        second run of a configuration starts without compiling); None = the environment
        variable PFEDLA_JAX_COMPILATION_CACHE, else ~/.cache/pfedla_jax/jax (XDG_CACHE_HOME
        respected); '' = off.

    Raises (constructor): UserInputError on a bad value.
    """

    checkpoint_every: int = option(10, "Checkpoint every this many rounds (and at the end); 0 = "
                                   "only at the end. Re-running with the same --workdir resumes.", RUN)
    overwrite: bool = option(False, "Discard what --workdir holds (another run's config, "
                             "checkpoints, metrics) and start over.", RUN)
    tensorboard: bool = option(True, "Write TensorBoard event files to WORKDIR/tb.", RUN)
    log_every: int = option(1, "One progress line every this many rounds (0 = only at "
                            "evaluations).", RUN)
    client_parallelism: str = option("auto", "auto | vmap | loop | shard.", RUN)
    host_devices: int = option(
        -1, "CPU only: split the host into this many XLA devices, one per core, for the 'shard' "
        "strategy (-1 = one per available core; 0 = leave XLA's default of one device).", RUN)
    data_dir: str | None = option(None, "Dataset directory (fmnist IDX files or TFDS data_dir).", DATA)
    compilation_cache_dir: str | None = option(
        None, "JAX's persistent compilation cache directory, shared by all runs (default: "
        "$PFEDLA_JAX_COMPILATION_CACHE, else ~/.cache/pfedla_jax/jax); '' turns it off.", RUN,
        flag="compilation_cache")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.checkpoint_every < 0:
            raise UserInputError(f"--checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.log_every < 0:
            raise UserInputError(f"--log_every must be >= 0, got {self.log_every}")
        if self.client_parallelism not in STRATEGIES:
            raise UserInputError(f"unknown --client_parallelism {self.client_parallelism!r}; "
                                 f"expected one of {', '.join(STRATEGIES)}")
        if self.host_devices < -1:
            raise UserInputError(f"--host_devices must be -1, 0 or a positive count, got "
                                 f"{self.host_devices}")
