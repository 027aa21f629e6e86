"""FedALA: the ALA module and three rounds against independent computations.

Oracles: the worked example of a two-layer scalar model y = w2 w1 x (ALA on w2, squared
loss; numbers computed by hand): one ALA epoch for two clients (one clipped to W = 0), a
local gradient step and the server average; client A's start phase (11 epochs, W = 0.500244);
a naive per-client Python loop (model.apply + jax.grad on the unpadded minibatches of
`ClientTrainer.batch_plan` and the ALA sample `FedALA.ala_batches` reports, plain Python over
clients, epochs and minibatches, np.std for the stop rule) for three rounds: the first
participation (no ALA), the start phase, then one ALA epoch, with W, the flags and theta_i
persisting.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.run import main as run_main
from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.fedala import FedALA, FedALAConfig, adaptive_local_aggregation
from pfedla_jax.core.client_update import Batch
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.data.store import normalize_images
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import layer_names, make_cnn
from pfedla_jax.training.command_line import config_from_argv
from pfedla_jax.training.config import ExperimentConfig
from tests.helpers import one_error_line, small_store

KEY = jax.random.PRNGKey(11)


# ---------------------------------------------------------------------------- scalar oracle
class Weight(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("w", nn.initializers.zeros, ())


class Chain(nn.Module):
    """y = w2 w1 x, layers L1 (w1), L2 (w2)."""

    @nn.compact
    def __call__(self, x, *, train, mask=None):
        return Weight(name="L2")(Weight(name="L1")(x[:, 0]))


def squared(out, y, mask):
    return jnp.sum(0.5 * (out - y) ** 2 * mask), jnp.sum(mask)


def _params(w1, w2):
    return {"L1": {"w": jnp.float64(w1)}, "L2": {"w": jnp.float64(w2)}}


def _ala(theta, x, y, w=1.0, *, run=True, start=False, threshold=0.1, max_epochs=50):
    batches = Batch(jnp.full((1, 1, 1), x, jnp.float64), jnp.full((1, 1), y, jnp.float64),
                    jnp.ones((1, 1), jnp.float64))
    return adaptive_local_aggregation(
        Chain(), _params(*theta), _params(1.0, 1.0), {"L2": {"w": jnp.float64(w)}}, {}, batches, 1,
        run=jnp.asarray(run), start_phase=jnp.asarray(start), eta=0.5, threshold=threshold,
        window=10, max_epochs=max_epochs, loss=squared)


def test_scalar_oracle_one_ala_epoch_local_step_and_average():
    """Theta = (1, 1), eta = 0.5, W = 1 (not in the start phase): A (0.5, 2) on (1, 1.5) gets
    W = 0.75, B (2, 0) on (1, -2) gets W = clip(-0.5) = 0; then one GD step (lr 0.1) and the
    uniform average (1.015625, 0.5375)."""
    with jax.enable_x64(True):
        trained = []
        for theta, (x, y), want_w, want_hat, want_trained in (
                ((0.5, 2.0), (1.0, 1.5), 0.75, (1.0, 1.25), (1.03125, 1.275)),
                ((2.0, 0.0), (1.0, -2.0), 0.0, (1.0, 0.0), (1.0, -0.2))):
            hat, w, epochs = _ala(theta, x, y)
            assert int(epochs) == 1
            np.testing.assert_allclose(float(w["L2"]["w"]), want_w, atol=1e-12)
            np.testing.assert_allclose([float(hat["L1"]["w"]), float(hat["L2"]["w"])], want_hat, atol=1e-12)
            loss = lambda p: 0.5 * (Chain().apply({"params": p}, jnp.full((1, 1), x), train=True)[0] - y) ** 2
            g = jax.grad(loss)(hat)
            step = jax.tree.map(lambda p, gi: p - 0.1 * gi, hat, g)
            np.testing.assert_allclose([float(step["L1"]["w"]), float(step["L2"]["w"])], want_trained, atol=1e-12)
            trained.append(step)
        avg = jax.tree.map(lambda a, b: (a + b) / 2, *trained)
        np.testing.assert_allclose([float(avg["L1"]["w"]), float(avg["L2"]["w"])], [1.015625, 0.5375], atol=1e-12)


def test_scalar_oracle_start_phase_first_round_and_cap():
    """A's start phase: losses 0.125, 0.03125, ... (/4 each epoch) stop after 11 epochs with
    threshold 0.1 or 0.01, at W = 0.500244, w2hat = 1.499756. Threshold 0 runs to the cap. A
    client's first participation (run False) gets Theta, W unchanged, 0 epochs."""
    with jax.enable_x64(True):
        for threshold in (0.1, 0.01):
            hat, w, epochs = _ala((0.5, 2.0), 1.0, 1.5, start=True, threshold=threshold)
            assert int(epochs) == 11
            np.testing.assert_allclose(float(w["L2"]["w"]), 0.500244, atol=1e-6)
            np.testing.assert_allclose(float(hat["L2"]["w"]), 1.499756, atol=1e-6)
            assert float(hat["L1"]["w"]) == 1.0
        _, _, epochs = _ala((0.5, 2.0), 1.0, 1.5, start=True, threshold=0.0, max_epochs=17)
        assert int(epochs) == 17
        hat, w, epochs = _ala((0.5, 2.0), 1.0, 1.5, w=0.3, run=False, start=True)
        assert int(epochs) == 0 and float(w["L2"]["w"]) == 0.3
        assert (float(hat["L1"]["w"]), float(hat["L2"]["w"])) == (1.0, 1.0)


