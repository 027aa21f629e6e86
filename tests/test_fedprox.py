"""FedProx: the proximal local step and rounds against independent computations.

Oracles: the scalar full-batch example (3 clients, F_i = a_i/2 (w - c_i)^2, two GD steps of
w <- w - eta (a (w - c) + mu (w - w^t)), worked in numpy float64: 0.18 / 1.02 / -0.36,
n-weighted mean 0.12; mu = 0: FedAvg's 0.19 / 1.08 / -0.38); a naive per-client Python loop
(model.apply + jax.grad on the unpadded minibatches `ClientTrainer.batch_plan` reports, the
anchor the round's received global model) for two rounds on the CNN with BN; FedAvg itself
for mu = 0.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import run as run_command
from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.fedavg import FedAvg
from pfedla_jax.algorithms.fedprox import FedProx, FedProxConfig, prox_update
from pfedla_jax.algorithms.search_space import check_search_space
from pfedla_jax.core.client_update import Batch
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.data.store import normalize_images
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import layer_names, make_cnn
from pfedla_jax.training.command_line import config_from_argv
from pfedla_jax.training.config import ExperimentConfig
from tests.helpers import one_error_line, small_store

KEY = jax.random.PRNGKey(11)


# ---------------------------------------------------------------------------- scalar oracles
class Linear(nn.Module):
    """out = x @ w: with x = sqrt(a) and y = sqrt(a) c, half the squared error is a/2 (w - c)^2."""

    dim: int = 1

    @nn.compact
    def __call__(self, x, *, train, mask=None):
        return x @ self.param("w", nn.initializers.zeros, (self.dim,))


def half_squared_error(out, y, mask):
    """(sum of (out - y)^2 / 2 over the batch, 1): the batch is ONE quadratic, not a mean."""
    return jnp.sum(0.5 * (out - y) ** 2 * mask), jnp.float32(1.0)


def quadratic_batch(a, c):
    """The full batch of F(w) = 1/2 ||sqrt(a) (w - c)||^2 for w of dimension len(c)."""
    a, c = np.atleast_1d(np.asarray(a, np.float64)), np.atleast_1d(np.asarray(c, np.float64))
    x = np.diag(np.sqrt(a)) if a.size == c.size else np.sqrt(a)[:, None] * np.eye(c.size)
    return Batch(jnp.asarray(x[None]), jnp.asarray((np.sqrt(a) * c)[None]), jnp.ones((1, c.size)))


def run_update(update, shared, client, batches):
    """finalize(step^K(init(...))) of a ClientUpdate, by hand (no trainer)."""
    carry = update.init(shared, client, 0, KEY)
    step = jax.jit(update.step)
    for batch in batches:
        carry, _ = step(carry, batch)
    return update.finalize(carry, shared, client)


def test_prox_step_equals_the_scalar_oracle():
    a, c, n = (1.0, 2.0, 1.0), (1.0, 3.0, -2.0), np.array([1.0, 1.0, 2.0])
    with jax.enable_x64(True):
        for mu, expect in ((1.0, (0.18, 1.02, -0.36)), (0.0, (0.19, 1.08, -0.38))):
            update = prox_update(Linear(), optax.sgd(0.1), mu, loss=half_squared_error)
            anchor = {"w": jnp.zeros(1)}
            out = [run_update(update, anchor, {"batch_stats": {}}, [quadratic_batch(ai, ci)] * 2)
                   for ai, ci in zip(a, c)]
            w = np.array([float(o["params"]["w"][0]) for o in out])
            np.testing.assert_allclose(w, expect, rtol=1e-12, atol=1e-12)
        # the server's n-weighted mean of the mu = 1 clients: 0.12 (uniform would be 0.28)
        out = [run_update(prox_update(Linear(), optax.sgd(0.1), 1.0, loss=half_squared_error),
                          {"w": jnp.zeros(1)}, {"batch_stats": {}}, [quadratic_batch(ai, ci)] * 2)
               for ai, ci in zip(a, c)]
        w = np.array([float(o["params"]["w"][0]) for o in out])
        np.testing.assert_allclose(n @ w / n.sum(), 0.12, atol=1e-12)
        # with 500 steps the local solve reaches the exact proximal point (a c + mu w^t)/(a + mu)
        update = prox_update(Linear(), optax.sgd(0.1), 1.0, loss=half_squared_error)
        far = [float(run_update(update, {"w": jnp.zeros(1)}, {"batch_stats": {}},
                                [quadratic_batch(ai, ci)] * 500)["params"]["w"][0]) for ai, ci in zip(a, c)]
        np.testing.assert_allclose(far, (0.5, 2.0, -1.0), atol=1e-10)


def test_anchor_and_start_come_from_the_client_when_given():
    """{'params', 'anchor'} in the client override the shared model (FedAMP's use): one GD
    step from 1 toward anchor 3 on a flat loss moves by eta rho (3 - 1)."""
    update = prox_update(Linear(), optax.sgd(0.1), 2.0, loss=lambda o, y, m: (0.0 * jnp.sum(o), 1.0))
    out = run_update(update, None, {"params": {"w": jnp.ones(1)}, "anchor": {"w": jnp.full(1, 3.0)},
                                    "batch_stats": {}}, [quadratic_batch(1.0, 0.0)])
    np.testing.assert_allclose(np.asarray(out["params"]["w"]), [1.0 + 0.1 * 2.0 * 2.0], rtol=1e-6)


# ---------------------------------------------------------------------------- rounds
@pytest.fixture(scope="module")
def ragged():
    ds, store = small_store(num_clients=3, scheme="dirichlet", samples_per_client=40,
                            dirichlet_alpha=1.0, min_client_size=15)
    assert len(set(np.asarray(store.train_count).tolist())) == 3, "unequal sizes wanted"
    return ds, store


def make_ctx(ds, store, cfg, model, strategy="loop", layer_order=None):
    return FLContext(model=model, layer_order=layer_order or layer_names(model), store=store,
                     trainer=ClientTrainer(model, store, cfg, strategy),
                     num_clients=int(store.train_idx.shape[0]), input_shape=ds.input_shape)


def grad_fn(model):
    """jax.grad of the mean cross-entropy of a minibatch (train mode, BN statistics out)."""
    @jax.jit
    def grad(p, st, x, y):
        def loss(p):
            logits, new = model.apply({"params": p, "batch_stats": st}, x, train=True,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]
        return jax.grad(loss, has_aux=True)(p)
    return grad


def minibatches(store, trainer, cid, key):
    """The (x, y) minibatches client `cid` trains on in the round of `key`, real examples only."""
    images, labels = np.asarray(store.images), np.asarray(store.labels)
    idx, mask = trainer.batch_plan(int(cid), key)
    for t in range(idx.shape[0]):
        rows = idx[t][mask[t]]
        if rows.size:
            yield normalize_images(jnp.asarray(images[rows]), store.mean, store.std), jnp.asarray(labels[rows])


def naive_prox_client(grad, batches, start, anchor, stats, lr, rho):
    """Plain SGD on CE + rho/2 ||w - anchor||^2 over `batches`: (params, batch_stats)."""
    step = jax.jit(lambda w, g: jax.tree.map(lambda wi, gi, ai: wi - lr * (gi + rho * (wi - ai)), w, g, anchor))
    w = start
    for x, y in batches:
        g, stats = grad(w, stats, x, y)
        w = step(w, g)
    return w, stats


def assert_tree_close(got, want, msg="", rtol=1e-5, atol=1e-6):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=msg)


row = lambda tree, i: jax.tree.map(lambda a: np.asarray(a)[i], tree)

MU, LR = 0.5, 0.05


@pytest.mark.slow
def test_two_rounds_equal_a_naive_per_client_loop(ragged):
    """CNN with BN, participants [2, 0] then [1, 2]; the anchor is the round's received
    global model (so a client trained twice is anchored to two different models); BN
    statistics get no prox term and stay per client; the server's weighted mean."""
    ds, store = ragged
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=True)
    ctx = make_ctx(ds, store, LocalTrainConfig(batch_size=8, local_epochs=1, lr=LR), model)
    algo = FedProx(ctx, FedProxConfig(mu=MU))
    state = algo.init(jax.random.PRNGKey(0))
    grad = grad_fn(model)
    counts = np.asarray(store.train_count).astype(np.float64)
    expect = jax.device_get(state)
    for t, ids in enumerate((np.array([2, 0]), np.array([1, 2]))):
        key = jax.random.fold_in(KEY, t)
        state, info = algo.round(state, t, ids, key)
        after = jax.device_get(state)
        w_t = expect["global_params"]
        uploads = []
        for cid in ids:
            w, st = naive_prox_client(grad, minibatches(store, algo.trainer, cid, key), w_t, w_t,
                                      row(expect["batch_stats"], cid), LR, MU)
            uploads.append(w)
            for key_, value in (("client_params", w), ("batch_stats", st)):
                expect[key_] = jax.tree.map(lambda a, v: _set_row(a, cid, v), expect[key_], value)
        wts = counts[ids] / counts[ids].sum()
        expect["global_params"] = jax.tree.map(lambda *u: sum(wi * np.asarray(ui) for wi, ui in zip(wts, u)), *uploads)
        for key_ in ("global_params", "client_params", "batch_stats"):
            assert_tree_close(after[key_], expect[key_], f"round {t} {key_}")
        expect = jax.tree.map(np.asarray, after)   # the next round starts from the engine's state
        np.testing.assert_array_equal(info["bytes_up"], [ctx.model_bytes] * 2)
        np.testing.assert_array_equal(info["bytes_down"], [ctx.model_bytes] * 2)
    views = algo.evaluate(state, 1, KEY).views
    assert set(views) == {"", "local"} and views[""].shared


