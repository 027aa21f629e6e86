"""Tests for pfedla_jax.models.ops: the custom-VJP conv and reshape max-pool vs plain lax."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pfedla_jax.models import ops

RTOL = 1e-5
COUT = 8


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_close_tree(a, b, rtol=RTOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape
        assert rel_err(x, y) < rtol, rel_err(x, y)


def normal(rng, shape, scale=1.0):
    # numpy RNG: jax.random compiles a new kernel per shape, which dominates small tests.
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def make_inputs(cin, key=0, lead=()):
    rng = np.random.default_rng(key)
    x = normal(rng, lead + (3, 12, 10, cin))
    w = normal(rng, lead + (5, 5, cin, COUT), 1 / np.sqrt(25 * cin))
    g = normal(rng, lead + (3, 8, 6, COUT))  # random cotangent direction
    return x, w, g


def scalar_fn(conv, g):
    """A random nonlinear scalar of the conv output, so both gradients are generic."""
    return lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) * g)


CONVS = {
    "fast": lambda x, w: ops.conv2d_valid(x, w, cin1_fast_path=True),
    "generic": lambda x, w: ops.conv2d_valid(x, w, cin1_fast_path=False),
}


@pytest.mark.parametrize("variant", sorted(CONVS))
@pytest.mark.parametrize("cin", [1, 3, 16])
def test_conv_forward_and_grads_match_reference(cin, variant):
    x, w, g = make_inputs(cin)
    conv = CONVS[variant]
    y = jax.jit(conv)(x, w)
    y_ref = jax.jit(ops.conv2d_valid_reference)(x, w)
    assert y.shape == y_ref.shape == (3, 8, 6, COUT)
    assert rel_err(y, y_ref) < RTOL
    grads = jax.jit(jax.grad(scalar_fn(conv, g), argnums=(0, 1)))(x, w)
    grads_ref = jax.jit(jax.grad(scalar_fn(ops.conv2d_valid_reference, g), argnums=(0, 1)))(x, w)
    assert_close_tree(grads, grads_ref)


@pytest.mark.parametrize("cin", [1, 3, 16])
def test_conv_grads_inside_scan(cin):
    xs, w, g = make_inputs(cin, key=1, lead=(4,))
    w = w[0]

    def run(conv):
        # A few SGD steps on w: gradients of later steps depend on earlier ones.
        def step(w, xg):
            x, gg = xg
            dx, dw = jax.grad(scalar_fn(conv, gg), argnums=(0, 1))(x, w)
            return w - 0.1 * dw, dx

        return jax.jit(lambda w, xs, g: lax.scan(step, w, (xs, g)))(w, xs, g)

    assert_close_tree(run(ops.conv2d_valid), run(ops.conv2d_valid_reference))


@pytest.mark.parametrize("cin", [1, 3, 16])
def test_conv_grads_under_vmap(cin):
    # Leading client axis on everything, including the kernel (per-client params).
    x, w, g = make_inputs(cin, key=2, lead=(2,))

    def grads(conv):
        f = lambda x, w, g: jax.grad(scalar_fn(conv, g), argnums=(0, 1))(x, w)
        return jax.jit(jax.vmap(f))(x, w, g)

    out = grads(ops.conv2d_valid)
    assert_close_tree(out, grads(ops.conv2d_valid_reference))
    # ... and equal to the per-client computation.
    one = jax.jit(lambda x, w, g: jax.grad(scalar_fn(ops.conv2d_valid, g), argnums=(0, 1))(x, w))
    per_client = [one(x[i], w[i], g[i]) for i in range(2)]
    assert_close_tree(out, jax.tree.map(lambda *a: jnp.stack(a), *per_client))


@pytest.mark.parametrize("cin", [1, 16])
def test_conv_vmap_with_shared_kernel(cin):
    x, w, g = make_inputs(cin, key=3, lead=(2,))
    w = w[0]

    def f(conv):
        grad = jax.grad(scalar_fn(conv, g[0]), argnums=(0, 1))
        return jax.jit(jax.vmap(grad, in_axes=(0, None)))(x, w)

    assert_close_tree(f(ops.conv2d_valid), f(ops.conv2d_valid_reference))


@pytest.mark.parametrize("cin", [1, 3])
def test_conv_second_order_reverse_mode(cin):
    # Hessian-vector product by reverse-over-reverse (what second-order methods use).
    x, w, g = make_inputs(cin, key=4)
    v = normal(np.random.default_rng(9), w.shape)

    def hvp(conv):
        grad_w = jax.grad(scalar_fn(conv, g), argnums=1)
        return jax.jit(jax.grad(lambda w: jnp.vdot(grad_w(x, w), v)))(w)

    assert_close_tree(hvp(ops.conv2d_valid), hvp(ops.conv2d_valid_reference))


def conv_eqns(jaxpr):
    """All conv_general_dilated equations in a jaxpr, including nested ones (scan bodies...)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            out.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += conv_eqns(sub)
    return out


