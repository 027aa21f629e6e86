"""Tests for pfedla_jax.models.ops: the custom-VJP conv, max-pool and BatchNorm vs plain autodiff."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pfedla_jax.errors import UserInputError
from pfedla_jax.models import ops
from pfedla_jax.models.cnn import BatchNorm

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
    "fast": lambda x, w: ops.conv2d_valid(x, w, fast_path=True),
    "generic": lambda x, w: ops.conv2d_valid(x, w, fast_path=False),
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
@pytest.mark.parametrize("fast", [True, False])
def test_conv_grads_inside_scan(cin, fast):
    xs, w, g = make_inputs(cin, key=1, lead=(4,))
    w = w[0]
    fast_conv = lambda x, w: ops.conv2d_valid(x, w, fast_path=fast)

    def run(conv):
        # A few SGD steps on w: gradients of later steps depend on earlier ones.
        def step(w, xg):
            x, gg = xg
            dx, dw = jax.grad(scalar_fn(conv, gg), argnums=(0, 1))(x, w)
            return w - 0.1 * dw, dx

        return jax.jit(lambda w, xs, g: lax.scan(step, w, (xs, g)))(w, xs, g)

    assert_close_tree(run(fast_conv), run(ops.conv2d_valid_reference))


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


@pytest.mark.parametrize("cin,fast,n_convs", [
    (1, True, 1), (3, True, 1), (16, True, 2), (1, None, None), (1, False, 3), (16, False, 3)])
def test_conv_grad_uses_only_canonical_convs(cin, fast, n_convs):
    if n_convs is None:  # the default: the fast path on CPU only
        n_convs = 1 if ops.fast_path_enabled() else 3
    # The performance property behind the custom VJP: every conv in the training step is a plain
    # NHWC x HWIO -> NHWC conv without groups or dilation (what XLA:CPU runs fast in loops).
    x, w, g = make_inputs(cin)
    f = jax.grad(scalar_fn(lambda x, w: ops.conv2d_valid(x, w, fast_path=fast), g), argnums=(0, 1))
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
    # Distinct convs by operand shapes: forward, dx and dW without the fast path; with it
    # (the CPU default) dx is a GEMM, and for Cin <= 3 the forward is shifted
    # multiply-adds, which leaves dW only.
    assert len(kinds) == n_convs
    # Plain autodiff, for contrast, emits non-canonical layouts (the slow path on CPU).
    ref = jax.grad(scalar_fn(ops.conv2d_valid_reference, g), argnums=(0, 1))
    ref_eqns = conv_eqns(jax.make_jaxpr(ref)(x, w).jaxpr)
    assert any(e.params["dimension_numbers"] != canonical for e in ref_eqns)


def test_fast_path_default_follows_backend(monkeypatch):
    assert ops.fast_path_enabled(True) and not ops.fast_path_enabled(False)
    monkeypatch.setattr(ops, "FAST_PATH_DEFAULT", None)
    assert ops.fast_path_enabled() == (jax.default_backend() == "cpu")
    monkeypatch.setattr(ops, "FAST_PATH_DEFAULT", False)
    assert not ops.fast_path_enabled()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="inspects the XLA:CPU program")
@pytest.mark.parametrize("cin", [1, 3])
def test_shift_forward_is_materialised_once_per_channel(cin):
    # The shifted multiply-add output must survive XLA's fusion as a buffer (see
    # ops._materialize): one conditional per input channel in the optimised program. If XLA
    # ever folds these (e.g. identical branches), the CPU step silently gets 3-15x slower.
    x, w, _ = make_inputs(cin)
    fwd = jax.jit(lambda x, w: jnp.maximum(ops.conv2d_valid(x, w, fast_path=True), 0.0).sum((1, 2)))
    hlo = fwd.lower(x, w).compile().as_text()
    assert hlo.count(" conditional(") == cin


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("cin", [1, 3, 16])
def test_conv_non_square_kernel_and_input(cin, fast):
    # kh != kw and H != W catch any swapped spatial index in the hand-written passes.
    rng = np.random.default_rng(15)
    x = normal(rng, (2, 9, 11, cin))
    w = normal(rng, (3, 5, cin, COUT), 1 / np.sqrt(15 * cin))
    g = normal(rng, (2, 7, 7, COUT))
    conv = lambda x, w: ops.conv2d_valid(x, w, fast_path=fast)
    assert rel_err(jax.jit(conv)(x, w), ops.conv2d_valid_reference(x, w)) < RTOL
    grads = jax.jit(jax.grad(scalar_fn(conv, g), argnums=(0, 1)))(x, w)
    assert_close_tree(grads, jax.grad(scalar_fn(ops.conv2d_valid_reference, g), argnums=(0, 1))(x, w))


def test_conv_shape_errors():
    x = jnp.zeros((2, 8, 8, 3))
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d_valid(x, jnp.zeros((5, 5, 2, 4)))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        ops.conv2d_valid(jnp.zeros((2, 4, 8, 3)), jnp.zeros((5, 5, 3, 4)))
    with pytest.raises(ValueError, match=r"\[B,H,W,Cin\]"):
        ops.conv2d_valid(jnp.zeros((8, 8, 3)), jnp.zeros((5, 5, 3, 4)))


def reduce_window_pool(x):
    return ops.max_pool_2x2_reference(x)


def first_max_pool_grad(x, g):
    """numpy: each window's cotangent goes to its first maximum in row-major order."""
    x, g = np.asarray(x), np.asarray(g)
    dx = np.zeros_like(x)
    for idx in np.ndindex(*g.shape):
        *lead, h, w, c = idx
        window = [(2 * h + a, 2 * w + b) for a in (0, 1) for b in (0, 1)]
        values = [x[(*lead, p, q, c)] for p, q in window]
        p, q = window[int(np.argmax(values))]  # argmax returns the first maximum
        dx[(*lead, p, q, c)] = g[idx]
    return dx


