"""FedFomo: the weights and update on a hand-worked example, the selection,
the validation split, the batched [S, M] candidate losses against a Python loop, a round
against a naive per-client loop (numpy weights, model.apply, jax.grad SGD), vmap = loop =
shard without retrace, and bad input (config, data, CLI).

One small BN model (synthetic RGB, 4 clients of unequal sizes) is run once per strategy
for 3 rounds of 3 participants (module fixture): compiles are the cost of this file.
"""

import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.fedfomo import (FedFomo, FedFomoConfig, all_others, fomo_update,
                                           fomo_weights, param_distance, select_candidates)
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.data.store import normalize_images
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import layer_names, make_cnn
from pfedla_jax.training.config import ExperimentConfig
from tests.helpers import small_store

select = jax.jit(select_candidates, static_argnums=(3,))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = jax.random.PRNGKey(7)
TRAIN = LocalTrainConfig(batch_size=8, local_steps=2, lr=0.05)
# eps_t = 0.3 - 0.3 t: exploration only in round 0 (when nothing is uploaded), so rounds 1-2
# are greedy by P and the naive loop can pick the candidates itself
CONFIG = FedFomoConfig(num_candidates=2, epsilon=0.3, epsilon_decay=0.3)
COHORTS = ([0, 1, 2], [3, 0, 2], [1, 2, 3])


# ---------------------------------------------------------------------------- pure maths
def test_hand_example_weights_and_update():
    """By hand: L_0(theta) = (theta - 1)^2, theta_0 = 0, candidates {2, -1, 0.5, 1.5}:
    w = {0, -3, 1.5, 0.5}, wbar = {0, 0, 0.75, 0.25}, theta_0' = 0.75."""
    theta = {"w": jnp.zeros(())}
    cands = {"w": jnp.array([2.0, -1.0, 0.5, 1.5])}
    loss = lambda t: (t - 1.0) ** 2
    dist = jax.vmap(lambda c: param_distance({"w": c}, theta))(cands["w"])
    np.testing.assert_allclose(dist, [2, 1, 0.5, 1.5])
    w, wbar = fomo_weights(loss(0.0), loss(cands["w"]), dist, denom_eps=0.0)
    np.testing.assert_allclose(w, [0.0, -3.0, 1.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(wbar, [0.0, 0.0, 0.75, 0.25], rtol=1e-6)
    np.testing.assert_allclose(fomo_update(theta, cands, wbar)["w"], 0.75, rtol=1e-6)
    # with the 1e-5 guard (FL-bench/PFLlib): w_3 = 0.75 / 0.50001
    w, wbar = fomo_weights(loss(0.0), loss(cands["w"]), dist, denom_eps=1e-5)
    np.testing.assert_allclose(w[2], 0.75 / 0.50001, rtol=1e-6)
    np.testing.assert_allclose(fomo_update(theta, cands, wbar)["w"], 0.75, rtol=1e-4)
    # all-negative fallback: candidates {2, -1} -> w = {0, -3}, theta unchanged
    w, wbar = fomo_weights(1.0, loss(cands["w"][:2]), dist[:2], denom_eps=0.0)
    np.testing.assert_array_equal(wbar, [0.0, 0.0])
    np.testing.assert_array_equal(fomo_update(theta, {"w": cands["w"][:2]}, wbar)["w"], 0.0)
    # invalid slots and identical models (0 / 0) count for nothing
    w, _ = fomo_weights(1.0, jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0]), jnp.array([False, True]), 0.0)
    np.testing.assert_array_equal(w, [0.0, 0.0])


