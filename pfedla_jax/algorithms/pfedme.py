"""pFedMe (Dinh, Tran, Nguyen, "Personalized Federated Learning with Moreau Envelopes",
NeurIPS 2020, Algorithm 1): personalisation by Moreau envelopes.

Objective: min_w (1/N) sum_i F_i(w), F_i(w) = min_theta f_i(theta) + lam/2 ||theta - w||^2;
the personalised model of client i is theta_i, the proximal point of f_i at w. Server
state: the global model w. Per client: theta_i (the personalised model, evaluated), w_i
(its local copy of w after its latest local training) and BN running statistics.

One round (paper Alg. 1; official code CharlieDinh/pFedMe userpFedMe.py `train`,
optimizers/fedoptimizer.py `pFedMeOptimizer`, serverbase.py
`persionalized_aggregate_parameters`):

    server sends w^t to the participants S (sample-then-train, FL-bench's convention; the
      paper and the official code train all N clients and aggregate S)
    for each participant i (in parallel): w_i = theta = w^t
        for each local minibatch D (the trainer's epochs or --local_steps):
            repeat K times (the SAME batch):                                 inner solve
                theta <- theta - p (grad f_i(theta; D) + lam (theta - w_i) + mu theta)
            w_i <- w_i - eta lam (w_i - theta)                               local outer step
        (theta is carried from batch to batch as the warm start, never reset to w_i
         inside a round: the official code's self.model; reset to w^t at the next round)
        upload w_i; keep theta as the personalised model
    server: w^{t+1} = (1 - beta) w^t + beta sum_i n_i w_i / sum_i n_i

The inner solve is the official code's (K steps of `pFedMeOptimizer`; the paper solves the
inner problem to an accuracy nu). eta is the experiment's --lr; p = --pfedme_personal_lr;
mu = --pfedme_mu is the official code's extra L2 term (1e-3 there, not in the paper:
default 0). --momentum and --weight_decay are refused (every step is the plain update
above).

BN running statistics (a choice of this project: the paper's models have no BN): every
inner forward at theta updates them (K per batch, PyTorch's train-mode semantics); they stay
with the client.

Evaluation (each client's own BN running statistics):
  ''       theta_i, the personalised model: the final inner iterate of the client's latest
           local training (the initial model before it first trains). The paper's "PM".
           Every public reference evaluates something else through tensor aliasing (the
           official code w_i, PFLlib the broadcast global w; FL-bench the initial weights),
           so our numbers will not match theirs by construction.
  'local'  w_i after the client's latest local training (what the official code's "PM"
           really is).
  'global' the global model w (the paper's "GM").

Shapes: the global model is one unstacked params pytree; `client_params` and `theta`
leaves [N, ...]; `batch_stats` leaves [N, ...].
Errors: `PFedMeConfig.validate` / `validate_training` raise UserInputError (one line,
naming the flag) before any data is loaded.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pfedla_jax.algorithms.base import Algorithm, AlgorithmConfig, Evaluation, FLContext, TableRow
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import IntRange, LogUniform
from pfedla_jax.core.aggregation import weighted_average
from pfedla_jax.core.client_update import Batch, ClientUpdate, masked_cross_entropy, mean_batch_loss
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.core.state_size import client_models_terms, per_client_term, server_model_term
from pfedla_jax.errors import UserInputError


def _help(text: str) -> dict:
    return {"help": f"pFedMe: {text}"}


@dataclasses.dataclass(frozen=True)
class PFedMeConfig(AlgorithmConfig):
    """pFedMe's options (CLI --pfedme_<field>; the defaults: the official code's, field
    help)."""

    lam: float = dataclasses.field(default=15.0, metadata=_help(
        "lambda, the weight of the proximal term lam/2 ||theta - w||^2 (official default 15)."))
    inner_steps: int = dataclasses.field(default=5, metadata=_help(
        "K, gradient steps of the inner solve for theta on each minibatch (official default 5)."))
    personal_lr: float = dataclasses.field(default=0.01, metadata=_help(
        "p, the inner solve's step size (0.01: the official README's CIFAR-10 CNN setting, "
        "FL-bench and PFLlib; the official main.py default 0.09 is its MNIST DNN setting)."))
    beta: float = dataclasses.field(default=1.0, metadata=_help(
        "server mixing weight: w <- (1 - beta) w + beta * mean of the participants' w "
        "(official default 1; > 1 extrapolates)."))
    mu: float = dataclasses.field(default=0.0, metadata=_help(
        "extra L2 weight mu on theta in the inner step (the official code's 1e-3; not in the "
        "paper)."))

    def validate(self) -> None:
        """Raises UserInputError (one line, naming the flag) on a bad option."""
        for name in ("lam", "personal_lr", "beta"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UserInputError(f"--pfedme_{name} must be a positive number, got {value}")
        if self.inner_steps < 1:
            raise UserInputError(f"--pfedme_inner_steps must be >= 1, got {self.inner_steps}")
        if not (self.mu >= 0 and math.isfinite(self.mu)):
            raise UserInputError(f"--pfedme_mu must be a finite number >= 0, got {self.mu}")
        if self.personal_lr * (self.lam + self.mu) >= 2:
            raise UserInputError(
                f"--pfedme_personal_lr * (--pfedme_lam + --pfedme_mu) = "
                f"{self.personal_lr * (self.lam + self.mu):g} >= 2: the inner solve diverges "
                "even on a flat loss; lower --pfedme_personal_lr")

    def validate_training(self, train: LocalTrainConfig) -> None:
        """eta = --lr must keep the local outer step contracting; no momentum / weight decay."""
        if train.momentum > 0 or train.weight_decay > 0:
            raise UserInputError("pFedMe's local steps are plain updates (eta = --lr, "
                                 "--pfedme_personal_lr): --momentum and --weight_decay must be 0")
        if train.lr * self.lam >= 2:
            raise UserInputError(
                f"--lr * --pfedme_lam = {train.lr * self.lam:g} >= 2: the local step "
                "w <- w - lr lam (w - theta) diverges; lower --lr or --pfedme_lam")


# ---------------------------------------------------------------------------- the local step
def pfedme_update(model, *, lam: float, inner_steps: int, personal_lr: float, lr: float,
                  mu: float = 0.0, loss=masked_cross_entropy) -> ClientUpdate:
    """One client's pFedMe local training as a `ClientUpdate` (module docstring).

    Inputs as `sgd_update`: `client` = {'batch_stats'} with the starting w as `shared`
    (the global model), or {'params', 'batch_stats'} with shared None; theta starts at w.
    One minibatch per step. Output: {'params': w_i after the last batch, 'theta': the last
    inner iterate, 'batch_stats'}. The step's reported loss is f(theta; D) at the batch's
    first inner step, summed over D's real examples.

    Args:
      model: a Flax module called as model.apply(variables, x, train=True, mask=mask,
        mutable=['batch_stats']) -> (outputs, new_vars).
      lam, inner_steps, personal_lr, mu: lambda, K, p and mu of the inner solve.
      lr: eta, the local outer step size.
      loss: (outputs, labels, mask [B]) -> (sum of the real examples' losses, their count);
        cross-entropy by default (tests pass a squared error for closed forms).
    """

    grad = jax.grad(mean_batch_loss(model, loss), has_aux=True)

    def init(shared, client, client_id, key):
        w = client["params"] if shared is None else shared
        return w, w, client["batch_stats"]

    def step(carry, batch: Batch):
        theta, w, stats = carry
        x, y, mask = batch.x[0], batch.y[0], batch.mask[0]

        def inner(c, _):
            theta, stats = c
            g, (total, count, stats) = grad(theta, stats, x, y, mask)
            theta = jax.tree.map(lambda t, gi, wi: t - personal_lr * (gi + lam * (t - wi) + mu * t),
                                 theta, g, w)
            return (theta, stats), (total, count)

        (theta, stats), (totals, counts) = jax.lax.scan(inner, (theta, stats), None, length=inner_steps)
        w = jax.tree.map(lambda wi, t: wi - lr * lam * (wi - t), w, theta)
        return (theta, w, stats), (totals[0], counts[0])

    def finalize(carry, shared, client):
        theta, w, stats = carry
        return {"params": w, "theta": theta, "batch_stats": stats}

    return ClientUpdate(init=init, step=step, finalize=finalize)


# ---------------------------------------------------------------------------- the algorithm
@register("pfedme", PFedMeConfig)
class PFedMe(Algorithm):
    """pFedMe on the stacked engine (module docstring)."""

    display_name = "pFedMe"
    table_rows = (TableRow("pfedme", "pFedMe", order=3),)
    # The bounds keep every combination valid: lr * lam <= 0.09 * 20 = 1.8 < 2 and
    # personal_lr * lam <= 1.8 < 2 (mu = 0), so no sampled point is refused by validate().
    search_space = (
        LogUniform("train.lr", 1e-3, 0.09, source="pFedMe Sec. 5: eta 0.005 (tuned 0.01); capped "
                   "so that lr * lam < 2 over the whole lam range"),
        LogUniform("lam", 1.0, 20.0, source="pFedMe Sec. 5 / official code: 15 (tuned 15-30, "
                   "capped at 20); PFLlib 1.0"),
        LogUniform("personal_lr", 1e-3, 0.09, source="pFedMe Sec. 5: 0.09 (non-convex MNIST); "
                   "official README CIFAR-10, FL-bench, PFLlib: 0.01"),
        IntRange("inner_steps", 1, 10, source="K = 5: pFedMe official code, FL-bench, PFLlib"),
    )
    server_state_keys = ("global_params",)

    @classmethod
    def state_size_terms(cls, config, dims):
        """w_i (client_params) and theta_i of every client, BN statistics, the global w."""
        client, stats = client_models_terms(dims)
        return [client, per_client_term("client params", "theta", dims.P, "P"), stats,
                server_model_term(dims)]

    def __init__(self, ctx: FLContext, config: PFedMeConfig | None = None):
        super().__init__(ctx, config)
        cfg = self.config
        self.trainer: ClientTrainer = ctx.trainer.with_update(pfedme_update(
            ctx.model, lam=cfg.lam, inner_steps=cfg.inner_steps, personal_lr=cfg.personal_lr,
            lr=ctx.train.lr, mu=cfg.mu))

    def describe(self) -> str:
        cfg = self.config
        return (f"lam {cfg.lam:g}, K {cfg.inner_steps}, personal lr {cfg.personal_lr:g}, "
                f"eta {self.ctx.train.lr:g}, beta {cfg.beta:g}, mu {cfg.mu:g}")

    def init_state(self, key):
        params, stats = self.ctx.init_client_variables(key)
        weights = self.ctx.store.train_count.astype(jnp.float32)
        copy = lambda t: jax.tree.map(jnp.array, t)
        return {"global_params": weighted_average(params, weights), "client_params": params,
                "theta": copy(params), "batch_stats": stats}

    def round_step(self, state, round_idx, client_ids, key, data):
        stats = self.take(state["batch_stats"], client_ids)
        out, metrics = self.trainer.run(state["global_params"], {"batch_stats": stats},
                                        client_ids, key, data)
        weights = jnp.take(data.train_count, client_ids).astype(jnp.float32)
        beta = self.config.beta
        mixed = jax.tree.map(lambda g, m: (1.0 - beta) * g + beta * m,
                             state["global_params"], weighted_average(out["params"], weights))
        new_state = {
            "global_params": mixed,
            "client_params": self.put(state["client_params"], client_ids, out["params"]),
            "theta": self.put(state["theta"], client_ids, out["theta"]),
            "batch_stats": self.put(state["batch_stats"], client_ids, out["batch_stats"]),
        }
        model = jnp.full(client_ids.shape, self.ctx.model_bytes, jnp.int32)
        return new_state, {**metrics, "bytes_up": model, "bytes_down": model}

    def evaluate(self, state, round_idx, key):
        stats = state["batch_stats"]
        return Evaluation({"": View(state["theta"], stats),
                           "local": View(state["client_params"], stats),
                           "global": View(state["global_params"], stats, shared=True)})