@pytest.mark.parametrize("cin,fast,n_convs", [(3, True, 3), (1, False, 3), (1, True, 1), (1, None, 1)])
def test_conv_grad_uses_only_canonical_convs(cin, fast, n_convs):
    # The performance property behind the custom VJP: every conv in the training step is a plain
    # NHWC x HWIO -> NHWC conv without groups or dilation (what XLA:CPU runs fast in loops).
    x, w, g = make_inputs(cin)
    f = jax.grad(scalar_fn(lambda x, w: ops.conv2d_valid(x, w, cin1_fast_path=fast), g), argnums=(0, 1))
    step = lambda w, x: (w - f(x, w)[1], None)
    jaxpr = jax.make_jaxpr(lambda w, xs: lax.scan(step, w, xs))(w, jnp.stack([x, x]))
    eqns = conv_eqns(jaxpr.jaxpr)
    canonical = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    kinds = set()
    for e in eqns:
        p = e.params
        assert p["dimension_numbers"] == canonical
        assert p["feature_group_count"] == 1 and p["batch_group_count"] == 1
        assert tuple(p["lhs_dilation"]) == (1, 1) and tuple(p["rhs_dilation"]) == (1, 1)
        kinds.add((tuple(e.invars[0].aval.shape), tuple(e.invars[1].aval.shape)))
    # Distinct convs by operand shapes: forward, dx and dW; the Cin == 1 fast path (on by
    # default: fast=None) keeps only dW.
    assert len(kinds) == n_convs
    # Plain autodiff, for contrast, emits non-canonical layouts (the slow path on CPU).
    ref = jax.grad(scalar_fn(ops.conv2d_valid_reference, g), argnums=(0, 1))
    ref_eqns = conv_eqns(jax.make_jaxpr(ref)(x, w).jaxpr)
    assert any(e.params["dimension_numbers"] != canonical for e in ref_eqns)


def test_conv_shape_errors():
    x = jnp.zeros((2, 8, 8, 3))
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d_valid(x, jnp.zeros((5, 5, 2, 4)))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        ops.conv2d_valid(jnp.zeros((2, 4, 8, 3)), jnp.zeros((5, 5, 3, 4)))
    with pytest.raises(ValueError, match=r"\[B,H,W,Cin\]"):
        ops.conv2d_valid(jnp.zeros((8, 8, 3)), jnp.zeros((5, 5, 3, 4)))


def reduce_window_pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def test_max_pool_matches_reduce_window():
    rng = np.random.default_rng(5)
    x = normal(rng, (3, 8, 6, 5))  # continuous data: no ties
    g = normal(rng, (3, 4, 3, 5))
    y = jax.jit(ops.max_pool_2x2)(x)
    assert y.shape == (3, 4, 3, 5)
    np.testing.assert_array_equal(y, jax.jit(reduce_window_pool)(x))
    f = lambda pool: jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * g)))(x)
    np.testing.assert_array_equal(f(ops.max_pool_2x2), f(reduce_window_pool))


def test_max_pool_leading_axes_and_vmap():
    x = normal(np.random.default_rng(6), (2, 3, 4, 4, 2))
    expected = jnp.stack([reduce_window_pool(x[i]) for i in range(2)])
    np.testing.assert_array_equal(ops.max_pool_2x2(x), expected)
    np.testing.assert_array_equal(jax.vmap(ops.max_pool_2x2)(x), expected)


def test_max_pool_tie_gradient_is_split():
    # Documented behaviour: tied maxima share the cotangent equally (reduce_window picks one).
    x = jnp.ones((1, 2, 2, 1))
    np.testing.assert_allclose(jax.grad(lambda x: ops.max_pool_2x2(x).sum())(x), np.full((1, 2, 2, 1), 0.25))


@pytest.mark.parametrize("shape", [(2, 5, 4, 1), (2, 4, 7, 1), (4, 4)])
def test_max_pool_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="max_pool_2x2"):
        ops.max_pool_2x2(jnp.zeros(shape))