def _set_row(a, i, v):
    a = np.array(a, copy=True)
    a[i] = np.asarray(v)
    return a


@pytest.mark.slow
def test_mu_zero_is_fedavg(ragged):
    ds, store = ragged
    ctx = make_ctx(ds, store, LocalTrainConfig(batch_size=8, local_steps=3, lr=LR),
                   make_cnn(ds.input_shape, ds.num_classes, use_bn=True))
    states = []
    for algo in (FedAvg(ctx), FedProx(ctx, FedProxConfig(mu=0.0))):
        state = algo.init(jax.random.PRNGKey(0))
        for t, ids in enumerate(([0, 2], [1, 0, 2])):
            state, _ = algo.round(state, t, np.array(ids), jax.random.fold_in(KEY, t))
        states.append(jax.device_get(state))
    assert_tree_close(states[1], states[0], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- strategies
class TinyNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, *, train, mask=None):
        x = jnp.tanh(nn.Dense(8, name="FC1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="FC2")(x)


def strategies_agree(ragged, make_algo, keys):
    """vmap = loop = shard over two rounds of three clients of different sizes (5 / 6 / 7
    local steps at batch 5), one trace of the round each; returns the vmap algorithm."""
    ds, store = ragged
    cfg = LocalTrainConfig(batch_size=5, local_epochs=1, lr=0.05)
    ids = np.array([0, 1, 2])
    out = {}
    for strategy in ("vmap", "loop", "shard"):
        algo = make_algo(make_ctx(ds, store, cfg, TinyNet(ds.num_classes), strategy, ("FC1", "FC2")))
        state = algo.init(jax.random.PRNGKey(0))
        for t in range(3):
            state, _ = algo.round(state, t, np.roll(ids, t), jax.random.fold_in(KEY, t))
        assert algo.trace_count == 1
        out[strategy] = jax.device_get({k: state[k] for k in keys})
    for strategy in ("loop", "shard"):
        for a, b in zip(jax.tree.leaves(out["vmap"]), jax.tree.leaves(out[strategy])):
            a, b = np.asarray(a), np.asarray(b)
            if a.ndim and a.shape[0] != b.shape[0]:   # per-client rows padded to the mesh
                a, b = a[:3], b[:3]
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_every_strategy_agrees_with_one_trace(ragged):
    strategies_agree(ragged, lambda ctx: FedProx(ctx, FedProxConfig(mu=0.3)),
                     ("global_params", "client_params"))


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options,train,pattern", [
    (dict(mu=-0.1), dict(), "--fedprox_mu must be"),
    (dict(mu=float("nan")), dict(), "--fedprox_mu must be"),
    (dict(mu=float("inf")), dict(), "--fedprox_mu must be"),
    (dict(mu=50.0), dict(lr=0.05), "--lr \\* --fedprox_mu = 2.5 >= 2"),
])
def test_bad_options_are_refused(options, train, pattern):
    with pytest.raises(UserInputError, match=pattern):
        FedProxConfig(**options).validate_training(LocalTrainConfig(**train))
    with pytest.raises(UserInputError, match=pattern):
        ExperimentConfig(algorithm="fedprox", algorithm_config=FedProxConfig(**options),
                         train=LocalTrainConfig(**train))


BAD_ARGV = ["--algorithm=fedprox", "--fedprox_mu=-1", "--dataset=synthetic", "--num_clients=4", "--rounds=1"]


def test_command_line_bad_option_is_one_line(capfd, tmp_path):
    with pytest.raises(UserInputError, match="fedprox_mu") as err:
        config_from_argv(["run", *BAD_ARGV])
    assert len(str(err.value).splitlines()) == 1
    line = one_error_line(run_command.main, ["run", *BAD_ARGV, f"--workdir={tmp_path}"], capfd)
    assert "--fedprox_mu" in line


def test_registry_row_search_space_and_description():
    cls = FedProx
    assert [(r.key, r.display, r.order) for r in cls.rows()] == [("fedprox", "FedProx", 20)]
    assert [h.path for h in cls.search_space] == ["train.lr", "mu"]
    check_search_space(ExperimentConfig(algorithm="fedprox"))
    assert FedProxConfig().mu == 1.0
