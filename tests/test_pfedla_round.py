"""pFedLA rounds: start from theta_bar, one-hot == Local, uniform == average, semantics, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.local import Local
from pfedla_jax.algorithms.pfedla import PFedLA, PFedLAConfig
from pfedla_jax.core.aggregation import aggregate
from pfedla_jax.core.client_parallel import make_mesh
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import layer_names, make_cnn
from pfedla_jax.models.hypernetwork import stacked_alpha
from tests.helpers import small_store, store_from_indices, synthetic


class RecordingTrainer:
    """A deterministic stand-in for local training that records its inputs.

    theta' = 0.5 * theta_start + 0.1 * (client_id + 1): simple enough to compute rounds by
    hand, and different per client. Traceable (the round is one jitted program): the inputs
    reach `calls` through a host callback, once per execution.
    """

    def __init__(self):
        self.calls = []
        self.config = LocalTrainConfig()   # what FLContext reads of a trainer besides `train`
        self.mesh = make_mesh("loop")
        self.store = None

    def train(self, params, batch_stats, client_ids, round_key, store=None):
        def record(p, ids):
            self.calls.append((jax.tree.map(np.asarray, p), np.asarray(ids)))

        jax.debug.callback(record, params, client_ids, ordered=True)
        shift = (client_ids.astype(jnp.float32) + 1) * 0.1
        out = jax.tree.map(lambda a: 0.5 * a + shift.reshape((-1,) + (1,) * (a.ndim - 1)), params)
        n = client_ids.shape[0]
        return out, batch_stats, {"loss_sum": jnp.zeros(n), "num_examples": jnp.ones(n)}


def _ctx(num_clients=3, trainer=None, store=None, ds=None, cfg=None):
    ds = ds or synthetic()
    model = make_cnn(ds.input_shape, ds.num_classes)
    if trainer is None:
        trainer = ClientTrainer(model, store, cfg, "loop")
    return FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                     num_clients=num_clients, input_shape=ds.input_shape, init="independent")


def _set_hn_alpha(algo, state, alpha_fn):
    """Make every HN output a fixed alpha: heads zero, bias = the target's scores (the target
    itself under ReLU normalisation, its log under softmax)."""
    n = algo.ctx.num_clients
    hp = jax.tree.map(jnp.zeros_like, state["hn_params"])
    bias = jnp.stack([alpha_fn(i) for i in range(n)])                     # [N, L, N]
    if algo.hn.config.normalization == "softmax":
        bias = jnp.log(bias)
    hp["heads_bias"] = bias
    return {**state, "hn_params": hp}


@pytest.mark.slow
def test_clients_start_from_theta_bar_and_store_trained():
    trainer = RecordingTrainer()
    algo = PFedLA(_ctx(trainer=trainer), PFedLAConfig(hn_lr=0.1))
    state = algo.init(jax.random.PRNGKey(0))
    ids = np.array([0, 2])
    alpha = stacked_alpha(algo.hn, algo.take(state["hn_params"], jnp.asarray(ids)), jnp.asarray(ids))
    expect_bar = aggregate(alpha, state["client_params"], algo.layer_map)   # independent: from the snapshot
    new_state, _ = algo.round(state, 0, ids, jax.random.PRNGKey(1))
    started, called_ids = trainer.calls[0]
    np.testing.assert_array_equal(called_ids, ids)
    for s, e in zip(jax.tree.leaves(started), jax.tree.leaves(expect_bar)):
        np.testing.assert_allclose(s, np.asarray(e), rtol=1e-6, atol=1e-7)
    # the start is NOT the client's previous model (the public-code bug)
    prev = jax.tree.map(lambda a: np.asarray(a)[ids], state["client_params"])
    assert not all(np.allclose(s, p) for s, p in zip(jax.tree.leaves(started), jax.tree.leaves(prev)))
    # stored theta_i = theta_bar_i + delta_i = trained params; client 1 untouched
    for new, s, old in zip(jax.tree.leaves(new_state["client_params"]), jax.tree.leaves(started),
                           jax.tree.leaves(state["client_params"])):
        shift = np.array([0.1, 0.3], np.float32).reshape((-1,) + (1,) * (s.ndim - 1))
        np.testing.assert_allclose(np.asarray(new)[ids], 0.5 * s + shift, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(new)[1], np.asarray(old)[1])
    # hypernetworks of participants moved, the non-participant's did not
    moved = lambda i: any(not np.array_equal(np.asarray(a)[i], np.asarray(b)[i]) for a, b in
                          zip(jax.tree.leaves(new_state["hn_params"]), jax.tree.leaves(state["hn_params"])))
    assert moved(0) and moved(2) and not moved(1)


@pytest.mark.slow
def test_synchronous_vs_sequential_by_hand():
    """Fixed alpha (hn_lr = 0): sequential clients see earlier clients' new params."""
    n = 3
    A = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], np.float32)  # A[i, j]
    results = {}
    for semantics in ("synchronous", "sequential"):
        trainer = RecordingTrainer()
        algo = PFedLA(_ctx(n, trainer), PFedLAConfig(hn_lr=0.0, semantics=semantics))
        state = algo.init(jax.random.PRNGKey(0))
        state = _set_hn_alpha(algo, state, lambda i: jnp.tile(jnp.asarray(A[i]), (algo.layer_map.num_layers, 1)))
        theta0 = jax.tree.map(lambda a: np.asarray(a, np.float64), state["client_params"])
        new_state, _ = algo.round(state, 0, np.arange(n), jax.random.PRNGKey(1))
        results[semantics] = (theta0, new_state["client_params"], len(trainer.calls))
    shift = lambda i: 0.1 * (i + 1)
    theta0, sync, calls = results["synchronous"]
    assert calls == 1
    for t0, got in zip(jax.tree.leaves(theta0), jax.tree.leaves(sync)):
        for i in range(n):
            bar = sum(A[i, j] * t0[j] for j in range(n))
            np.testing.assert_allclose(np.asarray(got)[i], 0.5 * bar + shift(i), rtol=1e-5, atol=1e-6)
    theta0, seq, calls = results["sequential"]
    assert calls == n
    for t0, got in zip(jax.tree.leaves(theta0), jax.tree.leaves(seq)):
        cur = [t0[j].copy() for j in range(n)]
        for i in range(n):  # client i aggregates the params already updated by clients < i
            bar = sum(A[i, j] * cur[j] for j in range(n))
            cur[i] = 0.5 * bar + shift(i)
        for i in range(n):
            np.testing.assert_allclose(np.asarray(got)[i], cur[i], rtol=1e-5, atol=1e-6)
    # and the two semantics really differ
    assert not np.allclose(np.asarray(jax.tree.leaves(sync)[0]), np.asarray(jax.tree.leaves(seq)[0]))


