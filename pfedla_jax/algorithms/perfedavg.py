"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar, NeurIPS 2020, Alg. 1): FedAvg of a MAML objective.

Objective: min_w (1/n) sum_i f_i(w - alpha grad f_i(w)), a global w that is good after ONE
local gradient step. Server state: the global model w. Per client: BN running statistics
only (the algorithm itself keeps nothing per client).

One round (paper Alg. 1; FL-bench src/client/perfedavg.py and KarhouTam/Per-FedAvg
perfedavg.py for the HF finite difference; every reference takes the outer step at
w_{t-1}, restoring the pre-inner-step params):

    server sends w to the participants S
    for each participant i (in parallel), w_0 = w, for t = 1..tau:
        draw independent minibatches D, D' (and D'' for HF) of the client's training data
        w~  = w_{t-1} - alpha * grad f_i(w_{t-1}; D)                  inner (MAML) step
        g   = grad f_i(w~; D')                                         outer gradient at w~
        FO: w_t = w_{t-1} - beta * g                                   Hessian term dropped
        HF: w_t = w_{t-1} - beta * (g - alpha * H(w_{t-1}; D'') g)     at w_{t-1}, not at w~
    server: w <- sum_i n_i w_tau^i / sum_i n_i                         FedAvg's weighted mean

H(w; D'') g, `--perfedavg_hessian` (`hessian_vector_product`):
  exact              the gradient of <grad f(w; D''), v> in w with v = stop_gradient(g):
                     reverse over reverse (the model's custom-VJP ops have no forward
                     mode, so no jvp-of-grad); one extra backward of a backward.
  finite_difference  (grad f(w + delta v; D'') - grad f(w - delta v; D'')) / (2 delta), the
                     paper's and the references' estimate (FL-bench, KarhouTam, delta 1e-3).

Local budget: the trainer's epochs (or --local_steps): one meta-step consumes 2 (FO) or 3
(HF) minibatches of the client's per-epoch shuffles, so a client of b batches per epoch
runs floor(E * b / k) meta-steps (FL-bench's floor(b/k) per epoch; a client with fewer than
k batches in all its epochs runs none). Both steps are plain SGD: --momentum and
--weight_decay are refused (FL-bench takes the inner step with the client optimizer, whose
momentum buffer then carries across meta-steps: not in the algorithm); --lr is alpha unless
--perfedavg_alpha is set.

BN running statistics (a choice of this project: the paper's models have no BN): only the
inner-step forward at w_{t-1} on D updates them; the forwards at w~ and for the Hessian use
batch statistics (train mode) and their running-stat updates are dropped (FL-bench restores
the stats after every meta-step, so they never move: a bug this avoids). Statistics stay
with each client.

Evaluation (host side, never writes the state; every client, from the current global w,
each with its own BN running statistics, which the personalisation does not change):
  ''       w - alpha grad f_i(w; one training minibatch of size B), the batch drawn from
           the client's own TRAINING split with the evaluation key (paper §5's one SGD step
           "at the test time", on training data: pFedMe's code, CharlieDinh/pFedMe
           userperavg.py `train_one_step`, personalises on test batches, a leak). The
           headline.
  'local'  w after one full local epoch of plain SGD at lr alpha over the client's training
           data (FL-bench's forced fine-tune epoch; optimistic next to the paper).
  'global' w itself, no adaptation (a diagnostic: what the personalisation adds).

Shapes: the global model is one unstacked params pytree; `batch_stats` leaves [N, ...].
Errors: `PerFedAvgConfig.validate` / `validate_training` raise UserInputError (one line,
naming the flag) before any data is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pfedla_jax.algorithms.base import Algorithm, AlgorithmConfig, Evaluation, FLContext, TableRow
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import CLIENT_LR, LogUniform
from pfedla_jax.core.aggregation import weighted_average
from pfedla_jax.core.client_update import Batch, ClientUpdate, masked_cross_entropy, mean_batch_loss
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.core.state_size import per_client_term, server_model_term
from pfedla_jax.errors import UserInputError, check_choice

VARIANTS = ("fo", "hf")
HESSIANS = ("exact", "finite_difference")


def _help(text: str) -> dict:
    return {"help": f"Per-FedAvg: {text}"}


@dataclasses.dataclass(frozen=True)
class PerFedAvgConfig(AlgorithmConfig):
    """Per-FedAvg's options (CLI --perfedavg_<field>; the defaults follow FL-bench,
    pFedMe's code and KarhouTam/Per-FedAvg where they agree, field help)."""

    variant: str = dataclasses.field(default="fo", metadata=_help(
        "fo (first order: w <- w - beta g) | hf (Hessian-free: w <- w - beta (g - alpha H g), "
        "3 minibatches per local step)."))
    alpha: float = dataclasses.field(default=0.0, metadata=_help(
        "inner / personalisation step size alpha; 0 = the experiment's --lr (alpha = "
        "pFedLA's client lr; FL-bench: the client optimizer's lr)."))
    beta: float = dataclasses.field(default=1e-3, metadata=_help(
        "outer step size beta (1e-3: FL-bench, pFedMe's code and KarhouTam/Per-FedAvg agree)."))
    hessian: str = dataclasses.field(default="exact", metadata=_help(
        "HF's Hessian-vector product: exact (reverse-over-reverse autodiff) | "
        "finite_difference (central difference of gradients, step --perfedavg_delta)."))
    delta: float = dataclasses.field(default=1e-3, metadata=_help(
        "finite-difference step delta of --perfedavg_hessian=finite_difference (references: 1e-3)."))

    def validate(self) -> None:
        """Raises UserInputError (one line, naming the flag) on a bad option."""
        check_choice("perfedavg_variant", self.variant, VARIANTS)
        check_choice("perfedavg_hessian", self.hessian, HESSIANS)
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise UserInputError(f"--perfedavg_alpha must be a positive number (or 0 = --lr), got {self.alpha}")
        for name in ("beta", "delta"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UserInputError(f"--perfedavg_{name} must be a positive number, got {value}")

    def validate_training(self, train: LocalTrainConfig) -> None:
        """The meta-steps are plain SGD: the client optimizer's extras are refused."""
        if train.momentum > 0 or train.weight_decay > 0:
            raise UserInputError("Per-FedAvg's inner and outer steps are plain SGD (alpha, beta): "
                                 "--momentum and --weight_decay must be 0")

    def resolved_alpha(self, train: LocalTrainConfig) -> float:
        """alpha, or the experiment's --lr when alpha is 0."""
        return self.alpha or train.lr

    @property
    def batches_per_step(self) -> int:
        return 2 if self.variant == "fo" else 3


# ---------------------------------------------------------------------------- the local step
def _tree_vdot(a, b) -> jax.Array:
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _axpy(a, x, y):
    """a * x + y over pytrees."""
    return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


def hessian_vector_product(grad_fn, params, v, *, hessian: str = "exact", delta: float = 1e-3):
    """H(params) v, the Hessian of the loss whose gradient is `grad_fn`, times v (HF's term).

    Args:
      grad_fn: params -> the gradient pytree (in the HF step: of the mean loss on D'').
      params: the point w_{t-1}; v: a pytree like params, held constant (stop_gradient).
      hessian: 'exact' (the gradient of <grad_fn(w), v>: reverse over reverse) or
        'finite_difference' ((grad_fn(w + delta v) - grad_fn(w - delta v)) / (2 delta)).
      delta: the finite-difference step.
    Returns:
      a pytree like params.
    """
    v = jax.lax.stop_gradient(v)
    if hessian == "exact":
        return jax.grad(lambda p: _tree_vdot(grad_fn(p), v))(params)
    plus, minus = grad_fn(_axpy(delta, v, params)), grad_fn(_axpy(-delta, v, params))
    return jax.tree.map(lambda a, b: (a - b) / (2.0 * delta), plus, minus)


def perfedavg_update(model, *, alpha: float, beta: float, variant: str = "fo",
                     hessian: str = "exact", delta: float = 1e-3,
                     loss=masked_cross_entropy) -> ClientUpdate:
    """One client's Per-FedAvg local training as a `ClientUpdate` (module docstring).

    Inputs as `sgd_update`: `client` = {'batch_stats'} with the starting params as `shared`
    (the global model), or {'params', 'batch_stats'} with shared None. Each step receives
    k = 2 (FO) or 3 (HF) minibatches [k, B, ...]: D = batch 0, D' = 1, D'' = 2. Output:
    {'params': w_tau, 'batch_stats'}. The step's reported loss is f(w_{t-1}; D) (the inner
    forward), summed over D's real examples.

    Args:
      model: a Flax module called as model.apply(variables, x, train=True, mask=mask,
        mutable=['batch_stats']) -> (outputs, new_vars) (any model: tests use a linear one).
      alpha, beta: inner and outer step sizes (> 0).
      variant: 'fo' or 'hf'.
      hessian: 'exact' or 'finite_difference' (HF only).
      delta: the finite-difference step.
      loss: (outputs, labels, mask [B]) -> (sum of the real examples' losses, their count);
        cross-entropy by default (tests pass a squared error for closed forms).

    Raises:
      ValueError: an unknown variant or hessian.
    """
    if variant not in VARIANTS or hessian not in HESSIANS:
        raise ValueError(f"variant must be one of {VARIANTS} and hessian one of {HESSIANS}; "
                         f"got {variant!r}, {hessian!r}")

    grad = jax.grad(mean_batch_loss(model, loss), has_aux=True)

    def init(shared, client, client_id, key):
        params = client["params"] if shared is None else shared
        return params, client["batch_stats"]

    def step(carry, batch: Batch):
        params, stats = carry
        d0 = (batch.x[0], batch.y[0], batch.mask[0])
        d1 = (batch.x[1], batch.y[1], batch.mask[1])
        # inner step at w_{t-1} on D: the only forward whose running-stat update is kept
        g0, (loss_sum, count, new_stats) = grad(params, stats, *d0)
        adapted = _axpy(-alpha, g0, params)
        g, _ = grad(adapted, stats, *d1)
        if variant == "hf":
            d2 = (batch.x[2], batch.y[2], batch.mask[2])
            hv = hessian_vector_product(lambda p: grad(p, stats, *d2)[0], params, g,
                                        hessian=hessian, delta=delta)
            g = _axpy(-alpha, hv, g)
        params = _axpy(-beta, g, params)
        return (params, new_stats), (loss_sum, count)

    def finalize(carry, shared, client):
        return {"params": carry[0], "batch_stats": carry[1]}

    return ClientUpdate(init=init, step=step, finalize=finalize,
                        batches_per_step=2 if variant == "fo" else 3)


# ---------------------------------------------------------------------------- the algorithm
@register("perfedavg", PerFedAvgConfig)
class PerFedAvg(Algorithm):
    """Per-FedAvg on the stacked engine (module docstring)."""

    display_name = "Per-FedAvg"
    table_rows = (TableRow("perfedavg", "Per-FedAvg", order=2),)
    # alpha is the client lr (--perfedavg_alpha stays 0 = --lr): tuning train.lr tunes alpha
    # (FL-bench: alpha = the client optimizer's lr; pFedMe's code 0.005, tuned 0.02-0.03).
    # beta from the references' 1e-3 (FL-bench, pFedMe's code, KarhouTam/Per-FedAvg; pFedMe's
    # code tuned 1e-3 - 3e-3) up to beta = alpha (PFLlib) at the client-lr range's top.
    search_space = (CLIENT_LR,
                    LogUniform("beta", 1e-4, 0.3, source="1e-3: FL-bench, pFedMe's code, "
                               "KarhouTam/Per-FedAvg; beta = alpha: PFLlib"))
    server_state_keys = ("global_params",)

    @classmethod
    def state_size_terms(cls, config, dims):
        """Every client's BN statistics and the global model w (nothing else per client)."""
        return [per_client_term("BN statistics", "batch_stats", dims.B, "B"),
                server_model_term(dims)]

    def __init__(self, ctx: FLContext, config: PerFedAvgConfig | None = None):
        super().__init__(ctx, config)
        self.alpha = self.config.resolved_alpha(ctx.train)
        self.trainer  # built now: a budget without one meta-step is refused here

    @functools.cached_property
    def trainer(self) -> ClientTrainer:
        """The experiment's trainer (data, batch plan, strategy) running the meta-steps."""
        cfg = self.config
        return self.ctx.trainer.with_update(perfedavg_update(
            self.ctx.model, alpha=self.alpha, beta=cfg.beta, variant=cfg.variant,
            hessian=cfg.hessian, delta=cfg.delta))

    def _sgd_trainer(self, **budget) -> ClientTrainer:
        """Plain SGD at lr alpha over the experiment's data, batch size and strategy."""
        base = self.ctx.trainer
        cfg = LocalTrainConfig(batch_size=self.ctx.train.batch_size, lr=self.alpha, **budget)
        return ClientTrainer(self.ctx.model, base.store, cfg, base.strategy)

    @functools.cached_property
    def adapt_trainer(self) -> ClientTrainer:
        """One SGD step at alpha on one training minibatch (the '' view)."""
        return self._sgd_trainer(local_steps=1)

    @functools.cached_property
    def finetune_trainer(self) -> ClientTrainer:
        """One local epoch of SGD at alpha (the 'local' view)."""
        return self._sgd_trainer(local_epochs=1)

    def describe(self) -> str:
        cfg = self.config
        hf = f", Hessian {cfg.hessian}" + (f" (delta {cfg.delta:g})" if cfg.hessian != "exact" else "")
        return (f"{cfg.variant.upper()}{hf if cfg.variant == 'hf' else ''}: alpha {self.alpha:g}, "
                f"beta {cfg.beta:g}, {cfg.batches_per_step} minibatches per local step")

    def init_state(self, key):
        params, stats = self.ctx.init_client_variables(key)
        weights = self.ctx.store.train_count.astype(jnp.float32)
        return {"global_params": weighted_average(params, weights), "batch_stats": stats}

    def round_step(self, state, round_idx, client_ids, key, data):
        stats = self.take(state["batch_stats"], client_ids)
        out, metrics = self.trainer.run(state["global_params"], {"batch_stats": stats},
                                        client_ids, key, data)
        weights = jnp.take(data.train_count, client_ids).astype(jnp.float32)
        new_state = {"global_params": weighted_average(out["params"], weights),
                     "batch_stats": self.put(state["batch_stats"], client_ids, out["batch_stats"])}
        model = jnp.full(client_ids.shape, self.ctx.model_bytes, jnp.int32)
        return new_state, {**metrics, "bytes_up": model, "bytes_down": model}

    # ------------------------------------------------------------------ evaluation
    def _stored_ids(self) -> np.ndarray:
        """int32 [N_pad]: row r is client r (the mesh-padding rows repeat client 0)."""
        rows, n = self.ctx.num_stored, self.ctx.num_clients
        return np.where(np.arange(rows) < n, np.arange(rows), 0).astype(np.int32)

    def personalized(self, state, key, trainer: ClientTrainer | None = None):
        """Every client's model after `trainer`'s SGD at alpha from the global model (default:
        one step on one training minibatch drawn with `key`): leaves [N_pad, ...]. Pure."""
        trainer = trainer if trainer is not None else self.adapt_trainer
        out, _ = trainer.run(state["global_params"], {"batch_stats": state["batch_stats"]},
                             self._stored_ids(), key)
        return out["params"]

    def evaluate(self, state, round_idx, key):
        stats = state["batch_stats"]
        return Evaluation({
            "": View(self.personalized(state, key), stats),
            "local": View(self.personalized(state, key, self.finetune_trainer), stats),
            "global": View(state["global_params"], stats, shared=True),
        })
