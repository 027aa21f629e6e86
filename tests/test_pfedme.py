"""pFedMe: the local step and a round against independent computations.

Oracles: the numpy closed form of the inner recurrence on a linear least-squares model
(theta_K = M^K theta_0 + sum_{k<K} M^k p (b + lam w), M = I - p (A + (lam + mu) I)) and its
fixed point, the proximal point (A + (lam + mu) I)^-1 (b + lam w); a naive per-client
Python loop (model.apply + jax.grad on the unpadded minibatches `ClientTrainer.batch_plan`
reports) for a round; the evaluated views compared with the state (theta, not w).
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.pfedme import PFedMe, PFedMeConfig, pfedme_update
from pfedla_jax.core.client_update import Batch
from pfedla_jax.core.evaluation import Evaluator, summarize
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.data.store import normalize_images
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import layer_names, make_cnn
from pfedla_jax.training.command_line import config_from_argv
from pfedla_jax.training.config import ExperimentConfig
from tests.helpers import small_store

KEY = jax.random.PRNGKey(5)


# ---------------------------------------------------------------------------- closed forms
class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, *, train, mask=None):
        return x @ self.param("w", nn.initializers.zeros, (x.shape[-1],))


def squared_error(out, y, mask):
    return jnp.sum(0.5 * (out - y) ** 2 * mask), jnp.sum(mask)


def _batch(rng, b=6, d=4):
    x, y = rng.normal(size=(1, b, d)), rng.normal(size=(1, b))
    mask = np.ones((1, b))
    mask[0, -1] = 0.0
    a = x[0].T @ np.diag(mask[0]) @ x[0] / mask[0].sum()
    c = x[0].T @ (mask[0] * y[0]) / mask[0].sum()
    return Batch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)), a, c


def _steps(update, w0, batches):
    carry = update.init(None, {"params": {"w": jnp.asarray(w0)}, "batch_stats": {}}, 0, KEY)
    step = jax.jit(update.step)
    for batch in batches:
        carry, _ = step(carry, batch)
    return update.finalize(carry, None, None)


def test_inner_recurrence_and_proximal_point_on_a_quadratic():
    """K = 3 inner steps then the local step, twice (theta warm-started from batch to batch),
    against the numpy recurrence; with K = 500 theta reaches the proximal point of f + mu/2
    ||.||^2 at w, and w moves eta lam of the way to it. float64."""
    rng = np.random.default_rng(0)
    lam, p, mu, eta, d = 2.0, 0.1, 0.05, 0.1, 4
    w0 = rng.normal(size=d)
    with jax.enable_x64(True):
        (b1, a1, c1), (b2, a2, c2) = _batch(rng), _batch(rng)
        out = _steps(pfedme_update(Linear(), lam=lam, inner_steps=3, personal_lr=p, lr=eta, mu=mu,
                                   loss=squared_error), w0, [b1, b2])
        theta, w = w0.copy(), w0.copy()
        for a, c in ((a1, c1), (a2, c2)):
            m = np.eye(d) - p * (a + (lam + mu) * np.eye(d))
            theta = (np.linalg.matrix_power(m, 3) @ theta
                     + sum(np.linalg.matrix_power(m, k) for k in range(3)) @ (p * (c + lam * w)))
            w = w - eta * lam * (w - theta)
        np.testing.assert_allclose(np.asarray(out["theta"]["w"]), theta, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(out["params"]["w"]), w, rtol=1e-12, atol=1e-12)
        assert set(out) == {"params", "theta", "batch_stats"}
        # the inner solve converges to the proximal point
        out = _steps(pfedme_update(Linear(), lam=lam, inner_steps=500, personal_lr=p, lr=eta, mu=mu,
                                   loss=squared_error), w0, [b1])
        prox = np.linalg.solve(a1 + (lam + mu) * np.eye(d), c1 + lam * w0)
        np.testing.assert_allclose(np.asarray(out["theta"]["w"]), prox, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(out["params"]["w"]), w0 - eta * lam * (w0 - prox), rtol=1e-10)


# ---------------------------------------------------------------------------- a round
@pytest.fixture(scope="module")
def ragged():
    ds, store = small_store(num_clients=3, scheme="dirichlet", samples_per_client=40,
                            dirichlet_alpha=1.0, min_client_size=15)
    assert len(set(np.asarray(store.train_count).tolist())) == 3, "unequal sizes wanted"
    return ds, store


def _ctx(ds, store, cfg, model, strategy="loop", layer_order=None):
    return FLContext(model=model, layer_order=layer_order or layer_names(model), store=store,
                     trainer=ClientTrainer(model, store, cfg, strategy),
                     num_clients=int(store.train_idx.shape[0]), input_shape=ds.input_shape)


LAM, K, P, ETA, BETA, MU = 15.0, 2, 0.02, 0.05, 0.5, 1e-3


@pytest.fixture(scope="module")
def one_round(ragged):
    """pFedMe on the CNN with BN, participants [2, 0] (25 / 32 training examples, batches
    of 8: a partial last batch), beta = 0.5: (algo, ctx, state before, state after, ids)."""
    ds, store = ragged
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=True)
    ctx = _ctx(ds, store, LocalTrainConfig(batch_size=8, local_epochs=1, lr=ETA), model)
    algo = PFedMe(ctx, PFedMeConfig(lam=LAM, inner_steps=K, personal_lr=P, beta=BETA, mu=MU))
    state = algo.init(jax.random.PRNGKey(0))
    before = jax.device_get(state)
    ids = np.array([2, 0])
    state, info = algo.round(state, 0, ids, KEY)
    np.testing.assert_array_equal(np.asarray(info["bytes_up"]), [ctx.model_bytes] * 2)
    return algo, ctx, before, state, ids


@pytest.mark.slow
def test_one_round_equals_a_naive_per_client_loop(ragged, one_round):
    ds, store = ragged
    algo, ctx, before, state, ids = one_round
    after = jax.device_get(state)
    model = ctx.model

    @jax.jit
    def grad(p, st, x, y):
        def loss(p):
            logits, new = model.apply({"params": p, "batch_stats": st}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]
        return jax.grad(loss, has_aux=True)(p)

    images, labels = np.asarray(store.images), np.asarray(store.labels)
    uploads = []
    for cid in ids:
        w = theta = before["global_params"]
        st = jax.tree.map(lambda a: a[cid], before["batch_stats"])
        idx, mask = algo.trainer.batch_plan(int(cid), KEY)
        for t in range(idx.shape[0]):
            rows = idx[t][mask[t]]
            if rows.size == 0:
                continue
            x = normalize_images(jnp.asarray(images[rows]), store.mean, store.std)
            y = jnp.asarray(labels[rows])
            for _ in range(K):   # the same batch K times; theta carried across batches
                g, st = grad(theta, st, x, y)
                theta = jax.tree.map(lambda th, gi, wi: th - P * (gi + LAM * (th - wi) + MU * th), theta, g, w)
            w = jax.tree.map(lambda wi, th: wi - ETA * LAM * (wi - th), w, theta)
        uploads.append(w)
        for key, expect in (("theta", theta), ("client_params", w), ("batch_stats", st)):
            for a, b in zip(jax.tree.leaves(after[key]), jax.tree.leaves(expect)):
                np.testing.assert_allclose(a[cid], b, rtol=5e-5, atol=5e-6, err_msg=key)
    counts = np.asarray(store.train_count)[ids].astype(np.float64)
    wts = counts / counts.sum()
    for g0, g1, a, b in zip(jax.tree.leaves(before["global_params"]), jax.tree.leaves(after["global_params"]),
                            *map(jax.tree.leaves, uploads)):
        mean = wts[0] * np.asarray(a) + wts[1] * np.asarray(b)
        np.testing.assert_allclose(g1, (1 - BETA) * g0 + BETA * mean, rtol=5e-5, atol=5e-6)
    # the non-participant keeps everything
    for key in ("theta", "client_params", "batch_stats"):
        for a, b in zip(jax.tree.leaves(after[key]), jax.tree.leaves(before[key])):
            np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.slow
def test_headline_view_evaluates_theta_not_w(ragged, one_round):
    """'' is theta (the personalised model), 'local' the client's w, 'global' the global w;
    for a participant the three differ (no aliasing), and the headline accuracy is theta's:
    it would fail if w (the official code's "PM") were evaluated."""
    ds, store = ragged
    algo, ctx, _, state, ids = one_round
    after = jax.device_get(state)
    evaluation = algo.evaluate(state, 0, KEY)
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)   # evaluate changed nothing
    views = evaluation.views
    assert set(views) == {"", "local", "global"} and views["global"].shared
    for name, key in (("", "theta"), ("local", "client_params"), ("global", "global_params")):
        for a, b in zip(jax.tree.leaves(jax.device_get(views[name].params)), jax.tree.leaves(after[key])):
            np.testing.assert_array_equal(a, b)
    kernel = lambda tree, c: np.asarray(tree["FC3"]["kernel"])[c] if c is not None else np.asarray(tree["FC3"]["kernel"])
    for c in ids:
        theta, w_i, w = kernel(after["theta"], c), kernel(after["client_params"], c), kernel(after["global_params"], None)
        assert not np.allclose(theta, w_i) and not np.allclose(theta, w) and not np.allclose(w_i, w)
    # the headline accuracy is theta's, computed here directly from the state
    ev = Evaluator(ctx.model, store, "loop")
    result = ev.evaluate(views[""].params, views[""].batch_stats)
    by_hand = ev.evaluate(after["theta"], after["batch_stats"])
    of_w = ev.evaluate(after["client_params"], after["batch_stats"])
    np.testing.assert_array_equal(result["loss_sum"], by_hand["loss_sum"])
    assert not np.allclose(result["loss_sum"][ids], of_w["loss_sum"][ids])
    assert 0 <= summarize(result)["test_acc"] <= 1