@pytest.mark.slow
def test_uniform_alpha_is_plain_average():
    trainer = RecordingTrainer()
    algo = PFedLA(_ctx(4, trainer), PFedLAConfig(hn_lr=0.0))
    state = algo.init(jax.random.PRNGKey(3))
    state = _set_hn_alpha(algo, state, lambda i: jnp.full((algo.layer_map.num_layers, 4), 0.25))
    models = algo.evaluate(state, 0, jax.random.PRNGKey(0)).views[""].params
    for got, p in zip(jax.tree.leaves(models), jax.tree.leaves(state["client_params"])):
        mean = np.asarray(p, np.float64).mean(0)
        for i in range(4):
            np.testing.assert_allclose(np.asarray(got)[i], mean, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_one_hot_self_alpha_reproduces_local_training_exactly():
    ds, store = small_store(num_clients=3, samples_per_client=40)
    cfg = LocalTrainConfig(batch_size=16, local_epochs=1, lr=0.05)
    ctx = _ctx(3, store=store, ds=ds, cfg=cfg)
    algo = PFedLA(ctx, PFedLAConfig(hn_lr=0.0))
    local = Local(ctx)
    key = jax.random.PRNGKey(5)
    s_p = _set_hn_alpha(algo, algo.init(key), lambda i: jnp.tile(jax.nn.one_hot(i, 3), (algo.layer_map.num_layers, 1)))
    s_l = local.init(key)  # same key -> the same initial client models
    for t in range(2):
        rk = jax.random.fold_in(key, t)
        s_p, _ = algo.round(s_p, t, np.arange(3), rk)
        s_l, _ = local.round(s_l, t, np.arange(3), rk)
    for a, b in zip(jax.tree.leaves(s_p["client_params"]), jax.tree.leaves(s_l["client_params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_heur_retained_layers_are_own_and_bytes_recorded():
    trainer = RecordingTrainer()
    algo = PFedLA(_ctx(3, trainer), PFedLAConfig(hn_lr=0.0, heur_k=1))
    assert algo.name == "heurpfedla"
    state = algo.init(jax.random.PRNGKey(0))
    # client i's self-weight is largest on layer FC2 (index 3): FC2 is retained
    def alpha(i):
        rows = np.full((5, 3), 1 / 3, np.float32)
        rows[3] = 0.05
        rows[3, i] = 0.9
        return jnp.asarray(rows)
    state = _set_hn_alpha(algo, state, alpha)
    new_state, info = algo.round(state, 0, np.arange(3), jax.random.PRNGKey(1))
    started, _ = trainer.calls[0]
    for i in range(3):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(started["FC2"][leaf][i], np.asarray(state["client_params"]["FC2"][leaf])[i])
        assert not np.allclose(started["FC1"]["kernel"][i], np.asarray(state["client_params"]["FC1"]["kernel"])[i])
    np.testing.assert_array_equal(info["bytes_up"], [85822 * 4] * 3)
    np.testing.assert_array_equal(info["bytes_down"], [(85822 - 10164) * 4] * 3)


def test_heur_k_must_be_less_than_num_layers():
    with pytest.raises(UserInputError, match="heur_k"):
        PFedLA(_ctx(3, RecordingTrainer()), PFedLAConfig(heur_k=5))


@pytest.mark.slow
def test_alpha_learns_group_structure():
    """Two groups with disjoint classes: each client's alpha favours its own group."""
    ds = synthetic(per_class=120)
    rng = np.random.default_rng(0)
    by_class = {c: rng.permutation(np.flatnonzero(ds.labels == c)) for c in range(10)}
    groups = [(0, 1, 2, 3, 4)] * 2 + [(5, 6, 7, 8, 9)] * 2
    train, test, used = [], [], {c: 0 for c in range(10)}
    for classes in groups:
        tr, te = [], []
        for c in classes:
            take = by_class[c][used[c]: used[c] + 30]
            used[c] += 30
            tr += list(take[:21]); te += list(take[21:])
        train.append(tr); test.append(te)
    store = store_from_indices(ds, train, test)
    cfg = LocalTrainConfig(batch_size=16, local_epochs=1, lr=0.05)
    ctx = _ctx(4, store=store, ds=ds, cfg=cfg)
    algo = PFedLA(ctx, PFedLAConfig(hn_lr=1.0))
    state = algo.init(jax.random.PRNGKey(0))
    for t in range(40):
        state, _ = algo.round(state, t, np.arange(4), jax.random.fold_in(jax.random.PRNGKey(1), t))
    alpha = algo.evaluate(state, 40, jax.random.PRNGKey(2)).arrays["alpha"]     # [N, L, N]
    mean_over_layers = alpha.mean(1)
    same = [mean_over_layers[i, [j for j in range(4) if groups[j] == groups[i]]].sum() for i in range(4)]
    other = [mean_over_layers[i, [j for j in range(4) if groups[j] != groups[i]]].sum() for i in range(4)]
    assert all(s > o + 0.1 for s, o in zip(same, other)), (same, other)
