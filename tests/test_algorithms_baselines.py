"""Local and FedAvg: hand-computed rounds and learning on synthetic data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.fedavg import FedAvg
from pfedla_jax.algorithms.local import Local
from pfedla_jax.core.evaluation import Evaluator, summarize
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.models import layer_names, make_cnn
from tests.helpers import small_store


def _ctx(store, ds, cfg, strategy="loop"):
    model = make_cnn(ds.input_shape, ds.num_classes)
    return FLContext(model=model, layer_order=layer_names(model), store=store,
                     trainer=ClientTrainer(model, store, cfg, strategy),
                     num_clients=store.train_idx.shape[0], input_shape=ds.input_shape)


@pytest.mark.slow
def test_fedavg_round_is_train_size_weighted_average():
    ds, store = small_store(num_clients=3, scheme="dirichlet", samples_per_client=40,
                            dirichlet_alpha=1.0, min_client_size=15)
    counts = np.asarray(store.train_count)
    assert len(set(counts.tolist())) > 1, "need unequal client sizes for this test"
    cfg = LocalTrainConfig(batch_size=8, local_steps=3, lr=0.05)
    ctx = _ctx(store, ds, cfg)
    algo = FedAvg(ctx)
    state = algo.init(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(11)
    new_state, info = algo.round(state, 0, np.array([0, 1, 2]), key)
    # independent computation: train each client alone from the global model, then average
    trained = []
    for c in range(3):
        p, _, _ = ctx.trainer.train(jax.tree.map(lambda a: a[None], state["global_params"]),
                                    jax.tree.map(lambda a: a[c:c + 1], state["batch_stats"]),
                                    jnp.array([c], jnp.int32), key)
        trained.append(jax.tree.map(lambda a: np.asarray(a[0], np.float64), p))
    w = counts / counts.sum()
    expect = jax.tree.map(lambda *ps: sum(wi * pi for wi, pi in zip(w, ps)), *trained)
    for g, e in zip(jax.tree.leaves(new_state["global_params"]), jax.tree.leaves(expect)):
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(info["bytes_up"], [85822 * 4] * 3)
    np.testing.assert_array_equal(info["bytes_down"], [85822 * 4] * 3)


def _accuracy(algo, state, evaluator):
    view = algo.evaluate(state, 0, jax.random.PRNGKey(2)).views[""]
    return summarize(evaluator.evaluate(view.params, view.batch_stats, shared=view.shared))["test_acc"]


def _run(algo, rounds, evaluator):
    state = algo.init(jax.random.PRNGKey(0))
    before = _accuracy(algo, state, evaluator)
    for t in range(rounds):
        state, _ = algo.round(state, t, np.arange(algo.ctx.num_clients), jax.random.fold_in(jax.random.PRNGKey(1), t))
    after = _accuracy(algo, state, evaluator)
    return before, after, state


@pytest.mark.slow
def test_local_learns_on_synthetic():
    ds, store = small_store(num_clients=4, samples_per_client=200, per_class=200)  # 2 classes each
    ctx = _ctx(store, ds, LocalTrainConfig(batch_size=16, local_epochs=1, lr=0.05))
    before, after, _ = _run(Local(ctx), 10, Evaluator(ctx.model, store, "loop"))
    assert before < 0.3 and after > 0.75, (before, after)


@pytest.mark.slow
def test_fedavg_learns_and_beats_local_on_iid_synthetic():
    """On IID clients collaboration must help: FedAvg's global model beats Local."""
    ds, store = small_store(num_clients=4, samples_per_client=200, per_class=200, scheme="iid",
                            classes_per_client=None)
    ctx = _ctx(store, ds, LocalTrainConfig(batch_size=16, local_epochs=1, lr=0.05))
    ev = Evaluator(ctx.model, store, "loop")
    before, fedavg, _ = _run(FedAvg(ctx), 25, ev)
    _, local, _ = _run(Local(ctx), 25, ev)
    assert before < 0.2 and fedavg > 0.55, (before, fedavg)
    assert fedavg > local + 0.05, (fedavg, local)
