"""Stacked-client local training: strategies agree, masking is exact, no retrace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfedla_jax.core.client_update import ClientUpdate, sgd_update
from pfedla_jax.core.local_training import (ClientTrainer, LocalTrainConfig, make_optimizer,
                                            masked_cross_entropy)
from pfedla_jax.core.stacking import broadcast_clients
from pfedla_jax.data.store import normalize_images
from pfedla_jax.models import init_variables, make_cnn
from tests.helpers import store_from_indices, synthetic

KEY = jax.random.PRNGKey(7)
_LISTS = {}


def _cohort(ds, sizes, test=8):
    """Clients with the given train sizes, disjoint slices of the synthetic pool."""
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(ds.labels))
    train, tests, off = [], [], 0
    for n in sizes:
        train.append(perm[off:off + n]); off += n
        tests.append(perm[off:off + test]); off += test
    _LISTS[id(ds), tuple(sizes)] = (train, tests)  # dataset-level indices, for rebuilding cohorts
    return store_from_indices(ds, train, tests)


def _start(model, shape, num, key=0):
    v = init_variables(model, jax.random.PRNGKey(key), shape)
    return broadcast_clients(v["params"], num), broadcast_clients(v.get("batch_stats", {}), num)


@pytest.fixture(scope="module")
def gray():
    ds = synthetic()
    return ds, _cohort(ds, [70, 33, 50])


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("use_bn,name", [(False, "synthetic"), (True, "synthetic_rgb")])
def test_vmap_loop_shard_agree(use_bn, name):
    ds = synthetic(name)
    store = _cohort(ds, [45, 20, 64])
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=use_bn)
    cfg = LocalTrainConfig(batch_size=16, local_epochs=2, lr=0.05)
    params, stats = _start(model, ds.input_shape, 3)
    ids = jnp.array([0, 1, 2], jnp.int32)
    outs = {}
    for strategy in ("loop", "vmap", "shard"):
        trainer = ClientTrainer(model, store, cfg, strategy)
        outs[strategy] = trainer.train(params, stats, ids, KEY)
    _assert_trees_close(outs["loop"], outs["vmap"], rtol=2e-4, atol=2e-5)
    _assert_trees_close(outs["loop"], outs["shard"], rtol=2e-4, atol=2e-5)
    # every client did learn something
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), outs["loop"][0], params)
    assert min(float(m) for m in jax.tree.leaves(moved)) > 0


@pytest.mark.slow
def test_shard_with_fewer_clients_than_devices(gray):
    ds, store = gray
    model = make_cnn(ds.input_shape, ds.num_classes)
    cfg = LocalTrainConfig(batch_size=16, local_steps=3, lr=0.05)
    params, stats = _start(model, ds.input_shape, 1)
    ids = jnp.array([2], jnp.int32)
    a = ClientTrainer(model, store, cfg, "shard").train(params, stats, ids, KEY)
    b = ClientTrainer(model, store, cfg, "loop").train(params, stats, ids, KEY)
    _assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_matches_naive_python_sgd(gray):
    """The scan with masks equals a plain loop over the client's shuffled minibatches."""
    ds, store = gray
    model = make_cnn(ds.input_shape, ds.num_classes)
    cfg = LocalTrainConfig(batch_size=16, local_epochs=2, lr=0.05)
    params, stats = _start(model, ds.input_shape, 3)
    trainer = ClientTrainer(model, store, cfg, "loop")
    first = lambda t: jax.tree.map(lambda a: a[:1], t)
    got, _, metrics = trainer.train(first(params), first(stats), jnp.array([1], jnp.int32), KEY)

    cid, n, max_train = 1, 33, store.train_idx.shape[1]
    p = jax.tree.map(lambda a: a[0], params)
    key = jax.random.fold_in(KEY, cid)
    own = np.asarray(store.train_idx[cid])
    losses = []
    # one plain SGD step's loss and gradient (jitted: two programs, batch 16 and 1)
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda q, x, y: optax_ce(model.apply({"params": q}, x, train=True), y)))
    for e in range(2):
        u = np.asarray(jax.random.uniform(jax.random.fold_in(key, e), (max_train,)))
        order = np.argsort(np.where(np.arange(max_train) < n, u, 2.0), kind="stable")[:n]
        for b in range(0, n, 16):  # the last batch is partial (n = 33 -> 16, 16, 1)
            idx = own[order[b:b + 16]]
            x = normalize_images(store.images[idx], store.mean, store.std)
            y = store.labels[idx]
            val, g = value_and_grad(p, x, y)
            losses.append(float(val) * len(idx))
            p = jax.tree.map(lambda w, gw: w - 0.05 * gw, p, g)
    _assert_trees_close(jax.tree.map(lambda a: a[0], got), p, rtol=1e-4, atol=1e-5)
    assert float(metrics["num_examples"][0]) == 2 * n
    np.testing.assert_allclose(float(metrics["loss_sum"][0]), sum(losses), rtol=1e-4)