# ---------------------------------------------------------------------------- three rounds
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


LR = 0.05
CONFIG = FedALAConfig(rand_percent=50.0, layers=2)
# round 0: no ALA; round 1: client 1's first participation, client 2's start phase;
# round 2: client 0's start phase, client 2's one ALA epoch
ROUNDS = (np.array([2, 0]), np.array([1, 2]), np.array([0, 2]))
ROUND_KEYS = tuple(jax.random.fold_in(KEY, r) for r in range(3))


@pytest.fixture(scope="module")
def three_rounds(ragged):
    """FedALA on the CNN with BN (ALA on FC2, FC3), independent initial models, batches of 8
    (partial last batches, ALA samples of 50%): (algo, ctx, [states], [infos], state)."""
    ds, store = ragged
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=True)
    ctx = _ctx(ds, store, LocalTrainConfig(batch_size=8, local_epochs=1, lr=LR), model)
    algo = FedALA(ctx, CONFIG)
    assert algo.top == ("FC2", "FC3")
    state = algo.init(jax.random.PRNGKey(0))
    states, infos = [jax.device_get(state)], []
    for r, (ids, key) in enumerate(zip(ROUNDS, ROUND_KEYS)):
        state, info = algo.round(state, r, ids, key)
        states.append(jax.device_get(state))
        infos.append(jax.device_get(info))
        np.testing.assert_array_equal(info["bytes_up"], [ctx.model_bytes] * 2)
        np.testing.assert_array_equal(info["bytes_down"], [ctx.model_bytes] * 2)
    return algo, ctx, states, infos, state


