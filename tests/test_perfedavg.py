"""Per-FedAvg FO and HF: the local step against independent computations.

Oracles: numpy closed forms of the FO / HF meta-step on a linear least-squares model (a
quadratic loss: gradients A w - b, Hessian A); the central finite difference against the
exact (reverse-over-reverse) Hessian-vector product on the real CNN, in float64; a naive
per-client Python loop (model.apply + jax.grad on the unpadded minibatches that
`ClientTrainer.batch_plan` reports) for a round; one SGD step by hand for the evaluation.
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
from pfedla_jax.algorithms.perfedavg import (PerFedAvg, PerFedAvgConfig, hessian_vector_product,
                                             perfedavg_update)
from pfedla_jax.core.client_update import Batch, mean_batch_loss
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.data.store import normalize_images
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import init_variables, layer_names, make_cnn
from pfedla_jax.training.command_line import config_from_argv
from pfedla_jax.training.config import ExperimentConfig
from tests.helpers import small_store

KEY = jax.random.PRNGKey(7)


# ---------------------------------------------------------------------------- closed forms
class Linear(nn.Module):
    """y = x . w (no bias): with a squared error, a quadratic loss in w."""

    @nn.compact
    def __call__(self, x, *, train, mask=None):
        return x @ self.param("w", nn.initializers.zeros, (x.shape[-1],))


def squared_error(out, y, mask):
    return jnp.sum(0.5 * (out - y) ** 2 * mask), jnp.sum(mask)


def cross_entropy64(logits, labels, mask):
    """Cross-entropy in the logits' own precision (the default casts to float32)."""
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    return jnp.sum(ce * mask), jnp.sum(mask)


def _quadratic(rng, k, b=6, d=4):
    """k minibatches (x [k, b, d], y [k, b], mask [k, b] with a partial last batch) and the
    (A_j, b_j) of each: grad f_j(w) = A_j w - b_j over the real examples."""
    x = rng.normal(size=(k, b, d))
    y = rng.normal(size=(k, b))
    mask = np.ones((k, b))
    mask[-1, -2:] = 0.0
    mats = [(x[j].T @ np.diag(mask[j]) @ x[j] / mask[j].sum(), x[j].T @ (mask[j] * y[j]) / mask[j].sum())
            for j in range(k)]
    return x, y, mask, mats


@pytest.mark.parametrize("variant,hessian", [("fo", "exact"), ("hf", "exact"), ("hf", "finite_difference")])
def test_meta_step_equals_the_closed_form_on_a_quadratic(variant, hessian):
    """Two meta-steps (the carry) of FO / HF against numpy in float64:
    w~ = w - a (A0 w - b0), g = A1 w~ - b1, FO: w - b g, HF: w - b (I - a A2) g."""
    rng = np.random.default_rng(0)
    alpha, beta = 0.3, 0.7
    k = 2 if variant == "fo" else 3
    update = perfedavg_update(Linear(), alpha=alpha, beta=beta, variant=variant, hessian=hessian,
                              delta=1e-4, loss=squared_error)
    assert update.batches_per_step == k
    w = rng.normal(size=4)
    with jax.enable_x64(True):
        carry = update.init(None, {"params": {"w": jnp.asarray(w)}, "batch_stats": {}}, 0, KEY)
        step = jax.jit(update.step)
        for _ in range(2):
            x, y, mask, mats = _quadratic(rng, k)
            carry, (loss_sum, count) = step(carry, Batch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)))
            # the reported loss: f(w_{t-1}; D) summed over D's real examples
            np.testing.assert_allclose(float(loss_sum), np.sum(0.5 * (x[0] @ w - y[0]) ** 2 * mask[0]), rtol=1e-10)
            assert float(count) == mask[0].sum()
            (a0, b0), (a1, b1) = mats[:2]
            g = a1 @ (w - alpha * (a0 @ w - b0)) - b1
            if variant == "hf":
                g = g - alpha * mats[2][0] @ g
            w = w - beta * g
            tol = 1e-12 if hessian == "exact" else 1e-7  # the FD of a quadratic: roundoff only
            np.testing.assert_allclose(np.asarray(carry[0]["w"]), w, rtol=tol, atol=tol)
        out = update.finalize(carry, None, None)
        assert set(out) == {"params", "batch_stats"}


