"""Ditto: the interleaved local update and rounds against independent computations.

Oracles: the scalar example (2 clients, F_i = a_i/2 (w - c_i)^2, two steps, lam = 1, v
starting at (0, 0.5), the anchor the received w^t = 0, numpy float64): v = (0.36, -0.095),
w_k = (0.38, -0.36), their mean 0.01 (the wrong anchor, the evolving local w, would give v =
(0.38, -0.115) or (0.414, -0.145)); a naive per-client Python loop (model.apply + jax.grad on
the minibatches `ClientTrainer.batch_plan` reports: per batch a personal step toward w^t,
then a global step) over two rounds on the CNN with BN, with a client in both rounds (its v
persists) and one sitting out (its v untouched).
"""

import jax
import numpy as np
import optax
import pytest

from experiments import run as run_command
from pfedla_jax.algorithms.ditto import Ditto, DittoConfig, ditto_update
from pfedla_jax.algorithms.search_space import check_search_space
from pfedla_jax.core.local_training import LocalTrainConfig
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import make_cnn
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
    make_ctx,
    minibatches,
    quadratic_batch,
    ragged,
    row,
    run_update,
    strategies_agree,
)


def test_update_equals_the_scalar_oracle():
    with jax.enable_x64(True):
        update = ditto_update(Linear(), optax.sgd(0.1), 1.0, loss=half_squared_error)
        out = [run_update(update, {"w": np.zeros(1)},
                          {"personal": {"w": np.full(1, v0)}, "batch_stats": {}, "personal_stats": {}},
                          [quadratic_batch(a, c)] * 2)
               for a, c, v0 in ((1.0, 2.0, 0.0), (2.0, -1.0, 0.5))]
        v = [float(o["personal"]["w"][0]) for o in out]
        w = [float(o["params"]["w"][0]) for o in out]
        np.testing.assert_allclose(v, (0.36, -0.095), atol=1e-12)
        np.testing.assert_allclose(w, (0.38, -0.36), atol=1e-12)
        np.testing.assert_allclose(np.mean(w), 0.01, atol=1e-12)
        # lam = 0: v is local SGD from its own start, w is unaffected
        out = run_update(ditto_update(Linear(), optax.sgd(0.1), 0.0, loss=half_squared_error),
                         {"w": np.zeros(1)}, {"personal": {"w": np.full(1, 0.5)}, "batch_stats": {},
                                              "personal_stats": {}}, [quadratic_batch(2.0, -1.0)] * 2)
        local = 0.5
        for _ in range(2):
            local -= 0.1 * 2.0 * (local + 1.0)
        np.testing.assert_allclose(float(out["personal"]["w"][0]), local, atol=1e-12)
        np.testing.assert_allclose(float(out["params"]["w"][0]), -0.36, atol=1e-12)


LAM, LR = 0.7, 0.05


