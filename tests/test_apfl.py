"""APFL: the local step and two rounds against independent computations.

Oracles: the worked 2-client scalar example (quadratic losses f_i(x) = a_i/2 (x - c_i)^2,
two local steps by the paper's rules, then the server average and the new mixture; numbers
computed by hand in float64); a naive per-client Python loop (model.apply + jax.grad on the
unpadded minibatches `ClientTrainer.batch_plan` reports, plain Python over clients and
steps) for two rounds, alpha_i, v_i and both BN statistics persisting; the evaluated views
against the state.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.run import main as run_main
from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.apfl import APFL, APFLConfig, apfl_update
from pfedla_jax.core.client_update import Batch
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.data.store import normalize_images
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import layer_names, make_cnn
from pfedla_jax.training.command_line import config_from_argv
from pfedla_jax.training.config import ExperimentConfig
from tests.helpers import one_error_line, small_store

KEY = jax.random.PRNGKey(7)


# ---------------------------------------------------------------------------- scalar oracle
class Scalar(nn.Module):
    """Outputs (x, a) per example: the model's one scalar parameter x and the example's a."""

    @nn.compact
    def __call__(self, inputs, *, train, mask=None):
        x = self.param("x", nn.initializers.zeros, ())
        return jnp.stack([jnp.broadcast_to(x, inputs.shape[:1]), inputs[:, 0]], axis=1)


def quadratic(out, c, mask):
    """a/2 (x - c)^2 summed over the real examples."""
    return jnp.sum(0.5 * out[:, 1] * (out[:, 0] - c) ** 2 * mask), jnp.sum(mask)


def test_scalar_oracle_two_clients_two_steps():
    """a = (1, 2), c = (2, -1), w^t = 0, v = (1, 0.5), alpha = (0.5, 0.5), eta = eta_alpha =
    0.1, two steps by the paper's rules (pre-step values on every right-hand side)."""
    with jax.enable_x64(True):
        update = apfl_update(Scalar(), lr=0.1, alpha_lr=0.1, loss=quadratic)
        step = jax.jit(update.step)
        uploads, outs = [], []
        for a, c, v0, want in ((1.0, 2.0, 1.0, [(0.2, 1.075, 0.65), (0.38, 1.155031, 0.757734)]),
                               (2.0, -1.0, 0.5, [(-0.2, 0.375, 0.375), (-0.36, 0.298828, 0.258203)])):
            carry = update.init({"x": jnp.float64(0.0)},
                                {"v": {"x": jnp.float64(v0)}, "alpha": 0.5, "batch_stats": {},
                                 "personal_stats": {}}, 0, KEY)
            batch = Batch(jnp.full((1, 1, 1), a), jnp.full((1, 1), c), jnp.ones((1, 1)))
            for w_want, v_want, alpha_want in want:
                carry, _ = step(carry, batch)
                got = (float(carry[0]["x"]), float(carry[1]["x"]), float(carry[2]))
                np.testing.assert_allclose(got, (w_want, v_want, alpha_want), atol=1e-6)
            out = update.finalize(carry, None, None)
            uploads.append(float(out["params"]["x"]))
            outs.append(out)
        np.testing.assert_allclose(
            [float(o["alpha"] * o["v"]["x"] + (1 - o["alpha"]) * o["params"]["x"]) for o in outs],
            [0.967268, -0.189889], atol=1e-6)       # vbar with the local w
        w_new = np.mean(uploads)                     # equal train sizes
        np.testing.assert_allclose(w_new, 0.01, atol=1e-12)
        np.testing.assert_allclose(
            [float(o["alpha"] * o["v"]["x"] + (1 - o["alpha"]) * w_new) for o in outs],
            [0.87763, 0.084576], atol=1e-6)          # vbar with the new global (view '')


def test_fixed_alpha_zero_leaves_v_and_alpha_one_is_local_training():
    """alpha fixed at 0: v never moves (grad_v f(vbar) = alpha grad f(vbar) = 0); alpha fixed
    at 1: v follows plain gradient descent on f alone (vbar = v)."""
    with jax.enable_x64(True):
        update = apfl_update(Scalar(), lr=0.1, alpha_lr=0.0, loss=quadratic)
        batch = Batch(jnp.full((1, 1, 1), 2.0), jnp.full((1, 1), 1.0), jnp.ones((1, 1)))
        for alpha in (0.0, 1.0):
            carry = update.init({"x": jnp.float64(0.0)}, {"v": {"x": jnp.float64(3.0)}, "alpha": alpha,
                                                            "batch_stats": {}, "personal_stats": {}}, 0, KEY)
            v = 3.0
            for _ in range(3):
                carry, _ = update.step(carry, batch)
                v = v - 0.1 * 2.0 * (v - 1.0) if alpha == 1.0 else v
            assert float(carry[2]) == alpha
            np.testing.assert_allclose(float(carry[1]["x"]), v, rtol=1e-12)