def test_distances_and_convex_hull():
    rng = np.random.default_rng(0)
    a = {"x": rng.normal(size=(3, 2)).astype(np.float32), "y": rng.normal(size=4).astype(np.float32)}
    b = {"x": rng.normal(size=(3, 2)).astype(np.float32), "y": rng.normal(size=4).astype(np.float32)}
    d = np.concatenate([(a[k] - b[k]).ravel() for k in a])
    np.testing.assert_allclose(param_distance(a, b, "l2"), np.linalg.norm(d), rtol=1e-6)
    np.testing.assert_allclose(param_distance(a, b, "l1"), np.abs(d).sum(), rtol=1e-6)
    # with some positive weight, every coordinate of the update lies in the candidates' hull
    cands = {"x": rng.normal(size=(5, 3, 2)).astype(np.float32)}
    w, wbar = fomo_weights(1.0, jnp.asarray(rng.uniform(0, 2, 5)), jnp.ones(5), denom_eps=0.0)
    assert float(jnp.sum(wbar)) == pytest.approx(1.0, rel=1e-6)
    new = np.asarray(fomo_update({"x": jnp.zeros((3, 2))}, cands, wbar)["x"])
    used = np.asarray(wbar) > 0
    assert np.all(new <= cands["x"][used].max(0) + 1e-6) and np.all(new >= cands["x"][used].min(0) - 1e-6)


def test_selection_greedy_uploaded_first_and_exploring():
    rng = np.random.default_rng(1)
    n, m = 7, 3
    p = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
    ids = jnp.array([0, 4, 6], jnp.int32)
    everyone = jnp.ones(n, bool)
    greedy = np.asarray(select(p[ids], everyone, ids, m, 0.0, KEY))
    for row, i in zip(greedy, np.asarray(ids)):
        order = [j for j in np.argsort(-np.asarray(p[i]), kind="stable") if j != i]
        assert list(row) == order[:m]
    # clients that never uploaded are only picked when the uploaded ones run out
    uploaded = jnp.array([1, 0, 1, 0, 0, 1, 0], bool)
    picks = np.asarray(select(p[ids], uploaded, ids, m, 0.0, KEY))
    for row, i in zip(picks, np.asarray(ids)):
        up = [j for j in (0, 2, 5) if j != i]
        assert set(row[:len(up)]) == set(up) and i not in row and len(set(row)) == m
    # epsilon = 1: random picks, still distinct, never self; the draws differ with the key
    draws = {tuple(np.asarray(select(p[ids], everyone, ids, m, 1.0, jax.random.fold_in(KEY, k)))[0])
             for k in range(8)}
    assert len(draws) > 1
    for row in draws:
        assert len(set(row)) == m and 0 not in row
    # ties (P = 0) are broken at random, not by index
    tied = {tuple(sorted(np.asarray(select(jnp.zeros((1, n)), everyone, ids[:1], m, 0.0,
                                                      jax.random.fold_in(KEY, k)))[0])) for k in range(8)}
    assert len(tied) > 1
    np.testing.assert_array_equal(all_others(jnp.array([0, 2]), 4), [[1, 2, 3], [0, 1, 3]])


# ---------------------------------------------------------------------------- a cohort
@pytest.fixture(scope="module")
def data():
    ds, store = small_store(num_clients=4, scheme="dirichlet", samples_per_client=40,
                            dirichlet_alpha=1.0, min_client_size=15, name="synthetic_rgb")
    assert len(set(np.asarray(store.train_count).tolist())) > 1, "unequal sizes wanted"
    return ds, store


def _ctx(ds, store, strategy="loop"):
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=(ds.input_shape[-1] == 3))
    return FLContext(model=model, layer_order=layer_names(model), store=store,
                     trainer=ClientTrainer(model, store, TRAIN, strategy),
                     num_clients=int(store.train_idx.shape[0]), input_shape=ds.input_shape)


def _affinity(n):
    return np.random.default_rng(3).normal(size=(n, n)).astype(np.float32)


@pytest.fixture(scope="module")
def runs(data):
    """Per strategy: the algorithm and its states before each round (P overwritten with a
    random matrix after round 0, so that greedy picks are unique) and after the last."""
    ds, store = data
    out = {}
    for strategy in ("loop", "shard", "vmap"):
        algo = FedFomo(_ctx(ds, store, strategy), CONFIG)
        state = algo.init(jax.random.PRNGKey(0))
        states, infos = [jax.device_get(state)], []
        for t, ids in enumerate(COHORTS):
            if t == 1:
                state = dict(state, affinity=jnp.asarray(_affinity(4)))
                states[-1] = jax.device_get(state)
            state, info = algo.round(state, t, np.array(ids), jax.random.fold_in(KEY, t))
            states.append(jax.device_get(state))
            infos.append(jax.device_get(info))
            assert algo.trace_count == 1, "one program for every round of a cohort size"
        out[strategy] = (algo, states, infos)
    return out


