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
Local's, pFedLA's), with an optional trainable mask built from optax's `partition`
(frozen leaves get a zero update and their optimizer state does not advance): one
per-leaf mask for all steps (e.g. a frozen classifier), or `PhaseMasks`, one mask per
phase of the local epochs (e.g. FedRep's head epochs, then body epochs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class Batch(NamedTuple):
    """k minibatches of one client for one step.

    Attributes:
      x: float32 [k, B, H, W, C], normalised images.
      y: int32 [k, B] labels.
      mask: float32 [k, B], 1 for real examples, 0 for the padding of a partial batch.
      epoch: int32 scalar, the local epoch (0-based) of the step's first minibatch (epochs
        are counted in the client's own batches, ceil(train examples / B) per epoch).
    """

    x: jax.Array
    y: jax.Array
    mask: jax.Array
    epoch: jax.Array | int = 0


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


def mean_batch_loss(model, loss: Callable = masked_cross_entropy) -> Callable:
    """The train-mode loss of one minibatch, for `jax.grad(..., has_aux=True)`.

    Returns f(params, batch_stats, x, y, mask) -> (mean loss over the real examples,
    (loss sum, real examples, the batch_stats after this forward pass)).

    Args:
      model: a Flax module called as model.apply(variables, x, train=True, mask=mask,
        mutable=['batch_stats']) -> (outputs, new_vars).
      loss: (outputs, labels, mask [B]) -> (sum of the real examples' losses, their count);
        cross-entropy by default (tests pass a squared error for closed forms).
    """
    def f(params, batch_stats, x, y, mask):
        out, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                    train=True, mask=mask, mutable=["batch_stats"])
        total, count = loss(out, y, mask)
        return total / jnp.maximum(count, 1.0), (total, count, new_vars.get("batch_stats", batch_stats))

    return f


@dataclasses.dataclass(frozen=True)
class PhaseMasks:
    """Trainable masks that change with the local epoch: phase p covers `epochs[p]` epochs.

    A step of local epoch e is in phase p when sum(epochs[:p]) <= e < sum(epochs[:p+1]);
    steps past the last phase stay in it. In a phase, the leaves its mask marks False get a
    zero update and their optimizer state does not advance (each leaf's optimizer state
    persists across the phases it trains in: one optimizer, gated per phase).

    Attributes:
      trainable: one mask per phase: a pytree of bools with the params' structure, or a
        callable params -> such a pytree.
      epochs: int >= 0 per phase, the local epochs it lasts (a phase of 0 epochs is skipped).

    Raises:
      ValueError: a different number of masks and phases, or a negative phase length.

    Example (FedRep, Collins et al. 2021, Alg. 1: head epochs with the body frozen, then
    body epochs with the head frozen):
      PhaseMasks((is_head, is_body), epochs=(local_epochs - 1, 1))
    """

    trainable: tuple
    epochs: tuple[int, ...]

    def __post_init__(self):
        if len(self.trainable) != len(self.epochs) or not self.epochs:
            raise ValueError(f"PhaseMasks needs one mask per phase; got {len(self.trainable)} "
                             f"masks for {len(self.epochs)} phases")
        if any(int(e) < 0 for e in self.epochs):
            raise ValueError(f"phase lengths must be >= 0 epochs, got {self.epochs}")

    def phase(self, epoch) -> jax.Array:
        """int32 scalar: the phase of a step of local epoch `epoch` (traceable)."""
        bounds = jnp.asarray(np.cumsum(self.epochs)[:-1], jnp.int32)
        return jnp.sum(jnp.asarray(epoch, jnp.int32) >= bounds).astype(jnp.int32)

    def masks(self, params) -> list:
        return [m(params) if callable(m) else m for m in self.trainable]


def _phase_gated(optimizer: optax.GradientTransformation, phases: tuple[int, ...]
                 ) -> optax.GradientTransformationExtraArgs:
    """`optimizer` while the `phase` extra argument is one of `phases`; frozen otherwise.

    Frozen = zero updates and the optimizer state kept as it was (selected with jnp.where:
    bit-identical, no retrace per phase).
    """
    inner = optax.with_extra_args_support(optimizer)

    def update(updates, state, params=None, *, phase=0, **extra_args):
        new_updates, new_state = inner.update(updates, state, params)
        on = jnp.any(jnp.asarray(phase) == jnp.asarray(phases))
        new_updates = jax.tree.map(lambda u: jnp.where(on, u, jnp.zeros_like(u)), new_updates)
        new_state = jax.tree.map(lambda n, o: jnp.where(on, n, o), new_state, state)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update)


def masked_optimizer(optimizer: optax.GradientTransformation, trainable: Any | None
                     ) -> optax.GradientTransformation:
    """`optimizer` on the leaves where `trainable` is True; zero updates elsewhere.

    Args:
      optimizer: the optax transformation of the trainable leaves.
      trainable: None (every leaf trains), a pytree of bools with the params' structure,
        a callable params -> such a pytree, or `PhaseMasks` (then `update` takes the extra
        argument `phase=`, an int32 scalar: `PhaseMasks.phase(batch.epoch)`).
    Returns:
      An optax transformation (optax.partition: the trainable leaves under `optimizer`,
      gated per phase for PhaseMasks; frozen leaves under set_to_zero, without state).
    """
    if trainable is None:
        return optimizer
    if not isinstance(trainable, PhaseMasks):
        def labels(params):
            mask = trainable(params) if callable(trainable) else trainable
            return jax.tree.map(lambda t: "train" if t else "freeze", mask)

        return optax.partition({"train": optimizer, "freeze": optax.set_to_zero()}, labels)

    num = len(trainable.epochs)

    def phase_labels(params):
        # a leaf's label: the phases it trains in ('0', '1', '0,1', ...) or 'freeze'
        per_phase = trainable.masks(params)
        return jax.tree.map(
            lambda *on: ",".join(str(p) for p in range(num) if on[p]) or "freeze", *per_phase)

    groups = {",".join(str(p) for p in range(num) if bits >> p & 1) for bits in range(1, 2 ** num)}
    transforms = {g: _phase_gated(optimizer, tuple(int(p) for p in g.split(","))) for g in groups}
    transforms["freeze"] = optax.set_to_zero()
    return optax.partition(transforms, phase_labels)


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
      trainable: optional mask of the trainable leaves, one for all steps or one per
        phase of the local epochs (`PhaseMasks`; see `masked_optimizer`).
    """
    tx = masked_optimizer(optimizer, trainable)
    phased = isinstance(trainable, PhaseMasks)
    grad = jax.grad(mean_batch_loss(model), has_aux=True)

    def init(shared, client, client_id, key):
        params = client["params"] if shared is None else shared
        return params, client["batch_stats"], tx.init(params)

    def step(carry, batch: Batch):
        params, batch_stats, opt_state = carry
        x, y, mask = batch.x[0], batch.y[0], batch.mask[0]

        grads, (loss_total, count, new_stats) = grad(params, batch_stats, x, y, mask)
        if phased:
            updates, opt_state = tx.update(grads, opt_state, params,
                                           phase=trainable.phase(batch.epoch))
        else:
            updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, new_stats, opt_state), (loss_total, count)

    def finalize(carry, shared, client):
        return {"params": carry[0], "batch_stats": carry[1]}

    return ClientUpdate(init=init, step=step, finalize=finalize)
