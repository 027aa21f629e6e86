"""Tests for pfedla_jax.models.cnn: CNNTarget shapes, counts, init, gradients, BatchNorm."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfedla_jax import models
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import BatchNorm

FMNIST = (28, 28, 1)
CIFAR = (32, 32, 3)
EPS = 1e-5


def assert_close_tree(a, b, rtol=1e-5, atol=1e-6):
    """||a - b|| <= rtol ||b|| + atol per leaf (atol: conv biases before BN have ~0 gradient)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        err, ref = np.linalg.norm(x - y), np.linalg.norm(y)
        assert err <= rtol * ref + atol, (jax.tree_util.keystr(path), err, ref)


def normal(rng, shape, scale=1.0, loc=0.0):
    # numpy RNG: eager jax.random compiles per shape, which dominates small tests.
    return jnp.asarray(loc + scale * rng.standard_normal(shape), jnp.float32)


def batch(shape, n, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return normal(rng, (n,) + shape), jnp.asarray(rng.integers(0, num_classes, n), jnp.int32)


def init(shape, seed=0):
    # Default model (custom conv, 10 classes): init_variables caches its jitted init per model,
    # so every test after the first one per shape skips the (seconds-long) compile.
    return models.init_variables(models.make_cnn(shape, 10), jax.random.key(seed), shape)


def masked_ce(logits, y, mask):
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
    return jnp.sum(ce * mask) / jnp.sum(mask)


def make_loss_and_grad(model):
    """jit(params, batch_stats, x, y, mask) -> ((loss, new batch_stats), grads)."""

    def loss_fn(params, batch_stats, x, y, mask):
        logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mask=mask, mutable=["batch_stats"])
        return masked_ce(logits, y, mask), upd.get("batch_stats", {})

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("shape,num_classes,expected_bn,count", [
    (FMNIST, 10, False, 85_822),
    (CIFAR, 10, True, 121_278),
    (CIFAR, 100, True, 128_928),
])
def test_parameter_counts_and_layers(shape, num_classes, expected_bn, count):
    model = models.make_cnn(shape, num_classes)
    assert model.use_bn is expected_bn
    # eval_shape: no compile (an init compile costs seconds on CPU); values are tested below.
    variables = jax.eval_shape(lambda k: models.init_variables(model, k, shape), jax.random.key(0))
    assert models.count_params(variables["params"]) == count
    names = models.layer_names(model)
    # Dict order is not forward order (jit sorts keys): layer_names gives the order.
    assert set(variables["params"]) == set(names)
    expected = models.LAYER_ORDER if expected_bn else ("Conv1", "Conv2", "FC1", "FC2", "FC3")
    assert names == expected
    for name in names:
        leaves = set(variables["params"][name])
        assert leaves == ({"scale", "bias"} if name.startswith("BN") else {"kernel", "bias"})
    if expected_bn:
        assert set(variables["batch_stats"]) == {"BN1", "BN2"}
        bn2 = variables["batch_stats"]["BN2"]
        assert {k: v.shape for k, v in bn2.items()} == {"mean": (32,), "var": (32,)}
    else:
        assert variables["batch_stats"] == {}
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, jnp.zeros((2,) + shape))
    assert logits.shape == (2, num_classes)


@pytest.mark.slow
def test_init_follows_pytorch_default_bounds():
    variables = init(CIFAR, seed=1)
    p = variables["params"]
    for name in ("BN1", "BN2"):
        np.testing.assert_array_equal(variables["batch_stats"][name]["mean"], 0.0)
        np.testing.assert_array_equal(variables["batch_stats"][name]["var"], 1.0)
        np.testing.assert_array_equal(p[name]["scale"], 1.0)
        np.testing.assert_array_equal(p[name]["bias"], 0.0)
    assert p["Conv1"]["kernel"].shape == (5, 5, 3, 16)
    assert p["Conv2"]["kernel"].shape == (5, 5, 16, 32)
    assert p["FC1"]["kernel"].shape == (800, 120)
    fan_in = {"Conv1": 75, "Conv2": 400, "FC1": 800, "FC2": 120, "FC3": 84}
    for name, fan in fan_in.items():
        bound = 1 / math.sqrt(fan)
        for leaf in ("kernel", "bias"):
            a = np.asarray(p[name][leaf])
            assert np.abs(a).max() <= bound
            if a.size >= 100:  # uniform on the whole interval, not a narrower one
                assert np.abs(a).max() > 0.9 * bound
                assert abs(a.std() - bound / math.sqrt(3)) < 0.2 * bound


