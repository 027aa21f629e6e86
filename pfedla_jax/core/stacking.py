"""Gather/scatter of the participating clients' rows of stacked pytrees."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


@jax.jit
def take_clients(tree: Any, client_ids: jax.Array) -> Any:
    """Rows `client_ids` of every leaf: [N, ...] -> [S, ...] (a scalar id drops the axis)."""
    return jax.tree.map(lambda a: jnp.take(a, client_ids, axis=0), tree)


@jax.jit
def put_clients(tree: Any, client_ids: jax.Array, rows: Any) -> Any:
    """Writes `rows` ([S, ...]) into rows `client_ids` of `tree` ([N, ...])."""
    return jax.tree.map(lambda a, r: a.at[client_ids].set(r.astype(a.dtype)), tree, rows)


def broadcast_clients(tree: Any, num: int) -> Any:
    """[...] -> [num, ...] for every leaf."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (num,) + a.shape), tree)


def tree_bytes(tree: Any) -> int:
    """Bytes of all leaves of an (unstacked) pytree."""
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree)))
