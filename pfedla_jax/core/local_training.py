"""Stacked-client local training: a `ClientUpdate` run over a cohort by `for_each_client`.

A client's local work is E epochs (or a fixed number of steps) of minibatches of size B
from its own training split, reshuffled every epoch from `fold_in(fold_in(train_key,
round), client)`; each epoch's last batch may be partial (masked examples, like a PyTorch
DataLoader without drop_last). Each client runs its OWN number of steps (a `while` loop
over its live steps): on the `loop`/`shard` strategies a small client costs only its own
steps; under `vmap` a cohort costs its largest member's steps (not the population's).

`ClientTrainer.run` runs any `ClientUpdate` (client_update.py); `ClientTrainer.train` is
the common case, cross-entropy SGD from given params. Both are pure and traceable: an
algorithm calls them inside its jitted round, passing the client data (`store`) as an
argument so that it is not baked into the program as a constant.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pfedla_jax.core.client_parallel import (STRATEGIES, for_each_client, make_mesh, replicated,
                                             resolve_strategy)
from pfedla_jax.core.client_update import Batch, ClientUpdate, masked_cross_entropy, sgd_update
from pfedla_jax.data.store import ClientStore, normalize_images
from pfedla_jax.core import multihost
from pfedla_jax.errors import UserInputError

__all__ = ["STRATEGIES", "ClientTrainer", "LocalTrainConfig", "client_batch_plan",
           "make_optimizer", "masked_cross_entropy", "resolve_strategy"]


def _option(default, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class LocalTrainConfig:
    """Client-side optimisation (paper: SGD, batch 32, cross-entropy); checked when built.

    Raises (constructor): UserInputError on a bad value.
    """

    batch_size: int = _option(32, "Local batch size.")
    local_epochs: int = _option(1, "Local epochs per round.")
    local_steps: int = _option(0, "If > 0: local SGD steps per round instead of epochs.")
    lr: float = _option(0.005, "Client SGD learning rate.")
    momentum: float = _option(0.0, "Client SGD momentum.")
    weight_decay: float = _option(0.0, "Client weight decay (L2, added to the gradient).")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UserInputError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.local_steps < 0:
            raise UserInputError(f"--local_steps must be >= 0, got {self.local_steps}")
        if self.local_steps == 0 and self.local_epochs < 1:
            raise UserInputError(f"--local_epochs must be >= 1, got {self.local_epochs}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UserInputError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise UserInputError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise UserInputError(f"--weight_decay must be a finite number >= 0, got {self.weight_decay}")


def make_optimizer(config: LocalTrainConfig) -> optax.GradientTransformation:
    """The client optimizer: SGD with optional momentum and L2 weight decay (added to the
    gradient before momentum, as torch.optim.SGD(weight_decay=...))."""
    parts = []
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    parts.append(optax.sgd(config.lr, momentum=config.momentum or None))
    return optax.chain(*parts)


def client_batch_plan(client_key, count, own_idx, *, batch_size: int, num_steps: int,
                      num_epochs: int, total_steps):
    """The minibatches of one client's local training (pure, traceable).

    Each epoch e is a fresh permutation of the client's `count` real examples drawn from
    `fold_in(client_key, e)` (padding slots of `own_idx` sort last); an epoch is
    ceil(count / batch_size) batches, the last one partial, as a PyTorch DataLoader without
    drop_last; batches from `total_steps` on (beyond the client's own work) are fully masked.

    Args:
      client_key: the client's key of this round, fold_in(round_key, client_id).
      count: int scalar, the client's number of training examples (>= 1).
      own_idx: int [max_train], the client's row of ClientStore.train_idx.
      batch_size: B.
      num_steps: static number of batches (rows of the plan).
      num_epochs: static number of epoch permutations to draw (enough to cover num_steps).
      total_steps: int scalar, the client's own number of live batches.

    Returns:
      (idx [num_steps, B] = own_idx entries, i.e. indices into the store's images,
       mask bool [num_steps, B], True for real examples).
    """
    max_train = own_idx.shape[0]
    slots = jnp.arange(max_train)

    def epoch_order(e):
        u = jax.random.uniform(jax.random.fold_in(client_key, e), (max_train,))
        return jnp.argsort(jnp.where(slots < count, u, 2.0))

    orders = jax.vmap(epoch_order)(jnp.arange(num_epochs))            # [E, max_train]
    steps_per_epoch = (count + batch_size - 1) // batch_size
    s = jnp.arange(num_steps)[:, None]
    epoch = s // steps_per_epoch
    pos = (s % steps_per_epoch) * batch_size + jnp.arange(batch_size)[None, :]
    mask = (pos < count) & (s < total_steps)
    slot = orders[jnp.minimum(epoch, num_epochs - 1), jnp.minimum(pos, max_train - 1)]
    return own_idx[slot], mask


class ClientTrainer:
    """Runs a `ClientUpdate` for a cohort of clients (one call for all of them).

    Args:
      model: the client model (for the default update).
      store: the client data (placed replicated on the trainer's mesh).
      config: batch size, epochs or steps, and the default SGD update's optimizer.
      strategy: client parallelism ('auto', 'vmap', 'loop', 'shard'; client_parallel.py).
      update: the client update; default `sgd_update(model, make_optimizer(config))`.

    Attributes:
      num_steps: static rows of a client's batch plan: the largest client's number of steps
        (a client stops after its own number).
      mesh: the device mesh the cohort is split over.
      trace_count: traces of the per-client function (no retrace across rounds: tests).
    """

    def __init__(self, model, store: ClientStore, config: LocalTrainConfig,
                 strategy: str = "auto", update: ClientUpdate | None = None):
        self.model = model
        self.config = config
        self.strategy = resolve_strategy(strategy)
        self.mesh = make_mesh(self.strategy)
        self.update = update if update is not None else sgd_update(model, make_optimizer(config))
        self.trace_count = 0
        counts = np.asarray(jax.device_get(store.train_count))
        if counts.min() < 1:
            raise UserInputError("every client needs at least one training example")
        k = self.update.batches_per_step
        batches_per_epoch = -(-counts // config.batch_size)
        if config.local_steps > 0:
            self.num_steps = int(config.local_steps)
            num_batches = self.num_steps * k
            # epochs needed by the smallest client to cover num_batches
            self._num_epochs = int(-(-num_batches // int(batches_per_epoch.min())))
        else:
            num_batches = int(config.local_epochs * batches_per_epoch.max())
            self.num_steps = num_batches // k
            self._num_epochs = int(config.local_epochs)
        if self.num_steps < 1:
            raise UserInputError(f"local training of {num_batches} batches gives no step of "
                                 f"{k} batches; raise --local_epochs or --local_steps")
        # balancing the devices by step counts only matters when the counts differ
        self._balance = config.local_steps == 0 and counts.min() != counts.max()
        # one replica of the client data per device of the mesh, placed once
        self.store = multihost.put(store, replicated(self.mesh))
        self._map = for_each_client(self._client_fn, self.strategy, self.mesh, negative_ids=False)
        self._jitted: dict[str, Any] = {}

    def with_update(self, update: ClientUpdate) -> "ClientTrainer":
        """A trainer of the same data, config, strategy and mesh running `update` instead
        (e.g. an algorithm's own local objective or trainable mask); the client data
        already placed on the mesh is reused, not copied."""
        return ClientTrainer(self.model, self.store, self.config, self.strategy, update=update)

    # ------------------------------------------------------------------ one client
    def live_steps(self, client_id, store: ClientStore):
        """The client's own number of steps (int32, traceable)."""
        cfg = self.config
        if cfg.local_steps > 0:
            return jnp.full(jnp.shape(client_id), cfg.local_steps, jnp.int32)
        batches = (store.train_count[client_id] + cfg.batch_size - 1) // cfg.batch_size * cfg.local_epochs
        return (batches // self.update.batches_per_step).astype(jnp.int32)

    def _plan(self, client_id, round_key, store: ClientStore):
        """(idx [T, k, B], mask bool [T, k, B], live steps) of one client; traceable."""
        cfg, k = self.config, self.update.batches_per_step
        n = store.train_count[client_id]
        live = self.live_steps(client_id, store)
        idx, mask = client_batch_plan(jax.random.fold_in(round_key, client_id), n,
                                      store.train_idx[client_id], batch_size=cfg.batch_size,
                                      num_steps=self.num_steps * k, num_epochs=self._num_epochs,
                                      total_steps=live * k)
        shape = (self.num_steps, k, cfg.batch_size)
        return idx.reshape(shape), mask.reshape(shape), live

    def batch_plan(self, client_id, round_key) -> tuple[np.ndarray, np.ndarray]:
        """The exact examples `train` feeds client `client_id` in the round of `round_key`.

        Args:
          client_id: which stored client (row of the ClientStore).
          round_key: the round's PRNG key, as passed to `train`.

        Returns:
          (idx int32 [num_steps, B] (or [num_steps, k, B] for an update taking k > 1
           batches per step): indices into store.images / store.labels,
           mask bool, same shape: True for real examples). Step s trains on
          idx[s][mask[s]] (the real examples are a prefix of the row; the loss is their
          mean); the client runs only its own steps (the rows with any real example).
          Rows of idx at masked positions are valid indices but meaningless.
        """
        if "plan" not in self._jitted:
            self._jitted["plan"] = jax.jit(lambda c, k, s: self._plan(c, k, s)[:2])
        idx, mask = self._jitted["plan"](jnp.int32(client_id), round_key, self.store)
        if self.update.batches_per_step == 1:
            idx, mask = idx[:, 0], mask[:, 0]
        return np.asarray(idx), np.asarray(mask)

    def _client_fn(self, shared, client, client_id, round_key):
        """The update of one client over its own live steps. Pure; traced once per program."""
        self.trace_count += 1
        store, start = shared
        idx, mask, live = self._plan(client_id, round_key, store)
        carry = self.update.init(start, client, client_id, jax.random.fold_in(round_key, client_id))
        k = self.update.batches_per_step
        batches_per_epoch = (store.train_count[client_id] + self.config.batch_size - 1) // self.config.batch_size

        def body(t, c):
            carry, loss_sum, seen = c
            rows, m = idx[t], mask[t].astype(jnp.float32)
            batch = Batch(normalize_images(store.images[rows], store.mean, store.std),
                          store.labels[rows], m, ((t * k) // batches_per_epoch).astype(jnp.int32))
            carry, (loss, count) = self.update.step(carry, batch)
            return carry, loss_sum + loss, seen + count

        carry, loss_sum, seen = jax.lax.fori_loop(0, live, body,
                                                  (carry, jnp.float32(0.0), jnp.float32(0.0)))
        return (self.update.finalize(carry, start, client),
                {"loss_sum": loss_sum, "num_examples": seen})

    # ------------------------------------------------------------------ a cohort
    def run(self, shared, clients, client_ids, round_key, store: ClientStore | None = None):
        """Runs the update for a cohort. Traceable; jitted when called with concrete arrays.

        Args:
          shared: the update's shared input (the same for every client; e.g. a global model).
          clients: the update's per-client input, leaves [S, ...].
          client_ids: int32 [S], rows of the store.
          round_key: PRNG key of this round (client c uses fold_in(round_key, c)).
          store: the client data; pass the jitted round's argument (default: self.store).

        Returns:
          (finalize outputs, leaves [S, ...], {'loss_sum': [S], 'num_examples': [S]}).
        """
        store = self.store if store is None else store
        args = (shared, clients, jnp.asarray(client_ids, jnp.int32), round_key)
        if "run" not in self._jitted:
            self._jitted["run"] = jax.jit(self._run, out_shardings=replicated(self.mesh))
        if not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
            # a direct call: inputs committed to the mesh like the outputs, so that feeding
            # outputs back in (the next round) hits the same compiled program
            args = multihost.put(args, replicated(self.mesh))
        return self._jitted["run"](*args, store)

    def _run(self, shared, clients, client_ids, round_key, store):
        cost = self.live_steps(jnp.maximum(client_ids, 0), store) if self._balance else None
        return self._map((store, shared), clients, client_ids, round_key, cost=cost)

    def train(self, params, batch_stats, client_ids, round_key, store: ClientStore | None = None,
              *, shared_params: bool = False):
        """Cross-entropy SGD (the default update) for S clients starting from `params`.

        Args:
          params: pytree, leaves [S, ...]: the params each client starts from; with
            shared_params=True one unstacked pytree all clients start from.
          batch_stats: pytree, leaves [S, ...]: each client's BN running statistics.
          client_ids: int32 [S]: which stored client (rows of the ClientStore) each is.
          round_key: PRNG key of this round (per-client keys are fold_in(round_key, id)).
          store: the client data (see `run`).

        Returns:
          (params [S, ...], batch_stats [S, ...], {'loss_sum': [S], 'num_examples': [S]}).
        """
        if shared_params:
            out, metrics = self.run(params, {"batch_stats": batch_stats}, client_ids, round_key, store)
        else:
            out, metrics = self.run(None, {"params": params, "batch_stats": batch_stats},
                                    client_ids, round_key, store)
        return out["params"], out["batch_stats"], metrics