@pytest.mark.slow
def test_two_rounds_equal_a_naive_per_client_loop(ragged):
    """CNN with BN, participants [2, 0] then [1, 2]: the global model, every v_k, both BN
    statistics stacks; client 2's round-1 v starts from its round-0 v, client 1 keeps its
    initial v in round 0 and client 0 keeps its round-0 v in round 1."""
    ds, store = ragged
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=True)
    ctx = make_ctx(ds, store, LocalTrainConfig(batch_size=8, local_epochs=1, lr=LR), model)
    algo = Ditto(ctx, DittoConfig(lam=LAM))
    state = algo.init(jax.random.PRNGKey(0))
    grad = grad_fn(model)
    personal_step = jax.jit(lambda v, g, a: jax.tree.map(lambda vi, gi, ai: vi - LR * (gi + LAM * (vi - ai)), v, g, a))
    global_step = jax.jit(lambda w, g: jax.tree.map(lambda wi, gi: wi - LR * gi, w, g))
    counts = np.asarray(store.train_count).astype(np.float64)
    expect = jax.tree.map(np.asarray, jax.device_get(state))
    for t, ids in enumerate((np.array([2, 0]), np.array([1, 2]))):
        key = jax.random.fold_in(KEY, t)
        state, info = algo.round(state, t, ids, key)
        w_t, uploads = expect["global_params"], []
        for cid in ids:
            w, v = w_t, row(expect["personal_params"], cid)
            st_w, st_v = row(expect["batch_stats"], cid), row(expect["personal_stats"], cid)
            for x, y in minibatches(store, algo.trainer, cid, key):
                g, st_v = grad(v, st_v, x, y)
                v = personal_step(v, g, w_t)
                g, st_w = grad(w, st_w, x, y)
                w = global_step(w, g)
            uploads.append(w)
            for key_, value in (("personal_params", v), ("batch_stats", st_w), ("personal_stats", st_v)):
                expect[key_] = jax.tree.map(lambda a, b: _set_row(a, cid, b), expect[key_], value)
        wts = counts[ids] / counts[ids].sum()
        expect["global_params"] = jax.tree.map(lambda *u: sum(wi * np.asarray(ui) for wi, ui in zip(wts, u)),
                                               *uploads)
        after = jax.tree.map(np.asarray, jax.device_get(state))
        for key_ in expect:
            assert_tree_close(after[key_], expect[key_], f"round {t} {key_}")
        expect = after   # the next round starts from the engine's state
        np.testing.assert_array_equal(info["bytes_up"], [ctx.model_bytes] * 2)
        np.testing.assert_array_equal(info["bytes_down"], [ctx.model_bytes] * 2)
    # the views: '' = v_k with its own statistics, 'global' = w with the global model's
    views = algo.evaluate(state, 1, KEY).views
    assert set(views) == {"", "global"} and views["global"].shared
    for name, params, stats in (("", "personal_params", "personal_stats"),
                                ("global", "global_params", "batch_stats")):
        assert_tree_close(views[name].params, after[params], rtol=0, atol=0)
        assert_tree_close(views[name].batch_stats, after[stats], rtol=0, atol=0)
    # v and w really differ, and so do the two statistics stacks
    assert not np.allclose(after["personal_params"]["FC3"]["kernel"][2], after["global_params"]["FC3"]["kernel"])
    assert not np.allclose(after["personal_stats"]["BN1"]["mean"][2], after["batch_stats"]["BN1"]["mean"][2])


@pytest.mark.slow
def test_every_strategy_agrees_with_one_trace(ragged):
    strategies_agree(ragged, lambda ctx: Ditto(ctx, DittoConfig(lam=0.5)),
                     ("global_params", "personal_params"))


@pytest.mark.parametrize("options,train,pattern", [
    (dict(lam=-1.0), dict(), "--ditto_lam must be"),
    (dict(lam=float("nan")), dict(), "--ditto_lam must be"),
    (dict(lam=100.0), dict(lr=0.05), "--lr \\* --ditto_lam = 5 >= 2"),
])
def test_bad_options_are_refused(options, train, pattern):
    with pytest.raises(UserInputError, match=pattern):
        DittoConfig(**options).validate_training(LocalTrainConfig(**train))
    with pytest.raises(UserInputError, match=pattern):
        ExperimentConfig(algorithm="ditto", algorithm_config=DittoConfig(**options),
                         train=LocalTrainConfig(**train))


BAD_ARGV = ["--algorithm=ditto", "--ditto_lam=-1", "--dataset=synthetic", "--num_clients=4", "--rounds=1"]


def test_command_line_bad_option_is_one_line(capfd, tmp_path):
    with pytest.raises(UserInputError, match="ditto_lam") as err:
        config_from_argv(["run", *BAD_ARGV])
    assert len(str(err.value).splitlines()) == 1
    assert "--ditto_lam" in one_error_line(run_command.main, ["run", *BAD_ARGV, f"--workdir={tmp_path}"], capfd)


def test_registry_row_search_space_and_defaults():
    assert [(r.key, r.display, r.order) for r in Ditto.rows()] == [("ditto", "Ditto", 21)]
    assert [h.path for h in Ditto.search_space] == ["train.lr", "lam"]
    check_search_space(ExperimentConfig(algorithm="ditto"))
    assert DittoConfig().lam == 1.0