def _naive_round(algo, model, store, before, ids, key):
    """One FedALA round by hand: ALA then plain SGD, one client after another."""
    top = ("FC2", "FC3")
    images, labels = np.asarray(store.images), np.asarray(store.labels)
    batch = lambda rows: (normalize_images(jnp.asarray(images[rows]), store.mean, store.std),
                          jnp.asarray(labels[rows]))

    def ce(p, st, x, y):
        logits, new = model.apply({"params": p, "batch_stats": st}, x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

    grad = jax.jit(jax.grad(ce, has_aux=True))
    top_grad = jax.jit(jax.value_and_grad(lambda tp, lower, st, x, y: ce({**lower, **tp}, st, x, y)[0]))
    after = jax.tree.map(np.array, before)
    glob = before["global_params"]
    uploads, epochs_run = [], []
    for cid in ids:
        row = lambda tree: jax.tree.map(lambda a: np.asarray(a)[cid], tree)
        theta, st, w = row(before["client_params"]), row(before["batch_stats"]), row(before["ala_weights"])
        epochs = 0
        if not before["trained"][cid]:
            start = glob
        else:
            lower = {k: v for k, v in glob.items() if k not in top}
            diff = {k: jax.tree.map(lambda g, t: g - t, glob[k], theta[k]) for k in top}
            hat = lambda w: {k: jax.tree.map(lambda t, d, wi: t + d * wi, theta[k], diff[k], w[k]) for k in top}
            idx, mask = algo.ala_batches(int(cid), key)
            sample = [idx[a][mask[a]] for a in range(idx.shape[0]) if mask[a].any()]
            losses = []
            while True:
                for rows in sample:
                    value, g = top_grad(hat(w), lower, st, *batch(rows))
                    w = {k: jax.tree.map(lambda wi, gi, d: np.clip(wi - CONFIG.eta * gi * d, 0, 1),
                                         w[k], g[k], diff[k]) for k in top}
                losses.append(float(value))
                epochs += 1
                if before["started"][cid]:
                    break
                if len(losses) > 10 and np.std(losses[-10:]) < CONFIG.threshold:
                    break
                if epochs == CONFIG.max_start_epochs:
                    break
            start = {**lower, **hat(w)}
        p = start
        idx, mask = algo.trainer.batch_plan(int(cid), key)
        for t in range(idx.shape[0]):
            rows = idx[t][mask[t]]
            if rows.size:
                g, st = grad(p, st, *batch(rows))
                p = jax.tree.map(lambda a, gi: a - LR * gi, p, g)
        uploads.append(p)
        epochs_run.append(epochs)
        for name, value in (("client_params", p), ("batch_stats", st), ("ala_weights", w)):
            for dst, src in zip(jax.tree.leaves(after[name]), jax.tree.leaves(value), strict=True):
                dst[cid] = np.asarray(src)
        after["started"][cid] = before["started"][cid] or before["trained"][cid]
        after["trained"][cid] = True
    counts = np.asarray(store.train_count)[ids].astype(np.float64)
    wts = counts / counts.sum()
    after["global_params"] = jax.tree.map(lambda *u: sum(c * np.asarray(a) for c, a in zip(wts, u)), *uploads)
    return after, epochs_run


@pytest.mark.slow
def test_three_rounds_equal_a_naive_per_client_loop(ragged, three_rounds):
    ds, store = ragged
    algo, ctx, states, infos, _ = three_rounds
    expect = states[0]
    for r, (ids, key) in enumerate(zip(ROUNDS, ROUND_KEYS)):
        expect, epochs = _naive_round(algo, ctx.model, store, expect, ids, key)
        np.testing.assert_array_equal(infos[r]["ala_epochs"], epochs)
        got = states[r + 1]
        for name in expect:
            for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(expect[name]), strict=True):
                a, b = np.asarray(a), np.asarray(b)
                if name != "global_params":
                    a, b = a[:3], b[:3]
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"round {r}: {name}")
        expect = jax.tree.map(np.asarray, got)   # the next round from the engine's state
    # what ran: round 0 no ALA; round 1 client 1 none, client 2 its start phase (>= 11
    # epochs); round 2 client 0's start phase, client 2 one epoch
    assert infos[0]["ala_epochs"].tolist() == [0, 0]
    assert infos[1]["ala_epochs"][0] == 0 and infos[1]["ala_epochs"][1] >= 11
    assert infos[2]["ala_epochs"][0] >= 11 and infos[2]["ala_epochs"][1] == 1
    final = states[-1]
    assert final["trained"][:3].tolist() == [True, True, True]
    assert final["started"][:3].tolist() == [True, False, True]
    # W moved for the clients that ran ALA, and persisted between rounds 1 and 2 for client 2
    w = lambda s, c: np.concatenate([np.ravel(a[c]) for a in jax.tree.leaves(s["ala_weights"])])
    assert np.all(w(final, 1) == 1.0) and not np.all(w(final, 0) == 1.0)
    assert not np.allclose(w(states[2], 2), 1.0) and not np.allclose(w(final, 2), w(states[2], 2))


@pytest.mark.slow
def test_views(three_rounds):
    """'' = theta_i, 'ala' = Eq. 1 with the latest Theta and the stored W (Theta for a client
    that never trained: none left here, so checked on the initial state), 'global' = Theta."""
    algo, ctx, states, _, state = three_rounds
    after = states[-1]
    views = algo.evaluate(state, 2, KEY).views
    assert set(views) == {"", "ala", "global"} and views["global"].shared
    for a, b in zip(jax.tree.leaves(views[""].params), jax.tree.leaves(after["client_params"])):
        np.testing.assert_array_equal(np.asarray(a), b)
    mixed = jax.device_get(views["ala"].params)
    for c in range(3):
        for layer, leaves in after["global_params"].items():
            for leaf, g in leaves.items():
                want = g
                if layer in algo.top:
                    t = after["client_params"][layer][leaf][c]
                    want = t + (g - t) * after["ala_weights"][layer][leaf][c]
                np.testing.assert_allclose(mixed[layer][leaf][c], want, rtol=1e-6, atol=1e-7)
    first = algo.init(jax.random.PRNGKey(0))
    for a, b in zip(jax.tree.leaves(algo.mixed(first)), jax.tree.leaves(first["global_params"])):
        np.testing.assert_array_equal(np.asarray(a)[1], np.asarray(b))