def optax_ce(logits, y):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


@pytest.mark.slow
def test_padding_steps_change_nothing(gray):
    """A small client trained beside a big one equals the same client trained alone."""
    ds, store = gray
    model = make_cnn(ds.input_shape, ds.num_classes)
    cfg = LocalTrainConfig(batch_size=16, local_epochs=2, lr=0.05)
    params, stats = _start(model, ds.input_shape, 3)
    two = lambda t: jax.tree.map(lambda a: a[:2], t)
    together = ClientTrainer(model, store, cfg, "loop").train(two(params), two(stats),
                                                              jnp.array([1, 0], jnp.int32), KEY)
    # the same client's rows, re-stored as client 1 of a store whose clients are all small
    train, tests = _LISTS[id(ds), (70, 33, 50)]
    alone_store = store_from_indices(ds, [train[2][:10], train[1]], [tests[2], tests[1]])
    alone = ClientTrainer(model, alone_store, cfg, "loop").train(
        jax.tree.map(lambda a: a[:1], params), jax.tree.map(lambda a: a[:1], stats),
        jnp.array([1], jnp.int32), KEY)
    assert ClientTrainer(model, store, cfg, "loop").num_steps > ClientTrainer(model, alone_store, cfg, "loop").num_steps
    _assert_trees_close(jax.tree.map(lambda a: a[:1], together[0]), alone[0], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_fixed_steps_and_determinism(gray):
    ds, store = gray
    model = make_cnn(ds.input_shape, ds.num_classes)
    cfg = LocalTrainConfig(batch_size=16, local_steps=7, lr=0.05)
    params, stats = _start(model, ds.input_shape, 3)
    trainer = ClientTrainer(model, store, cfg, "loop")
    assert trainer.num_steps == 7
    a = trainer.train(params, stats, jnp.arange(3, dtype=jnp.int32), KEY)
    b = trainer.train(params, stats, jnp.arange(3, dtype=jnp.int32), KEY)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # steps walk through epochs; each epoch ends with a partial batch (no drop_last)
    def seen(n):
        batches = [min(16, n - b) for b in range(0, n, 16)]
        return sum((batches * 7)[:7])
    np.testing.assert_array_equal(np.asarray(a[2]["num_examples"]), [seen(70), seen(33), seen(50)])
    c = trainer.train(params, stats, jnp.arange(3, dtype=jnp.int32), jax.random.fold_in(KEY, 1))
    assert not np.array_equal(np.asarray(jax.tree.leaves(a[0])[0]), np.asarray(jax.tree.leaves(c[0])[0]))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_no_retrace_across_rounds(gray, strategy):
    ds, store = gray
    model = make_cnn(ds.input_shape, ds.num_classes)
    trainer = ClientTrainer(model, store, LocalTrainConfig(batch_size=16, local_steps=2, lr=0.05), strategy)
    params, stats = _start(model, ds.input_shape, 2)
    traces = []
    for r in range(3):
        ids = jnp.array([r % 3, (r + 1) % 3], jnp.int32)
        params, stats, _ = trainer.train(params, stats, ids, jax.random.fold_in(KEY, r))
        traces.append(trainer.trace_count)
    # traced when first compiled (once, plus once for for_each_client's output shapes), then
    # never again
    assert traces[0] in (1, 2) and traces == [traces[0]] * 3, traces


def test_masked_cross_entropy():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    y = jnp.array([0, 1, 1])
    total, count = masked_cross_entropy(logits, y, jnp.array([1.0, 1.0, 0.0]))
    expect = -np.log(np.exp(2) / (np.exp(2) + 1)) - np.log(np.exp(1) / (np.exp(1) + 1))
    np.testing.assert_allclose(float(total), expect, rtol=1e-6)
    assert float(count) == 2


def _label_counter(k):
    """A ClientUpdate that sums the labels of the real examples of each of its k batches."""
    def init(shared, client, client_id, key):
        return jnp.zeros((k,), jnp.float32)

    def step(carry, batch):
        per_batch = jnp.sum(batch.y * batch.mask, axis=1)
        return carry + per_batch, (jnp.sum(per_batch), jnp.sum(batch.mask))

    return ClientUpdate(init=init, step=step, finalize=lambda carry, shared, client: carry,
                        batches_per_step=k)


@pytest.mark.parametrize("strategy", ["loop", "shard", "vmap"])
def test_k_batches_per_step_consume_the_same_batch_stream(gray, strategy):
    """A step of k batches gets batches k*t .. k*t+k-1 of the k = 1 plan; a client runs
    floor(own batches / k) steps."""
    ds, store = gray
    model = make_cnn(ds.input_shape, ds.num_classes)
    cfg = LocalTrainConfig(batch_size=16, local_epochs=2, lr=0.05)
    one = ClientTrainer(model, store, cfg, "loop")
    two = ClientTrainer(model, store, cfg, strategy, update=_label_counter(2))
    assert two.num_steps == one.num_steps // 2 == 5
    ids = jnp.array([2, 0, 1], jnp.int32)
    out, metrics = two.run(None, {}, ids, KEY)
    labels = np.asarray(store.labels)
    for row, cid in enumerate(np.asarray(ids)):
        idx, mask = one.batch_plan(int(cid), KEY)
        own_batches = 2 * -(-int(store.train_count[cid]) // 16)
        steps = own_batches // 2
        sums = [float(labels[idx[b]][mask[b]].sum()) for b in range(2 * steps)]
        np.testing.assert_allclose(np.asarray(out)[row], [sum(sums[0::2]), sum(sums[1::2])])
        assert float(metrics["num_examples"][row]) == sum(int(mask[b].sum()) for b in range(2 * steps))
        idx2, mask2 = two.batch_plan(int(cid), KEY)
        assert idx2.shape == (5, 2, 16)
        np.testing.assert_array_equal(idx2[:steps].reshape(-1, 16)[mask2[:steps].reshape(-1, 16)],
                                      idx[:2 * steps][mask[:2 * steps]])


def test_trainable_mask_freezes_leaves(gray):
    ds, store = gray
    model = make_cnn(ds.input_shape, ds.num_classes)
    cfg = LocalTrainConfig(batch_size=16, local_steps=3, lr=0.1, momentum=0.9)
    update = sgd_update(model, make_optimizer(cfg),
                        trainable=lambda p: {k: jax.tree.map(lambda _: k.startswith("Conv"), v)
                                             for k, v in p.items()})
    params, stats = _start(model, ds.input_shape, 2)
    out, _, _ = ClientTrainer(model, store, cfg, "loop", update=update).train(
        params, stats, jnp.array([0, 1], jnp.int32), KEY)
    for layer in params:
        moved = any(not np.array_equal(np.asarray(out[layer][k]), np.asarray(params[layer][k]))
                    for k in params[layer])
        assert moved == layer.startswith("Conv"), layer
