"""Local training: every client trains alone, nothing is communicated (the "Local" row of
pFedLA's Tables 1-2, Ma et al., CVPR 2022: each client's E local epochs of SGD per round)."""

from __future__ import annotations

import jax.numpy as jnp

from pfedla_jax.algorithms.base import Algorithm, Evaluation, TableRow
from pfedla_jax.algorithms.registry import register
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.state_size import client_models_terms


@register("local")
class Local(Algorithm):
    display_name = "Local"
    table_rows = (TableRow("local", "Local", order=0),)

    @classmethod
    def state_size_terms(cls, config, dims):
        return client_models_terms(dims)

    def init_state(self, key):
        params, stats = self.ctx.init_client_variables(key)
        return {"client_params": params, "batch_stats": stats}

    def round_step(self, state, round_idx, client_ids, key, data):
        mine = self.take({"params": state["client_params"], "stats": state["batch_stats"]}, client_ids)
        params, stats, metrics = self.ctx.trainer.train(mine["params"], mine["stats"], client_ids, key, data)
        state = {"client_params": self.put(state["client_params"], client_ids, params),
                 "batch_stats": self.put(state["batch_stats"], client_ids, stats)}
        nothing = jnp.zeros(client_ids.shape, jnp.int32)
        return state, {**metrics, "bytes_up": nothing, "bytes_down": nothing}

    def evaluate(self, state, round_idx, key):
        return Evaluation({"": View(state["client_params"], state["batch_stats"])})
