"""The trainable mask (one per phase of the local epochs), FedBN and FedRep.

Oracles: a numpy momentum-SGD for the gated optimizer; FedAvg itself for FedBN on a model
without BN; an explicit per-client train-then-average for FedBN's BN split; a naive
per-client Python loop (model.apply + jax.grad + optax on the head, then on the body, over
the batches `ClientTrainer.batch_plan` reports) for FedRep.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.fedavg import FedAvg
from pfedla_jax.algorithms.fedbn import FedBN, FedBNConfig
from pfedla_jax.algorithms.fedrep import FedRep, FedRepConfig
from pfedla_jax.core.client_update import PhaseMasks, masked_optimizer, sgd_update
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.data.store import normalize_images
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import batchnorm_layers, init_variables, layer_names, make_cnn
from pfedla_jax.training.config import ExperimentConfig
from tests.helpers import small_store

KEY = jax.random.PRNGKey(3)


# ---------------------------------------------------------------------------- the mask
def test_phase_gated_optimizer_freezes_updates_and_momentum():
    """Phase 0 trains `a`, phase 1 trains `b`: a frozen leaf gets a zero update and its
    momentum buffer does not advance (it resumes where it stopped: numpy oracle)."""
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    masks = PhaseMasks(({"a": True, "b": False}, {"a": False, "b": True}), epochs=(2, 1))
    tx = masked_optimizer(optax.sgd(0.1, momentum=0.9), masks)
    state = tx.init(params)
    grads = {"a": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array([4.0, 5.0])}
    buf = {"a": np.zeros(3), "b": np.zeros(2)}
    for phase in (0, 0, 1, 1, 0):
        updates, state = tx.update(grads, state, params, phase=jnp.int32(phase))
        for leaf, trains in (("a", phase == 0), ("b", phase == 1)):
            if trains:
                buf[leaf] = 0.9 * buf[leaf] + np.asarray(grads[leaf])
                np.testing.assert_allclose(np.asarray(updates[leaf]), -0.1 * buf[leaf], rtol=1e-6)
            else:
                np.testing.assert_array_equal(np.asarray(updates[leaf]), 0.0)
    # epochs -> phases: [0, 2) phase 0, then phase 1 (and after the last phase, stay there)
    assert [int(masks.phase(e)) for e in range(5)] == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError):
        PhaseMasks(({"a": True},), epochs=(1, 1))


def _is_head(params):
    return {layer: jax.tree.map(lambda _: layer == "FC3", leaves) for layer, leaves in params.items()}


def _is_body(params):
    return jax.tree.map(lambda h: not h, _is_head(params))


@pytest.fixture(scope="module")
def gray():
    ds, store = small_store(num_clients=3, scheme="dirichlet", samples_per_client=40,
                            dirichlet_alpha=1.0, min_client_size=15)
    assert len(set(np.asarray(store.train_count).tolist())) > 1, "unequal sizes wanted"
    return ds, store


@pytest.mark.slow
def test_phase_masks_in_the_trainer_every_strategy(gray):
    """Head epoch, then body epoch, with momentum: vmap = loop = shard; the head is
    bit-identical to a head-only run of the first epoch (frozen in phase 1), the body
    bit-identical to the start after a run whose body phase has 0 epochs; no retrace."""
    ds, store = gray
    model = make_cnn(ds.input_shape, ds.num_classes)
    cfg = LocalTrainConfig(batch_size=16, local_epochs=2, lr=0.05)
    opt = optax.sgd(0.05, momentum=0.9)
    variables = init_variables(model, jax.random.PRNGKey(0), ds.input_shape)
    ids = jnp.array([2, 0, 1], jnp.int32)
    start = jax.tree.map(lambda a: jnp.broadcast_to(a, (3,) + a.shape), variables["params"])
    stats = jax.tree.map(lambda a: jnp.broadcast_to(a, (3,) + a.shape), variables["batch_stats"])
    phased = sgd_update(model, opt, trainable=PhaseMasks((_is_head, _is_body), epochs=(1, 1)))
    out = {}
    for strategy in ("loop", "shard", "vmap"):
        trainer = ClientTrainer(model, store, cfg, strategy, update=phased)
        out[strategy] = trainer.train(start, stats, ids, KEY)[0]
        if strategy == "loop":
            traces = trainer.trace_count
            trainer.train(out[strategy], stats, ids, jax.random.fold_in(KEY, 1))
            assert trainer.trace_count == traces
    for strategy in ("shard", "vmap"):
        for a, b in zip(jax.tree.leaves(out["loop"]), jax.tree.leaves(out[strategy])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # phase 0 alone (one epoch, head only): the same first epoch of batches; under every
    # strategy the frozen body stays bit-identical and the head equals the phased run's
    # (frozen during its phase 1)
    one_epoch = LocalTrainConfig(batch_size=16, local_epochs=1, lr=0.05)
    for strategy in ("loop", "shard", "vmap"):
        head_only = ClientTrainer(model, store, one_epoch, strategy, update=sgd_update(model, opt, trainable=_is_head))
        first = head_only.train(start, stats, ids, KEY)[0]
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(out[strategy]["FC3"][leaf]), np.asarray(first["FC3"][leaf]))
        for layer in ("Conv1", "Conv2", "FC1", "FC2"):
            np.testing.assert_array_equal(np.asarray(first[layer]["kernel"]), np.asarray(start[layer]["kernel"]))
    assert not np.array_equal(np.asarray(out["loop"]["Conv1"]["kernel"]), np.asarray(start["Conv1"]["kernel"]))
    assert not np.array_equal(np.asarray(first["FC3"]["kernel"]), np.asarray(start["FC3"]["kernel"]))


# ---------------------------------------------------------------------------- FedBN
def _ctx(ds, store, cfg, use_bn=None, strategy="loop", init="common"):
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=use_bn)
    return FLContext(model=model, layer_order=layer_names(model), store=store,
                     trainer=ClientTrainer(model, store, cfg, strategy),
                     num_clients=int(store.train_idx.shape[0]), input_shape=ds.input_shape, init=init)


def test_batchnorm_layers_found_by_type():
    assert batchnorm_layers(make_cnn((32, 32, 3), 10), (32, 32, 3)) == ("BN1", "BN2")
    assert batchnorm_layers(make_cnn((28, 28, 1), 10), (28, 28, 1)) == ()


@pytest.mark.slow
def test_fedbn_is_fedavg_bit_for_bit_without_bn(gray):
    ds, store = gray
    ctx = _ctx(ds, store, LocalTrainConfig(batch_size=16, local_steps=3, lr=0.05))
    states = []
    for cls in (FedAvg, FedBN):
        algo = cls(ctx)
        state = algo.init(jax.random.PRNGKey(0))
        for t, ids in enumerate(([0, 2], [1, 0, 2])):
            state, info = algo.round(state, t, np.array(ids), jax.random.fold_in(KEY, t))
        states.append((jax.device_get(state), jax.device_get(info)))
    assert FedBN(ctx).describe().startswith("the model has no BatchNorm")
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_fedbn_keeps_every_bn_tensor_local(gray):
    """CIFAR-shaped model with BN, 2 rounds: after round 2, each participant's BN scale/bias
    and running statistics are what it trained (from the global non-BN params and its own
    round-1 BN params), every other tensor is the weighted average; a non-participant
    keeps everything."""
    _, _ = gray
    ds, store = small_store(num_clients=3, samples_per_client=30, name="synthetic_rgb")
    cfg = LocalTrainConfig(batch_size=8, local_steps=2, lr=0.05)
    ctx = _ctx(ds, store, cfg, use_bn=True)
    algo = FedBN(ctx, FedBNConfig(weighting="uniform"))
    assert algo.local_layers() == ("BN1", "BN2")
    state = algo.init(jax.random.PRNGKey(0))
    state, _ = algo.round(state, 0, np.array([0, 1, 2]), KEY)
    before = jax.device_get(state)
    ids = np.array([2, 0])
    state, info = algo.round(state, 1, ids, jax.random.fold_in(KEY, 1))
    after = jax.device_get(state)
    # independent computation: compose each participant's start by hand, train, average
    start = {layer: {leaf: (before["client_params"][layer][leaf][ids] if layer.startswith("BN")
                            else np.broadcast_to(v, (2,) + v.shape))
                     for leaf, v in leaves.items()} for layer, leaves in before["global_params"].items()}
    stats = jax.tree.map(lambda a: a[ids], before["batch_stats"])
    trained, new_stats, _ = ctx.trainer.train(start, stats, jnp.asarray(ids, jnp.int32), jax.random.fold_in(KEY, 1))
    trained, new_stats = jax.device_get((trained, new_stats))
    for layer, leaves in trained.items():
        for leaf, value in leaves.items():
            np.testing.assert_allclose(after["client_params"][layer][leaf][ids], value, rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(after["client_params"][layer][leaf][1],
                                          before["client_params"][layer][leaf][1])
            if not layer.startswith("BN"):
                np.testing.assert_allclose(after["global_params"][layer][leaf], value.mean(0), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(after["batch_stats"]), jax.tree.leaves(new_stats)):
        np.testing.assert_allclose(a[ids], b, rtol=1e-6, atol=1e-7)
    # the BN params of the two participants really differ (they are not averaged)
    assert not np.allclose(after["client_params"]["BN1"]["scale"][2], after["client_params"]["BN1"]["scale"][0])
    # the evaluated model: global non-BN params, own BN params
    view = algo.evaluate(state, 1, KEY).views[""]
    personal = jax.device_get(view.params)
    np.testing.assert_array_equal(personal["BN2"]["bias"][:3], after["client_params"]["BN2"]["bias"][:3])
    np.testing.assert_array_equal(personal["FC1"]["kernel"][1], after["global_params"]["FC1"]["kernel"])
    bn_bytes = 4 * sum(v.size for layer in ("BN1", "BN2") for v in before["global_params"][layer].values())
    np.testing.assert_array_equal(info["bytes_up"], [ctx.model_bytes - bn_bytes] * 2)


# ---------------------------------------------------------------------------- FedRep
def _naive_fedrep_client(model, store, params, stats, cid, idx, mask, head_epochs, lr, head):
    """One client by hand: SGD on the head for `head_epochs` epochs (body frozen), then on
    the body; batches as the trainer reports them; real examples only (no mask)."""
    params = jax.tree.map(np.asarray, params)
    per_epoch = -(-int(store.train_count[cid]) // idx.shape[1])
    images, labels = np.asarray(store.images), np.asarray(store.labels)

    @jax.jit
    def grads_of(p, st, x, y):
        def loss(p):
            logits, new = model.apply({"params": p, "batch_stats": st}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
        return jax.grad(loss, has_aux=True)(p)

    for s in range(idx.shape[0]):
        rows = idx[s][mask[s]]
        if rows.size == 0:
            continue
        x = normalize_images(jnp.asarray(images[rows]), store.mean, store.std)
        g, new = grads_of(params, stats, x, jnp.asarray(labels[rows]))
        in_head_phase = s // per_epoch < head_epochs
        params = {layer: {leaf: (v - lr * np.asarray(g[layer][leaf])
                                 if (layer in head) == in_head_phase else v)
                          for leaf, v in leaves.items()} for layer, leaves in params.items()}
        stats = new.get("batch_stats", stats)
    return params, stats


@pytest.mark.slow
def test_fedrep_round_equals_a_naive_per_client_loop(gray):
    ds, store = gray
    cfg = LocalTrainConfig(batch_size=16, local_epochs=3, lr=0.05)
    ctx = _ctx(ds, store, cfg, init="independent")   # different heads per client
    algo = FedRep(ctx, FedRepConfig(head="FC3", body_epochs=1))
    assert algo.phases.epochs == (2, 1)
    state = algo.init(jax.random.PRNGKey(0))
    before = jax.device_get(state)
    ids = np.array([2, 0])
    state, info = algo.round(state, 0, ids, KEY)
    after = jax.device_get(state)
    trained = []
    for cid in ids:
        # the participant starts from the global body and its own head
        start = {layer: ({k: v[cid] for k, v in before["client_params"][layer].items()}
                         if layer == "FC3" else before["global_params"][layer])
                 for layer in before["global_params"]}
        idx, mask = algo.trainer.batch_plan(int(cid), KEY)
        p, _ = _naive_fedrep_client(ctx.model, store, start, {}, int(cid), idx, mask, 2, cfg.lr, ("FC3",))
        trained.append(p)
        for layer, leaves in p.items():
            for leaf, v in leaves.items():
                np.testing.assert_allclose(after["client_params"][layer][leaf][cid], v, rtol=2e-5, atol=2e-6)
    counts = np.asarray(store.train_count)[ids].astype(np.float64)
    w = counts / counts.sum()
    for layer in ("Conv1", "Conv2", "FC1", "FC2"):
        for leaf in after["global_params"][layer]:
            expect = w[0] * trained[0][layer][leaf] + w[1] * trained[1][layer][leaf]
            np.testing.assert_allclose(after["global_params"][layer][leaf], expect, rtol=2e-5, atol=2e-6)
    # heads stay with the clients: the global head is untouched, the sitting-out client's too
    np.testing.assert_array_equal(after["global_params"]["FC3"]["kernel"], before["global_params"]["FC3"]["kernel"])
    np.testing.assert_array_equal(after["client_params"]["FC3"]["kernel"][1], before["client_params"]["FC3"]["kernel"][1])
    head_bytes = 4 * (84 * ds.num_classes + ds.num_classes)
    np.testing.assert_array_equal(info["bytes_up"], [ctx.model_bytes - head_bytes] * 2)
    # evaluation: the new global body with each client's own head
    personal = jax.device_get(algo.evaluate(state, 0, KEY).views[""].params)
    np.testing.assert_array_equal(personal["FC3"]["kernel"][:3], after["client_params"]["FC3"]["kernel"][:3])
    np.testing.assert_array_equal(personal["Conv2"]["kernel"][0], after["global_params"]["Conv2"]["kernel"])


def test_fedrep_without_head_epochs_never_moves_a_head(gray):
    """body_epochs = local_epochs: no head phase, every head bit-identical (FedAvg of the
    body under a frozen head: FedRep reduces to FedAvg of the body)."""
    ds, store = gray
    ctx = _ctx(ds, store, LocalTrainConfig(batch_size=16, local_epochs=1, lr=0.05))
    algo = FedRep(ctx, FedRepConfig(body_epochs=1))
    assert algo.phases.epochs == (0, 1)
    state = algo.init(jax.random.PRNGKey(0))
    head = np.asarray(state["client_params"]["FC3"]["kernel"])
    state, _ = algo.round(state, 0, np.array([0, 1, 2]), KEY)
    np.testing.assert_array_equal(np.asarray(state["client_params"]["FC3"]["kernel"]), head)
    assert not np.array_equal(np.asarray(state["client_params"]["FC2"]["kernel"][0]),
                              np.asarray(algo.init(jax.random.PRNGKey(0))["client_params"]["FC2"]["kernel"][0]))


@pytest.mark.parametrize("name,options,train,pattern", [
    ("fedrep", dict(head="FC9"), dict(local_epochs=2), "unknown layer 'FC9'"),
    ("fedrep", dict(head=" , "), dict(local_epochs=2), "names no layer"),
    ("fedrep", dict(body_epochs=0), dict(local_epochs=2), "body_epochs must be >= 1"),
    ("fedrep", dict(body_epochs=3), dict(local_epochs=2), "does not fit"),
    ("fedrep", dict(), dict(local_steps=5), "local_epochs"),
    ("fedbn", dict(weighting="median"), dict(), "fedbn_weighting"),
])
def test_bad_options_are_refused_before_data(name, options, train, pattern):
    """Refused where the configs are built: the algorithm's own options by its config, their
    fit with the local training by the ExperimentConfig that pairs them."""
    config_class = FedRepConfig if name == "fedrep" else FedBNConfig
    with pytest.raises(UserInputError, match=pattern):
        ExperimentConfig(algorithm=name, algorithm_config=config_class(**options),
                         train=LocalTrainConfig(**train))


def test_fedrep_head_must_exist_and_leave_a_body(gray):
    ds, store = gray
    ctx = _ctx(ds, store, LocalTrainConfig(batch_size=16, local_epochs=2, lr=0.05))
    with pytest.raises(UserInputError, match="no layer 'BN1'"):
        FedRep(ctx, FedRepConfig(head="BN1"))
    with pytest.raises(UserInputError, match="no body"):
        FedRep(ctx, FedRepConfig(head="Conv1,Conv2,FC1,FC2,FC3"))