def test_max_pool_matches_reduce_window():
    rng = np.random.default_rng(5)
    x = normal(rng, (3, 8, 6, 5))  # continuous data: no ties
    g = normal(rng, (3, 4, 3, 5))
    y = jax.jit(ops.max_pool_2x2)(x)
    assert y.shape == (3, 4, 3, 5)
    np.testing.assert_array_equal(y, jax.jit(reduce_window_pool)(x))
    f = lambda pool: jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * g)))(x)
    np.testing.assert_array_equal(f(ops.max_pool_2x2), f(reduce_window_pool))
    np.testing.assert_array_equal(f(ops.max_pool_2x2), first_max_pool_grad(x, g))


def test_max_pool_leading_axes_and_vmap():
    x = normal(np.random.default_rng(6), (2, 3, 4, 4, 2))
    expected = jnp.stack([reduce_window_pool(x[i]) for i in range(2)])
    np.testing.assert_array_equal(ops.max_pool_2x2(x), expected)
    np.testing.assert_array_equal(jax.vmap(ops.max_pool_2x2)(x), expected)
    g = normal(np.random.default_rng(7), (2, 3, 2, 2, 2))
    grad = jax.vmap(jax.grad(lambda x, g: jnp.sum(ops.max_pool_2x2(x) * g)))(x, g)
    np.testing.assert_array_equal(grad, first_max_pool_grad(x, g))


def test_max_pool_leading_axes_gradient_without_vmap():
    rng = np.random.default_rng(16)
    x = jnp.asarray(rng.integers(0, 2, (2, 3, 4, 6, 2)), jnp.float32)  # many ties
    g = normal(rng, (2, 3, 2, 3, 2))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(ops.max_pool_2x2(x) * g)))(x)
    np.testing.assert_array_equal(grad, first_max_pool_grad(x, g))


def test_max_pool_nan_window():
    # Documented: a NaN window has a NaN maximum and sends its cotangent to its last member.
    x = jnp.array([1.0, jnp.nan, 2.0, 0.0]).reshape(1, 2, 2, 1)
    assert np.isnan(ops.max_pool_2x2(x)).all()
    grad = jax.grad(lambda x: ops.max_pool_2x2(x).sum())(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[0.0, 0.0], [0.0, 1.0]])


