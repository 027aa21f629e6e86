"""FedAMP: the attention step, its numerics, and rounds against independent computations.

Oracles: the 3-client 2-D example (W = [(0,0), (1,0), (0,2)], sigma = 1, alpha_k = 0.5, lam =
1: Xi, U, and two GD steps of the prox problem from w^{k-1} with F_i = 1/2 ||w - c_i||^2,
numpy float64); float64 numpy for the kernel where float32 would cancel, overflow or
underflow; a naive per-client Python loop (numpy float64 distances and attention over all
stored models, then model.apply + jax.grad SGD toward u_i on the minibatches
`ClientTrainer.batch_plan` reports) over two rounds on the CNN with BN, the models
initialised independently so that the attention is not trivial.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import run as run_command
from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.fedamp import (FedAMP, FedAMPConfig, attention_weights, cloud_models,
                                          squared_distances)
from pfedla_jax.algorithms.fedprox import prox_update
from pfedla_jax.algorithms.search_space import check_search_space
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import layer_names, make_cnn
from pfedla_jax.training.command_line import config_from_argv
from pfedla_jax.training.config import ExperimentConfig
from tests.helpers import one_error_line
from tests.test_fedprox import (  # noqa: F401  (ragged: a fixture)
    KEY,
    Linear,
    _set_row,
    assert_tree_close,
    grad_fn,
    half_squared_error,
    minibatches,
    quadratic_batch,
    ragged,
    row,
    run_update,
    strategies_agree,
)

W0 = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
XI = np.array([[0.806902, 0.183940, 0.009158],
               [0.183940, 0.812691, 0.003369],
               [0.009158, 0.003369, 0.987473]])
U = np.array([[0.183940, 0.018316], [0.812691, 0.006738], [0.003369, 1.974946]])
C = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]])


@jax.jit
def _distances(stacked, ids):
    return squared_distances(stacked, jax.tree.map(lambda a: a[ids], stacked))


def _attention(w, ids, alpha, sigma, num=None):
    """(D, Xi, U) of participants `ids` over the pool `w` [N, d] (float32)."""
    stacked = {"w": jnp.asarray(w, jnp.float32)}
    ids = jnp.asarray(ids, jnp.int32)
    dist = _distances(stacked, ids)
    xi = attention_weights(dist, ids, num or w.shape[0], alpha, sigma)
    return np.asarray(dist), np.asarray(xi), np.asarray(cloud_models(xi, stacked)["w"])


def test_attention_step_equals_the_2d_oracle():
    dist, xi, u = _attention(W0, [0, 1, 2], alpha=0.5, sigma=1.0)
    np.testing.assert_allclose(dist, [[0, 1, 4], [1, 0, 5], [4, 5, 0]], atol=1e-6)
    np.testing.assert_allclose(xi, XI, atol=2e-6)
    np.testing.assert_allclose(u, U, atol=2e-6)
    np.testing.assert_allclose(xi.sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(xi - np.diag(np.diag(xi)), (xi - np.diag(np.diag(xi))).T)
    # a cohort of two (rows for clients 2 and 0) from the same pool: the same rows
    _, xi_s, u_s = _attention(W0, [2, 0], alpha=0.5, sigma=1.0)
    np.testing.assert_allclose(xi_s, XI[[2, 0]], atol=2e-6)
    np.testing.assert_allclose(u_s, U[[2, 0]], atol=2e-6)


def test_client_step_equals_the_2d_oracle():
    """Two GD steps of F_i + (lam / 2 alpha_k) ||w - u_i||^2 (prox weight 2) from w^{k-1}."""
    expect = np.array([[0.232540, 0.176227], [1.106315, 0.002291], [0.001145, 2.161482]])
    update = prox_update(Linear(dim=2), optax.sgd(0.1), 1.0 / 0.5, loss=half_squared_error)
    with jax.enable_x64(True):
        got = [np.asarray(run_update(update, None, {"params": {"w": W0[i]}, "anchor": {"w": U[i]},
                                                    "batch_stats": {}},
                                     [quadratic_batch([1.0, 1.0], C[i])] * 2)["params"]["w"])
               for i in range(3)]
    np.testing.assert_allclose(got, expect, atol=2e-6)


def test_kernel_numerics():
    """Distances from the differences survive a large common offset (float32 Gram would
    cancel); the kernel is one exp of log(alpha/sigma) - D/sigma (alpha/sigma = 1e40
    overflows float32 on its own); far-apart models give Xi = I and u = w bit for bit; rows
    of mesh padding get no weight; alpha_k -> 0 and equal models give u = w."""
    rng = np.random.default_rng(0)
    w = 1000.0 + 1e-2 * rng.normal(size=(4, 300))
    exact = ((w[:, None] - w[None]) ** 2).sum(-1)
    dist, _, _ = _attention(w.astype(np.float32).astype(np.float64), [0, 1, 2, 3], 0.1, 1.0)
    w32 = w.astype(np.float32).astype(np.float64)
    exact32 = ((w32[:, None] - w32[None]) ** 2).sum(-1)   # the float32-rounded inputs' distances
    np.testing.assert_allclose(dist, exact32, rtol=1e-4, atol=1e-7)
    gram = w.astype(np.float32) @ w.astype(np.float32).T
    sq = np.diag(gram)
    naive = sq[:, None] + sq[None] - 2 * gram
    assert np.max(np.abs(naive - exact)) > 10 * np.max(exact)   # what the Gram form would give
    # the kernel in log space: alpha / sigma = 1e40 (inf in float32), D / sigma = 100
    sigma, alpha = 1e-20, 1e20
    d = jnp.array([[0.0, 100 * sigma]], jnp.float32)
    xi = np.asarray(attention_weights(d, jnp.array([0]), 2, alpha, sigma))
    np.testing.assert_allclose(xi[0, 1], 1e40 * np.exp(-100.0), rtol=1e-4)
    assert np.all(np.isfinite(xi))
    # far apart (D / sigma ~ 1e4): the attention underflows to 0, Xi = I and u = w exactly
    far = rng.normal(size=(3, 50)) * 100
    _, xi, u = _attention(far, [0, 1, 2], 0.1, 1.0)
    np.testing.assert_array_equal(xi, np.eye(3))
    np.testing.assert_array_equal(u, far.astype(np.float32))
    # mesh padding rows (index >= num clients) get no weight, even when equal to a client
    padded = np.concatenate([W0, W0[:1]])
    _, xi, u = _attention(padded, [0, 1, 2], 0.5, 1.0, num=3)
    np.testing.assert_array_equal(xi[:, 3], 0.0)
    np.testing.assert_allclose(xi[:, :3], XI, atol=2e-6)
    # alpha_k -> 0: u = w; equal models: u = w whatever the weights
    np.testing.assert_allclose(_attention(W0, [0, 1, 2], 1e-12, 1.0)[2], W0, atol=1e-9)
    np.testing.assert_allclose(_attention(np.ones((3, 2)), [0, 1, 2], 0.5, 1.0)[2], np.ones((3, 2)), atol=1e-6)


# ---------------------------------------------------------------------------- rounds
def _flat(params, i):
    return np.concatenate([np.asarray(a, np.float64)[i].ravel() for a in jax.tree.leaves(params)])


LR, RHO = 0.05, 0.5


@pytest.mark.slow
def test_two_rounds_equal_a_naive_per_client_loop(ragged):
    """CNN with BN, independent initial models, participants [2, 0] then [1, 2]: every
    participant's Xi row over all three stored models (float64 numpy), u_i, local SGD toward
    u_i from its own w_i, the state that persists (w_i, BN statistics, u_i, xi_ii); the
    non-participant keeps everything."""
    ds, store = ragged
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=True)
    cfg = LocalTrainConfig(batch_size=8, local_epochs=1, lr=LR)
    ctx = FLContext(model=model, layer_order=layer_names(model), store=store,
                    trainer=ClientTrainer(model, store, cfg, "loop"), num_clients=3,
                    input_shape=ds.input_shape, init="independent")
    probe = FedAMP(ctx).init(jax.random.PRNGKey(0))
    flat = np.stack([_flat(probe["client_params"], i) for i in range(3)])
    d0 = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    sigma = float(np.median(d0[~np.eye(3, dtype=bool)]))     # attention of order 1 in round 0
    alpha = 0.4 * sigma / 2                                   # alpha (N - 1) / sigma = 0.4
    algo = FedAMP(ctx, FedAMPConfig(alpha=alpha, lam=RHO * alpha, sigma=sigma))
    state = algo.init(jax.random.PRNGKey(0))
    grad = grad_fn(model)
    step = jax.jit(lambda w, g, a: jax.tree.map(lambda wi, gi, ai: wi - LR * (gi + RHO * (wi - ai)), w, g, a))
    expect = jax.tree.map(np.asarray, jax.device_get(state))
    for t, ids in enumerate((np.array([2, 0]), np.array([1, 2]))):
        key = jax.random.fold_in(KEY, t)
        state, info = algo.round(state, t, ids, key)
        pool = expect["client_params"]
        flat = np.stack([_flat(pool, i) for i in range(3)])
        new = jax.tree.map(np.copy, expect)
        for cid in ids:
            d = ((flat - flat[cid]) ** 2).sum(-1)
            xi = (alpha / sigma) * np.exp(-d / sigma)
            xi[cid] = 0.0
            xi[cid] = 1.0 - xi.sum()
            assert 0.1 < xi[cid] < 0.99, xi   # a real mix
            u = jax.tree.map(lambda a: np.tensordot(xi, np.asarray(a, np.float64), axes=1), pool)
            w, st = row(pool, cid), row(expect["batch_stats"], cid)
            for x, y in minibatches(store, algo.trainer, cid, key):
                g, st = grad(w, st, x, y)
                w = step(w, g, u)
            for key_, value in (("client_params", w), ("batch_stats", st), ("cloud_params", u)):
                new[key_] = jax.tree.map(lambda a, b: _set_row(a, cid, b), new[key_], value)
            new["self_weight"][cid] = xi[cid]
        after = jax.tree.map(np.asarray, jax.device_get(state))
        for key_ in new:
            assert_tree_close(after[key_], new[key_], f"round {t} {key_}")
        expect = after   # the next round starts from the engine's state
        np.testing.assert_array_equal(info["bytes_up"], [ctx.model_bytes] * 2)
        np.testing.assert_array_equal(info["bytes_down"], [ctx.model_bytes] * 2)
    evaluation = algo.evaluate(state, 1, KEY)
    assert set(evaluation.views) == {"", "cloud"}
    assert_tree_close(evaluation.views[""].params, after["client_params"], rtol=0, atol=0)
    assert_tree_close(evaluation.views["cloud"].params, after["cloud_params"], rtol=0, atol=0)
    assert evaluation.scalars["fedamp_self_weight"] == pytest.approx(float(np.mean(after["self_weight"])))
    assert evaluation.scalars["fedamp_min_self_weight"] == pytest.approx(float(np.min(after["self_weight"])))


@pytest.mark.slow
def test_every_strategy_agrees_with_one_trace(ragged):
    """Three clients on a mesh of two devices (shard: one padding row in the pool)."""
    strategies_agree(ragged, lambda ctx: FedAMP(ctx, FedAMPConfig(alpha=0.2, lam=0.1, sigma=0.5)),
                     ("client_params", "cloud_params", "self_weight"))


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options,train,pattern", [
    (dict(alpha=0.0), dict(), "--fedamp_alpha must be a positive"),
    (dict(sigma=-1.0), dict(), "--fedamp_sigma must be a positive"),
    (dict(sigma=float("inf")), dict(), "--fedamp_sigma must be a positive"),
    (dict(lam=-0.1), dict(), "--fedamp_lam must be"),
    (dict(alpha=0.01, lam=1.0), dict(lr=0.05), "--lr \\* --fedamp_lam / --fedamp_alpha = 5 >= 2"),
])
def test_bad_options_are_refused(options, train, pattern):
    with pytest.raises(UserInputError, match=pattern):
        FedAMPConfig(**options).validate_training(LocalTrainConfig(**train))
    with pytest.raises(UserInputError, match=pattern):
        ExperimentConfig(algorithm="fedamp", algorithm_config=FedAMPConfig(**options),
                         train=LocalTrainConfig(**train))


BAD_ARGV = ["--algorithm=fedamp", "--fedamp_sigma=0", "--dataset=synthetic", "--num_clients=4", "--rounds=1"]


def test_command_line_bad_option_is_one_line(capfd, tmp_path):
    with pytest.raises(UserInputError, match="fedamp_sigma") as err:
        config_from_argv(["run", *BAD_ARGV])
    assert len(str(err.value).splitlines()) == 1
    assert "--fedamp_sigma" in one_error_line(run_command.main, ["run", *BAD_ARGV, f"--workdir={tmp_path}"], capfd)


def test_registry_row_search_space_and_defaults():
    assert [(r.key, r.display, r.order) for r in FedAMP.rows()] == [("fedamp", "FedAMP", 23)]
    assert [h.path for h in FedAMP.search_space] == ["train.lr", "sigma", "alpha", "lam"]
    check_search_space(ExperimentConfig(algorithm="fedamp"))
    # every corner of the joint space keeps lr * lam / alpha_k < 2
    lr = FedAMP.search_space[0].high
    alpha, lam = FedAMP.search_space[2].low, FedAMP.search_space[3].high
    ExperimentConfig(algorithm="fedamp", algorithm_config=FedAMPConfig(alpha=alpha, lam=lam),
                     train=LocalTrainConfig(lr=lr))
    cfg = FedAMPConfig()
    assert (cfg.alpha, cfg.lam, cfg.sigma) == (0.1, 0.1, 1.0)
