"""Partition schemes by name, and the two entry points that run one.

A scheme is one module that registers a `Scheme`: its name, the parameters it takes, a
one-line description and its two functions. The modules of this package are imported by
the package, so a new module there is a new scheme; a module anywhere else registers its
scheme when it is imported::

    def clients(pool, rng, samples_per_client, *, group_size=3):
        ...  # check, draw from `rng`, return (per-client index arrays, total)

    def max_samples_per_client(pool, rng, *, group_size=3):
        ...

    register_scheme(Scheme(
        name="groups", description="...", parameters=("group_size",),
        clients=clients, max_samples_per_client=max_samples_per_client))

Everything that lists schemes derives the list from here: `scheme_names()` (the
package's `SCHEMES`), `scheme_parameters(name)`, and the parameter table of partition
files (`partition_file`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import numpy as np

from pfedla_jax.data.partition.common import (TRAIN_FRACTION, Partition, check_pool,
                                              split_train_test)
from pfedla_jax.errors import UserInputError

# Arguments of make_partition that every scheme shares; no scheme parameter may take
# one of these names.
COMMON_ARGUMENTS = ("labels", "num_classes", "num_clients", "scheme", "samples_per_client",
                    "train_fraction", "seed")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A partition scheme, as registered.

    Attributes:
        name: The scheme's name (``--partition=NAME``), a non-empty string without ':'.
        description: One line for help texts: the layout and its source.
        parameters: The keyword parameters the scheme takes besides the common arguments
            (samples_per_client, train_fraction, seed), named like the ExperimentConfig
            fields that set them (e.g. ``classes_per_client``); their defaults are those
            of the two functions.
        clients: ``clients(pool, rng, samples_per_client, **parameters) -> (clients,
            total)``: checks the parameters and samples_per_client (None: the largest
            feasible size, or the scheme's own default), draws from `rng` (the partition's
            `np.random.Generator`, seeded by make_partition) and returns per client the
            int indices into ``pool.labels`` (distinct over all clients, >= 2 per
            client) and the Partition's samples_per_client (an int, or None when sizes
            vary). `split_train_test` then splits each client, drawing from the same rng.
            Raises UserInputError on bad values or an infeasible request.
        max_samples_per_client: ``max_samples_per_client(pool, rng, **parameters) ->
            int``: the largest samples_per_client `clients` accepts with these parameters
            and a generator seeded the same (so random choices made before the size, like
            class sets, must be drawn the same way in both). Raises UserInputError when
            no size is feasible.
        order: Position in `scheme_names()` (ties: registration order). The built-in
            schemes use 10..60 (the paper's schemes first); others default to 100.
    """

    name: str
    description: str
    parameters: tuple[str, ...]
    clients: Callable[..., tuple[list[np.ndarray], int | None]]
    max_samples_per_client: Callable[..., int]
    order: int = 100

    def validate(self) -> None:
        """Raises ValueError / TypeError on a malformed scheme (a programming error)."""
        if not isinstance(self.name, str) or not self.name or ":" in self.name:
            raise ValueError(f"a scheme name must be a non-empty string without ':', "
                             f"got {self.name!r}")
        if not isinstance(self.parameters, tuple) or not all(
                isinstance(p, str) and p.isidentifier() for p in self.parameters):
            raise TypeError(f"scheme {self.name!r}: parameters must be a tuple of identifiers, "
                            f"got {self.parameters!r}")
        if len(set(self.parameters)) != len(self.parameters):
            raise ValueError(f"scheme {self.name!r}: parameters repeat: {self.parameters}")
        clash = [p for p in self.parameters if p in COMMON_ARGUMENTS]
        if clash:
            raise ValueError(f"scheme {self.name!r}: {', '.join(clash)} is an argument of every "
                             f"scheme, not a scheme parameter")
        for fn in (self.clients, self.max_samples_per_client):
            if not callable(fn):
                raise TypeError(f"scheme {self.name!r}: {fn!r} is not callable")
            accepted = inspect.signature(fn).parameters.values()
            if any(p.kind is p.VAR_KEYWORD for p in accepted):
                continue
            names = {p.name for p in accepted if p.kind in (p.KEYWORD_ONLY,
                                                            p.POSITIONAL_OR_KEYWORD)}
            missing = [p for p in self.parameters if p not in names]
            if missing:
                raise TypeError(f"scheme {self.name!r}: {fn.__qualname__} does not take "
                                f"{', '.join(missing)}")


_SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    """Registers `scheme` under its name; returns it.

    Registering again a scheme whose functions are the same (by module and name, as when
    its module is reloaded) replaces it.

    Raises:
        ValueError, TypeError: the scheme is malformed, or its name is taken by another.
    """
    scheme.validate()
    old = _SCHEMES.get(scheme.name)
    if old is not None and _origin(old) != _origin(scheme):
        raise ValueError(f"partition scheme {scheme.name!r} is already registered by "
                         f"{old.clients.__module__}")
    _SCHEMES[scheme.name] = scheme
    return scheme


def unregister_scheme(name: str) -> None:
    """Removes `name` (tests that register toy schemes clean up with it)."""
    _SCHEMES.pop(name, None)


