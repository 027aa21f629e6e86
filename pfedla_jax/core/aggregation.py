"""Layer-wise aggregation of stacked client parameters as batched contractions.

For a leaf W of layer l stacked over the N stored clients, `[N, ...]`, and the weights
`alpha[s, l, n]` that participating client s puts on client n's layer l (pFedLA, Ma et al.
CVPR 2022, Eq. 3: one column of alpha_s per layer), the personalised leaf of client s is
(Eq. 6)

    theta_bar[s] = sum_n alpha[s, l, n] * W[n]        i.e. einsum('sn,n...->s...').

The cotangent of alpha that the hypernetwork update pulls back (Eqs. 10-11 with the local
update delta in place of the loss gradient) has the closed form

    G[s, l, n] = d<theta_bar_s, delta_s>/d alpha[s, l, n] = sum_{leaves of l} <W[n], delta[s]>

(d theta_bar_s / d alpha[s, l, n] is W[n] on layer l's block), so no parameter-sized
tensor is differentiated.

With a device mesh whose axis `clients` splits the stack (`mesh=`), both contractions run
where the stack lives (`client_parallel.over_row_blocks`): each device contracts its own
clients' rows and the partial results [S, ...] are summed across devices (the stack itself
never moves: at N = 1,000 no device gathers the other devices' 1,000 x |theta| rows).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pfedla_jax.core.client_parallel import RowBlock, over_row_blocks
from pfedla_jax.core.layers import LayerMap


def aggregate(alpha: jax.Array, stacked_params: Any, layer_map: LayerMap, mesh=None) -> Any:
    """Personalised params of S clients from the N stored ones (paper Eq. 6).

    Args:
      alpha: [S, L, N] aggregation weights; alpha[s, l] sums to 1 over n.
      stacked_params: pytree with leaves [N, ...].
      layer_map: which unit l each leaf belongs to.
      mesh: optional mesh splitting the N rows over its `clients` axis (N divisible by its
        size): partial sums per device, then one sum across devices (the result is on every
        device).

    Returns:
      pytree with leaves [S, ...].
    """
    def local(block: RowBlock, alpha_block, params_block):
        return block.total(_aggregate(alpha_block, params_block, layer_map))

    return over_row_blocks(local, mesh, in_axes=(2, 0), out_axes=None)(alpha, stacked_params)


def _aggregate(alpha, stacked_params, layer_map):
    def mix(unit, w):
        weights = alpha[:, unit, :].astype(w.dtype)
        # HIGHEST: the mix must be exact to float32 (a one-hot alpha must return a client's
        # own params bit for bit); the contraction is tiny next to local training.
        return jnp.einsum("sn,n...->s...", weights, w, precision=jax.lax.Precision.HIGHEST)

    return jax.tree.map(mix, layer_map.layer_of_leaf, stacked_params)


def alpha_cotangent(stacked_params: Any, delta: Any, layer_map: LayerMap, mesh=None) -> jax.Array:
    """G[s, l, n] = sum over leaves of layer l of <W[n], delta[s]> (module docstring).

    Args:
      stacked_params: pytree with leaves [N, ...]: the stored client params theta_n that
        built theta_bar_s.
      delta: pytree with leaves [S, ...]: the local updates delta theta_s.
      layer_map: the units.
      mesh: optional mesh splitting the N rows (as for `aggregate`): each device computes the
        columns of its own clients (delta is broadcast to every device).

    Returns:
      [S, L, N] float32.
    """
    return over_row_blocks(lambda block, w, d: _alpha_cotangent(w, d, layer_map), mesh,
                           in_axes=(0, None), out_axes=2)(stacked_params, delta)


def _alpha_cotangent(stacked_params, delta, layer_map):
    leaves_w = jax.tree.leaves(stacked_params)
    leaves_d = jax.tree.leaves(delta)
    units = jax.tree.leaves(layer_map.layer_of_leaf)
    num_s = leaves_d[0].shape[0]
    num_n = leaves_w[0].shape[0]
    out = jnp.zeros((num_s, layer_map.num_layers, num_n), jnp.float32)
    for unit, w, d in zip(units, leaves_w, leaves_d):
        w2 = w.reshape(num_n, -1).astype(jnp.float32)
        d2 = d.reshape(num_s, -1).astype(jnp.float32)
        out = out.at[:, unit, :].add(
            jnp.einsum("sp,np->sn", d2, w2, precision=jax.lax.Precision.HIGHEST))
    return out


def weighted_average(stacked_params: Any, weights: jax.Array) -> Any:
    """sum_s w_s theta_s / sum_s w_s over the leading axis (FedAvg)."""
    w = weights.astype(jnp.float32) / jnp.sum(weights.astype(jnp.float32))
    return jax.tree.map(
        lambda p: jnp.einsum("s,s...->...", w.astype(p.dtype), p,
                             precision=jax.lax.Precision.HIGHEST),
        stacked_params)