@pytest.mark.slow
def test_exact_hvp_equals_a_finite_difference_on_the_cnn():
    """The exact HVP (reverse over the custom-VJP ops' backward passes) vs the central
    difference on the real CNN with BN, in float64, along a unit direction with a step
    small enough to cross no ReLU / max-pool kink (with a larger step, or along a random
    direction of norm ~300, the kinks dominate the difference); the exact HVP of the linear
    model is A v."""
    ds, store = small_store(num_clients=2, samples_per_client=40)
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=True)
    rows = np.asarray(store.train_idx[0][:6])
    variables = init_variables(model, jax.random.PRNGKey(1), ds.input_shape)
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        x = jnp.asarray(normalize_images(store.images[rows], store.mean, store.std), jnp.float64)
        y, mask = jnp.asarray(store.labels[rows]), jnp.ones(6, jnp.float64).at[-1].set(0.0)
        leaves, treedef = jax.tree.flatten(variables["params"])
        v = [jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, jax.random.split(KEY, len(leaves)))]
        norm = jnp.sqrt(sum(jnp.sum(a * a) for a in v))
        v = treedef.unflatten([a / norm for a in v])
        # the HF step's gradient of the mean loss (perfedavg_update's), at p on this batch
        grad = jax.grad(mean_batch_loss(model, cross_entropy64), has_aux=True)
        batch_grad = lambda p: grad(p, variables["batch_stats"], x, y, mask)[0]
        hvp = jax.jit(lambda p, v, h: hessian_vector_product(batch_grad, p, v, hessian=h, delta=1e-5),
                      static_argnums=2)
        flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])
        e = flat(hvp(variables["params"], v, "exact"))
        f = flat(hvp(variables["params"], v, "finite_difference"))
        assert e.dtype == np.float64 and np.linalg.norm(e) > 1e-2
        assert np.linalg.norm(e - f) / np.linalg.norm(e) < 1e-6
        # linear model: H = A exactly
        rng = np.random.default_rng(1)
        xs, ys, m, mats = _quadratic(rng, 1)
        vv = rng.normal(size=4)
        linear_grad = jax.grad(mean_batch_loss(Linear(), squared_error), has_aux=True)
        hv = hessian_vector_product(
            lambda p: linear_grad(p, {}, jnp.asarray(xs[0]), jnp.asarray(ys[0]), jnp.asarray(m[0]))[0],
            {"w": jnp.zeros(4)}, {"w": jnp.asarray(vv)})
        np.testing.assert_allclose(np.asarray(hv["w"]), mats[0][0] @ vv, rtol=1e-12)


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


