"""FedAvg (McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient
Learning of Deep Networks from Decentralized Data", AISTATS 2017, Algorithm 1
FederatedAveraging), and the partial-sharing FedAvg that FedBN and FedRep are.

Each round: the participants start from the global model, train locally, and the server
sets the global model to their average weighted by training-set size (Algorithm 1's
w <- sum_k n_k / n w^k over the participants). BN running
statistics stay with each client (never aggregated), as in every algorithm here.

Evaluated two ways: '' = the global model on every client's test split (with that
client's BN statistics), 'local' = each client's model after its latest local training.

`FedAvg.local_layers()` names top-level layers that stay with each client instead (none
in FedAvg): a participant starts from the global model's shared layers and its OWN
stored local layers, only the shared layers are averaged and sent, and the personalised
model ('') is the global shared layers with the client's own local layers. FedBN
(fedbn.py: the BN layers) and FedRep (fedrep.py: the head) are this with a different
`local_layers()` (one code path, parameterised by what is local).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pfedla_jax.algorithms.base import Algorithm, Evaluation, TableRow
from pfedla_jax.algorithms.registry import register
from pfedla_jax.core.aggregation import weighted_average
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.state_size import client_models_terms, server_model_term


@register("fedavg")
class FedAvg(Algorithm):
    display_name = "FedAvg"
    table_rows = (TableRow("fedavg", "FedAvg", order=1),)

    server_state_keys = ("global_params",)

    @classmethod
    def state_size_terms(cls, config, dims):
        """Every client's model and BN statistics, and the global model (FedBN and FedRep
        too: their local layers stay in the client models)."""
        return [*client_models_terms(dims), server_model_term(dims)]

    # ------------------------------------------------------------------ what subclasses set
    def local_layers(self) -> tuple[str, ...]:
        """Top-level layers kept by each client, never averaged (FedAvg: none)."""
        return ()

    @functools.cached_property
    def trainer(self):
        """The local trainer (FedAvg: the experiment's plain SGD trainer)."""
        return self.ctx.trainer

    def aggregation_weights(self, data, client_ids) -> jax.Array:
        """float32 [S]: the participants' weights in the average (train-set sizes)."""
        return jnp.take(data.train_count, client_ids).astype(jnp.float32)

    # ------------------------------------------------------------------ shared/local split
    @functools.cached_property
    def is_local(self) -> dict:
        """{layer: {leaf: bool}}: True for the leaves of the local layers."""
        local = set(self.local_layers())
        return {layer: jax.tree.map(lambda _: layer in local, leaves)
                for layer, leaves in self.ctx.param_shapes.items()}

    @functools.cached_property
    def shared_bytes(self) -> int:
        """Bytes of the shared (averaged, communicated) part of one model."""
        sizes = jax.tree.map(lambda a, local: 0 if local else math.prod(a.shape) * a.dtype.itemsize,
                             self.ctx.param_shapes, self.is_local)
        return int(sum(jax.tree.leaves(sizes)))

    def personalized(self, global_params, client_params):
        """The global shared leaves with each client's own local leaves: [K, ...] like
        `client_params` (FedBN/FedRep's starting point and evaluated model)."""
        rows = jax.tree.leaves(client_params)[0].shape[0]
        return jax.tree.map(lambda g, c, local: c if local else jnp.broadcast_to(g, (rows,) + g.shape),
                            global_params, client_params, self.is_local)

    # ------------------------------------------------------------------ the algorithm
    def init_state(self, key):
        params, stats = self.ctx.init_client_variables(key)
        # With --init=independent the clients' first models differ; the global model is
        # then their train-size weighted average, the same rule as every round.
        weights = self.ctx.store.train_count.astype(jnp.float32)
        return {"global_params": weighted_average(params, weights),
                "client_params": params, "batch_stats": stats}

    def round_step(self, state, round_idx, client_ids, key, data):
        stats = self.take(state["batch_stats"], client_ids)
        if not self.local_layers():
            # every participant starts from the global model (passed once, not S copies)
            params, stats, metrics = self.trainer.train(
                state["global_params"], stats, client_ids, key, data, shared_params=True)
        else:
            start = self.personalized(state["global_params"], self.take(state["client_params"], client_ids))
            params, stats, metrics = self.trainer.train(start, stats, client_ids, key, data)
        average = weighted_average(params, self.aggregation_weights(data, client_ids))
        new_state = {
            # local leaves of the global model are never used: they keep their initial value
            "global_params": jax.tree.map(lambda g, a, local: g if local else a,
                                          state["global_params"], average, self.is_local),
            "client_params": self.put(state["client_params"], client_ids, params),
            "batch_stats": self.put(state["batch_stats"], client_ids, stats),
        }
        model = jnp.full(client_ids.shape, self.shared_bytes, jnp.int32)
        return new_state, {**metrics, "bytes_up": model, "bytes_down": model}

    def evaluate(self, state, round_idx, key):
        if self.local_layers():
            personal = View(self.personalized(state["global_params"], state["client_params"]),
                            state["batch_stats"])
        else:
            personal = View(state["global_params"], state["batch_stats"], shared=True)
        return Evaluation({"": personal, "local": View(state["client_params"], state["batch_stats"])})
