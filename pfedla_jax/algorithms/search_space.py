"""Hyperparameter search spaces that live with each algorithm (`Algorithm.search_space`).

An algorithm declares the hyperparameters worth tuning next to its config, each with its
range and the source of that range (the method's paper or reference code)::

    search_space = (CLIENT_LR,
                    LogUniform("beta", 1e-4, 1e-1, source="Per-FedAvg paper, Sec. 5"))

A `path` is a field of the algorithm's own config (dotted for a nested group, e.g.
'hn.embed_dim'), or `train.<field>` for the local training shared by every algorithm
(`train.lr`, `train.local_epochs`). `override_key` turns it into the key of
`training.config.apply_overrides` ('pfedla.hn_lr', 'train.lr') and `override_flags` into
`experiments.run` flags ('--pfedla_hn_lr=0.1', '--lr=0.05'). `experiments.tune` samples
these spaces with Optuna (`suggest`); `check_search_space` refuses a space whose ranges
do not fit the config's `validate()`.

A bound may depend on the experiment (`ConfigBound`): FedRep's body epochs range over
1..E - 1 of the run's local epochs E, e.g.
`IntRange("body_epochs", 1, ConfigBound("local_epochs - 1", lambda c: c.train.local_epochs - 1))`.
`resolve_space(config, space)` turns such bounds into numbers (what is checked and sampled).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from pfedla_jax.errors import UserInputError

KINDS = ("float", "int", "choice")


@dataclasses.dataclass(frozen=True)
class ConfigBound:
    """A range bound computed from the experiment's config (an `ExperimentConfig`).

    Attributes:
      text: how `describe` shows it before it is resolved, e.g. 'local_epochs - 1'.
      of: config -> the bound (a number).
    """

    text: str
    of: Callable[[Any], float]

    def __str__(self) -> str:
        return self.text


def _number(bound: Any) -> bool:
    return not isinstance(bound, ConfigBound)


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """One tuned hyperparameter.

    Attributes:
      path: a field of the algorithm's config ('beta', 'hn.embed_dim') or 'train.<field>'
        (the local training: lr, local_epochs, batch_size, momentum, weight_decay).
      kind: 'float' (low..high), 'int' (low..high, both included) or 'choice' (`choices`).
      low, high: the range of 'float' and 'int' (low <= high; > 0 with `log`); either may
        be a `ConfigBound` (checked once `resolved`).
      log: sample uniformly in log space (learning rates, regularisation weights).
      choices: the values of 'choice' (bool, int, float or str; at least one).
      source: where the range comes from (paper section or reference code), for readers.
    """

    path: str
    kind: str
    low: float | ConfigBound | None = None
    high: float | ConfigBound | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if not self.path or any(not part.isidentifier() for part in self.path.split(".")):
            raise ValueError(f"a hyperparameter path must be a dotted identifier, got {self.path!r}")
        if self.kind not in KINDS:
            raise ValueError(f"hyperparameter {self.path}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice":
            if not self.choices:
                raise ValueError(f"hyperparameter {self.path}: a choice needs at least one value")
            return
        if self.low is None or self.high is None:
            raise ValueError(f"hyperparameter {self.path}: needs low and high")
        if _number(self.low) and _number(self.high) and not self.low <= self.high:
            raise ValueError(f"hyperparameter {self.path}: needs low <= high, got {self.low}, {self.high}")
        if self.log and _number(self.low) and self.low <= 0:
            raise ValueError(f"hyperparameter {self.path}: a log range needs low > 0, got {self.low}")
        if self.kind == "int" and not all(float(b).is_integer() for b in (self.low, self.high) if _number(b)):
            raise ValueError(f"hyperparameter {self.path}: an int range needs integer bounds")

    @property
    def resolved_already(self) -> bool:
        """No bound depends on the config."""
        return _number(self.low) and _number(self.high)

    def resolved(self, config: Any) -> Hyperparameter:
        """This hyperparameter with its `ConfigBound`s computed from `config` (an
        `ExperimentConfig`); itself when it has none.

        Raises:
          UserInputError: the computed range is empty or not positive on a log scale.
        """
        if self.resolved_already:
            return self
        bounds = [b.of(config) if isinstance(b, ConfigBound) else b for b in (self.low, self.high)]
        if self.kind == "int":
            bounds = [int(b) for b in bounds]
        try:
            return dataclasses.replace(self, low=bounds[0], high=bounds[1])
        except ValueError as e:
            raise UserInputError(f"{self.describe()} on this config: {e}") from None

    def values_to_check(self) -> tuple[Any, ...]:
        """The values `check_search_space` builds a config with: both ends, or every choice
        (a range with a `ConfigBound` must be `resolved` first)."""
        if not self.resolved_already:
            raise ValueError(f"hyperparameter {self.path}: resolve its bounds against a config first")
        if self.kind == "choice":
            return self.choices
        if self.kind == "int":
            return (int(self.low), int(self.high))
        return (float(self.low), float(self.high))

    def describe(self) -> str:
        """E.g. 'train.lr ~ log-uniform [0.001, 0.3]'."""
        if self.kind == "choice":
            return f"{self.path} in {{{', '.join(map(str, self.choices))}}}"
        scale = "log-uniform" if self.log else "uniform"
        kind = "int " if self.kind == "int" else ""
        low, high = (f"{b:g}" if _number(b) else str(b) for b in (self.low, self.high))
        return f"{self.path} ~ {kind}{scale} [{low}, {high}]"


def _float(bound: Any) -> Any:
    return float(bound) if _number(bound) else bound


def LogUniform(path: str, low: float | ConfigBound, high: float | ConfigBound,
               source: str = "") -> Hyperparameter:
    """A float sampled uniformly in log space between low and high (both > 0)."""
    return Hyperparameter(path, "float", _float(low), _float(high), log=True, source=source)


def Uniform(path: str, low: float | ConfigBound, high: float | ConfigBound,
            source: str = "") -> Hyperparameter:
    """A float sampled uniformly between low and high."""
    return Hyperparameter(path, "float", _float(low), _float(high), source=source)


def IntRange(path: str, low: int | ConfigBound, high: int | ConfigBound, log: bool = False,
             source: str = "") -> Hyperparameter:
    """An int between low and high, both included."""
    return Hyperparameter(path, "int", low, high, log=log, source=source)


def Choice(path: str, choices: Sequence[Any], source: str = "") -> Hyperparameter:
    """One of `choices`."""
    return Hyperparameter(path, "choice", choices=tuple(choices), source=source)


# The client lr of every method. The paper's 0.005 (pFedLA Sec. 4) and the CPU preset's 0.05
# both lie inside; a shorter budget is absorbed by a larger lr, so the range reaches 0.3.
CLIENT_LR = LogUniform("train.lr", 1e-3, 0.3, source="pFedLA Sec. 4 (0.005); fmnist_e5_cpu (0.05)")


def override_key(algorithm: str, path: str) -> str:
    """The `apply_overrides` key of a search-space path: 'train.lr' -> 'train.lr',
    'beta' of perfedavg -> 'perfedavg.beta'."""
    return path if path.startswith("train.") else f"{algorithm}.{path}"


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def override_flags(overrides: dict[str, Any]) -> list[str]:
    """`experiments.run` flags for `apply_overrides` keys: {'train.lr': 0.05,
    'pfedla.hn_lr': 0.1, 'rounds': 5} -> ['--lr=0.05', '--pfedla_hn_lr=0.1', '--rounds=5']
    (floats written with repr: the run gets the exact value)."""
    out = []
    for key, value in overrides.items():
        if key.startswith("train."):
            flag = key[len("train."):]
        else:
            flag = key.replace(".", "_")
        out.append(f"--{flag}={_flag_value(value)}")
    return out


def search_space(algorithm: str) -> tuple[Hyperparameter, ...]:
    """The search space algorithm `algorithm` declares (`Algorithm.search_space`).

    Raises:
      UserInputError: unknown algorithm.
    """
    from pfedla_jax.algorithms.registry import algorithm_class  # pylint: disable=import-outside-toplevel
    return tuple(algorithm_class(algorithm).search_space)


def resolve_space(config: Any, space: Sequence[Hyperparameter] | None = None
                  ) -> tuple[Hyperparameter, ...]:
    """`space` (default: the algorithm of `config`'s own) with every `ConfigBound` computed
    from `config` (an `ExperimentConfig`).

    Raises:
      UserInputError: an entry that is not a Hyperparameter, or a bound that gives an empty
        range, naming the algorithm.
    """
    algorithm = config.algorithm
    space = search_space(algorithm) if space is None else tuple(space)
    out = []
    for h in space:
        if not isinstance(h, Hyperparameter):
            raise UserInputError(f"the search space of {algorithm} holds {h!r}, not a Hyperparameter")
        try:
            out.append(h.resolved(config))
        except UserInputError as e:
            raise UserInputError(f"the search space of {algorithm} does not fit its config: {e}") from None
    return tuple(out)


def check_search_space(config: Any, space: Sequence[Hyperparameter] | None = None) -> None:
    """Checks that every end of every range (every choice) of `space` (default: the
    algorithm's own; `ConfigBound`s computed from `config`) builds a valid config from
    `config` (an `ExperimentConfig`), the other hyperparameters at `config`'s values.

    Raises:
      UserInputError: a path that is not a field, a duplicate path, or a value the config's
        `validate()` refuses, naming the hyperparameter.
    """
    from pfedla_jax.training.config import apply_overrides  # pylint: disable=import-outside-toplevel
    algorithm = config.algorithm
    space = resolve_space(config, space)
    seen = set()
    for h in space:
        if h.path in seen:
            raise UserInputError(f"the search space of {algorithm} names {h.path} twice")
        seen.add(h.path)
        key = override_key(algorithm, h.path)
        for value in h.values_to_check():
            try:
                apply_overrides(config, {key: value})
            except UserInputError as e:
                raise UserInputError(f"the search space of {algorithm} does not fit its config: "
                                     f"{h.describe()} at {key}={value!r}: {e}") from None


def suggest(trial: Any, algorithm: str, space: Sequence[Hyperparameter]) -> dict[str, Any]:
    """One point of `space` (resolved: `resolve_space`), drawn by an Optuna trial:
    {override key: value}.

    Optuna's parameter names are the override keys ('train.lr', 'perfedavg.beta').

    Raises:
      ValueError: a range with an unresolved `ConfigBound`.
    """
    out = {}
    for h in space:
        if not h.resolved_already:
            raise ValueError(f"hyperparameter {h.path}: resolve its bounds against a config first")
        key = override_key(algorithm, h.path)
        if h.kind == "choice":
            out[key] = trial.suggest_categorical(key, list(h.choices))
        elif h.kind == "int":
            out[key] = trial.suggest_int(key, int(h.low), int(h.high), log=h.log)
        else:
            out[key] = trial.suggest_float(key, h.low, h.high, log=h.log)
    return out

