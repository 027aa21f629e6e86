"""The interface every federated algorithm implements, and the engine around it.

An algorithm is one module: a class registered under a name with its config dataclass
(`registry.register`), implementing three pure pieces that read like the paper:

  state = algo.init_state(key)                     # per-client leaves [N, ...]
  state, metrics = algo.round_step(state, round_idx, client_ids, key, data)   # traced
  evaluation = algo.evaluate(state, round_idx, key)                           # host side

`round_step` is traced once into ONE jitted program per round (aggregation, local
training of the cohort through `ctx.trainer`, the server update), with the state sharded
over the device mesh (axis `clients`, N padded to the mesh size) and, in an experiment,
donated (updated in place). The engine methods `init` and `round` add the padding,
placement and compilation; the loop only ever calls `init`, `round` and `evaluate`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pfedla_jax.core.client_parallel import (client_sharding, padded_size, put_rows,
                                             replicated, take_rows)
from pfedla_jax.core import multihost
from pfedla_jax.algorithms.search_space import CLIENT_LR, Hyperparameter
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.core.stacking import broadcast_clients, pad_clients, tree_bytes, unpad_clients
from pfedla_jax.core.state_size import ModelDims, StateTerm
from pfedla_jax.data.store import ClientStore
from pfedla_jax.models import count_params, init_variables

INITS = ("common", "independent")
# table rows with an order below this are the rows of pFedLA's Tables 1-2 (TableRow.order)
PAPER_ROWS_END = 10


@dataclasses.dataclass
class FLContext:
    """What every algorithm needs: the model, the client data and the local trainer.

    Attributes:
      model: the client model (Flax module).
      layer_order: the model's layers in forward order.
      store: the client data.
      trainer: the local trainer; its config is `train`.
      num_clients: N.
      input_shape: (H, W, C) of one example.
      init: 'common' (one initial model for all clients) or 'independent'.
      donate_state: `round` donates (updates in place) the state it is given. The
        experiment loop sets it; off by default so that a caller may keep using the
        state it passed in.
    """

    model: Any
    layer_order: tuple[str, ...]
    store: ClientStore
    trainer: ClientTrainer
    num_clients: int
    input_shape: tuple[int, int, int]
    init: str = "common"
    donate_state: bool = False

    @property
    def train(self) -> LocalTrainConfig:
        """The local training config (batch size, epochs or steps, client optimizer)."""
        return self.trainer.config

    @functools.cached_property
    def mesh(self):
        """The device mesh of the stacked state (the trainer's; one device by default)."""
        return self.trainer.mesh

    @property
    def data(self) -> ClientStore:
        """The client data as placed on the mesh (what jitted rounds receive)."""
        return self.trainer.store

    @property
    def num_stored(self) -> int:
        """Rows of every per-client state leaf: N padded to a multiple of the mesh size."""
        return padded_size(self.num_clients, self.mesh)

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
    def param_shapes(self) -> Any:
        """One client's trainable params as `jax.ShapeDtypeStruct`s (nothing computed)."""
        return jax.eval_shape(
            lambda: init_variables(self.model, jax.random.key(0), self.input_shape))["params"]

    @property
    def model_params(self) -> int:
        """Scalars in one client's trainable params."""
        return count_params(self.param_shapes)

    @property
    def model_bytes(self) -> int:
        """Bytes of one client's trainable params (what one model transfer costs)."""
        return tree_bytes(self.param_shapes)


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """Base of every algorithm's options: a frozen dataclass, checked when it is built.

    A subclass adds fields (each becomes the flag `--<algorithm>_<field>`; a nested
    dataclass `--<algorithm>_<group>_<field>`; `metadata={'help': ..., 'alias': ...}` gives
    the flag's help text and an additional historical name) and overrides `validate` (its
    own fields) and `validate_training` (its fit with the local training, e.g. an epoch
    split); both raise `UserInputError`. `__post_init__` runs `validate`, so a config that
    exists is valid; `ExperimentConfig` runs `validate_training` when it pairs the two.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises UserInputError on a bad option."""

    def validate_training(self, train: LocalTrainConfig) -> None:
        """Raises UserInputError if the options do not fit the local training `train`."""


@dataclasses.dataclass(frozen=True)
class NoConfig(AlgorithmConfig):
    """The config of an algorithm without options."""


@dataclasses.dataclass(frozen=True)
class TableRow:
    """A row of the method-comparison table (`experiments.table`).

    Attributes:
      key: the row's name in `--methods` (e.g. 'heurpfedla').
      display: the row label (e.g. 'HeurpFedLA (k=1)'); the paper's numbers in a preset's
        header are matched by it.
      order: rows are listed by this number (the paper's order: Local 0 ... HeurpFedLA 9),
        then by key; an algorithm without rows gets one row at 100. Rows with order <
        PAPER_ROWS_END are the paper's (`experiments.table --methods=paper`); the others are
        listed below a rule, "beyond the paper".
      options: the algorithm options of this row, {field path: value} (e.g. {'heur_k': 1}).
      needs_batchnorm: the row is left out of `--methods=all` when the model has no
        BatchNorm layer (FedBN: it would be FedAvg there).
    """

    key: str
    display: str
    order: float = 100.0
    options: tuple[tuple[str, Any], ...] = ()
    needs_batchnorm: bool = False

    @property
    def in_paper(self) -> bool:
        """Whether the row is one of the paper's (order < PAPER_ROWS_END)."""
        return self.order < PAPER_ROWS_END


@dataclasses.dataclass
class Evaluation:
    """What an algorithm hands the loop at an evaluated round.

    Attributes:
      views: {'': the personalised models (the headline `test_acc`), other views (e.g.
        'local': the models after local training -> `local_test_acc`, ...)}.
      arrays: numpy arrays saved for this round in WORKDIR/<export_name>.npz (e.g. alpha).
      scalars: extra numbers for the metrics row (e.g. pFedLA's mean self-weight per layer).
    """

    views: dict[str, View]
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)


