"""FedRoD: the balanced softmax against its closed form, the paper-style worked example of
one step, two rounds against a naive per-client Python loop, the strategies, bad options.

Oracles: the balanced softmax as -log(n_y e^{g_y} / sum_c n_c e^{g_c}) in float64 numpy;
hand-derived numbers of one step on a 2-class linear model (body = I, C = 2, lr 1); a naive
loop that takes the body's features with Flax's `capture_intermediates` (FC2's output, ReLU
by hand; the algorithm intercepts the head's input instead), the balanced softmax as a
count-weighted `logsumexp`, plain jax.grad and SGD by hand, Python loops over clients and
the minibatches `ClientTrainer.batch_plan` reports.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.scipy.special import logsumexp

import experiments.run as run_tool
from pfedla_jax.algorithms.fedrod import (FedRoD, FedRoDConfig, balanced_softmax_loss, class_counts,
                                          fedrod_update)
from pfedla_jax.algorithms.search_space import check_search_space
from pfedla_jax.core.client_update import Batch
from pfedla_jax.core.local_training import LocalTrainConfig
from pfedla_jax.data.store import normalize_images
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.config import ExperimentConfig
from tests.helpers import one_error_line, store_from_indices, synthetic
from tests.test_fedper import ARGV as FEDPER_ARGV, TinyNet, check_strategies, make_ctx

KEY = jax.random.PRNGKey(17)
TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- the loss
def closed_form_bsm(logits, labels, counts, gamma):
    w = np.asarray(counts, np.float64) ** gamma * (np.asarray(counts) > 0)
    e = w * np.exp(np.asarray(logits, np.float64))
    return -np.log(e[np.arange(len(labels)), labels] / e.sum(1))


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_balanced_softmax_equals_its_closed_form(gamma):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 5)) * 3
    counts = np.array([4.0, 0.0, 1.0, 9.0, 0.0])
    labels = rng.choice([0, 2, 3], size=7)
    got = balanced_softmax_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(counts), gamma)
    np.testing.assert_allclose(np.asarray(got), closed_form_bsm(logits, labels, counts, gamma), rtol=1e-5)
    # the gradient: softmax(g + gamma log n) - onehot; 0 for the absent classes
    grad = jax.grad(lambda g: balanced_softmax_loss(g, jnp.asarray(labels), jnp.asarray(counts), gamma).sum())(
        jnp.asarray(logits, jnp.float32))
    p = np.exp(logits) * counts ** gamma
    p = p / p.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(grad), p - np.eye(5)[labels], atol=1e-6)
    assert np.all(np.asarray(grad)[:, [1, 4]] == 0)
    # gamma = 0: plain cross-entropy over every class
    plain = balanced_softmax_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(counts), 0.0)
    np.testing.assert_allclose(np.asarray(plain), optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(logits, jnp.float32), jnp.asarray(labels)), rtol=1e-6)


def test_single_class_client_has_loss_zero_gradient_zero_no_nan():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)) * 5, jnp.float32)
    counts, labels = jnp.array([0.0, 6.0, 0.0]), jnp.array([1, 1, 1, 1])
    loss, grad = jax.value_and_grad(lambda g: balanced_softmax_loss(g, labels, counts, 1.0).sum())(logits)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_class_counts_of_the_training_split():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=50)
    idx = rng.integers(0, 50, size=(3, 9))
    count = np.array([9, 4, 1])
    got = np.asarray(class_counts(jnp.asarray(labels), jnp.asarray(idx), jnp.asarray(count), 4))
    for c in range(3):
        np.testing.assert_array_equal(got[c], np.bincount(labels[idx[c, :count[c]]], minlength=4))


# ---------------------------------------------------------------------------- worked example
class TwoClassLinear(nn.Module):
    """z = x B (B = I), generic head FC3: g = z psi + b (psi = 0)."""

    @nn.compact
    def __call__(self, x, *, train, mask=None):
        z = nn.Dense(2, use_bias=False, name="Body", kernel_init=lambda *_: jnp.eye(2))(x)
        return nn.Dense(2, name="FC3", kernel_init=nn.initializers.zeros)(z)


def _one_step(x, y, counts, phi):
    model = TwoClassLinear()
    params = model.init(KEY, jnp.zeros((1, 2)), train=False)["params"]
    update = fedrod_update(model, optax.sgd(1.0), head="FC3", gamma=1.0)
    client = {"batch_stats": {}, "class_counts": jnp.asarray(counts, jnp.float32),
              "personal_head": {"kernel": jnp.asarray(phi, jnp.float32), "bias": jnp.zeros(2)}}
    carry = update.init(params, client, 0, KEY)
    batch = Batch(jnp.asarray([[x]], jnp.float32), jnp.asarray([[y]]), jnp.ones((1, 1)))
    carry, (loss, count) = jax.jit(update.step)(carry, batch)
    return jax.device_get(update.finalize(carry, params, client)), float(loss)


def test_worked_example_one_step():
    """C = 2, body B = I, psi = 0, lr 1. Client A: x = (1, 0), y = 0, n = (3, 1), phi = I:
    BSM p = (0.75, 0.25), ER p = softmax(1, 0); the body does not move (the stop-gradient).
    Client B: x = (0, 1), y = 1, n = (0, 2), phi = 0: a single-class client, BSM loss 0 and
    no change to body or generic head, no NaN. Kernels are [F, C] (the transpose of the
    class-by-feature matrices of the derivation)."""
    a, loss_a = _one_step((1.0, 0.0), 0, (3, 1), np.eye(2))
    s = 1 / (1 + np.e)   # 0.268941
    np.testing.assert_allclose(loss_a, -np.log(0.75) - np.log(1 - s), rtol=1e-6)
    np.testing.assert_allclose(a["params"]["FC3"]["kernel"], [[0.25, -0.25], [0.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(a["params"]["FC3"]["bias"], [0.25, -0.25], atol=1e-7)
    np.testing.assert_array_equal(a["params"]["Body"]["kernel"], np.eye(2))
    np.testing.assert_allclose(a["personal_head"]["kernel"], [[1 + s, -s], [0.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(a["personal_head"]["bias"], [s, -s], atol=1e-6)
    b, loss_b = _one_step((0.0, 1.0), 1, (0, 2), np.zeros((2, 2)))
    np.testing.assert_allclose(loss_b, -np.log(0.5), rtol=1e-6)          # L_BR = 0, L_ER = log 2
    np.testing.assert_array_equal(b["params"]["FC3"]["kernel"], np.zeros((2, 2)))
    np.testing.assert_array_equal(b["params"]["FC3"]["bias"], np.zeros(2))
    np.testing.assert_array_equal(b["params"]["Body"]["kernel"], np.eye(2))
    np.testing.assert_allclose(b["personal_head"]["kernel"], [[0.0, 0.0], [-0.5, 0.5]], atol=1e-7)
    # the server's uniform average and the personalised logits (kernels only: bias-free)
    psi = (a["params"]["FC3"]["kernel"] + b["params"]["FC3"]["kernel"]) / 2
    np.testing.assert_allclose(psi, [[0.125, -0.125], [0.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(np.array([1.0, 0.0]) @ (psi + a["personal_head"]["kernel"]),
                               [1.393941, -0.393941], atol=1e-6)
    np.testing.assert_allclose(np.array([0.0, 1.0]) @ (psi + b["personal_head"]["kernel"]), [-0.5, 0.5], atol=1e-7)


# ---------------------------------------------------------------------------- rounds
@pytest.fixture(scope="module")
def skewed():
    """Client 0: one class (20 examples); client 1: classes 1-3 (25); client 2: all ten (32).
    Train / test halves of each class's examples."""
    ds = synthetic()
    by_class = [np.flatnonzero(ds.labels == c) for c in range(ds.num_classes)]
    train = [by_class[0][:20],
             np.concatenate([by_class[1][:9], by_class[2][:8], by_class[3][:8]]),
             np.concatenate([by_class[c][20:23] for c in range(10)] + [by_class[4][30:32]])]
    test = [by_class[0][40:50], by_class[1][40:50], np.concatenate([by_class[c][50:52] for c in range(10)])]
    return ds, store_from_indices(ds, train, test)


