"""Algorithms by name: `@register(name, config_class)` on the class, `algorithm_class(name)`.

Adding an algorithm is writing one module under `pfedla_jax/algorithms/` (imported
automatically by the package) or anywhere else (imported before the run):

    @dataclasses.dataclass(frozen=True)
    class MyConfig:
        mu: float = 0.01            # CLI: --mine_mu, sweep/library override: mine.mu=0.1
        def validate(self): ...     # raise UserInputError on bad values

    @register("mine", MyConfig)
    class Mine(Algorithm):
        ...

The experiment holds the chosen algorithm's config only (`ExperimentConfig.
algorithm_config`), validated before any data loads; the CLI defines one flag per config
field, named `--<algorithm>_<field>` (nested dataclasses: `--<algorithm>_<group>_<field>`),
or the name in the field's `metadata={'flag': ...}` (pFedLA keeps its historical names,
e.g. --hn_lr). `metadata={'help': ...}` is the flag's help text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from pfedla_jax.errors import UserInputError

_CLASSES: dict[str, type] = {}


def register(name: str, config_class: type | None = None):
    """Class decorator: registers an `Algorithm` subclass under `name`.

    Args:
      name: the algorithm's name (--algorithm=NAME), lower case, a valid identifier.
      config_class: a frozen dataclass with `validate()` (default: no options).

    Raises:
      ValueError: the name is taken by another class, or is not an identifier.
    """
    from pfedla_jax.algorithms.base import NoConfig

    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"algorithm name must be a lower-case identifier, got {name!r}")

    def deco(cls):
        old = _CLASSES.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"algorithm {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        cls.name = name
        cls.config_class = config_class or NoConfig
        _CLASSES[name] = cls
        return cls

    return deco


def unregister(name: str) -> None:
    """Removes `name` (tests that register toy algorithms clean up with it)."""
    _CLASSES.pop(name, None)


def algorithm_names() -> tuple[str, ...]:
    return tuple(sorted(_CLASSES))


def algorithm_class(name: str) -> type:
    """The class registered as `name`.

    Raises:
      UserInputError: no such algorithm.
    """
    try:
        return _CLASSES[name]
    except KeyError:
        raise UserInputError(f"unknown --algorithm {name!r}; expected one of "
                             f"{', '.join(algorithm_names())}") from None


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """One (possibly nested) field of an algorithm's config, as the CLI sees it.

    Attributes:
      path: dotted path inside the config, e.g. 'hn.embed_dim'.
      flag: the flag name, e.g. 'hn_embed_dim' or 'pfedhn_embed_dim'.
      default: the default value (bool, int, float or str).
      help: the help text.
    """

    path: str
    flag: str
    default: Any
    help: str


def config_fields(algorithm: str) -> Iterator[ConfigField]:
    """The leaf fields of `algorithm`'s config class, with their flag names."""
    cls = algorithm_class(algorithm).config_class

    def walk(klass, prefix: str, flag_prefix: str):
        instance = klass()
        for f in dataclasses.fields(klass):
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(type(value), f"{prefix}{f.name}.", f"{flag_prefix}{f.name}_")
                continue
            yield ConfigField(path=prefix + f.name,
                              flag=f.metadata.get("flag", f"{flag_prefix}{f.name}"),
                              default=value, help=f.metadata.get("help", f"{algorithm}: {f.name}."))

    yield from walk(cls, "", f"{algorithm}_")


def replace_path(config: Any, path: str, value: Any) -> Any:
    """`config` with the dotted field `path` set to `value` (nested frozen dataclasses).

    Numbers are converted to the field's type (an int field refuses 0.5).

    Raises:
      UserInputError: unknown field, a group instead of a field, or a value of the wrong type.
    """
    head, _, rest = path.partition(".")
    fields = {f.name for f in dataclasses.fields(config)}
    if head not in fields:
        raise UserInputError(f"unknown config field {path!r} of {type(config).__name__} "
                             f"(fields: {', '.join(sorted(fields))})")
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise UserInputError(f"config field {head!r} has no field {rest!r}")
        return dataclasses.replace(config, **{head: replace_path(current, rest, value)})
    if dataclasses.is_dataclass(current):
        raise UserInputError(f"config field {path!r} is a group; set one of its fields ({path}.NAME=...)")
    return dataclasses.replace(config, **{head: coerce(path, current, value)})


def coerce(path: str, current: Any, value: Any) -> Any:
    """`value` converted to the type of the field's current value."""
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise UserInputError(f"config field {path!r} takes true or false, got {value!r}")
        return value
    if isinstance(current, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value) if not value.lstrip("+-").isdigit() else int(value)
            except ValueError:
                raise UserInputError(f"config field {path!r} takes a number, got {value!r}") from None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UserInputError(f"config field {path!r} takes a number, got {value!r}")
        if isinstance(current, int):
            if not float(value).is_integer():
                raise UserInputError(f"config field {path!r} takes an integer, got {value!r}")
            return int(value)
        return float(value)
    if current is None or isinstance(current, str):
        return value if current is None or isinstance(value, str) else str(value)
    return value