# ---------------------------------------------------------------------------- two rounds
@pytest.fixture(scope="module")
def ragged():
    ds, store = small_store(num_clients=3, scheme="dirichlet", samples_per_client=40,
                            dirichlet_alpha=1.0, min_client_size=15)
    assert len(set(np.asarray(store.train_count).tolist())) == 3, "unequal sizes wanted"
    return ds, store


def _ctx(ds, store, cfg, model, strategy="loop", layer_order=None, init="independent"):
    return FLContext(model=model, layer_order=layer_order or layer_names(model), store=store,
                     trainer=ClientTrainer(model, store, cfg, strategy),
                     num_clients=int(store.train_idx.shape[0]), input_shape=ds.input_shape, init=init)


ETA, ETA_ALPHA, ALPHA0 = 0.05, 0.5, 0.4
ROUNDS = (np.array([2, 0]), np.array([1, 2]))   # client 2 trains twice: its v, alpha persist
ROUND_KEYS = (KEY, jax.random.fold_in(KEY, 1))


@pytest.fixture(scope="module")
def two_rounds(ragged):
    """APFL on the CNN with BN, independent initial models (so v_i != w and alpha moves from
    the first step), batches of 8 (partial last batches): (algo, ctx, [states])."""
    ds, store = ragged
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=True)
    ctx = _ctx(ds, store, LocalTrainConfig(batch_size=8, local_epochs=1, lr=ETA), model)
    algo = APFL(ctx, APFLConfig(alpha=ALPHA0, alpha_lr=ETA_ALPHA))
    state = algo.init(jax.random.PRNGKey(0))
    states = [jax.device_get(state)]
    for ids, key in zip(ROUNDS, ROUND_KEYS):
        state, info = algo.round(state, 0, ids, key)
        np.testing.assert_array_equal(np.asarray(info["bytes_up"]), [ctx.model_bytes] * 2)
        np.testing.assert_array_equal(np.asarray(info["bytes_down"]), [ctx.model_bytes] * 2)
        states.append(jax.device_get(state))
    return algo, ctx, states, state


def _naive_round(model, store, trainer, before, ids, key):
    """One APFL round by hand: plain Python over participants and minibatches."""

    @jax.jit
    def grad(p, st, x, y):
        def loss(p):
            logits, new = model.apply({"params": p, "batch_stats": st}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]
        return jax.grad(loss, has_aux=True)(p)

    images, labels = np.asarray(store.images), np.asarray(store.labels)
    after = jax.tree.map(np.array, before)
    uploads = []
    for cid in ids:
        row = lambda tree: jax.tree.map(lambda a: a[cid], tree)
        w, v, alpha = before["global_params"], row(before["personal_params"]), float(before["alpha"][cid])
        st_w, st_v = row(before["batch_stats"]), row(before["personal_stats"])
        idx, mask = trainer.batch_plan(int(cid), key)
        for t in range(idx.shape[0]):
            rows = idx[t][mask[t]]
            if rows.size == 0:
                continue
            x = normalize_images(jnp.asarray(images[rows]), store.mean, store.std)
            y = jnp.asarray(labels[rows])
            vbar = jax.tree.map(lambda a, b: alpha * a + (1 - alpha) * b, v, w)
            g_w, st_w = grad(w, st_w, x, y)
            g_b, st_v = grad(vbar, st_v, x, y)
            d_alpha = sum(float(np.sum((np.asarray(a) - np.asarray(b)) * np.asarray(g)))
                          for a, b, g in zip(jax.tree.leaves(v), jax.tree.leaves(w), jax.tree.leaves(g_b)))
            w = jax.tree.map(lambda a, g: a - ETA * g, w, g_w)
            v = jax.tree.map(lambda a, g: a - ETA * alpha * g, v, g_b)
            alpha = min(1.0, max(0.0, alpha - ETA_ALPHA * d_alpha))
        uploads.append(w)
        for key_, value in (("client_params", w), ("personal_params", v), ("batch_stats", st_w),
                            ("personal_stats", st_v)):
            for dst, src in zip(jax.tree.leaves(after[key_]), jax.tree.leaves(value)):
                dst[cid] = np.asarray(src)
        after["alpha"][cid] = alpha
    counts = np.asarray(store.train_count)[ids].astype(np.float64)
    wts = counts / counts.sum()
    after["global_params"] = jax.tree.map(lambda *u: sum(c * np.asarray(a) for c, a in zip(wts, u)), *uploads)
    return after


@pytest.mark.slow
def test_two_rounds_equal_a_naive_per_client_loop(ragged, two_rounds):
    ds, store = ragged
    algo, ctx, states, _ = two_rounds
    expect = states[0]
    for r, (ids, key) in enumerate(zip(ROUNDS, ROUND_KEYS)):
        expect = _naive_round(ctx.model, store, algo.trainer, expect, ids, key)
        got = states[r + 1]
        for name in expect:
            for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(expect[name]), strict=True):
                np.testing.assert_allclose(np.asarray(a)[:3] if a.ndim and name != "global_params" else a,
                                           b[:3] if b.ndim and name != "global_params" else b,
                                           rtol=1e-5, atol=1e-5, err_msg=f"round {r}: {name}")
        expect = jax.tree.map(np.asarray, got)   # the next round from the engine's state
    # alpha really moved, and the sitting-out client's alpha / v stayed put
    first, second = states[1], states[2]
    assert abs(first["alpha"][2] - ALPHA0) > 1e-3 and abs(second["alpha"][2] - first["alpha"][2]) > 1e-4
    assert first["alpha"][1] == ALPHA0 and second["alpha"][0] == first["alpha"][0]
    for a, b in zip(jax.tree.leaves(second["personal_params"]), jax.tree.leaves(first["personal_params"])):
        np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.slow