def naive_fedrod_rounds(algo, store, start, cohorts, keys, lr):
    """Rounds of FedRoD by hand (module docstring). Returns per round (global params,
    personal heads [N, ...], loss sums of the cohort)."""
    model = algo.ctx.model
    images, labels = np.asarray(store.images), np.asarray(store.labels)
    counts = np.asarray(store.train_count)
    num_classes = start["personal_head"]["bias"].shape[1]
    n_of = [np.bincount(labels[np.asarray(store.train_idx)[c, :counts[c]]], minlength=num_classes)
            for c in range(counts.size)]

    def loss(params, phi, x, y, n):
        g, inter = model.apply({"params": params, "batch_stats": {}}, x, train=True,
                               capture_intermediates=lambda m, _: m.name == "FC2", mutable=["intermediates"])
        z = jax.nn.relu(inter["intermediates"]["FC2"]["__call__"][0])
        # balanced softmax: -log(n_y e^{g_y} / sum_c n_c e^{g_c}), labels always have n_y > 0
        br = logsumexp(g, b=n[None, :], axis=1) - jnp.take_along_axis(g, y[:, None], 1)[:, 0] - jnp.log(n[y])
        personal = jax.lax.stop_gradient(g) + jax.lax.stop_gradient(z) @ phi["kernel"] + phi["bias"]
        er = optax.softmax_cross_entropy_with_integer_labels(personal, y)
        return jnp.mean(br + er), jnp.sum(br + er)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    glob = jax.tree.map(np.asarray, start["global_params"])
    heads = [jax.tree.map(lambda a: np.asarray(a)[c], start["personal_head"]) for c in range(counts.size)]
    out = []
    for ids, key in zip(cohorts, keys):
        trained, sums = [], []
        for cid in ids:
            params, phi, total = glob, heads[cid], 0.0
            idx, mask = algo.trainer.batch_plan(int(cid), key)
            for t in range(idx.shape[0]):
                rows = idx[t][mask[t]]
                if rows.size == 0:
                    continue
                x = normalize_images(jnp.asarray(images[rows]), store.mean, store.std)
                (gp, gphi), s = grad(params, phi, x, jnp.asarray(labels[rows]), jnp.asarray(n_of[cid], jnp.float32))
                if np.count_nonzero(n_of[cid]) == 1:    # a single-class client: no body gradient
                    assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(gp))
                params = jax.tree.map(lambda a, b: np.asarray(a) - lr * np.asarray(b), params, gp)
                phi = jax.tree.map(lambda a, b: np.asarray(a) - lr * np.asarray(b), phi, gphi)
                total += float(s)
            trained.append(params)
            heads[cid] = phi
            sums.append(total)
        w = counts[list(ids)].astype(np.float64)
        w = w / w.sum()
        glob = jax.tree.map(lambda *p: sum(wi * pi for wi, pi in zip(w, p)), *trained)
        out.append((glob, jax.tree.map(lambda *rows: np.stack(rows), *heads), np.array(sums)))
    return out


