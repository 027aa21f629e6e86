"""A client's local update as data: `ClientUpdate(init, step, finalize)`.

Local training of one client is a loop over minibatches. What changes between algorithms
is the carry (params and optimizer state for FedAvg; also the global model for pFedMe;
two batches per step for Per-FedAvg), the step and what is sent back. A `ClientUpdate`
holds those three pure functions; `ClientTrainer` (local_training.py) owns everything
else: the batch plan, the loop over the client's own number of steps, and running the
cohort through `for_each_client`.

    carry  = init(shared, client, client_id, key)        # shared: e.g. the global model
    carry, (loss_sum, count) = step(carry, batch)         # batch: k minibatches [k, B, ...]
    out    = finalize(carry, shared, client)              # what the client returns

`sgd_update` is the cross-entropy SGD instance (the paper's client update, and FedAvg's,
Local's, pFedLA's), with an optional per-leaf trainable mask built from optax's
`multi_transform` + `set_to_zero` (frozen leaves get a zero update and no optimizer state
changes, e.g. FedRep's head/body phases or a frozen classifier).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class Batch(NamedTuple):
    """k minibatches of one client for one step.

    Attributes:
      x: float32 [k, B, H, W, C], normalised images.
      y: int32 [k, B] labels.
      mask: float32 [k, B], 1 for real examples, 0 for the padding of a partial batch.
    """

    x: jax.Array
    y: jax.Array
    mask: jax.Array


@dataclasses.dataclass(frozen=True)
class ClientUpdate:
    """One client's local update as three pure functions (see the module docstring).

    Attributes:
      init: (shared, client, client_id, key) -> carry.
      step: (carry, Batch) -> (carry, (loss_sum, count)): float32 scalars, the summed loss of
        the step's real examples and their number (for the round's train loss).
      finalize: (carry, shared, client) -> the client's output pytree.
      batches_per_step: k, the minibatches each step receives (Per-FedAvg: 2 or 3).
    """

    init: Callable[..., Any]
    step: Callable[..., tuple[Any, tuple[jax.Array, jax.Array]]]
    finalize: Callable[..., Any]
    batches_per_step: int = 1


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array):
    """(sum of per-example CE over real examples, number of real examples)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    ce = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    return jnp.sum(ce * mask), jnp.sum(mask)


def masked_optimizer(optimizer: optax.GradientTransformation, trainable: Any | None
                     ) -> optax.GradientTransformation:
    """`optimizer` on the leaves where `trainable` is True; zero updates elsewhere.

    Args:
      optimizer: the optax transformation of the trainable leaves.
      trainable: None (every leaf trains), a pytree of bools with the params' structure,
        or a callable params -> such a pytree.
    Returns:
      An optax transformation (optax.multi_transform with set_to_zero for frozen leaves).
    """
    if trainable is None:
        return optimizer

    def labels(params):
        mask = trainable(params) if callable(trainable) else trainable
        return jax.tree.map(lambda t: "train" if t else "freeze", mask)

    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def sgd_update(model, optimizer: optax.GradientTransformation, *,
               trainable: Any | None = None) -> ClientUpdate:
    """Cross-entropy minibatch SGD (or any optax optimizer) on a Flax model with BN state.

    Inputs: `client` = {'params': [...], 'batch_stats': [...]} (one client's row), or
    {'batch_stats': ...} with the starting params as `shared` (e.g. FedAvg's global
    model, passed once instead of S copies). The optimizer state is created afresh each
    round (as PyTorch FL code builds a new optimizer per round). Output:
    {'params', 'batch_stats'} after local training. One minibatch per step.

    Args:
      model: a Flax module called as model.apply(variables, x, train=True, mask=mask,
        mutable=['batch_stats']) -> (logits, new_vars).
      optimizer: the client optimizer.
      trainable: optional per-leaf mask (see `masked_optimizer`).
    """
    tx = masked_optimizer(optimizer, trainable)

    def init(shared, client, client_id, key):
        params = client["params"] if shared is None else shared
        return params, client["batch_stats"], tx.init(params)

    def step(carry, batch: Batch):
        params, batch_stats, opt_state = carry
        x, y, mask = batch.x[0], batch.y[0], batch.mask[0]

        def loss_fn(p):
            logits, new_vars = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                           train=True, mask=mask, mutable=["batch_stats"])
            loss_total, count = masked_cross_entropy(logits, y, mask)
            return loss_total / jnp.maximum(count, 1.0), (loss_total, count, new_vars)

        grads, (loss_total, count, new_vars) = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, new_vars.get("batch_stats", batch_stats), opt_state), (loss_total, count)

    def finalize(carry, shared, client):
        return {"params": carry[0], "batch_stats": carry[1]}

    return ClientUpdate(init=init, step=step, finalize=finalize)