def test_ala_sample_is_a_random_subset_of_own_examples(ragged):
    ds, store = ragged
    model = make_cnn(ds.input_shape, ds.num_classes)
    algo = FedALA(_ctx(ds, store, LocalTrainConfig(batch_size=4, local_epochs=1), model),
                  FedALAConfig(rand_percent=50.0))
    counts = np.asarray(store.train_count)
    np.testing.assert_array_equal(algo.sample_sizes, (counts * 0.5).astype(int))
    for c in range(3):
        idx, mask = algo.ala_batches(c, KEY)
        picked = idx[mask]
        assert picked.size == algo.sample_sizes[c] == len(set(picked.tolist()))
        assert set(picked.tolist()) <= set(np.asarray(store.train_idx)[c, :counts[c]].tolist())
        assert all(m[:m.sum()].all() for m in mask)   # real examples first, batch by batch
        other, _ = algo.ala_batches(c, jax.random.fold_in(KEY, 1))
        assert not np.array_equal(other[mask], picked)  # redrawn every round
    assert FedALAConfig(rand_percent=1.0).sample_sizes([5, 300]).tolist() == [1, 3]


# ---------------------------------------------------------------------------- strategies
class TinyNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, *, train, mask=None):
        x = jnp.tanh(nn.Dense(8, name="FC1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="FC2")(x)


@pytest.mark.slow
def test_every_strategy_agrees_one_trace(ragged):
    """vmap = loop = shard for three clients of different sizes over three rounds (no ALA,
    the start phase, one epoch); each round program is traced once."""
    ds, store = ragged
    model = TinyNet(ds.num_classes)
    cfg = LocalTrainConfig(batch_size=5, local_epochs=1, lr=0.1)
    out = {}
    for strategy in ("vmap", "loop", "shard"):
        algo = FedALA(_ctx(ds, store, cfg, model, strategy, ("FC1", "FC2")), FedALAConfig())
        state = algo.init(jax.random.PRNGKey(0))
        epochs = []
        for t, ids in enumerate(([0, 1, 2], [2, 0, 1], [1, 0, 2])):
            state, info = algo.round(state, t, np.array(ids), jax.random.fold_in(KEY, t))
            epochs.append(np.asarray(info["ala_epochs"]).tolist())
        assert algo.trace_count == 1
        out[strategy] = (jax.device_get(state), epochs)
    assert out["vmap"][1][0] == [0, 0, 0] and min(out["vmap"][1][1]) >= 11 and out["vmap"][1][2] == [1, 1, 1]
    for strategy in ("loop", "shard"):
        assert out[strategy][1] == out["vmap"][1]
        for a, b in zip(jax.tree.leaves(out["vmap"][0]), jax.tree.leaves(out[strategy][0])):
            a, b = np.asarray(a), np.asarray(b)
            if a.ndim and a.shape[0] != b.shape[0]:   # per-client rows padded to the mesh
                a, b = a[:3], b[:3]
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options,pattern", [
    (dict(rand_percent=0.0), "fedala_rand_percent"),
    (dict(rand_percent=101.0), "fedala_rand_percent"),
    (dict(layers=0), "fedala_layers"),
    (dict(eta=0.0), "fedala_eta"),
    (dict(eta=float("inf")), "fedala_eta"),
    (dict(threshold=-0.1), "fedala_threshold"),
    (dict(num_pre_loss=0), "fedala_num_pre_loss"),
    (dict(max_start_epochs=10), "fedala_max_start_epochs"),
])
def test_bad_options_are_refused_before_data(options, pattern):
    with pytest.raises(UserInputError, match=pattern):
        FedALAConfig(**options)
    with pytest.raises(UserInputError, match=pattern):
        ExperimentConfig(algorithm="fedala", algorithm_config=FedALAConfig(**options))


def test_too_many_layers_is_refused(ragged):
    ds, store = ragged
    model = make_cnn(ds.input_shape, ds.num_classes)
    with pytest.raises(UserInputError, match="fedala_layers=6 exceeds the model's 5 layers"):
        FedALA(_ctx(ds, store, LocalTrainConfig(), model), FedALAConfig(layers=6))


BAD_ARGV = ["--algorithm=fedala", "--fedala_rand_percent=0", "--dataset=synthetic",
            "--synthetic_per_class=40", "--num_clients=4", "--rounds=1"]


def test_command_line_bad_option_is_one_line(capfd, tmp_path):
    with pytest.raises(UserInputError, match="fedala_rand_percent") as err:
        config_from_argv(["run", *BAD_ARGV])
    assert len(str(err.value).splitlines()) == 1
    line = one_error_line(run_main, ["run", *BAD_ARGV, f"--workdir={tmp_path}"], capfd)
    assert "fedala_rand_percent" in line