@pytest.mark.slow
def test_validation_split_is_a_partition_of_each_train_split(runs, data):
    _, store = data
    algo, states, _ = runs["loop"]
    counts = np.asarray(store.train_count)
    np.testing.assert_array_equal(algo.num_val, np.floor(0.2 * counts + 0.5).astype(int))
    redrawn = jax.device_get(algo.split_tables(jax.random.PRNGKey(99)))
    for split in (states[0]["split"], redrawn):
        for c in range(4):
            nv, nt = algo.num_val[c], counts[c] - algo.num_val[c]
            val, train = split["val_idx"][c][:nv], split["train_idx"][c][:nt]
            assert sorted(np.concatenate([val, train])) == sorted(np.asarray(store.train_idx[c][:counts[c]]))
            assert not np.any(split["train_idx"][c][nt:]) and not np.any(split["val_idx"][c][nv:])
    assert not np.array_equal(redrawn["val_idx"], states[0]["split"]["val_idx"])
    # the split is fixed by default: every round keeps the one drawn at init
    np.testing.assert_array_equal(states[-1]["split"]["val_idx"], states[0]["split"]["val_idx"])


@functools.lru_cache(maxsize=None)
def _eval_logits(model):
    return jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x, train=False))


@functools.lru_cache(maxsize=None)
def _train_grads(model):
    @jax.jit
    def grads_of(p, st, x, y):
        def loss(p):
            logits, new = model.apply({"params": p, "batch_stats": st}, x, train=True, mutable=["batch_stats"])
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), new
        return jax.grad(loss, has_aux=True)(p)
    return grads_of


def _naive_losses(model, store, models, stats, val_rows, width):
    """Mean CE on the given examples, one model at a time (eval-mode BN: examples are
    independent, so the rows are padded to `width` for one compiled forward, then dropped)."""
    images, labels = np.asarray(store.images), np.asarray(store.labels)
    rows = np.concatenate([val_rows, np.full(width - len(val_rows), val_rows[0])])
    x = normalize_images(jnp.asarray(images[rows]), store.mean, store.std)
    out = []
    for p, s in zip(models, stats):
        logp = np.asarray(jax.nn.log_softmax(np.asarray(_eval_logits(model)(p, s, x), np.float64)))
        out.append(-np.mean(logp[np.arange(len(val_rows)), labels[val_rows]]))
    return np.array(out)


def _row(tree, i):
    return jax.tree.map(lambda a: np.asarray(a[i]), tree)


def _naive_federated_update(algo, store, before, i, cand, base_key="client_params",
                            base_stats_key="batch_stats", cand_stats="own"):
    """(losses [1 + M'], dist, w, wbar, updated params) of participant i by hand."""
    val_rows = before["split"]["val_idx"][i][:algo.num_val[i]]
    base, base_stats = _row(before[base_key], i), _row(before[base_stats_key], i)
    models = [base] + [_row(before["client_params"], j) for j in cand]
    stats = [base_stats] + [(_row(before["batch_stats"], j) if cand_stats == "own" else base_stats)
                            for j in cand]
    losses = _naive_losses(algo.ctx.model, store, models, stats, val_rows, algo.max_val)
    flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)]).astype(np.float64)
    dist = np.array([np.linalg.norm(flat(m) - flat(base)) for m in models[1:]])
    valid = np.array([bool(before["uploaded"][j]) or j == i for j in cand])
    w = np.where(valid, (losses[0] - losses[1:]) / (dist + 1e-5), 0.0)
    pos = np.maximum(w, 0.0)
    wbar = pos / pos.sum() if pos.sum() > 0 else pos
    current = _row(before["client_params"], i)
    new = jax.tree.map(lambda t, *cs: t + sum(wb * (c - t) for wb, c in zip(wbar, cs)),
                       current, *models[1:])
    return losses, dist, w, wbar, new


