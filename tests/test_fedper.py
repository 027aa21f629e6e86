"""FedPer: two rounds against a naive per-client Python loop, the split, the strategies, and
its relation to FedAvg and FedRep.

Oracle: plain jax.grad of the model's cross-entropy on the real examples of each minibatch
(the order `ClientTrainer.batch_plan` reports), SGD by hand, Python loops over clients and
batches; the server's average by hand; the personalisation layers carried from round 1 to
round 2 by the loop itself. `naive_split_rounds` serves LG-FedAvg's test too.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import experiments.run as run_tool
from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.fedavg import FedAvg
from pfedla_jax.algorithms.fedper import FedPer, FedPerConfig, top_weight_layers
from pfedla_jax.algorithms.fedrep import FedRep, FedRepConfig
from pfedla_jax.algorithms.search_space import check_search_space
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.data.store import normalize_images
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import layer_names, make_cnn
from pfedla_jax.training.command_line import config_from_argv
from pfedla_jax.training.config import ExperimentConfig
from tests.helpers import one_error_line, small_store

KEY = jax.random.PRNGKey(11)
TOL = dict(rtol=1e-5, atol=1e-5)
CIFAR_LAYERS = ("Conv1", "BN1", "Conv2", "BN2", "FC1", "FC2", "FC3")


@pytest.fixture(scope="module")
def ragged():
    ds, store = small_store(num_clients=3, scheme="dirichlet", samples_per_client=40,
                            dirichlet_alpha=1.0, min_client_size=15)
    assert len(set(np.asarray(store.train_count).tolist())) == 3, "unequal sizes wanted"
    return ds, store


def make_ctx(ds, store, cfg, model=None, strategy="loop", init="common", layer_order=None):
    model = model if model is not None else make_cnn(ds.input_shape, ds.num_classes)
    return FLContext(model=model, layer_order=layer_order or layer_names(model), store=store,
                     trainer=ClientTrainer(model, store, cfg, strategy),
                     num_clients=int(store.train_idx.shape[0]), input_shape=ds.input_shape, init=init)


def naive_split_rounds(algo, store, start, cohorts, keys, lr, local, uniform):
    """Rounds of a split FedAvg by hand: each participant starts from the global model's
    shared layers and its own `local` layers, runs plain SGD (jax.grad on the model's CE)
    over the batches of the round's plan, sends the shared layers; the server averages them
    (train-size or uniform weights). No engine code but the batch plan (the minibatch order).

    Args:
      start: the engine's initial state (device_get): global_params, client_params.
    Returns:
      per round: (global params, client params [N, ...]) as numpy.
    """
    model = algo.ctx.model
    images, labels = np.asarray(store.images), np.asarray(store.labels)
    counts = np.asarray(store.train_count)

    @jax.jit
    def grad(p, x, y):
        def loss(p):
            logits = model.apply({"params": p, "batch_stats": {}}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return jax.grad(loss)(p)

    glob = jax.tree.map(np.asarray, start["global_params"])
    clients = [jax.tree.map(lambda a: np.asarray(a)[c], start["client_params"]) for c in range(counts.size)]
    out = []
    for ids, key in zip(cohorts, keys):
        trained = {}
        for cid in ids:
            p = {layer: dict(clients[cid][layer] if layer in local else glob[layer]) for layer in glob}
            idx, mask = algo.trainer.batch_plan(int(cid), key)
            for t in range(idx.shape[0]):
                rows = idx[t][mask[t]]
                if rows.size == 0:
                    continue
                x = normalize_images(jnp.asarray(images[rows]), store.mean, store.std)
                g = grad(p, x, jnp.asarray(labels[rows]))
                p = jax.tree.map(lambda a, b: np.asarray(a) - lr * np.asarray(b), p, g)
            trained[cid] = p
        w = np.ones(len(ids)) if uniform else counts[list(ids)].astype(np.float64)
        w = w / w.sum()
        glob = {layer: (leaves if layer in local else
                        {k: sum(wi * trained[c][layer][k] for wi, c in zip(w, ids)) for k in leaves})
                for layer, leaves in glob.items()}
        for cid in ids:
            clients[cid] = trained[cid]
        out.append((glob, jax.tree.map(lambda *rows: np.stack(rows), *clients)))
    return out


def check_rounds(algo, store, cohorts, lr, uniform, init_key=0):
    """Runs `algo` for the cohorts and compares every round with `naive_split_rounds`:
    the global shared layers, every client's model, the views '' and 'local', the bytes."""
    keys = [jax.random.fold_in(KEY, t) for t in range(len(cohorts))]
    state = algo.init(jax.random.PRNGKey(init_key))
    start = jax.device_get(state)
    local = set(algo.local_layers())
    expect = naive_split_rounds(algo, store, start, cohorts, keys, lr, local, uniform)
    n = algo.ctx.num_clients
    shared = 4 * sum(int(np.prod(a.shape)) for layer, leaves in start["global_params"].items()
                     if layer not in local for a in leaves.values())
    for t, (ids, key) in enumerate(zip(cohorts, keys)):
        state, info = algo.round(state, t, np.asarray(ids), key)
        after = jax.device_get(state)
        glob, clients = expect[t]
        for layer, leaves in glob.items():
            for leaf, value in leaves.items():
                got = after["global_params"][layer][leaf]
                if layer in local:    # never averaged: the initial value stays
                    np.testing.assert_array_equal(got, start["global_params"][layer][leaf])
                else:
                    np.testing.assert_allclose(got, value, **TOL, err_msg=f"{layer}/{leaf} round {t}")
                np.testing.assert_allclose(after["client_params"][layer][leaf][:n], clients[layer][leaf],
                                           **TOL, err_msg=f"client {layer}/{leaf} round {t}")
        np.testing.assert_array_equal(info["bytes_up"], [shared] * len(ids))
        np.testing.assert_array_equal(info["bytes_down"], [shared] * len(ids))
        views = algo.evaluate(state, t, KEY).views
        assert set(views) == {"", "local"}
        personal = jax.device_get(views[""].params)
        for layer, leaves in glob.items():
            for leaf, value in leaves.items():
                expect_view = clients[layer][leaf] if layer in local else np.broadcast_to(value, (n,) + value.shape)
                np.testing.assert_allclose(personal[layer][leaf][:n], expect_view, **TOL)
    return shared


# ---------------------------------------------------------------------------- the split
def test_top_weight_layers_count_weight_layers_only():
    assert top_weight_layers(CIFAR_LAYERS, ("BN1", "BN2"), 1) == ("FC3",)
    assert top_weight_layers(CIFAR_LAYERS, ("BN1", "BN2"), 2) == ("FC2", "FC3")
    assert top_weight_layers(CIFAR_LAYERS, ("BN1", "BN2"), 4) == ("Conv2", "BN2", "FC1", "FC2", "FC3")
    for k in (0, 5):
        with pytest.raises(UserInputError, match="expected 1 to 4"):
            top_weight_layers(CIFAR_LAYERS, ("BN1", "BN2"), k)


def test_fedper_split_on_the_models(ragged):
    ds, store = ragged
    ctx = make_ctx(ds, store, LocalTrainConfig(batch_size=16, local_epochs=1, lr=0.05))
    assert FedPer(ctx).local_layers() == ("FC3",)
    assert FedPer(ctx, FedPerConfig(head_layers=2)).local_layers() == ("FC2", "FC3")
    with pytest.raises(UserInputError, match="--fedper_head_layers=5: .*leave no lower layer"):
        FedPer(ctx, FedPerConfig(head_layers=5))
    # the bytes of the shared base, for the E/FMNIST CNN: the model less FC3 (84 x 10 + 10)
    assert FedPer(ctx).shared_bytes == 4 * (85_822 - 850)


# ---------------------------------------------------------------------------- rounds
@pytest.mark.slow
def test_two_rounds_equal_a_naive_per_client_loop(ragged):
    """Independent initial models (each client's own head), participants [2, 0] then [1, 2]
    (client 2 trains from its round-1 head, client 1 from its initial one), 2 local epochs of
    batches of 16 (partial last batches), train-size weights; K_P = 2 (FC2, FC3)."""
    ds, store = ragged
    cfg = LocalTrainConfig(batch_size=16, local_epochs=2, lr=0.05)
    algo = FedPer(make_ctx(ds, store, cfg, init="independent"), FedPerConfig(head_layers=2))
    shared = check_rounds(algo, store, [[2, 0], [1, 2]], cfg.lr, uniform=False)
    assert shared == 4 * (85_822 - 850 - 10_164)


@pytest.mark.slow
def test_fedper_relation_to_fedavg_and_fedrep(ragged):
    """From a common initial model, FedPer's first round is FedAvg's (every client starts
    from the same model; FedAvg averages the head too, FedPer keeps it). FedPer is NOT FedRep
    with 0 head epochs: there the head is frozen throughout, here it trains with the body."""
    ds, store = ragged
    ctx = make_ctx(ds, store, LocalTrainConfig(batch_size=16, local_epochs=1, lr=0.05))
    ids = np.array([0, 2])
    after = {}
    for name, algo in (("fedper", FedPer(ctx)), ("fedavg", FedAvg(ctx)),
                       ("fedrep0", FedRep(ctx, FedRepConfig(body_epochs=1)))):
        state = algo.init(jax.random.PRNGKey(0))
        state, _ = algo.round(state, 0, ids, KEY)
        after[name] = jax.device_get(state)
    start = jax.device_get(FedAvg(ctx).init(jax.random.PRNGKey(0)))
    for a, b in zip(jax.tree.leaves(after["fedper"]["client_params"]),
                    jax.tree.leaves(after["fedavg"]["client_params"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for layer in ("Conv1", "Conv2", "FC1", "FC2"):
        np.testing.assert_allclose(after["fedper"]["global_params"][layer]["kernel"],
                                   after["fedavg"]["global_params"][layer]["kernel"], rtol=1e-6, atol=1e-7)
    head = lambda s: s["client_params"]["FC3"]["kernel"][ids]
    np.testing.assert_array_equal(head(after["fedrep0"]), head(start))     # FedRep: frozen head
    assert not np.allclose(head(after["fedper"]), head(start))            # FedPer: trained head


# ---------------------------------------------------------------------------- strategies
class TinyNet(nn.Module):
    """A two-layer model that compiles fast (FC1, FC2; FC2 is the head)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, *, train, mask=None):
        x = jnp.tanh(nn.Dense(8, name="FC1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="FC2")(x)


def check_strategies(ds, store, build, keys=("global_params", "client_params")):
    """vmap = loop = shard over three rounds of three clients of different sizes (one
    padded to the 2-device mesh under shard), one trace of the round each; `build(ctx)`
    makes the algorithm. Returns the loop run's final state."""
    model = TinyNet(ds.num_classes)
    cfg = LocalTrainConfig(batch_size=5, local_epochs=1, lr=0.05)
    cohorts = [np.array([0, 1, 2]), np.array([2, 0, 1]), np.array([1, 0, 2])]
    out = {}
    for strategy in ("vmap", "loop", "shard"):
        algo = build(make_ctx(ds, store, cfg, model, strategy, "independent", ("FC1", "FC2")))
        state = algo.init(jax.random.PRNGKey(0))
        for t, ids in enumerate(cohorts):
            state, _ = algo.round(state, t, ids, jax.random.fold_in(KEY, t))
        assert algo.trace_count == 1, (strategy, algo.trace_count)
        out[strategy] = jax.device_get({k: state[k] for k in keys})
    for strategy in ("vmap", "shard"):
        for a, b in zip(jax.tree.leaves(out["loop"]), jax.tree.leaves(out[strategy])):
            a, b = np.asarray(a), np.asarray(b)
            if a.ndim and a.shape[0] != b.shape[0]:   # per-client rows padded to the mesh
                a, b = a[:3], b[:3]
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=strategy)
    return out["loop"]


@pytest.mark.slow
def test_every_strategy_agrees_with_one_trace(ragged):
    ds, store = ragged
    final = check_strategies(ds, store, lambda ctx: FedPer(ctx))
    # the heads (FC2 of the toy model) stay apart; the global FC2 is never averaged
    heads = final["client_params"]["FC2"]["kernel"][:3]
    assert not np.allclose(heads[0], heads[1])


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options,pattern", [
    (dict(head_layers=0), "--fedper_head_layers must be >= 1"),
    (dict(weighting="median"), "unknown --fedper_weighting 'median'"),
])
def test_bad_options_are_refused(options, pattern):
    with pytest.raises(UserInputError, match=pattern):
        FedPerConfig(**options)


ARGV = ["experiments.run", "--algorithm=fedper", "--dataset=synthetic", "--synthetic_per_class=20",
        "--num_clients=3", "--samples_per_client=20", "--rounds=1"]


def test_command_line_bad_option_is_one_line(capfd):
    with pytest.raises(UserInputError, match="fedper_head_layers") as err:
        config_from_argv([*ARGV, "--fedper_head_layers=0"])
    assert len(str(err.value).splitlines()) == 1
    line = one_error_line(run_tool.main, [*ARGV, "--fedper_weighting=median"], capfd)
    assert "--fedper_weighting" in line


def test_a_split_the_model_cannot_take_is_one_line(capfd):
    """Refused when the algorithm meets the model (5 top layers of a 5-layer CNN)."""
    line = one_error_line(run_tool.main, [*ARGV, "--fedper_head_layers=5"], capfd)
    assert "--fedper_head_layers=5" in line and "leave no lower layer" in line


def test_search_space_fits_the_config():
    check_search_space(ExperimentConfig(algorithm="fedper"))
