"""Evaluation of every client's personalised model on its own test (or validation) split.

One jitted program evaluates all clients through `for_each_client` (the training
strategy and mesh; under `vmap` at most `clients_per_batch` clients at a time, so the
activations of N = 1,000 clients are never live together). BN runs in eval mode with the
client's own running statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pfedla_jax.core.client_parallel import for_each_client, make_mesh, replicated, resolve_strategy
from pfedla_jax.core import multihost
from pfedla_jax.core.client_update import masked_cross_entropy
from pfedla_jax.data.store import ClientStore, normalize_images
from pfedla_jax.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class View:
    """The models of one evaluation view (e.g. pFedLA's aggregated models, or the models
    after local training).

    Attributes:
      params: leaves [K, ...] (one model per client, rows 0..N-1 are clients 0..N-1; rows
        past N are padding and ignored), or one unstacked model for every client
        (`shared=True`, e.g. FedAvg's global model: no N-fold copy).
      batch_stats: leaves [K, ...]: each client's BN running statistics.
      shared: whether `params` is one model for all clients.
    """

    params: Any
    batch_stats: Any
    shared: bool = False


class Evaluator:
    """Per-client accuracy and loss of stacked models on one split (BN in eval mode).

    Args:
      model: the client model.
      store: the client data.
      strategy: client parallelism (as for training).
      batch_size: examples per forward pass.
      clients_per_batch: under `vmap`, clients evaluated at once.
      mesh: the device mesh (default: the strategy's).
      split: 'test' (default) or 'validation' (the store's validation split); the
        evaluator reads no other split.

    Raises:
      UserInputError: an unknown split, or 'validation' for a store without one.
    """

    def __init__(self, model, store: ClientStore, strategy: str = "auto", batch_size: int = 256,
                 clients_per_batch: int = 64, mesh=None, split: str = "test"):
        if split not in ("test", "validation"):
            raise UserInputError(f"Evaluator: split must be test or validation, got {split!r}")
        self.split = split
        table, counts, _ = store.split(split)
        # the evaluated split in the test fields of the store it is given (one code path)
        store = dataclasses.replace(store, test_idx=table, test_count=counts,
                                    max_test=int(table.shape[1]))
        self.model = model
        self.strategy = resolve_strategy(strategy)
        self.mesh = mesh if mesh is not None else make_mesh(self.strategy)
        self.store = multihost.put(store, replicated(self.mesh))
        self.num_clients = store.num_clients
        max_test = int(store.test_idx.shape[1])
        self.batch_size = max(1, min(batch_size, max_test))
        self.num_chunks = -(-max_test // self.batch_size)
        self._max_test = max_test
        self._map = for_each_client(self._client_eval, self.strategy, self.mesh,
                                    batch_size=clients_per_batch)
        self._jitted = jax.jit(self._evaluate, static_argnames=("shared",))

    def _client_eval(self, shared, client, client_id, key):
        store, shared_params = shared
        params = shared_params if shared_params is not None else client["params"]
        n = store.test_count[client_id]
        idx_row = store.test_idx[client_id]

        def chunk(c):
            pos = c * self.batch_size + jnp.arange(self.batch_size)
            mask = (pos < n).astype(jnp.float32)
            idx = idx_row[jnp.minimum(pos, self._max_test - 1)]
            x = normalize_images(store.images[idx], store.mean, store.std)
            y = store.labels[idx]
            logits = self.model.apply({"params": params, "batch_stats": client["batch_stats"]},
                                      x, train=False)
            loss_sum, count = masked_cross_entropy(logits, y, mask)
            correct = jnp.sum((jnp.argmax(logits, -1) == y) * mask)
            return correct, loss_sum, count

        correct, loss_sum, count = jax.lax.map(chunk, jnp.arange(self.num_chunks))
        return correct.sum(), loss_sum.sum(), count.sum()

    def _evaluate(self, params, batch_stats, client_ids, store, shared: bool):
        clients = {"batch_stats": batch_stats} if shared else {"params": params, "batch_stats": batch_stats}
        return self._map((store, params if shared else None), clients, client_ids, None)

    def evaluate(self, params: Any, batch_stats: Any, client_ids=None, *,
                 shared: bool = False) -> dict[str, np.ndarray]:
        """Evaluates clients `client_ids` (default all N) whose models are `params`.

        Args:
          params: leaves [K, ...], row k the model of client_ids[k] (default: row i =
            client i, K >= N, rows past N ignored); or one model for all (shared=True).
          batch_stats: leaves [K, ...], like params.
          client_ids: int [K] (default arange(K), ids >= N skipped).
          shared: params is one unstacked model used by every client.

        Returns:
          {'correct': [K'], 'loss_sum': [K'], 'count': [K']} as numpy float64, K' = K or N.
        """
        rows = jax.tree.leaves(batch_stats)[0].shape[0] if jax.tree.leaves(batch_stats) else None
        if client_ids is None:
            if rows is None:
                rows = self.num_clients if shared else jax.tree.leaves(params)[0].shape[0]
            ids = np.arange(rows, dtype=np.int32)
            keep = min(rows, self.num_clients)
            ids = np.where(ids < self.num_clients, ids, -1).astype(np.int32)
        else:
            ids = np.asarray(client_ids, np.int32)
            keep = ids.shape[0]
        if rows is None:  # no BN statistics at all: one (empty) row per client
            batch_stats = {}
        out = self._jitted(params, batch_stats, jnp.asarray(ids), self.store, shared=shared)
        correct, loss_sum, count = (np.asarray(v, np.float64)[:keep] for v in multihost.host_tree(out))
        return {"correct": correct, "loss_sum": loss_sum, "count": count}


def summarize(result: dict[str, np.ndarray], prefix: str = "test") -> dict[str, Any]:
    """Weighted (by test size) and unweighted mean accuracy, std over clients, loss."""
    count = result["count"]
    acc = result["correct"] / np.maximum(count, 1)
    return {
        f"{prefix}_acc": float(result["correct"].sum() / max(count.sum(), 1)),
        f"{prefix}_acc_unweighted": float(acc.mean()),
        f"{prefix}_acc_std": float(acc.std()),
        f"{prefix}_loss": float(result["loss_sum"].sum() / max(count.sum(), 1)),
        f"{prefix}_acc_per_client": [round(float(a), 6) for a in acc],
    }
