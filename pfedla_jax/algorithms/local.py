"""Local training: every client trains alone, nothing is communicated."""

from __future__ import annotations

import jax.numpy as jnp

from pfedla_jax.algorithms.base import Algorithm
from pfedla_jax.core.stacking import put_clients, take_clients


class Local(Algorithm):
    name = "local"

    def init(self, key):
        params, stats = self.ctx.init_client_variables(key)
        return {"client_params": params, "batch_stats": stats}

    def round(self, state, round_idx, participants, round_key):
        ids = jnp.asarray(participants, jnp.int32)
        params, stats, metrics = self.ctx.trainer.train(
            take_clients(state["client_params"], ids), take_clients(state["batch_stats"], ids),
            ids, round_key)
        state = {"client_params": put_clients(state["client_params"], ids, params),
                 "batch_stats": put_clients(state["batch_stats"], ids, stats)}
        return state, {**metrics, "bytes_up": 0, "bytes_down": 0}

    def eval_models(self, state):
        return {"": (state["client_params"], state["batch_stats"])}
