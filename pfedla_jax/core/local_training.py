"""Stacked-client local training: S clients trained by one call.

Every per-client quantity carries a leading client axis `[S, ...]`. A client's local
update is E epochs (or a fixed number of steps) of SGD with batch size B on its own
training split, reshuffled every epoch from `fold_in(fold_in(seed_key, round), client)`.
Clients of unequal size share one static step count: a client with fewer examples gets
masked steps at the end of each epoch that change nothing (no param, BN or optimizer
update), and the last batch of an epoch may be partial (masked examples, like a PyTorch
DataLoader without drop_last).

Strategies (`client_parallelism`):
  vmap  all S clients in one jitted call (jax.vmap of the per-client scan). The fast path
        on GPU/TPU; on CPU a vmapped conv lowers to a grouped conv, which is slow.
  loop  a Python loop over clients of one jitted per-client function (lax.scan over the
        local steps). The fast path on a single CPU device.
  shard the client axis split over the host's devices (one XLA CPU device per core,
        `--xla_force_host_platform_device_count`), each device running its clients'
        scans one after another (lax.map). The multi-device path.
  auto  the fastest measured for the backend (see BUILD_NOTES.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pfedla_jax.core.stacking import take_clients
from pfedla_jax.data.store import ClientStore, normalize_images
from pfedla_jax.errors import UserInputError

STRATEGIES = ("auto", "vmap", "loop", "shard")


@dataclasses.dataclass(frozen=True)
class LocalTrainConfig:
    """Client-side optimisation (paper: SGD, batch 32, cross-entropy)."""

    batch_size: int = 32
    local_epochs: int = 1
    local_steps: int = 0  # > 0: exactly this many steps instead of epochs
    lr: float = 0.005
    momentum: float = 0.0
    weight_decay: float = 0.0

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


def resolve_strategy(strategy: str) -> str:
    """Picks the client-parallel strategy; 'auto' by backend and device count."""
    if strategy not in STRATEGIES:
        raise UserInputError(
            f"unknown --client_parallelism {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if strategy != "auto":
        return strategy
    if jax.default_backend() == "cpu":
        # Measured (BUILD_NOTES.md): on CPU the per-client scan with the custom-VJP conv
        # beats vmap (grouped conv); several host devices beat XLA's intra-op threads.
        return "shard" if jax.device_count() > 1 else "loop"
    return "vmap"


def make_optimizer(config: LocalTrainConfig) -> optax.GradientTransformation:
    parts = []
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    parts.append(optax.sgd(config.lr, momentum=config.momentum or None))
    return optax.chain(*parts)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array):
    """(sum of per-example CE over real examples, number of real examples)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    ce = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    return jnp.sum(ce * mask), jnp.sum(mask)