class Algorithm(abc.ABC):
    """Base class; subclasses read like the paper's pseudo-code.

    Class attributes (set by `registry.register`): `name`, `config_class`. Subclasses set
    `server_state_keys` (state entries without a client axis, e.g. FedAvg's global model;
    every other entry is per client) and, if they export arrays at evaluations,
    `export_name` (the file WORKDIR/<export_name>.npz) and `export_metadata()`.
    Optional metadata: `search_space` (the hyperparameters worth tuning, with their ranges;
    default the client lr), `display_name` (the method's usual name), `table_rows` (its rows of
    the comparison table; default one row named `display_name`), the closed form of its
    state's size (`state_size_terms`, `state_size_symbols`) and the config variants that
    change its state (`state_size_variants`), for `experiments.bench.state_size`.

    Raises (constructor): UserInputError if `config` does not fit `ctx.train` (the check
    for a caller who builds an algorithm without an `ExperimentConfig`).
    """

    name: str = ""
    config_class: type = NoConfig
    display_name: str = ""
    table_rows: tuple[TableRow, ...] = ()
    # {label suffix: options} of configs whose state differs from the default one's (e.g.
    # pFedLA's Adam optimizer): rows '<name>+<suffix>' of the state-size report
    state_size_variants: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    server_state_keys: tuple[str, ...] = ()
    export_name: str | None = None
    # the hyperparameters `experiments.tune` searches (algorithms/search_space.py): the
    # client lr by default; an algorithm adds its own, each with the source of its range
    search_space: tuple[Hyperparameter, ...] = (CLIENT_LR,)

    def __init__(self, ctx: FLContext, config: Any = None):
        self.ctx = ctx
        self.config = config if config is not None else self.config_class()
        self.config.validate_training(ctx.train)
        self.trace_count = 0  # traces of round_step (one per compiled program)
        self._round_fn = None
        self._placed = None   # the last state `round` returned (placed on the mesh)

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def init_state(self, key: jax.Array) -> dict:
        """The initial server + client state: a dict of pytrees; per-client ones [N, ...]."""

    @abc.abstractmethod
    def round_step(self, state: dict, round_idx: jax.Array, client_ids: jax.Array,
                   key: jax.Array, data: ClientStore) -> tuple[dict, dict]:
        """One communication round with clients `client_ids` (int32 [S]). Pure, traced.

        Args:
          state: per-client leaves [N_pad, ...] (N padded to the mesh).
          round_idx: int32 scalar, the round (0-based).
          client_ids: int32 [S], the participants.
          key: the round's key (client c trains with fold_in(key, c)).
          data: the client data; pass it on to the trainer.

        Returns:
          (new state, metrics) with metrics per participant [S]: 'loss_sum',
          'num_examples' (train loss of the round) and 'bytes_up', 'bytes_down'
          (int32, what the participant sent and received this round).
        """

    @abc.abstractmethod
    def evaluate(self, state: dict, round_idx: int, key: jax.Array) -> Evaluation:
        """The views to evaluate (and arrays/scalars to record) after round `round_idx`.

        `key` is fold_in(evaluation key, round): for an evaluation that needs randomness
        (e.g. a personalisation step on a drawn batch).
        """

    @classmethod
    def rows(cls) -> tuple[TableRow, ...]:
        """The algorithm's rows of the comparison table: the `table_rows` its own class sets
        (a subclass does not inherit its parent's rows), or one row named after it."""
        own = vars(cls)
        if own.get("table_rows"):
            return own["table_rows"]
        return (TableRow(cls.name, own.get("display_name") or cls.name),)

    @classmethod
    def state_size_terms(cls, config: Any, dims: ModelDims) -> list[StateTerm] | None:
        """The state of `init_state` in closed form, part by part, for options `config`
        (an instance of `config_class`); None (the default): no formula, the state-size
        report shows the measured `jax.eval_shape` bytes alone. The parts must add up, leaf
        by leaf, to what `init_state` returns: tests/test_state_size.py checks it for every
        registered algorithm that has a formula."""
        return None

    @classmethod
    def state_size_symbols(cls, config: Any, dims: ModelDims) -> dict[str, int]:
        """The values of the symbols the formulas use besides N, P and B (e.g. pFedLA's
        L), shown with the report."""
        return {}

    def describe(self) -> str:
        """A note for the run's first log line (e.g. 'FedBN is FedAvg here'); '' for none."""
        return ""

    def export_metadata(self) -> dict[str, np.ndarray]:
        """Constant arrays stored beside the exported ones (e.g. pFedLA's layer names)."""
        return {}

    # ------------------------------------------------------------------ engine
    def state_shardings(self, state: dict) -> dict:
        """Per-client entries split over the mesh's `clients` axis; server ones replicated."""
        mesh = self.ctx.mesh
        return {k: replicated(mesh) if k in self.server_state_keys else client_sharding(mesh)
                for k in state}

    def take(self, tree: Any, client_ids: jax.Array) -> Any:
        """Inside `round_step`: rows `client_ids` of a per-client state entry, [S, ...] on every
        device (one collective for all its leaves; core.client_parallel.take_rows)."""
        return take_rows(tree, client_ids, self.ctx.mesh)

    def put(self, tree: Any, client_ids: jax.Array, rows: Any) -> Any:
        """Inside `round_step`: `tree` with rows `client_ids` replaced by `rows`, each device
        writing the rows it holds, in place (core.client_parallel.put_rows)."""
        return put_rows(tree, client_ids, rows, self.ctx.mesh)

    def one_client_at_a_time(self, block, state: dict, client_ids: jax.Array, key: jax.Array,
                             data: ClientStore) -> tuple[dict, dict]:
        """Inside `round_step`: `block(state, ids [1], key, data) -> (state, metrics [1])` for
        each participant in turn (a `lax.scan`), each seeing the state the previous ones left:
        the 'sequential' round semantics of the PyTorch reference codes. Metrics come back
        [S]."""
        def one(state, s):
            return block(state, jax.lax.dynamic_slice_in_dim(client_ids, s, 1), key, data)

        state, metrics = jax.lax.scan(one, state, jnp.arange(client_ids.shape[0]))
        return state, jax.tree.map(lambda a: a.reshape(client_ids.shape), metrics)

    def place(self, state: dict) -> dict:
        """`state` on the mesh (no copy for arrays already placed)."""
        return multihost.put(state, self.state_shardings(state))

    def init(self, key: jax.Array) -> dict:
        """The initial state, per-client entries padded to N_pad rows and placed."""
        return self.from_checkpoint(self.init_state(key))

    def to_checkpoint(self, state: dict) -> dict:
        """The state without the mesh padding (per-client leaves [N, ...])."""
        n = self.ctx.num_clients
        return {k: v if k in self.server_state_keys else unpad_clients(v, n) for k, v in state.items()}

    def from_checkpoint(self, state: dict) -> dict:
        """Inverse of `to_checkpoint`: padded to N_pad rows and placed."""
        rows = self.ctx.num_stored
        return self.place({k: v if k in self.server_state_keys else pad_clients(v, rows)
                           for k, v in state.items()})

    def _round_impl(self, state, round_idx, client_ids, key, data):
        self.trace_count += 1
        return self.round_step(state, round_idx, client_ids, key, data)

    def round(self, state: dict, round_idx: int, participants, round_key: jax.Array
              ) -> tuple[dict, dict]:
        """Runs one round as one compiled program (compiled on the first call).

        Args:
          state: as returned by `init` or a previous `round` (donated if
            ctx.donate_state: do not use it afterwards).
          round_idx: the round (0-based).
          participants: int [S], the participating clients.
          round_key: the round's PRNG key.

        Returns:
          (new state, metrics as device arrays, per participant [S]: 'loss_sum',
          'num_examples', 'bytes_up', 'bytes_down').
        """
        if state is not self._placed:  # a state this method returned is already in place
            state = self.place(state)
        if self._round_fn is None:
            shardings = self.state_shardings(state)
            self._round_fn = jax.jit(
                self._round_impl, donate_argnums=(0,) if self.ctx.donate_state else (),
                out_shardings=(shardings, replicated(self.ctx.mesh)))
        state, metrics = self._round_fn(state, np.int32(round_idx), np.asarray(participants, np.int32),
                                        round_key, self.ctx.data)
        self._placed = state
        return state, metrics
