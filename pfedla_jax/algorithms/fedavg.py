"""FedAvg (McMahan et al., 2017).

Each round: the participants start from the global model, train locally, and the server
sets the global model to their average weighted by training-set size. BN running
statistics stay with each client (never aggregated), as in every algorithm here.

Evaluated two ways: '' = the global model on every client's test split (with that
client's BN statistics), 'local' = each client's model after its latest local training.
"""

from __future__ import annotations

import jax.numpy as jnp

from pfedla_jax.algorithms.base import Algorithm, Evaluation
from pfedla_jax.algorithms.registry import register
from pfedla_jax.core.aggregation import weighted_average
from pfedla_jax.core.evaluation import View


@register("fedavg")
class FedAvg(Algorithm):
    server_state_keys = ("global_params",)

    def init_state(self, key):
        params, stats = self.ctx.init_client_variables(key)
        # With --init=independent the clients' first models differ; the global model is
        # then their train-size weighted average, the same rule as every round.
        weights = self.ctx.store.train_count.astype(jnp.float32)
        return {"global_params": weighted_average(params, weights),
                "client_params": params, "batch_stats": stats}

    def round_step(self, state, round_idx, client_ids, key, data):
        # every participant starts from the global model (passed once, not S copies)
        params, stats, metrics = self.ctx.trainer.train(
            state["global_params"], self.take(state["batch_stats"], client_ids), client_ids,
            key, data, shared_params=True)
        weights = jnp.take(data.train_count, client_ids).astype(jnp.float32)
        new_state = {
            "global_params": weighted_average(params, weights),
            "client_params": self.put(state["client_params"], client_ids, params),
            "batch_stats": self.put(state["batch_stats"], client_ids, stats),
        }
        model = jnp.full(client_ids.shape, self.ctx.model_bytes, jnp.int32)
        return new_state, {**metrics, "bytes_up": model, "bytes_down": model}

    def evaluate(self, state, round_idx, key):
        return Evaluation({"": View(state["global_params"], state["batch_stats"], shared=True),
                           "local": View(state["client_params"], state["batch_stats"])})