def _ce_grad(model):
    """jitted (params, stats, x, y) -> (grad of the mean CE over x, new BN stats)."""
    @jax.jit
    def fn(p, st, x, y):
        def loss(p):
            logits, new = model.apply({"params": p, "batch_stats": st}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new.get("batch_stats", st)
        return jax.grad(loss, has_aux=True)(p)
    return fn


def _real(store, rows):
    return (normalize_images(jnp.asarray(np.asarray(store.images)[rows]), store.mean, store.std),
            jnp.asarray(np.asarray(store.labels)[rows]))


@pytest.mark.slow
def test_round_and_evaluation_equal_a_naive_per_client_loop(ragged):
    """HF with the exact HVP on the CNN with BN, participants [2, 0] of different sizes:
    each client by hand (meta-steps over the trainer's batches, unpadded; the running stats
    from the inner forward only), then the train-size weighted mean. Then the evaluation:
    '' = one alpha-step from the global model on a batch of the client's TRAINING split,
    'local' = an epoch of SGD at alpha, 'global' = w; the state is left bit-identical."""
    ds, store = ragged
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=True)
    cfg = LocalTrainConfig(batch_size=5, local_epochs=1, lr=0.05)
    ctx = _ctx(ds, store, cfg, model)
    algo = PerFedAvg(ctx, PerFedAvgConfig(variant="hf", beta=0.02))
    assert algo.alpha == 0.05  # alpha 0 = --lr
    alpha, beta = 0.05, 0.02
    state = algo.init(jax.random.PRNGKey(0))
    before = jax.device_get(state)
    ids = np.array([2, 0])
    state, info = algo.round(state, 0, ids, KEY)
    after = jax.device_get(state)
    grad = _ce_grad(model)
    hvp = jax.jit(lambda p, st, x, y, v: jax.grad(
        lambda q: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grad(q, st, x, y)[0]), jax.tree.leaves(v))))(p))
    trained, steps = [], []
    for cid in ids:
        w, st = before["global_params"], jax.tree.map(lambda a: a[cid], before["batch_stats"])
        idx, mask = algo.trainer.batch_plan(int(cid), KEY)
        assert idx.shape[1] == 3
        live = [t for t in range(idx.shape[0]) if mask[t].any()]
        steps.append(len(live))
        for t in live:
            d = [_real(store, idx[t, j][mask[t, j]]) for j in range(3)]
            g0, new_st = grad(w, st, *d[0])
            w_tilde = jax.tree.map(lambda a, b: a - alpha * b, w, g0)
            g, _ = grad(w_tilde, st, *d[1])
            hv = hvp(w, st, *d[2], g)
            w = jax.tree.map(lambda a, b, c: a - beta * (b - alpha * c), w, g, hv)
            st = new_st
        trained.append(w)
        for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(after["batch_stats"])):
            np.testing.assert_allclose(b[cid], a, rtol=2e-5, atol=2e-6)
    # 25 / 28 / 32 examples in batches of 5: 5 / 6 / 7 batches -> 1 / 2 / 2 HF steps
    assert steps == [2, 1], steps
    counts = np.asarray(store.train_count)[ids].astype(np.float64)
    wts = counts / counts.sum()
    for g, a, b in zip(jax.tree.leaves(after["global_params"]), *map(jax.tree.leaves, trained)):
        np.testing.assert_allclose(g, wts[0] * np.asarray(a) + wts[1] * np.asarray(b), rtol=2e-5, atol=2e-6)
    # the non-participant keeps its statistics
    for a, b in zip(jax.tree.leaves(after["batch_stats"]), jax.tree.leaves(before["batch_stats"])):
        np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(info["bytes_up"], [ctx.model_bytes] * 2)

    # ---- evaluation
    ekey = jax.random.PRNGKey(99)
    evaluation = algo.evaluate(state, 1, ekey)
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)   # evaluate changed nothing
    views = jax.device_get({k: (v.params, v.shared) for k, v in evaluation.views.items()})
    assert set(views) == {"", "local", "global"} and views["global"][1]
    for a, b in zip(jax.tree.leaves(views["global"][0]), jax.tree.leaves(after["global_params"])):
        np.testing.assert_array_equal(a, b)
    w = after["global_params"]
    for cid in (1, 2):
        st = jax.tree.map(lambda a: a[cid], after["batch_stats"])
        own = np.asarray(store.train_idx[cid][:int(store.train_count[cid])])
        idx, mask = algo.adapt_trainer.batch_plan(cid, ekey)
        rows = idx[0][mask[0]]
        assert idx.shape[0] == 1 and rows.size == cfg.batch_size
        assert np.isin(rows, own).all()                      # training examples only
        assert not np.isin(rows, np.asarray(store.test_idx[cid])).any()
        g, _ = grad(w, st, *_real(store, rows))
        expect = jax.tree.map(lambda a, b: a - alpha * b, w, g)
        for a, b in zip(jax.tree.leaves(views[""][0]), jax.tree.leaves(expect)):
            np.testing.assert_allclose(a[cid], b, rtol=2e-5, atol=2e-6)
        # 'local': an epoch of plain SGD at alpha over the client's training data
        idx, mask = algo.finetune_trainer.batch_plan(cid, ekey)
        p = w
        for t in range(idx.shape[0]):
            if mask[t].any():
                g, st = grad(p, st, *_real(store, idx[t][mask[t]]))
                p = jax.tree.map(lambda a, b: a - alpha * b, p, g)
        for a, b in zip(jax.tree.leaves(views["local"][0]), jax.tree.leaves(p)):
            np.testing.assert_allclose(a[cid], b, rtol=5e-5, atol=5e-6)
    # every view carries each client's stored statistics (the personalisation does not write them)
    for v in evaluation.views.values():
        for a, b in zip(jax.tree.leaves(jax.device_get(v.batch_stats)), jax.tree.leaves(after["batch_stats"])):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- strategies