# ---------------------------------------------------------------------------- strategies
class TinyNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, *, train, mask=None):
        x = jnp.tanh(nn.Dense(8, name="FC1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="FC2")(x)


@pytest.mark.slow
def test_every_strategy_agrees_padding_changes_nothing_no_retrace(ragged):
    """vmap = loop = shard for three clients of different sizes (5 / 6 / 7 local steps);
    under vmap each client's output equals its output trained alone (the padding steps of
    the shorter clients change nothing); round 2 does not retrace."""
    ds, store = ragged
    model = TinyNet(ds.num_classes)
    cfg = LocalTrainConfig(batch_size=5, local_epochs=1, lr=0.05)
    config = PFedMeConfig(inner_steps=3, beta=0.8)
    ids = np.array([0, 1, 2])
    out = {}
    for strategy in ("vmap", "loop", "shard"):
        algo = PFedMe(_ctx(ds, store, cfg, model, strategy, ("FC1", "FC2")), config)
        state = algo.init(jax.random.PRNGKey(0))
        start = jax.device_get(state["global_params"])
        state, _ = algo.round(state, 0, ids, KEY)
        traces = (algo.trace_count, algo.trainer.trace_count)
        state, _ = algo.round(state, 1, ids[::-1].copy(), jax.random.fold_in(KEY, 1))
        assert traces[0] == 1 and (algo.trace_count, algo.trainer.trace_count) == traces
        out[strategy] = jax.device_get({k: state[k] for k in ("global_params", "client_params", "theta")})
        if strategy == "vmap":
            live = np.asarray(algo.trainer.live_steps(jnp.asarray(ids), store))
            assert live.tolist() == [5, 6, 7], live
            together, _ = algo.trainer.run(start, {"batch_stats": {}}, ids, KEY)
            for c in ids:
                alone, _ = algo.trainer.run(start, {"batch_stats": {}}, np.array([c]), KEY)
                for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
                    np.testing.assert_allclose(np.asarray(a)[c], np.asarray(b)[0], rtol=1e-6, atol=1e-7)
    for strategy in ("loop", "shard"):
        for a, b in zip(jax.tree.leaves(out["vmap"]), jax.tree.leaves(out[strategy])):
            a, b = np.asarray(a), np.asarray(b)
            if a.ndim and a.shape[0] != b.shape[0]:   # per-client rows padded to the mesh
                a, b = a[:3], b[:3]
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options,train,pattern", [
    (dict(lam=0.0), dict(), "pfedme_lam"),
    (dict(lam=-1.0), dict(), "pfedme_lam"),
    (dict(inner_steps=0), dict(), "pfedme_inner_steps"),
    (dict(personal_lr=0.0), dict(), "pfedme_personal_lr"),
    (dict(beta=0.0), dict(), "pfedme_beta"),
    (dict(beta=float("inf")), dict(), "pfedme_beta"),
    (dict(mu=-0.1), dict(), "pfedme_mu"),
    (dict(personal_lr=0.2), dict(), "inner solve diverges"),
    (dict(), dict(lr=0.2), "local step"),
    (dict(), dict(weight_decay=1e-4), "weight_decay"),
])
def test_bad_options_are_refused_before_data(options, train, pattern):
    """Refused where the configs are built: the options by PFedMeConfig, their fit with the
    local training by validate_training and the ExperimentConfig that pairs them."""
    with pytest.raises(UserInputError, match=pattern):
        PFedMeConfig(**options).validate_training(LocalTrainConfig(**train))
    with pytest.raises(UserInputError, match=pattern):
        ExperimentConfig(algorithm="pfedme", algorithm_config=PFedMeConfig(**options),
                         train=LocalTrainConfig(**train))


BAD_ARGV = ["--algorithm=pfedme", "--pfedme_lam=0", "--dataset=synthetic", "--synthetic_per_class=40",
            "--num_clients=4", "--rounds=1"]


def test_command_line_bad_option_is_one_line():
    with pytest.raises(UserInputError, match="pfedme_lam") as err:
        config_from_argv(["run", *BAD_ARGV])
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.slow
def test_cli_bad_option_is_one_line_exit_2(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "experiments.run", *BAD_ARGV, f"--workdir={tmp_path}"],
                       cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-2000:]
    assert err[0].startswith("error: ") and "pfedme_lam" in err[0], err[0]