def _naive_train(algo, store, plans, params, stats, cid, key):
    """Plain SGD on the batches a trainer of D_i^trn alone reports (real examples only)."""
    lr, grads_of = TRAIN.lr, _train_grads(algo.ctx.model)
    idx, mask = plans.batch_plan(cid, key)
    images, labels = np.asarray(store.images), np.asarray(store.labels)
    for s in range(idx.shape[0]):
        rows = idx[s][mask[s]]
        x = normalize_images(jnp.asarray(images[rows]), store.mean, store.std)
        g, new = grads_of(params, stats, x, jnp.asarray(labels[rows]))
        params = jax.tree.map(lambda p, gg: p - lr * np.asarray(gg), params, g)
        stats = jax.tree.map(np.asarray, new["batch_stats"])
    return params, stats


@pytest.mark.slow
def test_round_equals_a_naive_per_client_loop(runs, data):
    """Round 1 (participants 3, 0, 2; client 3 has not uploaded yet): candidates (uploaded
    first, then by P), candidate losses, distances, weights, the mix, local SGD on D_i^trn,
    the P increment and the bookkeeping, all by hand."""
    _, store = data
    algo, states, infos = runs["loop"]
    before, after = states[1], states[2]
    assert not before["uploaded"][3] and before["uploaded"][:3].all()
    p = before["affinity"]
    key = jax.random.fold_in(KEY, 1)
    expect_p = p.copy()
    split = before["split"]
    plans = ClientTrainer(algo.ctx.model, store.replace(train_idx=jnp.asarray(split["train_idx"]),
                                                        train_count=jnp.asarray(algo.num_train)), TRAIN, "loop")
    for i in COHORTS[1]:
        others = [j for j in range(4) if j != i]
        cand = sorted(others, key=lambda j: (not before["uploaded"][j], -p[i, j]))[:2]
        losses, dist, w, wbar, mixed = _naive_federated_update(algo, store, before, i, cand)
        expect_p[i, cand] += w
        for a, b in zip(jax.tree.leaves(mixed), jax.tree.leaves(_row(after["start_params"], i))):
            np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
        for a, b in zip(jax.tree.leaves(_row(before["batch_stats"], i)), jax.tree.leaves(_row(after["start_stats"], i))):
            np.testing.assert_array_equal(a, b)
        trained, stats = _naive_train(algo, store, plans, mixed, _row(before["batch_stats"], i), i, key)
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(_row(after["client_params"], i))):
            np.testing.assert_allclose(b, a, rtol=5e-5, atol=5e-6)
        for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(_row(after["batch_stats"], i))):
            np.testing.assert_allclose(b, a, rtol=5e-5, atol=5e-6)
    np.testing.assert_allclose(after["affinity"], expect_p, rtol=1e-4, atol=1e-5)
    # the sitting-out client keeps everything; everybody who trained has uploaded
    for key_ in ("client_params", "batch_stats", "start_params"):
        for a, b in zip(jax.tree.leaves(_row(before[key_], 1)), jax.tree.leaves(_row(after[key_], 1))):
            np.testing.assert_array_equal(a, b)
    assert after["uploaded"].all()
    model = algo.ctx.model_bytes
    np.testing.assert_array_equal(infos[1]["bytes_down"], [2 * model] * 3)
    np.testing.assert_array_equal(infos[1]["bytes_up"], [model + 8] * 3)


@pytest.mark.slow
def test_round_zero_only_trains(runs):
    """Nothing uploaded at round 0: no model is sent, P stays 0, theta_i is not mixed."""
    algo, states, infos = runs["loop"]
    np.testing.assert_array_equal(infos[0]["bytes_down"], 0)
    np.testing.assert_array_equal(states[1]["uploaded"], [True, True, True, False])
    for a, b in zip(jax.tree.leaves(states[0]["client_params"]), jax.tree.leaves(states[1]["start_params"])):
        np.testing.assert_array_equal(a, b)
    evaluation = algo.evaluate(algo.from_checkpoint(algo.to_checkpoint(states[-1])), 3, KEY)
    assert set(evaluation.views) == {"", "federated"}
    assert evaluation.arrays["affinity"].shape == (4, 4)


