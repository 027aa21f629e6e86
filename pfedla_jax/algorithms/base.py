"""The interface every federated algorithm implements.

An algorithm owns a state pytree (jax arrays only, so it can be checkpointed) and
three functions, mirroring the server's view of a round:

  state = algo.init(key)
  state, info = algo.round(state, round_idx, participants, round_key)
  models = algo.eval_models(state)   # {'': (params [N,...], batch_stats [N,...]), ...}

`eval_models` returns the personalised model of every client under '' (the headline
`test_acc`), and optionally other views (e.g. FedAvg's 'local': after local training).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pfedla_jax.core.local_training import ClientTrainer
from pfedla_jax.core.stacking import broadcast_clients, tree_bytes
from pfedla_jax.data.store import ClientStore
from pfedla_jax.models import init_variables

INITS = ("common", "independent")


@dataclasses.dataclass
class FLContext:
    """What every algorithm needs: the model, the client data and the local trainer."""

    model: Any
    layer_order: tuple[str, ...]
    store: ClientStore
    trainer: ClientTrainer
    num_clients: int
    input_shape: tuple[int, int, int]
    init: str = "common"  # one common initial model for all clients, or one each

    def init_client_variables(self, key: jax.Array):
        """(params [N, ...], batch_stats [N, ...]) for all clients."""
        if self.init == "common":
            variables = init_variables(self.model, key, self.input_shape)
            params = broadcast_clients(variables["params"], self.num_clients)
            stats = broadcast_clients(variables.get("batch_stats", {}), self.num_clients)
        else:
            keys = jax.random.split(key, self.num_clients)
            variables = jax.vmap(lambda k: init_variables(self.model, k, self.input_shape))(keys)
            params, stats = variables["params"], variables.get("batch_stats", {})
        copy = lambda t: jax.tree.map(jnp.array, t)  # materialise (no broadcast views)
        return copy(params), copy(stats)

    @functools.cached_property
    def model_bytes(self) -> int:
        """Bytes of one client's trainable params (what one model transfer costs)."""
        variables = jax.eval_shape(
            lambda: init_variables(self.model, jax.random.key(0), self.input_shape))
        return tree_bytes(variables["params"])


class Algorithm(abc.ABC):
    """Base class; subclasses read like the paper's pseudo-code."""

    name: str = ""

    def __init__(self, ctx: FLContext):
        self.ctx = ctx

    @abc.abstractmethod
    def init(self, key: jax.Array) -> dict:
        """The initial server+client state."""

    @abc.abstractmethod
    def round(self, state: dict, round_idx: int, participants: np.ndarray,
              round_key: jax.Array) -> tuple[dict, dict]:
        """One communication round with clients `participants` (int [S]).

        Returns the new state and an info dict with at least 'loss_sum', 'num_examples'
        (per participant, [S]), 'bytes_up' and 'bytes_down' (this round, all clients).
        """

    @abc.abstractmethod
    def eval_models(self, state: dict) -> dict[str, tuple[Any, Any]]:
        """{'': personalised (params, batch_stats) of all N clients, ...other views}."""

    def extra_exports(self, state: dict) -> dict[str, np.ndarray]:
        """Arrays to save at each evaluated round (e.g. pFedLA's alpha)."""
        return {}

    def evaluation(self, state: dict) -> tuple[dict[str, tuple[Any, Any]], dict[str, np.ndarray]]:
        """(eval_models(state), extra_exports(state)); overridden where they share work."""
        return self.eval_models(state), self.extra_exports(state)