def client_batch_plan(client_key, count, own_idx, *, batch_size: int, num_steps: int,
                      num_epochs: int, total_steps):
    """The minibatches of one client's local training (pure, traceable).

    Each epoch e is a fresh permutation of the client's `count` real examples drawn from
    `fold_in(client_key, e)` (padding slots of `own_idx` sort last); an epoch is
    ceil(count / batch_size) steps, the last one partial, as a PyTorch DataLoader without
    drop_last; steps from `total_steps` on (the padding of a client smaller than the
    cohort's largest) are fully masked.

    Args:
      client_key: the client's key of this round, fold_in(round_key, client_id).
      count: int scalar, the client's number of training examples (>= 1).
      own_idx: int [max_train], the client's row of ClientStore.train_idx.
      batch_size: B.
      num_steps: static number of steps (rows of the plan).
      num_epochs: static number of epoch permutations to draw (enough to cover num_steps).
      total_steps: int scalar, the client's own number of live steps.

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
    """Trains a stack of clients from given starting params.

    `train(params, batch_stats, client_ids, round_key)` returns the trained params and BN
    statistics (leaves `[S, ...]`) and per-client metrics. Compiled once per cohort size:
    no retrace across rounds (`trace_count` counts traces of the per-client function).
    """

    def __init__(self, model, store: ClientStore, config: LocalTrainConfig,
                 strategy: str = "auto"):
        config.validate()
        self.model = model
        self.store = store
        self.config = config
        self.strategy = resolve_strategy(strategy)
        self.trace_count = 0
        counts = np.asarray(jax.device_get(store.train_count))
        if counts.min() < 1:
            raise UserInputError("every client needs at least one training example")
        batch = config.batch_size
        steps_per_epoch = -(-counts // batch)
        if config.local_steps > 0:
            self.num_steps = int(config.local_steps)
            # epochs needed by the smallest client to cover num_steps
            self._num_epochs = int(-(-self.num_steps // int(steps_per_epoch.min())))
        else:
            self.num_steps = int(config.local_epochs * steps_per_epoch.max())
            self._num_epochs = int(config.local_epochs)
        self._tx = make_optimizer(config)
        self._compiled: dict[str, Callable] = {}
        if self.strategy == "shard":
            self._mesh = jax.sharding.Mesh(np.array(jax.devices()), ("clients",))
            # one replica of the client data per device, placed once
            self.store = jax.device_put(
                store, jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec()))

    # ------------------------------------------------------------------ one client
    def _plan(self, client_id, round_key, store: ClientStore):
        """(idx [num_steps, B], mask bool [num_steps, B]) of one client; traceable."""
        cfg = self.config
        n = store.train_count[client_id]
        total_steps = ((n + cfg.batch_size - 1) // cfg.batch_size * cfg.local_epochs
                       if cfg.local_steps == 0 else jnp.int32(cfg.local_steps))
        return client_batch_plan(jax.random.fold_in(round_key, client_id), n,
                                 store.train_idx[client_id], batch_size=cfg.batch_size,
                                 num_steps=self.num_steps, num_epochs=self._num_epochs,
                                 total_steps=total_steps)

    def batch_plan(self, client_id, round_key) -> tuple[np.ndarray, np.ndarray]:
        """The exact examples `train` feeds client `client_id` in the round of `round_key`.

        Args:
          client_id: which stored client (row of the ClientStore).
          round_key: the round's PRNG key, as passed to `train`.

        Returns:
          (idx int32 [num_steps, B]: indices into store.images / store.labels,
           mask bool [num_steps, B]: True for real examples). Step s trains on
          idx[s][mask[s]] (the real examples are a prefix of the row; the loss is their
          mean); a step whose mask is all False changes nothing. Rows of idx at masked
          positions are valid indices but meaningless.
        """
        if "plan" not in self._compiled:
            self._compiled["plan"] = jax.jit(self._plan)
        idx, mask = self._compiled["plan"](jnp.int32(client_id), round_key, self.store)
        return np.asarray(idx), np.asarray(mask)

    def _client_update(self, params, batch_stats, client_id, round_key, store: ClientStore):
        """E epochs of SGD for one client. Pure; traced once per strategy."""
        self.trace_count += 1
        plan_idx, plan_mask = self._plan(client_id, round_key, store)
        opt_state = self._tx.init(params)

        def step(carry, xs):
            params, batch_stats, opt_state, loss_sum, seen = carry
            idx, mask = xs
            mask = mask.astype(jnp.float32)
            x = normalize_images(store.images[idx], store.mean, store.std)
            y = store.labels[idx]

            def loss_fn(p):
                logits, new_vars = self.model.apply(
                    {"params": p, "batch_stats": batch_stats}, x, train=True, mask=mask,
                    mutable=["batch_stats"])
                loss_total, count = masked_cross_entropy(logits, y, mask)
                return loss_total / jnp.maximum(count, 1.0), (loss_total, new_vars)

            grads, (loss_total, new_vars) = jax.grad(loss_fn, has_aux=True)(params)
            updates, new_opt = self._tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            new_bs = new_vars.get("batch_stats", batch_stats)
            live = jnp.sum(mask) > 0  # a fully padded step changes nothing
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(live, a, b), new, old)
            carry = (keep(new_params, params), keep(new_bs, batch_stats), keep(new_opt, opt_state),
                     loss_sum + loss_total, seen + jnp.sum(mask))
            return carry, None

        init = (params, batch_stats, opt_state, jnp.float32(0.0), jnp.float32(0.0))
        (params, batch_stats, _, loss_sum, seen), _ = jax.lax.scan(
            step, init, (plan_idx, plan_mask))
        return params, batch_stats, {"loss_sum": loss_sum, "num_examples": seen}

    # ------------------------------------------------------------------ strategies
    def _vmap_fn(self):
        if "vmap" not in self._compiled:
            fn = jax.vmap(self._client_update, in_axes=(0, 0, 0, None, None))
            self._compiled["vmap"] = jax.jit(fn)
        return self._compiled["vmap"]

    def _loop_fn(self):
        if "loop" not in self._compiled:
            def one(params, batch_stats, s, client_ids, round_key, store):
                return self._client_update(take_clients(params, s), take_clients(batch_stats, s),
                                           client_ids[s], round_key, store)

            self._compiled["loop"] = jax.jit(one)
            self._compiled["stack"] = jax.jit(lambda outs: jax.tree.map(lambda *a: jnp.stack(a), *outs))
        return self._compiled["loop"], self._compiled["stack"]

    def _shard_fn(self):
        if "shard" not in self._compiled:
            from jax.sharding import PartitionSpec as P

            def local(params, batch_stats, client_ids, round_key, store):
                return jax.lax.map(
                    lambda a: self._client_update(a[0], a[1], a[2], round_key, store),
                    (params, batch_stats, client_ids))

            fn = jax.shard_map(local, mesh=self._mesh,
                               in_specs=(P("clients"), P("clients"), P("clients"), P(), P()),
                               out_specs=P("clients"), check_vma=False)
            self._compiled["shard"] = jax.jit(fn)
        return self._compiled["shard"]

    def train(self, params, batch_stats, client_ids, round_key):
        """Trains S clients starting from `params` (leaves [S, ...]).

        Args:
          params: pytree, leaves [S, ...]: the params each client starts from.
          batch_stats: pytree, leaves [S, ...]: each client's BN running statistics.
          client_ids: int32 [S]: which stored client (rows of the ClientStore) each is.
          round_key: PRNG key of this round (per-client keys are fold_in(round_key, id)).

        Returns:
          (params [S, ...], batch_stats [S, ...], {'loss_sum': [S], 'num_examples': [S]}).
        """
        client_ids = jnp.asarray(client_ids, jnp.int32)
        num = int(client_ids.shape[0])
        if self.strategy == "vmap":
            return self._vmap_fn()(params, batch_stats, client_ids, round_key, self.store)
        ndev = self._mesh.devices.size if self.strategy == "shard" else 1
        if self.strategy == "loop" or num < ndev:
            # (a cohort smaller than the device count, e.g. sequential pFedLA's one-client
            # blocks, would only train padding copies on the other devices)
            one, stack = self._loop_fn()
            outs = [one(params, batch_stats, s, client_ids, round_key, self.store)
                    for s in range(num)]
            return stack(outs)
        # shard: pad the cohort to a multiple of the device count with repeats of the
        # first client; the padded results are dropped.
        pad = (-num) % ndev
        if pad:
            rep = lambda t: jax.tree.map(
                lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]), t)
            params, batch_stats, client_ids = rep(params), rep(batch_stats), rep(client_ids)
        out = self._shard_fn()(params, batch_stats, client_ids, round_key, self.store)
        if pad:
            out = jax.tree.map(lambda a: a[:num], out)
        return out