@pytest.mark.slow
def test_two_rounds_equal_a_naive_per_client_loop(skewed):
    """Participants [0, 2] then [1, 0] (client 0 single-class, trains twice from its own
    personal head; client 1 three classes), 2 local epochs of batches of 8; the personal
    heads of every client, the global model, the train loss, the bytes and both views."""
    ds, store = skewed
    cfg = LocalTrainConfig(batch_size=8, local_epochs=2, lr=0.05)
    ctx = make_ctx(ds, store, cfg)
    algo = FedRoD(ctx)
    cohorts = [[0, 2], [1, 0]]
    keys = [jax.random.fold_in(KEY, t) for t in range(2)]
    state = algo.init(jax.random.PRNGKey(0))
    start = jax.device_get(state)
    # 'copy': every personal head starts as the initial generic head
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(start["personal_head"][leaf][1], start["global_params"]["FC3"][leaf])
    expect = naive_fedrod_rounds(algo, store, start, cohorts, keys, cfg.lr)
    for t, (ids, key) in enumerate(zip(cohorts, keys)):
        if t == 1:   # the single-class client leaves the body and generic head where they were
            alone, _ = algo.trainer.run(jax.device_get(state["global_params"]),
                                        {"batch_stats": {}, "class_counts": jnp.eye(10)[None, 0] * 20,
                                         "personal_head": jax.tree.map(lambda a: a[:1], start["personal_head"])},
                                        np.array([0]), key)
            for a, b in zip(jax.tree.leaves(alone["params"]), jax.tree.leaves(jax.device_get(state["global_params"]))):
                np.testing.assert_array_equal(np.asarray(a)[0], b)
        state, info = algo.round(state, t, np.asarray(ids), key)
        after = jax.device_get(state)
        if t == 0:
            first = after
        glob, heads, sums = expect[t]
        for a, b in zip(jax.tree.leaves(after["global_params"]), jax.tree.leaves(glob)):
            np.testing.assert_allclose(a, b, **TOL)
        for a, b in zip(jax.tree.leaves(after["personal_head"]), jax.tree.leaves(heads)):
            np.testing.assert_allclose(a[:3], b, **TOL)
        np.testing.assert_allclose(info["loss_sum"], sums, rtol=1e-5)
        np.testing.assert_array_equal(info["bytes_up"], [ctx.model_bytes] * 2)
        np.testing.assert_array_equal(info["bytes_down"], [ctx.model_bytes] * 2)
    # the client that sat out round 2 keeps its personal head
    np.testing.assert_array_equal(after["personal_head"]["kernel"][2], first["personal_head"]["kernel"][2])
    # views: '' = the global body + (psi + phi_i) as FC3, whose logits are g + h_P(z); 'generic'
    views = algo.evaluate(state, 1, KEY).views
    assert set(views) == {"", "generic"} and views["generic"].shared
    personal = jax.device_get(views[""].params)
    x = normalize_images(jnp.asarray(np.asarray(store.images)[np.asarray(store.test_idx)[1, :4]]),
                         store.mean, store.std)
    row = jax.tree.map(lambda a: a[1], personal)
    summed = ctx.model.apply({"params": row, "batch_stats": {}}, x, train=False)
    g, inter = ctx.model.apply({"params": after["global_params"], "batch_stats": {}}, x, train=False,
                               capture_intermediates=lambda m, _: m.name == "FC2", mutable=["intermediates"])
    z = jax.nn.relu(inter["intermediates"]["FC2"]["__call__"][0])
    phi = jax.tree.map(lambda a: a[1], after["personal_head"])
    np.testing.assert_allclose(summed, g + z @ phi["kernel"] + phi["bias"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_every_strategy_agrees_with_one_trace():
    """On a two-layer model (the head FC2 is Flax's nn.Dense; its input is tanh(FC1))."""
    ds = synthetic()
    rng = np.random.default_rng(3)
    train = [rng.choice(np.flatnonzero(ds.labels < k), size, replace=False) for k, size in ((2, 11), (5, 14), (10, 17))]
    test = [np.flatnonzero(ds.labels == c)[-5:] for c in range(3)]
    store = store_from_indices(ds, train, test)
    final = check_strategies(ds, store, lambda ctx: FedRoD(ctx), keys=("global_params", "personal_head"))
    heads = final["personal_head"]["kernel"][:3]
    assert not np.allclose(heads[0], heads[1])


# ---------------------------------------------------------------------------- bad input
class NoBiasHead(nn.Module):
    @nn.compact
    def __call__(self, x, *, train, mask=None):
        return nn.Dense(10, use_bias=False, name="FC2")(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("options,pattern", [
    (dict(gamma=-1.0), "--fedrod_gamma must be a finite number >= 0"),
    (dict(gamma=float("nan")), "--fedrod_gamma"),
    (dict(personal_init="random"), "unknown --fedrod_personal_init 'random'"),
])
def test_bad_options_are_refused(options, pattern):
    with pytest.raises(UserInputError, match=pattern):
        FedRoDConfig(**options)


def test_the_last_layer_must_be_linear():
    ds = synthetic()
    store = store_from_indices(ds, [np.arange(5)], [np.arange(5, 8)])
    ctx = make_ctx(ds, store, LocalTrainConfig(batch_size=4, local_epochs=1), model=NoBiasHead(),
                   layer_order=("FC2",))
    with pytest.raises(UserInputError, match="FedRoD needs a linear last layer"):
        FedRoD(ctx)
    assert FedRoD(make_ctx(ds, store, LocalTrainConfig(batch_size=4), model=TinyNet(),
                           layer_order=("FC1", "FC2"))).head == "FC2"


ARGV = [a.replace("fedper", "fedrod") for a in FEDPER_ARGV]


def test_command_line_bad_option_is_one_line(capfd):
    assert "--fedrod_gamma" in one_error_line(run_tool.main, [*ARGV, "--fedrod_gamma=-2"], capfd)


def test_search_space_fits_the_config():
    check_search_space(ExperimentConfig(algorithm="fedrod"))
