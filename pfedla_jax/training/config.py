"""What an experiment computes (`ExperimentConfig`) and how a run is executed (`RunOptions`).

`ExperimentConfig` is pinned in the workdir (a resumed run must match it); `RunOptions`
(checkpoint cadence, logging, client parallelism, data directory, compilation cache)
change how a run executes, not what it computes, and are not pinned.

The config holds only the chosen algorithm's options (`algorithm_config`, an instance of
the class the algorithm registered). `apply_overrides` sets any field by a dotted name:
`rounds=50`, `train.lr=0.01`, `pfedla.hn_lr=0.1`, `pfedla.hn.normalization=softmax` (the
algorithm's own fields are prefixed with its name), `algorithm=local` (which switches to
that algorithm's config).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

from pfedla_jax.algorithms.base import INITS
from pfedla_jax.algorithms.registry import algorithm_class, algorithm_names, replace_path
from pfedla_jax.core.client_parallel import STRATEGIES
from pfedla_jax.core.local_training import LocalTrainConfig
from pfedla_jax.errors import UserInputError

COMPILATION_CACHE_ENV = "PFEDLA_JAX_COMPILATION_CACHE"


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything that determines a run's numbers (pinned in WORKDIR/config.json).

    `algorithm_config` is the chosen algorithm's config (None: its defaults).
    """

    algorithm: str = "fedavg"
    # data
    dataset: str = "fmnist"
    partition: str = "noniid1"      # a scheme (data/partition.py) or file:PATH (data/partition_file.py)
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
    use_bn: str = "auto"             # auto | true | false
    # the chosen algorithm's options
    algorithm_config: Any = None

    def __post_init__(self):
        if self.algorithm_config is None:
            try:
                default = algorithm_class(self.algorithm).config_class()
            except UserInputError:
                return  # validate() reports the unknown name
            object.__setattr__(self, "algorithm_config", default)

    def validate(self) -> None:
        """Raises UserInputError on any bad setting (before any data is loaded)."""
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
        if self.samples_per_client < 0:
            raise UserInputError(f"--samples_per_client must be >= 0, got {self.samples_per_client}")
        self.train.validate()
        self.algorithm_config.validate()
        # options that must fit the local training (e.g. FedRep's head/body epoch split)
        fits = getattr(self.algorithm_config, "validate_training", None)
        if fits is not None:
            fits(self.train)

    @property
    def clients_per_round(self) -> int:
        return max(1, int(round(self.participation * self.num_clients)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; the algorithm's options under the algorithm's name."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "algorithm_config"}
        out["train"] = dataclasses.asdict(self.train)
        out[self.algorithm] = dataclasses.asdict(self.algorithm_config)
        return out


def with_algorithm(config: ExperimentConfig, name: str, algorithm_config: Any = None) -> ExperimentConfig:
    """`config` for algorithm `name` with `algorithm_config` (default: that algorithm's defaults)."""
    algorithm_class(name)  # unknown -> UserInputError
    return dataclasses.replace(config, algorithm=name, algorithm_config=algorithm_config)


def apply_overrides(config: ExperimentConfig, overrides: Iterable[tuple[str, Any]] | dict[str, Any],
                    algorithm_config_for: Callable[[str], Any] | None = None) -> ExperimentConfig:
    """`config` with dotted fields set (values may be strings: converted to the field's type).

    Args:
      config: the base config.
      overrides: {name: value} or (name, value) pairs: 'rounds', 'train.lr',
        '<algorithm>.<field>' (e.g. 'pfedla.hn_lr', 'pfedla.hn.embed_dim'), 'algorithm'
        (applied first; switches to that algorithm's config).
      algorithm_config_for: the config an `algorithm=NAME` override starts from (e.g. the
        CLI's flags for NAME); default: NAME's defaults.

    Raises:
      UserInputError: unknown field or algorithm, a value of the wrong type, or options of an
        algorithm other than the chosen one.
    """
    items = list(overrides.items() if isinstance(overrides, dict) else overrides)
    for key, value in items:
        if key == "algorithm":
            config = with_algorithm(config, str(value),
                                    algorithm_config_for(str(value)) if algorithm_config_for else None)
    for key, value in items:
        if key == "algorithm":
            continue
        head, _, rest = key.partition(".")
        if head == "algorithm_config":
            raise UserInputError(f"set the algorithm's options as {config.algorithm}.FIELD=..., not {key}")
        if head in algorithm_names() and not hasattr(config, head):
            if head != config.algorithm:
                raise UserInputError(f"{key!r} is an option of --algorithm={head}, but the algorithm "
                                     f"is {config.algorithm}")
            if not rest:
                raise UserInputError(f"{key!r}: name a field ({head}.FIELD=...)")
            config = dataclasses.replace(
                config, algorithm_config=replace_path(config.algorithm_config, rest, value))
        else:
            config = replace_path(config, key, value)
    return config


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
      data_dir: dataset directory (fmnist IDX files or TFDS data_dir); None = the default.
      compilation_cache_dir: JAX's persistent compilation cache, shared by all runs (a
        second run of a configuration starts without compiling); None = the environment
        variable PFEDLA_JAX_COMPILATION_CACHE, else ~/.cache/pfedla_jax/jax (XDG_CACHE_HOME
        respected); '' = off.
    """

    checkpoint_every: int = 10
    overwrite: bool = False
    tensorboard: bool = True
    log_every: int = 1
    client_parallelism: str = "auto"
    data_dir: str | None = None
    compilation_cache_dir: str | None = None

    def validate(self) -> None:
        if self.checkpoint_every < 0:
            raise UserInputError(f"--checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.log_every < 0:
            raise UserInputError(f"--log_every must be >= 0, got {self.log_every}")
        if self.client_parallelism not in STRATEGIES:
            raise UserInputError(f"unknown --client_parallelism {self.client_parallelism!r}; "
                                 f"expected one of {', '.join(STRATEGIES)}")


def compilation_cache_dir(option: str | None) -> str:
    """The cache directory an option means ('' = disabled)."""
    if option is not None:
        return option
    env = os.environ.get(COMPILATION_CACHE_ENV)
    if env is not None:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pfedla_jax", "jax")


def enable_compilation_cache(option: str | None) -> str:
    """Turns JAX's persistent compilation cache on at the directory `option` means.

    Every compiled program is cached (no minimum compile time), keyed by JAX on the program,
    its shapes, devices, flags and versions, so any run of a configuration already compiled
    once (another seed, another workdir) loads its programs instead of compiling them.
    Returns the directory ('' if disabled). Off in a run over several processes.
    """
    import jax

    path = compilation_cache_dir(option)
    if jax.process_count() > 1:
        # off in multi-process runs: in the first trial (jax 0.10.2, CPU, under load) a process
        # with the cache on stalled in its first compilation until the others declared it
        # dead; each process compiles for itself (BUILD_NOTES §11)
        path = ""
    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
        return ""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot create the compilation cache directory {path!r}: "
                             f"{e.strerror or e}") from None
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        from jax._src import compilation_cache

        compilation_cache.reset_cache()  # picks up the new directory
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
