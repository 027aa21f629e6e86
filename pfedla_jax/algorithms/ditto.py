"""Ditto (Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021, Algorithm 1; official code litian96/ditto,
flearn/trainers_MTL/ditto.py).

Each client k solves min_v F_k(v) + lam/2 ||v - w*||^2 (the paper's Eq. 2) for a personal
model v_k, where w* is the global model of a federated objective, trained by FedAvg. Round t:

    server sends w^t to the participants S
    each participant k, from w = w^t and its stored personal model v = v_k:
      for each of its local minibatches (the trainer's epochs or --local_steps):
        v <- v - eta (grad F_k(v; batch) + lam (v - w^t))      personal step (Alg. 1, line 8)
        w <- w - eta grad F_k(w; batch)                        global step (UPDATE_GLOBAL)
      keep v_k <- v; upload w
    server: w^{t+1} = sum_k n_k w_k / sum_k n_k over S (FedAvg)

The anchor is the round's received global model w^t, held fixed for the whole round (the
official code's `self.global_model`, FL-bench's and PFLlib's too), never the evolving local
copy of w; so the two trajectories are independent and their order does not change the
result. The schedule is the official code's: the two updates interleaved, one personal step
then one global step per minibatch, on the same minibatch and with the same learning rate
(so the personal model takes as many steps as the global one). FL-bench trains E global
epochs then `pers_epoch` personal epochs; PFLlib `plocal_epochs` personal epochs first.

Per client: v_k (the personal model, initialised to the client's initial model, i.e. the
initial global model under --init=common as in the official code; it changes only when k
participates), the BN running statistics of the global model's training on k
(`batch_stats`) and of v_k (`personal_stats`), kept apart (the two models' activations
differ). The server keeps w.

Evaluation: '' = v_k (the personal model; a client that never participated shows its
initial model, as in the official code); 'global' = the global model w with each client's
`batch_stats`.

Defaults: lam = 1 (the official scripts' --lam=1, e.g. run_fashion_clean_ditto_lam1.sh, and
FL-bench's; the paper picks lam per device from {0.1, 1, 2} on validation data, and the
official `--lam` default 0 and PFLlib's `-mu` default 0 make v a Local model). lam = 0 is
Local training of v; lam -> infinity gives v = w^t. Search range [0.05, 2]: the paper's
grids {0.05, 0.1, 0.2} and {0.1, 1, 2}. The official server takes the simple mean of the
uploads after sampling clients with probability ∝ n_k; here FedAvg's weighted mean (the
same in expectation). --momentum / --weight_decay apply to both models' steps (the
references use plain SGD, the default). Not modelled: the official --dynamic_lam (a lam from
{0.1, 1, 2} chosen at every step by validation loss) and the attack/robust-aggregation
options.

The round's train loss: f(v; batch) of the personal steps, summed over real examples.

Communication per participant and round: the global model down (w^t) and up (w_k); v_k
never leaves the client.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from pfedla_jax.algorithms.base import (Algorithm, AlgorithmConfig, Evaluation, FLContext,
                                        TableRow)
from pfedla_jax.algorithms.fedprox import check_prox_step, prox_gradient
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import CLIENT_LR, LogUniform
from pfedla_jax.core.aggregation import weighted_average
from pfedla_jax.core.client_update import Batch, ClientUpdate, masked_cross_entropy, mean_batch_loss
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig, make_optimizer
from pfedla_jax.core.state_size import client_models_terms, per_client_term, server_model_term
from pfedla_jax.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class DittoConfig(AlgorithmConfig):
    """Ditto's options (CLI --ditto_<field>; the default: the module docstring)."""

    lam: float = dataclasses.field(default=1.0, metadata={
        "help": "Ditto: lambda, the weight of lam/2 ||v - w||^2 pulling the personal model v "
                "toward the round's global model (official scripts and FL-bench: 1; 0 = Local)."})

    def validate(self) -> None:
        """Raises UserInputError (one line, naming the flag) on a bad option."""
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise UserInputError(f"--ditto_lam must be a finite number >= 0, got {self.lam}")

    def validate_training(self, train: LocalTrainConfig) -> None:
        check_prox_step(train.lr, self.lam, "--lr * --ditto_lam")


