"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in
Heterogeneous Networks", MLSys 2020, Algorithm 2; official code litian96/FedProx,
flearn/trainers/fedprox.py and flearn/optimizer/pgd.py).

FedAvg with a proximal term in every client's local objective. Round t:

    server sends w^t to the participants S
    each participant k starts from w^t and approximately minimises (Alg. 2, line 6)
        h_k(w) = F_k(w) + mu/2 ||w - w^t||^2
      by the trainer's local SGD: per minibatch,
        w <- w - eta (grad F_k(w; batch) + mu (w - w^t))     (pgd.py `_apply_dense`)
    server: w^{t+1} = sum_k n_k w_k / sum_k n_k over S   (the official code's weighted mean;
      the paper samples p_k ∝ n_k and takes the simple mean: the same in expectation)

The anchor w^t is the round's received global model, held fixed for the whole local
training (never the evolving iterate), on the trainable params only: BN running statistics
are not parameters, get no proximal term and stay with each client, as in every algorithm
here. With --momentum / --weight_decay the proximal gradient goes through the optimizer
with the loss gradient (FL-bench's `.grad` hook); the references use plain SGD (the
default), where this is exactly the update above. mu = 0 is FedAvg.

Per client: BN running statistics and the model after its latest local training (for the
'local' view); the server keeps w. No other state persists across rounds.

Evaluation: '' = the global model w on every client's test split (with that client's BN
statistics; FedProx is not a personalised method: the official code evaluates w^t),
'local' = each client's model after its latest local training.

Default mu = 1: the paper's best mu on its two image datasets (MNIST and FEMNIST; the
official plotting script's `mus`) and FL-bench's default. The official `--mu` default 0 and
PFLlib's `-mu` default 0 make it FedAvg. Search range [0.001, 1]: the paper's grid {0.001,
0.01, 0.1, 1}.

Not modelled: systems heterogeneity (the paper's stragglers, which run 1..E-1 epochs and
are still aggregated, and its adaptive-mu heuristic, §5.3): every participant runs the
trainer's full local epochs (or steps).

Communication per participant and round: the model down (w^t) and up (w_k), as FedAvg.

`prox_update` (the local step with a proximal term toward an anchor) also serves Ditto's
personal model (anchor w^t) and FedAMP (anchor u_i, one per client).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import optax

from pfedla_jax.algorithms.base import AlgorithmConfig, TableRow
from pfedla_jax.algorithms.fedavg import FedAvg
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import CLIENT_LR, LogUniform
from pfedla_jax.core.client_update import Batch, ClientUpdate, masked_cross_entropy, mean_batch_loss
from pfedla_jax.core.local_training import LocalTrainConfig, make_optimizer
from pfedla_jax.errors import UserInputError


def prox_gradient(grads, params, anchor, rho: float):
    """grads + rho (params - anchor), leaf by leaf (the gradient of rho/2 ||params -
    anchor||^2 added; the squared norm over the whole parameter vector)."""
    return jax.tree.map(lambda g, p, a: g + rho * (p - a), grads, params, anchor)


def prox_update(model, optimizer: optax.GradientTransformation, rho: float,
                loss=masked_cross_entropy) -> ClientUpdate:
    """Local training on f(w) + rho/2 ||w - anchor||^2, one minibatch per step, as a
    `ClientUpdate`: per step, grad = grad f(w; batch) + rho (w - anchor), then `optimizer`.

    Inputs: `client` = {'batch_stats', optionally 'params' (the start; default `shared`),
    optionally 'anchor' (default `shared`)}; `shared` = e.g. the global model (FedProx: the
    start and the anchor). The anchor is held fixed over the client's steps; the optimizer
    state is fresh each round. Output: {'params', 'batch_stats'} after local training. The
    step's reported loss is f(w; batch) (without the proximal term), summed over the batch's
    real examples.

    Args:
      model: a Flax module called as model.apply(variables, x, train=True, mask=mask,
        mutable=['batch_stats']) -> (logits, new_vars).
      optimizer: the client optimizer (plain SGD in the references).
      rho: the proximal weight (FedProx's mu, Ditto's lambda, FedAMP's lambda / alpha_k).
      loss: (outputs, labels, mask [B]) -> (sum of the real examples' losses, their count);
        cross-entropy by default (tests pass a squared error for closed forms).
    """
    grad = jax.grad(mean_batch_loss(model, loss), has_aux=True)

    def init(shared, client, client_id, key):
        params = client["params"] if "params" in client else shared
        anchor = client["anchor"] if "anchor" in client else shared
        return params, client["batch_stats"], optimizer.init(params), anchor

    def step(carry, batch: Batch):
        params, stats, opt_state, anchor = carry
        g, (total, count, stats) = grad(params, stats, batch.x[0], batch.y[0], batch.mask[0])
        updates, opt_state = optimizer.update(prox_gradient(g, params, anchor, rho), opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state, anchor), (total, count)

    def finalize(carry, shared, client):
        return {"params": carry[0], "batch_stats": carry[1]}

    return ClientUpdate(init=init, step=step, finalize=finalize)


def check_prox_step(lr: float, rho: float, flags: str) -> None:
    """Refuses lr * rho >= 2 (UserInputError naming `flags`): the proximal part of the step,
    w - a <- (1 - lr rho)(w - a), then diverges even on a flat loss."""
    if lr * rho >= 2:
        raise UserInputError(f"{flags} = {lr * rho:g} >= 2: the proximal step diverges even on "
                             "a flat loss; lower --lr or the proximal weight")


@dataclasses.dataclass(frozen=True)
class FedProxConfig(AlgorithmConfig):
    """FedProx's options (CLI --fedprox_<field>; the default: the module docstring)."""

    mu: float = dataclasses.field(default=1.0, metadata={
        "help": "FedProx: mu, the weight of the proximal term mu/2 ||w - w_global||^2 in the "
                "local objective (paper's best on MNIST/FEMNIST and FL-bench: 1; 0 is FedAvg)."})

    def validate(self) -> None:
        """Raises UserInputError (one line, naming the flag) on a bad option."""
        if not (self.mu >= 0 and math.isfinite(self.mu)):
            raise UserInputError(f"--fedprox_mu must be a finite number >= 0, got {self.mu}")

    def validate_training(self, train: LocalTrainConfig) -> None:
        check_prox_step(train.lr, self.mu, "--lr * --fedprox_mu")


@register("fedprox", FedProxConfig)
class FedProx(FedAvg):
    """FedProx on the stacked engine: FedAvg's round with `prox_update` as the local step
    (anchor = the shared global model the participants start from)."""

    display_name = "FedProx"
    table_rows = (TableRow("fedprox", "FedProx", order=20),)
    search_space = (CLIENT_LR, LogUniform("mu", 1e-3, 1.0, source="FedProx paper, grid {0.001, 0.01, 0.1, 1}"))

    def __init__(self, ctx, config=None):
        super().__init__(ctx, config)
        self.trainer  # built now, outside any trace (it places the client data on the mesh)

    @functools.cached_property
    def trainer(self):
        return self.ctx.trainer.with_update(
            prox_update(self.ctx.model, make_optimizer(self.ctx.train), self.config.mu))

    def describe(self) -> str:
        return f"mu {self.config.mu:g}"