def test_use_bn_override_and_default():
    assert models.make_cnn((28, 28, 3), 10).use_bn
    assert not models.make_cnn(CIFAR, 10, use_bn=False).use_bn
    assert models.make_cnn(FMNIST, 10, use_bn=True).use_bn
    assert models.layer_names(models.make_cnn(FMNIST, 10, use_bn=True)) == models.LAYER_ORDER


@pytest.mark.parametrize("shape", [(27, 27, 1), (30, 30, 1), (12, 12, 1), (28, 26, 1), (28, 28), (28, 28, 0),
                                   "abc"])
def test_bad_input_shapes_raise_user_error(shape):
    with pytest.raises(UserInputError) as exc:
        models.make_cnn(shape, 10)
    assert "\n" not in str(exc.value)


def test_other_bad_arguments_raise_user_error():
    with pytest.raises(UserInputError):
        models.make_cnn(FMNIST, 0)
    with pytest.raises(UserInputError):
        models.make_cnn(FMNIST, 10, conv_impl="flax")
    model = models.make_cnn(FMNIST, 10)
    variables = init(FMNIST)
    with pytest.raises(UserInputError):
        model.apply(variables, jnp.zeros((2, 27, 27, 1)), train=False)
    with pytest.raises(UserInputError):
        model.apply(variables, jnp.zeros((28, 28, 1)), train=False)


def test_smaller_valid_shapes_work():
    # 16 -> conv 12 -> pool 6 -> conv 2 -> pool 1: the smallest square input.
    model = models.make_cnn((16, 16, 1), 3)
    variables = jax.eval_shape(lambda k: models.init_variables(model, k, (16, 16, 1)), jax.random.key(0))
    assert variables["params"]["FC1"]["kernel"].shape == (32, 120)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("shape", [FMNIST, pytest.param(CIFAR, marks=pytest.mark.slow)])
def test_sgd_step_custom_conv_matches_reference(shape):
    x, y = batch(shape, 8, seed=2)
    mask = jnp.ones(8)
    variables = init(shape, seed=3)
    out = {}
    for impl in ("custom", "reference"):
        model = models.make_cnn(shape, 10, conv_impl=impl)
        out[impl] = make_loss_and_grad(model)(variables["params"], variables["batch_stats"], x, y, mask)
    (loss_c, stats_c), grads_c = out["custom"]
    (loss_r, stats_r), grads_r = out["reference"]
    assert abs(float(loss_c) - float(loss_r)) < 1e-5
    assert_close_tree(grads_c, grads_r)
    assert_close_tree(stats_c, stats_r)


@pytest.mark.slow
def test_vmap_over_clients_matches_per_client():
    model = models.make_cnn(CIFAR, 10)
    per_client = [init(CIFAR, seed) for seed in (4, 5)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *per_client)
    xs, ys = zip(*(batch(CIFAR, 4, seed=s) for s in (5, 6)))
    xs, ys, masks = jnp.stack(xs), jnp.stack(ys), jnp.ones((2, 4))
    loss_and_grad = make_loss_and_grad(model)
    vmapped = jax.jit(jax.vmap(loss_and_grad))(stacked["params"], stacked["batch_stats"], xs, ys, masks)
    for i, v in enumerate(per_client):
        single = loss_and_grad(v["params"], v["batch_stats"], xs[i], ys[i], masks[i])
        assert_close_tree(jax.tree.map(lambda a: a[i], vmapped), single, rtol=1e-5)


@pytest.mark.slow
def test_padding_mask_through_the_model():
    # Padded examples change neither real examples' logits, the BN stats, nor the gradients
    # of a masked loss: same as running the real examples alone.
    model = models.make_cnn(CIFAR, 10)
    variables = init(CIFAR, seed=7)
    x, y = batch(CIFAR, 6, seed=8)
    x = x.at[jnp.array([1, 4])].multiply(50.0)  # padding rows: wildly different data
    mask = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    real = jnp.array([0, 2, 3, 5])
    loss_and_grad = make_loss_and_grad(model)
    params, stats = variables["params"], variables["batch_stats"]
    (loss_m, stats_m), grads_m = loss_and_grad(params, stats, x, y, mask)
    (loss_r, stats_r), grads_r = loss_and_grad(params, stats, x[real], y[real], jnp.ones(4))
    assert abs(float(loss_m) - float(loss_r)) < 1e-5
    assert_close_tree(stats_m, stats_r)
    assert_close_tree(grads_m, grads_r, rtol=1e-5)
    apply = jax.jit(lambda v, x, m: model.apply(v, x, train=True, mask=m, mutable=["batch_stats"])[0])
    np.testing.assert_allclose(apply(variables, x, mask)[real], apply(variables, x[real], None),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- BatchNorm


def bn_variables(c, rng):
    return {
        "params": {"scale": normal(rng, (c,), 0.5, 1.0), "bias": normal(rng, (c,))},
        "batch_stats": {"mean": normal(rng, (c,)), "var": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)},
    }