def ditto_update(model, optimizer: optax.GradientTransformation, lam: float,
                 loss=masked_cross_entropy) -> ClientUpdate:
    """One client's Ditto local training as a `ClientUpdate` (module docstring).

    Inputs: `shared` = the round's global model w^t (the global start and the personal
    anchor); `client` = {'personal': v_k, 'batch_stats': the global model's BN statistics
    of this client, 'personal_stats': v_k's}. Per step (one minibatch): a personal step on
    v (loss + lam (v - w^t)), then a global step on w (the loss alone), each with its own
    fresh `optimizer` state. Output: {'params': w after local training, 'personal': v,
    'batch_stats', 'personal_stats'}; the reported loss is f(v; batch). `loss` as in
    `fedprox.prox_update` (cross-entropy by default).
    """
    grad = jax.grad(mean_batch_loss(model, loss), has_aux=True)

    def init(shared, client, client_id, key):
        v = client["personal"]
        return (shared, client["batch_stats"], optimizer.init(shared),
                v, client["personal_stats"], optimizer.init(v), shared)

    def step(carry, batch: Batch):
        w, stats_w, opt_w, v, stats_v, opt_v, anchor = carry
        x, y, mask = batch.x[0], batch.y[0], batch.mask[0]
        g, (total, count, stats_v) = grad(v, stats_v, x, y, mask)
        updates, opt_v = optimizer.update(prox_gradient(g, v, anchor, lam), opt_v, v)
        v = optax.apply_updates(v, updates)
        g, (_, _, stats_w) = grad(w, stats_w, x, y, mask)
        updates, opt_w = optimizer.update(g, opt_w, w)
        w = optax.apply_updates(w, updates)
        return (w, stats_w, opt_w, v, stats_v, opt_v, anchor), (total, count)

    def finalize(carry, shared, client):
        w, stats_w, _, v, stats_v, _, _ = carry
        return {"params": w, "batch_stats": stats_w, "personal": v, "personal_stats": stats_v}

    return ClientUpdate(init=init, step=step, finalize=finalize)


@register("ditto", DittoConfig)
class Ditto(Algorithm):
    """Ditto on the stacked engine (module docstring)."""

    display_name = "Ditto"
    table_rows = (TableRow("ditto", "Ditto", order=21),)
    server_state_keys = ("global_params",)
    search_space = (CLIENT_LR, LogUniform("lam", 0.05, 2.0,
                                          source="Ditto paper, Sec. 5: lam from {0.05, 0.1, 0.2} and {0.1, 1, 2}"))

    @classmethod
    def state_size_terms(cls, config, dims):
        """v_k of every client, the BN statistics of both models, the global w."""
        _, stats = client_models_terms(dims)
        return [per_client_term("client params", "personal_params", dims.P, "P"), stats,
                per_client_term("BN statistics", "personal_stats", dims.B, "B"),
                server_model_term(dims)]

    def __init__(self, ctx: FLContext, config: DittoConfig | None = None):
        super().__init__(ctx, config)
        self.trainer: ClientTrainer = ctx.trainer.with_update(
            ditto_update(ctx.model, make_optimizer(ctx.train), self.config.lam))

    def describe(self) -> str:
        return f"lam {self.config.lam:g}"

    def init_state(self, key):
        params, stats = self.ctx.init_client_variables(key)
        weights = self.ctx.store.train_count.astype(jnp.float32)
        copy = lambda t: jax.tree.map(jnp.array, t)
        return {"global_params": weighted_average(params, weights), "personal_params": params,
                "batch_stats": stats, "personal_stats": copy(stats)}

    def round_step(self, state, round_idx, client_ids, key, data):
        mine = self.take({"personal": state["personal_params"], "batch_stats": state["batch_stats"],
                          "personal_stats": state["personal_stats"]}, client_ids)
        out, metrics = self.trainer.run(state["global_params"], mine, client_ids, key, data)
        weights = jnp.take(data.train_count, client_ids).astype(jnp.float32)
        new_state = {
            "global_params": weighted_average(out["params"], weights),
            "personal_params": self.put(state["personal_params"], client_ids, out["personal"]),
            "batch_stats": self.put(state["batch_stats"], client_ids, out["batch_stats"]),
            "personal_stats": self.put(state["personal_stats"], client_ids, out["personal_stats"]),
        }
        model = jnp.full(client_ids.shape, self.ctx.model_bytes, jnp.int32)
        return new_state, {**metrics, "bytes_up": model, "bytes_down": model}

    def evaluate(self, state, round_idx, key):
        return Evaluation({"": View(state["personal_params"], state["personal_stats"]),
                           "global": View(state["global_params"], state["batch_stats"], shared=True)})