class TinyNet(nn.Module):
    """A small smooth classifier (tanh: a non-zero Hessian) that compiles fast."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, *, train, mask=None):
        x = jnp.tanh(nn.Dense(8, name="FC1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="FC2")(x)


@pytest.mark.slow
@pytest.mark.parametrize("variant,hessian", [("fo", "exact"), ("hf", "exact")])
def test_every_strategy_agrees_padding_changes_nothing_no_retrace(ragged, variant, hessian):
    """vmap = loop = shard for a cohort of three clients of different sizes (different
    numbers of meta-steps); under vmap (the cohort runs its largest member's steps) each
    client's model equals its model trained alone; round 2 does not retrace."""
    ds, store = ragged
    model = TinyNet(ds.num_classes)
    cfg = LocalTrainConfig(batch_size=5, local_epochs=1, lr=0.1)
    config = PerFedAvgConfig(variant=variant, hessian=hessian, beta=0.05)
    ids = np.array([0, 1, 2])
    out = {}
    for strategy in ("vmap", "loop", "shard"):
        algo = PerFedAvg(_ctx(ds, store, cfg, model, strategy, ("FC1", "FC2")), config)
        state = algo.init(jax.random.PRNGKey(0))
        start = jax.device_get(state["global_params"])
        state, _ = algo.round(state, 0, ids, KEY)
        traces = (algo.trace_count, algo.trainer.trace_count)
        state2, _ = algo.round(state, 1, ids[::-1].copy(), jax.random.fold_in(KEY, 1))
        assert traces[0] == 1 and (algo.trace_count, algo.trainer.trace_count) == traces
        out[strategy] = jax.device_get(state2["global_params"])
        if strategy == "vmap":
            live = np.asarray(algo.trainer.live_steps(jnp.asarray(ids), store))
            assert len(set(live.tolist())) > 1, live   # the cohort really is ragged
            together, _ = algo.trainer.run(start, {"batch_stats": {}}, ids, KEY)
            for c in ids:
                alone, _ = algo.trainer.run(start, {"batch_stats": {}}, np.array([c]), KEY)
                for a, b in zip(jax.tree.leaves(together["params"]), jax.tree.leaves(alone["params"])):
                    np.testing.assert_allclose(np.asarray(a)[c], np.asarray(b)[0], rtol=1e-6, atol=1e-7)
    for strategy in ("loop", "shard"):
        for a, b in zip(jax.tree.leaves(out["vmap"]), jax.tree.leaves(out[strategy])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options,train,pattern", [
    (dict(variant="so"), dict(), "perfedavg_variant"),
    (dict(hessian="bfgs"), dict(), "perfedavg_hessian"),
    (dict(alpha=-0.1), dict(), "perfedavg_alpha"),
    (dict(alpha=float("nan")), dict(), "perfedavg_alpha"),
    (dict(beta=0.0), dict(), "perfedavg_beta"),
    (dict(beta=-1.0), dict(), "perfedavg_beta"),
    (dict(delta=0.0), dict(), "perfedavg_delta"),
    (dict(), dict(momentum=0.9), "momentum"),
])
def test_bad_options_are_refused_before_data(options, train, pattern):
    """Refused where the configs are built: the options by PerFedAvgConfig, their fit with
    the local training by validate_training and the ExperimentConfig that pairs them."""
    with pytest.raises(UserInputError, match=pattern):
        PerFedAvgConfig(**options).validate_training(LocalTrainConfig(**train))
    with pytest.raises(UserInputError, match=pattern):
        ExperimentConfig(algorithm="perfedavg", algorithm_config=PerFedAvgConfig(**options),
                         train=LocalTrainConfig(**train))
    with pytest.raises(ValueError):
        perfedavg_update(Linear(), alpha=0.1, beta=0.1, variant="so")


BAD_ARGV = ["--algorithm=perfedavg", "--perfedavg_variant=so", "--dataset=synthetic",
            "--synthetic_per_class=40", "--num_clients=4", "--rounds=1"]


def test_command_line_bad_option_is_one_line():
    with pytest.raises(UserInputError, match="perfedavg_variant") as err:
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
    assert err[0].startswith("error: ") and "perfedavg_variant" in err[0], err[0]
