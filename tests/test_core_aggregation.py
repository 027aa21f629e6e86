"""Aggregation einsums vs naive loops; closed-form alpha cotangent vs autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfedla_jax.algorithms.pfedla import normalized_cotangent
from pfedla_jax.core.aggregation import aggregate, alpha_cotangent, weighted_average
from pfedla_jax.core.client_parallel import client_sharding, make_mesh
from pfedla_jax.core.layers import make_layer_map

LAYERS = ("Conv1", "BN1", "FC1")


def _params(rng, n):
    shapes = {"Conv1": {"kernel": (5, 5, 1, 4), "bias": (4,)},
              "BN1": {"scale": (4,), "bias": (4,)},
              "FC1": {"kernel": (6, 3), "bias": (3,)}}
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal((n,) + s), jnp.float32),
                        shapes, is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("granularity", ["layer", "tensor"])
def test_layer_map(granularity):
    params = jax.tree.map(lambda a: a[0], _params(np.random.default_rng(0), 1))
    lm = make_layer_map(params, LAYERS, granularity)
    if granularity == "layer":
        assert lm.names == LAYERS
        assert lm.num_params == (5 * 5 * 4 + 4, 8, 6 * 3 + 3)
        assert lm.layer_of_leaf["BN1"]["scale"] == lm.layer_of_leaf["BN1"]["bias"] == 1
    else:
        assert lm.names == ("Conv1/kernel", "Conv1/bias", "BN1/scale", "BN1/bias", "FC1/kernel", "FC1/bias")
        assert lm.num_params == (100, 4, 4, 4, 18, 3)
    assert sum(lm.num_params) == 100 + 4 + 8 + 21


@pytest.mark.parametrize("granularity", ["layer", "tensor"])
def test_aggregate_matches_naive_loop(granularity):
    rng = np.random.default_rng(1)
    n, s = 5, 3
    stacked = _params(rng, n)
    lm = make_layer_map(jax.tree.map(lambda a: a[0], stacked), LAYERS, granularity)
    alpha = jax.nn.softmax(jnp.asarray(rng.standard_normal((s, lm.num_layers, n)), jnp.float32), -1)
    got = aggregate(alpha, stacked, lm)
    units = jax.tree.leaves(lm.layer_of_leaf)
    for leaf_got, leaf_w, unit in zip(jax.tree.leaves(got), jax.tree.leaves(stacked), units):
        w = np.asarray(leaf_w, np.float64)
        for i in range(s):
            expect = sum(float(alpha[i, unit, j]) * w[j] for j in range(n))
            np.testing.assert_allclose(np.asarray(leaf_got[i]), expect, rtol=1e-5, atol=1e-6)


def test_one_hot_alpha_returns_own_params_exactly():
    rng = np.random.default_rng(2)
    stacked = _params(rng, 4)
    lm = make_layer_map(jax.tree.map(lambda a: a[0], stacked), LAYERS)
    ids = jnp.array([2, 0])
    alpha = jnp.broadcast_to(jax.nn.one_hot(ids, 4)[:, None, :], (2, lm.num_layers, 4))
    got = aggregate(alpha, stacked, lm)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w)[np.array([2, 0])])


@pytest.mark.parametrize("granularity", ["layer", "tensor"])
def test_alpha_cotangent_equals_autodiff(granularity):
    rng = np.random.default_rng(3)
    n, s = 4, 2
    stacked = _params(rng, n)
    delta = _params(rng, s)
    lm = make_layer_map(jax.tree.map(lambda a: a[0], stacked), LAYERS, granularity)
    alpha = jnp.asarray(rng.uniform(size=(s, lm.num_layers, n)), jnp.float32)

    def inner(a):
        bar = aggregate(a, stacked, lm)
        return sum(jnp.vdot(b, d) for b, d in zip(jax.tree.leaves(bar), jax.tree.leaves(delta)))

    np.testing.assert_allclose(alpha_cotangent(stacked, delta, lm), jax.grad(inner)(alpha),
                               rtol=1e-5, atol=1e-5)


def test_weighted_average():
    rng = np.random.default_rng(4)
    stacked = _params(rng, 3)
    w = jnp.array([10.0, 30.0, 60.0])
    got = weighted_average(stacked, w)
    for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(stacked)):
        p = np.asarray(p, np.float64)
        np.testing.assert_allclose(np.asarray(g), 0.1 * p[0] + 0.3 * p[1] + 0.6 * p[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_s", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_contractions_on_a_mesh_equal_one_device(num_s):
    """Split over the two devices' rows (partial sums + one sum across devices) = one device;
    the stack itself stays split (no device gathers the other's rows)."""
    mesh = make_mesh("shard")
    assert mesh.devices.size == 2
    rng = np.random.default_rng(3)
    n = 6
    stacked = jax.device_put(_params(rng, n), client_sharding(mesh))
    delta = _params(rng, num_s)
    lm = make_layer_map(jax.tree.map(lambda a: a[0], stacked), LAYERS, "layer")
    alpha = jnp.asarray(rng.dirichlet(np.ones(n), size=(num_s, lm.num_layers)), jnp.float32)
    one = jax.device_get(stacked)   # the references: the same rows, unsplit, on one device
    for got, want in [
        (jax.jit(lambda a, w: aggregate(a, w, lm, mesh))(alpha, stacked),
         jax.jit(lambda a, w: aggregate(a, w, lm))(alpha, one)),
        (jax.jit(lambda w, d: alpha_cotangent(w, d, lm, mesh))(stacked, delta),
         jax.jit(lambda w, d: alpha_cotangent(w, d, lm))(one, delta)),
        # 5 real clients of 6 rows: the padding row is excluded from the mean and spread
        *[(jax.jit(lambda w, d, s=scope: normalized_cotangent(w, d, lm, 5, mesh, s))(stacked, delta),
           jax.jit(lambda w, d, s=scope: normalized_cotangent(w, d, lm, 5, scope=s))(
               jax.tree.map(lambda a: a[:5], one), delta))
          for scope in ("model", "layer")],
    ]:
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_normalized_cotangent_equals_naive_loops(scope):
    """float64 loops over (s, l, j) of the documented formula."""
    rng = np.random.default_rng(5)
    n, num_s = 5, 3
    stacked, delta = _params(rng, n), _params(rng, num_s)
    lm = make_layer_map(jax.tree.map(lambda a: a[0], stacked), LAYERS, "layer")
    units = jax.tree.leaves(lm.layer_of_leaf)
    w = [np.asarray(x, np.float64).reshape(n, -1) for x in jax.tree.leaves(stacked)]
    d = [np.asarray(x, np.float64).reshape(num_s, -1) for x in jax.tree.leaves(delta)]
    layers = range(lm.num_layers)
    flat = lambda rows, l: np.concatenate([r for r, u in zip(rows, units) if u == l], axis=-1)
    centred = {l: flat(w, l) - flat(w, l).mean(0) for l in layers}
    dl = {l: flat(d, l) for l in layers}
    spread_sq = {l: np.mean(np.sum(centred[l] ** 2, axis=1)) for l in layers}
    want = np.zeros((num_s, lm.num_layers, n))
    for s in range(num_s):
        for l in layers:
            if scope == "layer":
                scale = np.linalg.norm(dl[l][s]) * np.sqrt(spread_sq[l])
            else:
                scale = (np.sqrt(sum(np.sum(dl[k][s] ** 2) for k in layers))
                         * np.sqrt(sum(spread_sq.values())))
            for j in range(n):
                want[s, l, j] = centred[l][j] @ dl[l][s] / scale
    got = normalized_cotangent(stacked, delta, lm, n, scope=scope)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_normalized_cotangent_is_scale_free(scope):
    """Scaling the clients' updates (a larger lr or budget) or the spread of the stored
    models around their mean leaves it unchanged; equal models give zero."""
    scoped = lambda *a: normalized_cotangent(*a, scope=scope)
    rng = np.random.default_rng(4)
    stacked, delta = _params(rng, 5), _params(rng, 3)
    lm = make_layer_map(jax.tree.map(lambda a: a[0], stacked), LAYERS, "layer")
    base = scoped(stacked, delta, lm, 5)
    mean = jax.tree.map(lambda w: w.mean(0, keepdims=True), stacked)
    for scale_delta, scale_spread in ((1e-3, 1.0), (50.0, 1.0), (1.0, 1e-2), (0.1, 20.0)):
        spread = jax.tree.map(lambda w, m: m + scale_spread * (w - m), stacked, mean)
        got = scoped(spread, jax.tree.map(lambda d: scale_delta * d, delta), lm, 5)
        np.testing.assert_allclose(got, base, rtol=2e-4, atol=2e-5)
    # the raw cotangent is not: it scales with the update
    raw = alpha_cotangent(stacked, delta, lm)
    raw2 = alpha_cotangent(stacked, jax.tree.map(lambda d: 50.0 * d, delta), lm)
    assert np.allclose(raw2, 50 * raw, rtol=1e-4)
    same = jax.tree.map(lambda w: jnp.broadcast_to(w[:1], w.shape), stacked)
    assert np.all(np.asarray(scoped(same, delta, lm, 5)) == 0)
