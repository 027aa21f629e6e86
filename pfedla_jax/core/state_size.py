"""The closed-form size of an algorithm's state, as a function of the number of clients N.

An algorithm may describe its state (`Algorithm.state_size_terms(config, dims)`) as a list
of `StateTerm`s, one per part of an entry of `init_state`'s dict, each with its bytes as a
function of N and the formula as printed; `experiments.bench.state_size` checks the terms
against `jax.eval_shape(init_state)` leaf by leaf and derives from them the largest N whose
state fits a device. `ModelDims` is what a formula may use besides N: the client model's
shapes and layers, and the training examples per client. float32 and int32 are 4 bytes,
bool 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pfedla_jax.models import count_params

STATE_GROUPS = ("client params", "BN statistics", "hypernetworks", "optimizer states",
                "server model", "other")


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """What a closed-form state size (`Algorithm.state_size_terms`) may use about the client
    model and data; N, the number of clients, is the formula's variable.

    Attributes:
      params: one client's trainable params, a pytree of `jax.ShapeDtypeStruct`.
      batch_stats: one client's BN running statistics, likewise ({} without BN).
      layer_order: the model's layers in forward order.
      train: training examples per client.
    """

    params: Any
    batch_stats: Any
    layer_order: tuple[str, ...]
    train: int

    @property
    def P(self) -> int:
        """Trainable scalars of one client model."""
        return count_params(self.params)

    @property
    def B(self) -> int:
        """BN running-statistic scalars of one client (0 without BN)."""
        return count_params(self.batch_stats)


@dataclasses.dataclass(frozen=True)
class StateTerm:
    """One part of an algorithm's state in closed form, as a function of N.

    Attributes:
      group: the component, one of `STATE_GROUPS`.
      part: the part's name in the report (e.g. 'client_params', 'heads').
      expr: the formula as printed, in bytes (e.g. '4·N·P').
      sharded: True for a per-client entry (split over the devices), False for one of
        `server_state_keys` (whole on every device).
      fn: N -> bytes.
      key: the state entry (a key of `init_state`'s dict) the part belongs to; default
        `part`.
      match: for an entry split into several parts, which of its leaves this part counts:
        a predicate on the leaf's path inside the entry (a tuple of key names, e.g.
        ('heads_kernel',)); default every leaf.
    """

    group: str
    part: str
    expr: str
    sharded: bool
    fn: Callable[[int], int]
    key: str = ""
    match: Callable[[tuple[str, ...]], bool] | None = None

    @property
    def entry(self) -> str:
        """The state entry this part belongs to."""
        return self.key or self.part

    def bytes(self, n: int) -> int:
        return int(self.fn(n))

    def counts(self, key: str, path: tuple[str, ...]) -> bool:
        """Whether the leaf at `path` of state entry `key` is part of this term."""
        return key == self.entry and (self.match is None or self.match(path))


def per_client_term(group: str, part: str, scalars: int, symbol: str, key: str = "",
                    match: Callable[[tuple[str, ...]], bool] | None = None) -> StateTerm:
    """A per-client float32 part of `scalars` numbers per client (e.g. one model: P):
    4·N·<symbol> bytes, split over the devices."""
    return StateTerm(group, part, f"4·N·{symbol}", True, lambda n: 4 * n * scalars, key, match)


def server_model_term(dims: ModelDims) -> StateTerm:
    """One float32 model kept by the server (`global_params`): 4·P bytes, replicated."""
    size = 4 * dims.P
    return StateTerm("server model", "global_params", "4·P", False, lambda n: size)


def client_models_terms(dims: ModelDims) -> list[StateTerm]:
    """Every client's model and BN statistics (`client_params`, `batch_stats`: 4·N·P and
    4·N·B bytes), the state `FLContext.init_client_variables` starts from."""
    return [per_client_term("client params", "client_params", dims.P, "P"),
            per_client_term("BN statistics", "batch_stats", dims.B, "B")]
