"""Stacked pytrees (a leading client axis on every leaf): broadcast, mesh padding, size."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def broadcast_clients(tree: Any, num: int) -> Any:
    """[...] -> [num, ...] for every leaf."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (num,) + a.shape), tree)


def pad_clients(tree: Any, num: int) -> Any:
    """[N, ...] -> [num, ...] with zero rows appended (num >= N); no copy if num == N."""
    def pad(a):
        extra = num - a.shape[0]
        if extra == 0:
            return a
        return jnp.concatenate([a, jnp.zeros((extra,) + a.shape[1:], a.dtype)])
    return jax.tree.map(pad, tree)


def unpad_clients(tree: Any, num: int) -> Any:
    """[K, ...] -> [num, ...] (the first num rows); no copy if K == num."""
    return jax.tree.map(lambda a: a if a.shape[0] == num else a[:num], tree)


def tree_bytes(tree: Any) -> int:
    """Bytes of all leaves of a pytree."""
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree)))