def test_max_pool_ties_go_to_the_first_maximum():
    # PyTorch's MaxPool2d rule. Ties are everywhere in practice: a conv over a constant
    # background gives equal values. Small integers make every tie pattern appear.
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.integers(0, 3, (4, 6, 8, 3)), jnp.float32)
    g = normal(rng, (4, 3, 4, 3))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(ops.max_pool_2x2(x) * g)))(x)
    np.testing.assert_array_equal(grad, first_max_pool_grad(x, g))
    ones = jax.grad(lambda x: ops.max_pool_2x2(x).sum())(jnp.ones((1, 2, 2, 1)))
    np.testing.assert_array_equal(ones[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_conv_pool_second_order_reverse_mode():
    # Hessian-vector product of conv -> pool -> tanh through both custom VJPs, vs plain autodiff.
    x, w, _ = make_inputs(3, key=10)  # conv output (3, 8, 6, COUT), pooled (3, 4, 3, COUT)
    rng = np.random.default_rng(11)
    g, v = normal(rng, (3, 4, 3, COUT)), normal(rng, w.shape)

    def hvp(conv, pool):
        loss = lambda w: jnp.sum(jnp.tanh(pool(conv(x, w))) * g)
        return jax.jit(jax.grad(lambda w: jnp.vdot(jax.grad(loss)(w), v)))(w)

    assert_close_tree(hvp(lambda x, w: ops.conv2d_valid(x, w, fast_path=True), ops.max_pool_2x2),
                      hvp(ops.conv2d_valid_reference, reduce_window_pool))


@pytest.mark.parametrize("shape", [(2, 5, 4, 1), (2, 4, 7, 1), (4, 4)])
def test_max_pool_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="max_pool_2x2"):
        ops.max_pool_2x2(jnp.zeros(shape))


# ----------------------------------------------------------------------------- BatchNorm


def bn_inputs(key, mask):
    rng = np.random.default_rng(key)
    x = normal(rng, (len(mask), 5, 4, 6), 2.0) + 0.5
    scale, bias = normal(rng, (6,)) + 1.0, normal(rng, (6,))
    cot = (normal(rng, x.shape), normal(rng, (6,)), normal(rng, (6,)))  # for y, mean, var
    return x, scale, bias, jnp.asarray(mask, jnp.float32), cot


@pytest.mark.parametrize("zero_padding_cotangent", [True, False])
@pytest.mark.parametrize("mask", [[1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 0, 0]])
def test_batch_norm_matches_autodiff_reference(mask, zero_padding_cotangent):
    x, scale, bias, m, (g_y, g_mean, g_var) = bn_inputs(12, mask)
    pad = (m == 0)[:, None, None, None]
    x = jnp.where(pad, 100.0 * x, x)  # padded rows: wild values
    if zero_padding_cotangent:  # as in training (the loss is masked)
        g_y = jnp.where(pad, 0.0, g_y)

    def loss(bn):
        def f(x, scale, bias):
            y, mean, var, _ = bn(x, scale, bias, m, 1e-5)
            return jnp.sum(y * g_y) + jnp.dot(mean, g_mean) + jnp.dot(var, g_var)
        return f

    out = jax.jit(ops.batch_norm_train, static_argnums=4)(x, scale, bias, m, 1e-5)
    ref = jax.jit(ops.batch_norm_train_reference, static_argnums=4)(x, scale, bias, m, 1e-5)
    assert_close_tree(out, ref)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(out))
    assert float(out[3]) == sum(mask) * 5 * 4
    grads = jax.jit(jax.grad(loss(ops.batch_norm_train), argnums=(0, 1, 2)))(x, scale, bias)
    grads_ref = jax.jit(jax.grad(loss(ops.batch_norm_train_reference), argnums=(0, 1, 2)))(x, scale, bias)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(grads))
    if zero_padding_cotangent and not any(mask):
        # An all-padding batch under a masked loss: nothing may move.
        assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(grads))
    else:
        assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(grads))  # not 0 == 0
    assert_close_tree(grads, grads_ref, rtol=2e-5)


def test_batch_norm_bool_mask_and_bad_impl():
    x, scale, bias, m, _ = bn_inputs(17, [1, 0, 1])
    as_bool = ops.batch_norm_train(x, scale, bias, m > 0, 1e-5)
    assert_close_tree(as_bool, ops.batch_norm_train(x, scale, bias, m, 1e-5))
    grad = jax.grad(lambda x: ops.batch_norm_train(x, scale, bias, m > 0, 1e-5)[0].sum() ** 2)(x)
    assert np.isfinite(grad).all()
    with pytest.raises(UserInputError, match="BatchNorm impl"):
        BatchNorm(impl="bogus").init(jax.random.key(0), x, train=True)


def test_batch_norm_second_order_reverse_mode():
    x, scale, bias, m, (g_y, _, _) = bn_inputs(13, [1, 1, 0, 1])
    v = normal(np.random.default_rng(14), x.shape)

    def hvp(bn):
        loss = lambda x: jnp.sum(jnp.tanh(bn(x, scale, bias, m, 1e-5)[0]) * g_y)
        return jax.jit(jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v)))(x)

    assert_close_tree(hvp(ops.batch_norm_train), hvp(ops.batch_norm_train_reference), rtol=1e-4)
