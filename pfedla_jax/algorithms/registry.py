"""Algorithms by name: `@register(name, config_class)` on the class, `algorithm_class(name)`.

Adding an algorithm is writing one module under `pfedla_jax/algorithms/` (imported
automatically by the package) or anywhere else (`--import=my_package.my_module` on the
command line, or imported before `run_experiment`):

    @dataclasses.dataclass(frozen=True)
    class MyConfig(AlgorithmConfig):
        mu: float = 0.01            # CLI: --mine_mu, sweep/library override: mine.mu=0.1
        def validate(self): ...     # raise UserInputError on bad values

    @register("mine", MyConfig)
    class Mine(Algorithm):
        ...

The experiment holds the chosen algorithm's config only (`ExperimentConfig.
algorithm_config`); the command line defines one flag per config field, named
`--<algorithm>_<field>` (nested dataclasses: `--<algorithm>_<group>_<field>`), with the
field's `metadata={'help': ..., 'alias': ...}` as its help text and an additional name
(pFedLA keeps its historical names this way, e.g. --hn_lr).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from pfedla_jax.algorithms.base import AlgorithmConfig, NoConfig
from pfedla_jax.errors import UserInputError

_CLASSES: dict[str, type] = {}


def register(name: str, config_class: type | None = None):
    """Class decorator: registers an `Algorithm` subclass under `name`.

    Args:
      name: the algorithm's name (--algorithm=NAME), lower case, a valid identifier.
      config_class: a frozen dataclass subclassing `base.AlgorithmConfig` (default: no
        options).

    Raises:
      ValueError: the name is taken by another class, or is not an identifier.
      TypeError: `config_class` is not an `AlgorithmConfig` dataclass.
    """
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"algorithm name must be a lower-case identifier, got {name!r}")
    if config_class is not None and not (isinstance(config_class, type)
                                         and issubclass(config_class, AlgorithmConfig)
                                         and dataclasses.is_dataclass(config_class)):
        raise TypeError(f"the config of algorithm {name!r} must be a frozen dataclass subclassing "
                        f"pfedla_jax.algorithms.AlgorithmConfig, got {config_class!r}")

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
      flag: the flag name, `<algorithm>_<path with _>`, e.g. 'pfedla_hn_embed_dim'.
      default: the default value (bool, int, float or str).
      help: the help text.
      alias: an additional flag name from the field's metadata (pFedLA: 'hn_embed_dim'), or ''.
    """

    path: str
    flag: str
    default: Any
    help: str
    alias: str = ""


def config_fields(algorithm: str) -> Iterator[ConfigField]:
    """The leaf fields of `algorithm`'s config class, with their flag names."""
    cls = algorithm_class(algorithm).config_class

    def walk(klass, prefix: str):
        instance = klass()
        for f in dataclasses.fields(klass):
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(type(value), f"{prefix}{f.name}.")
                continue
            path = prefix + f.name
            yield ConfigField(path=path, flag=f"{algorithm}_{path.replace('.', '_')}",
                              default=value, help=f.metadata.get("help", f"{algorithm}: {f.name}."),
                              alias=f.metadata.get("alias", ""))

    yield from walk(cls, "")


def replace_path(config: Any, path: str, value: Any) -> Any:
    """`config` with the dotted field `path` set to `value` (see `replace_paths`)."""
    return replace_paths(config, {path: value})


def replace_paths(config: Any, values: dict[str, Any], _prefix: str = "") -> Any:
    """`config` with every dotted field of `values` set (nested frozen dataclasses).

    Each dataclass on the way is rebuilt once with all its new values, so a config whose
    constructor checks itself is checked once, on the final combination (the order of
    `values` does not matter). Numbers are converted to the field's type (an int field
    refuses 0.5); a field holding a dataclass may be given a whole new instance (or None).

    Raises:
      UserInputError: unknown field, a group instead of a field, a value of the wrong type,
        or (from the config's constructor) an invalid result.
    """
    names = {f.name for f in dataclasses.fields(config)}
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if head not in names:
            raise UserInputError(f"unknown config field {_prefix + path!r} of {type(config).__name__} "
                                 f"(fields: {', '.join(sorted(names))})")
        current = getattr(config, head)
        if rest:
            if not dataclasses.is_dataclass(current):
                raise UserInputError(f"config field {_prefix + head!r} has no field {rest!r}")
            nested.setdefault(head, {})[rest] = value
        elif dataclasses.is_dataclass(current) or (current is None and dataclasses.is_dataclass(value)):
            if value is not None and not dataclasses.is_dataclass(value):
                raise UserInputError(f"config field {_prefix + path!r} is a group; set one of its "
                                     f"fields ({_prefix + path}.NAME=...)")
            direct[head] = value
        else:
            direct[head] = coerce(_prefix + path, current, value)
    for head, sub in nested.items():
        base = direct[head] if direct.get(head) is not None else getattr(config, head)
        direct[head] = replace_paths(base, sub, f"{_prefix}{head}.")
    return dataclasses.replace(config, **direct)


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
