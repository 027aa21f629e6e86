"""FedAvg (McMahan et al., 2017).

Each round: the participants start from the global model, train locally, and the server
sets the global model to their average weighted by training-set size. BN running
statistics stay with each client (never aggregated), as in every algorithm here.

Evaluated two ways: '' = the global model on every client's test split (with that
client's BN statistics), 'local' = each client's model after its latest local training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pfedla_jax.algorithms.base import Algorithm
from pfedla_jax.core.aggregation import weighted_average
from pfedla_jax.core.stacking import broadcast_clients, put_clients, take_clients


class FedAvg(Algorithm):
    name = "fedavg"

    def init(self, key):
        params, stats = self.ctx.init_client_variables(key)
        # With --init=independent the clients' first models differ; the global model is
        # then their train-size weighted average, the same rule as every round.
        weights = self.ctx.store.train_count.astype(jnp.float32)
        return {"global_params": weighted_average(params, weights),
                "client_params": params, "batch_stats": stats}

    def round(self, state, round_idx, participants, round_key):
        ids = jnp.asarray(participants, jnp.int32)
        start = broadcast_clients(state["global_params"], ids.shape[0])
        params, stats, metrics = self.ctx.trainer.train(
            start, take_clients(state["batch_stats"], ids), ids, round_key)
        weights = jnp.take(self.ctx.store.train_count, ids).astype(jnp.float32)
        new_state = {
            "global_params": weighted_average(params, weights),
            "client_params": put_clients(state["client_params"], ids, params),
            "batch_stats": put_clients(state["batch_stats"], ids, stats),
        }
        nbytes = self.ctx.model_bytes * int(ids.shape[0])
        return new_state, {**metrics, "bytes_up": nbytes, "bytes_down": nbytes}

    def eval_models(self, state):
        n = self.ctx.num_clients
        global_for_all = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape),
                                      state["global_params"])
        return {"": (global_for_all, state["batch_stats"]),
                "local": (state["client_params"], state["batch_stats"])}
