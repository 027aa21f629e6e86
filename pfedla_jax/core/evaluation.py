"""Evaluation of every client's personalised model on its own test split."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pfedla_jax.core.local_training import masked_cross_entropy, resolve_strategy
from pfedla_jax.core.stacking import take_clients
from pfedla_jax.data.store import ClientStore, normalize_images


class Evaluator:
    """Per-client test accuracy and loss of stacked models (BN in eval mode)."""

    def __init__(self, model, store: ClientStore, strategy: str = "auto", batch_size: int = 256):
        self.model = model
        self.store = store
        # Evaluation is forward-only and occasional: vmap where vmap trains fastest, else the
        # per-client loop (the sharded path is not used for it).
        self.strategy = "vmap" if resolve_strategy(strategy) == "vmap" else "loop"
        max_test = int(store.test_idx.shape[1])
        self.batch_size = max(1, min(batch_size, max_test))
        self.num_chunks = -(-max_test // self.batch_size)
        self._max_test = max_test
        self._fns: dict[str, Any] = {}

    def _client_eval(self, params, batch_stats, client_id, store: ClientStore):
        n = store.test_count[client_id]
        idx_row = store.test_idx[client_id]

        def chunk(c):
            pos = c * self.batch_size + jnp.arange(self.batch_size)
            mask = (pos < n).astype(jnp.float32)
            idx = idx_row[jnp.minimum(pos, self._max_test - 1)]
            x = normalize_images(store.images[idx], store.mean, store.std)
            y = store.labels[idx]
            logits = self.model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
            loss_sum, count = masked_cross_entropy(logits, y, mask)
            correct = jnp.sum((jnp.argmax(logits, -1) == y) * mask)
            return correct, loss_sum, count

        correct, loss_sum, count = jax.lax.map(chunk, jnp.arange(self.num_chunks))
        return correct.sum(), loss_sum.sum(), count.sum()

    def evaluate(self, params: Any, batch_stats: Any, client_ids=None) -> dict[str, np.ndarray]:
        """Evaluates clients `client_ids` (default all) whose models are `params` ([K, ...]).

        Returns:
          {'correct': [K], 'loss_sum': [K], 'count': [K]} as numpy float64.
        """
        num = jax.tree.leaves(params)[0].shape[0]
        ids = jnp.arange(num, dtype=jnp.int32) if client_ids is None else jnp.asarray(client_ids, jnp.int32)
        if self.strategy == "vmap":
            if "vmap" not in self._fns:
                self._fns["vmap"] = jax.jit(jax.vmap(self._client_eval, in_axes=(0, 0, 0, None)))
            out = self._fns["vmap"](params, batch_stats, ids, self.store)
        else:
            if "loop" not in self._fns:
                def one(p, bs, s, ids, store):
                    return self._client_eval(take_clients(p, s), take_clients(bs, s), ids[s], store)
                self._fns["loop"] = jax.jit(one)
            outs = [self._fns["loop"](params, batch_stats, s, ids, self.store) for s in range(num)]
            out = tuple(jnp.stack(v) for v in zip(*outs))
        correct, loss_sum, count = (np.asarray(jax.device_get(v), np.float64) for v in out)
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