def bn_train(variables, x, mask=None):
    f = jax.jit(functools.partial(BatchNorm().apply, train=True, mutable=["batch_stats"]))
    y, upd = f(variables, x, mask=mask)
    return y, upd["batch_stats"]


def numpy_bn_train(variables, x):
    x = np.asarray(x, np.float64)
    p, s = (jax.tree.map(np.asarray, variables[k]) for k in ("params", "batch_stats"))
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    n = x.size // x.shape[-1]
    y = (x - mean) / np.sqrt(var + EPS) * p["scale"] + p["bias"]
    stats = {"mean": 0.9 * s["mean"] + 0.1 * mean, "var": 0.9 * s["var"] + 0.1 * var * n / (n - 1)}
    return y, stats


def test_batchnorm_train_matches_numpy():
    rng = np.random.default_rng(10)
    variables = bn_variables(5, rng)
    x = normal(rng, (6, 3, 4, 5), 2.0, 1.5)
    y, stats = bn_train(variables, x)
    y_np, stats_np = numpy_bn_train(variables, x)
    np.testing.assert_allclose(y, y_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["mean"], stats_np["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], stats_np["var"], rtol=1e-5, atol=1e-6)
    # An all-ones mask is the same as no mask.
    y1, stats1 = bn_train(variables, x, jnp.ones(6))
    np.testing.assert_allclose(y1, y, rtol=1e-6, atol=1e-6)
    assert_close_tree(stats1, stats, rtol=1e-6)


def test_batchnorm_mask_excludes_padding():
    rng = np.random.default_rng(11)
    variables = bn_variables(4, rng)
    x = normal(rng, (7, 2, 3, 4))
    x = x.at[jnp.array([0, 3, 6])].set(normal(rng, (3, 2, 3, 4), 100.0, 30.0))
    mask = jnp.array([0, 1, 1, 0, 1, 1, 0], jnp.int32)  # integer masks work too
    real = jnp.array([1, 2, 4, 5])
    y_m, stats_m = bn_train(variables, x, mask)
    y_r, stats_r = bn_train(variables, x[real])
    np.testing.assert_allclose(y_m[real], y_r, rtol=1e-5, atol=1e-5)
    assert_close_tree(stats_m, stats_r, rtol=1e-6)
    assert np.isfinite(np.asarray(y_m)).all()


def test_batchnorm_all_masked_keeps_running_stats():
    rng = np.random.default_rng(12)
    variables = bn_variables(4, rng)
    x = normal(rng, (3, 2, 2, 4))
    y, stats = bn_train(variables, x, jnp.zeros(3))
    np.testing.assert_array_equal(stats["mean"], variables["batch_stats"]["mean"])
    np.testing.assert_array_equal(stats["var"], variables["batch_stats"]["var"])
    assert np.isfinite(np.asarray(y)).all()


def test_batchnorm_eval_uses_running_stats():
    rng = np.random.default_rng(13)
    variables = bn_variables(3, rng)
    x = normal(rng, (4, 2, 2, 3), 3.0)
    y, upd = BatchNorm().apply(variables, x, train=False, mutable=["batch_stats"])
    p, s = variables["params"], variables["batch_stats"]
    expected = (np.asarray(x) - s["mean"]) / np.sqrt(np.asarray(s["var"]) + EPS) * p["scale"] + p["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):  # eval never updates
        np.testing.assert_array_equal(upd["batch_stats"][k], s[k])


def test_batchnorm_train_with_frozen_stats_does_not_update():
    rng = np.random.default_rng(14)
    variables = bn_variables(3, rng)
    x = normal(rng, (4, 2, 2, 3))
    y = BatchNorm().apply(variables, x, train=True)  # batch_stats not mutable: no error, no update
    np.testing.assert_allclose(y, numpy_bn_train(variables, x)[0], rtol=1e-5, atol=1e-5)