def scheme_names() -> tuple[str, ...]:
    """The registered schemes' names, by `Scheme.order` (ties: registration order)."""
    return tuple(sorted(_SCHEMES, key=lambda name: _SCHEMES[name].order))


def get_scheme(name: str) -> Scheme:
    """The scheme registered as `name`.

    Raises:
        UserInputError: no scheme has that name (one line listing the schemes).
    """
    scheme = _SCHEMES.get(name) if isinstance(name, str) else None
    if scheme is None:
        raise UserInputError(
            f"unknown partition scheme {name!r}; valid: {', '.join(scheme_names())}")
    return scheme


def scheme_parameters(name: str) -> tuple[str, ...]:
    """The parameters scheme `name` takes besides samples_per_client, train_fraction and
    seed (e.g. ``('classes_per_client',)``); names of ExperimentConfig fields.

    Raises:
        UserInputError: unknown scheme.
    """
    return get_scheme(name).parameters


def make_partition(
    labels: np.ndarray,
    num_classes: int,
    num_clients: int,
    scheme: str,
    *,
    samples_per_client: int | None = None,
    train_fraction: float = TRAIN_FRACTION,
    seed: int = 0,
    **scheme_params,
) -> Partition:
    """Partitions a labelled pool among clients and splits each client train/test.

    The scheme chooses every client's examples (see its module: noniid1, noniid2,
    adjacent, fig5, dirichlet, iid, or a registered one); then each client's data is
    split per class (`common.split_train_test`): n_train = round_half_up(train_fraction *
    n_c), clamped to [1, n_c - 1] when n_c >= 2; a client whose classes all hold a single
    example is split as a whole. Every client gets >= 1 train and >= 1 test example.
    Everything is deterministic given `seed` (one `np.random.default_rng(seed)` stream,
    consumed in a fixed order), no example is given to two clients, and an infeasible
    request raises `UserInputError` instead of being silently shrunk.

    Args:
        labels: int [M] class of every example of the pooled dataset.
        num_classes: C; labels must lie in [0, C).
        num_clients: N >= 1.
        scheme: A registered scheme (`scheme_names()`).
        samples_per_client: Per-client total S (train + test), >= 2; None = the largest
            the data allows for this scheme (`max_samples_per_client`), or the whole
            pool for dirichlet.
        train_fraction: Share of each client's data used for training, in (0, 1).
        seed: Seed of the partition.
        **scheme_params: The scheme's own parameters (`scheme_parameters(scheme)`), e.g.
            classes_per_client for noniid1; those not given take the scheme's defaults.

    Returns:
        The `Partition`.

    Raises:
        UserInputError: Unknown scheme, a parameter the scheme does not take, bad values
            or an infeasible request (one line; it names the feasible values or the
            parameters to change).
    """
    entry, pool = _prepare(labels, num_classes, num_clients, scheme, train_fraction,
                           scheme_params)
    rng = np.random.default_rng(seed)
    clients, total = entry.clients(pool, rng, samples_per_client, **scheme_params)
    return split_train_test(rng, clients, pool.labels, train_fraction, scheme, total)


def max_samples_per_client(
    labels: np.ndarray,
    num_classes: int,
    num_clients: int,
    scheme: str,
    *,
    samples_per_client: int | None = None,
    train_fraction: float = TRAIN_FRACTION,
    seed: int = 0,
    **scheme_params,
) -> int:
    """The largest samples_per_client `make_partition` accepts with these arguments.

    It is what `make_partition` uses when samples_per_client is None (except for
    dirichlet, which then uses the whole pool; its bound here is floor(M / N)).
    Arguments are those of `make_partition`; samples_per_client is ignored. The bound
    may depend on the seed where random choices come before the size (noniid2's
    dominant classes, fig5's class sets). It accounts for the train/test split: it is
    never below 2 (k-class schemes: 2k; dirichlet: max(min_client_size, 2), whose random
    draws may still fail at that size).

    Returns:
        The largest feasible per-client total (train + test), an int.

    Raises:
        UserInputError: Unknown scheme, a parameter the scheme does not take, bad values,
            or no size at all is feasible (the message names the parameters to change).
    """
    del samples_per_client  # Not a bound of the size.
    entry, pool = _prepare(labels, num_classes, num_clients, scheme, train_fraction,
                           scheme_params)
    return entry.max_samples_per_client(pool, np.random.default_rng(seed), **scheme_params)


def _prepare(labels, num_classes, num_clients, scheme, train_fraction, scheme_params):
    """(the Scheme, the checked Pool); refuses parameters the scheme does not take."""
    entry = get_scheme(scheme)
    unknown = [p for p in scheme_params if p not in entry.parameters]
    if unknown:
        own = ", ".join(entry.parameters) or "none"
        raise UserInputError(
            f"{scheme}: the {scheme} partition does not take {', '.join(unknown)}; its "
            f"parameters: {own} (every scheme takes samples_per_client, train_fraction "
            f"and seed)")
    return entry, check_pool(labels, num_classes, num_clients, train_fraction)


def _origin(scheme: Scheme) -> tuple[str, str]:
    fn = scheme.clients
    return getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn))