@pytest.mark.slow
def test_batched_candidate_losses_equal_a_loop(runs, data):
    """`score` ([S, M' + 1] losses from one batched evaluation) against model.apply per
    (participant, model), with the non-default options: self as candidate 0, the
    pre-training baseline and the scoring client's BN statistics (NVlabs/FL-bench). (The
    default options' losses enter the naive round test through P and the mix.)"""
    _, store = data
    algo, states, _ = runs["loop"]
    state = states[2]
    ids = jnp.array([0, 3, 1], jnp.int32)
    other = FedFomo(algo.ctx, FedFomoConfig(num_candidates=2, include_self=True, baseline="pre_training",
                                            candidate_stats="client"))
    out = jax.device_get(jax.jit(other.score)(algo.from_checkpoint(algo.to_checkpoint(state)), 2, ids,
                                              jax.random.fold_in(KEY, 2), other.ctx.data))
    assert out["losses"].shape == (3, 4) and out["cand"].shape == (3, 3)
    for row, i in enumerate(np.asarray(ids)):
        cand = list(out["cand"][row])
        assert cand[0] == i and len(set(cand)) == 3
        losses, dist, w, wbar, _ = _naive_federated_update(other, store, state, i, cand, "start_params",
                                                           "start_stats", cand_stats="client")
        np.testing.assert_allclose(out["losses"][row], losses, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(out["dist"][row], dist, rtol=2e-5)
        np.testing.assert_allclose(out["w"][row], w, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(out["wbar"][row], wbar, rtol=1e-3, atol=1e-5)
        # self: the freshly trained model against its pre-training start
        assert dist[0] > 0 and (w[0] > 0) == (losses[1] < losses[0])


@pytest.mark.slow
def test_strategies_agree(runs):
    """vmap = loop = shard for every round (states and metrics); one trace each (fixture)."""
    _, loop_states, loop_infos = runs["loop"]
    for strategy in ("shard", "vmap"):
        _, states, infos = runs[strategy]
        for a, b in zip(loop_states, states):
            for key in a:
                for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key])):
                    if x.ndim and key not in ("affinity", "uploaded", "split"):
                        x, y = x[:4], y[:4]   # shard state is padded to the mesh
                    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                               rtol=2e-4, atol=2e-5, err_msg=f"{strategy} {key}")
        for a, b in zip(loop_infos, infos):
            for key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=2e-5)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options,pattern", [
    (dict(val_fraction=0.0), "val_fraction"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(num_candidates=-1), "num_candidates"),
    (dict(epsilon=1.5), "epsilon"),
    (dict(epsilon_decay=-0.1), "epsilon_decay"),
    (dict(denom_eps=float("nan")), "denom_eps"),
    (dict(norm="linf"), "fedfomo_norm"),
    (dict(baseline="best"), "fedfomo_baseline"),
    (dict(candidate_stats="mixed"), "fedfomo_candidate_stats"),
])
def test_bad_options_are_refused_before_data(options, pattern):
    """Refused when the config is built (before any ExperimentConfig or data)."""
    with pytest.raises(UserInputError, match=pattern):
        ExperimentConfig(algorithm="fedfomo", algorithm_config=FedFomoConfig(**options))


def test_bad_options_that_need_the_data(data):
    ctx = _ctx(*data)
    counts = np.asarray(data[1].train_count)
    with pytest.raises(UserInputError, match="exceeds the N - 1 = 3"):
        FedFomo(ctx, FedFomoConfig(num_candidates=4))
    with pytest.raises(UserInputError, match="no training example"):
        FedFomo(ctx, FedFomoConfig(val_fraction=1 - 0.4 / counts.max()))
    with pytest.raises(UserInputError, match="no validation example"):
        FedFomo(ctx, FedFomoConfig(val_fraction=0.4 / counts.max()))


@pytest.mark.slow
@pytest.mark.parametrize("args,pattern", [
    (["--fedfomo_num_candidates=4"], "num_candidates=4 exceeds"),
    (["--fedfomo_val_fraction=0.999"], "no training example"),
    (["--fedfomo_val_fraction=1"], "val_fraction must be in"),
])
def test_cli_one_line_error(args, pattern, tmp_path):
    base = ["--algorithm=fedfomo", "--dataset=synthetic", "--synthetic_per_class=40", "--num_clients=4",
            "--rounds=1", f"--workdir={tmp_path}"]
    p = subprocess.run([sys.executable, "-m", "experiments.run", *base, *args], cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(pattern, err[0]), p.stderr[-2000:]