def test_views_are_the_mixtures(two_rounds):
    """'' = alpha v + (1 - alpha) w (new global), 'local' = the mixture with the client's own
    trained w_i, 'global' = w; the mixtures use vbar's BN statistics."""
    algo, ctx, states, state = two_rounds
    after = states[-1]
    evaluation = algo.evaluate(state, 1, KEY)
    views = evaluation.views
    assert set(views) == {"", "local", "global"} and views["global"].shared
    np.testing.assert_array_equal(evaluation.arrays["alpha"], after["alpha"][:3])
    for c in range(3):
        a = after["alpha"][c]
        for name, w in (("", after["global_params"]),
                        ("local", jax.tree.map(lambda x: x[c], after["client_params"]))):
            got = jax.tree.map(lambda x: np.asarray(x)[c], views[name].params)
            want = jax.tree.map(lambda vi, wi: a * vi[c] + (1 - a) * wi, after["personal_params"], w)
            for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        for name in ("", "local"):
            for x, y in zip(jax.tree.leaves(views[name].batch_stats), jax.tree.leaves(after["personal_stats"])):
                np.testing.assert_array_equal(np.asarray(x)[c], y[c])


# ---------------------------------------------------------------------------- strategies
class TinyNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, *, train, mask=None):
        x = jnp.tanh(nn.Dense(8, name="FC1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="FC2")(x)


@pytest.mark.slow
def test_every_strategy_agrees_one_trace(ragged):
    """vmap = loop = shard for three clients of different sizes (5 / 6 / 7 local steps) over
    three rounds; each round program is traced once."""
    ds, store = ragged
    model = TinyNet(ds.num_classes)
    cfg = LocalTrainConfig(batch_size=5, local_epochs=1, lr=0.1)
    out = {}
    for strategy in ("vmap", "loop", "shard"):
        algo = APFL(_ctx(ds, store, cfg, model, strategy, ("FC1", "FC2")), APFLConfig(alpha_lr=1.0))
        state = algo.init(jax.random.PRNGKey(0))
        for t, ids in enumerate(([0, 1, 2], [2, 0, 1], [1, 0, 2])):
            state, _ = algo.round(state, t, np.array(ids), jax.random.fold_in(KEY, t))
        assert algo.trace_count == 1
        out[strategy] = jax.device_get(state)
    for strategy in ("loop", "shard"):
        for a, b in zip(jax.tree.leaves(out["vmap"]), jax.tree.leaves(out[strategy])):
            a, b = np.asarray(a), np.asarray(b)
            if a.ndim and a.shape[0] != b.shape[0]:   # per-client rows padded to the mesh
                a, b = a[:3], b[:3]
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out["vmap"]["alpha"][:3], 0.5)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options,train,pattern", [
    (dict(alpha=-0.1), dict(), "apfl_alpha must"),
    (dict(alpha=1.5), dict(), "apfl_alpha must"),
    (dict(alpha_lr=-1.0), dict(), "apfl_alpha_lr"),
    (dict(alpha_lr=float("nan")), dict(), "apfl_alpha_lr"),
    (dict(), dict(momentum=0.9), "momentum"),
    (dict(), dict(weight_decay=1e-4), "weight_decay"),
])
def test_bad_options_are_refused_before_data(options, train, pattern):
    with pytest.raises(UserInputError, match=pattern):
        APFLConfig(**options).validate_training(LocalTrainConfig(**train))
    with pytest.raises(UserInputError, match=pattern):
        ExperimentConfig(algorithm="apfl", algorithm_config=APFLConfig(**options),
                         train=LocalTrainConfig(**train))


def test_step_size_follows_the_client_lr():
    assert APFLConfig().step_size(0.03) == 0.03
    assert APFLConfig(alpha_lr=0.2).step_size(0.03) == 0.2
    assert APFLConfig(adaptive=False, alpha_lr=0.2).step_size(0.03) == 0.0


BAD_ARGV = ["--algorithm=apfl", "--apfl_alpha=2", "--dataset=synthetic", "--synthetic_per_class=40",
            "--num_clients=4", "--rounds=1"]


def test_command_line_bad_option_is_one_line(capfd, tmp_path):
    with pytest.raises(UserInputError, match="apfl_alpha") as err:
        config_from_argv(["run", *BAD_ARGV])
    assert len(str(err.value).splitlines()) == 1
    line = one_error_line(run_main, ["run", *BAD_ARGV, f"--workdir={tmp_path}"], capfd)
    assert "apfl_alpha" in line
