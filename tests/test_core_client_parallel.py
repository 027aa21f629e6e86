"""for_each_client: vmap = loop = shard, padding skipped, balanced split, shared inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfedla_jax.core.client_parallel import balanced_order, for_each_client, make_mesh


def _client_fn(calls=None):
    def fn(shared, client, cid, key):
        if calls is not None:
            jax.debug.callback(lambda i: calls.append(int(i)), cid)
        noise = jax.random.uniform(jax.random.fold_in(key, cid), ())
        return {"y": client["x"] * shared["scale"] + cid, "n": noise}
    return fn


@pytest.mark.parametrize("num", [1, 3, 4])
def test_strategies_agree_and_padding_is_skipped(num):
    assert jax.device_count() == 2, "conftest splits the host into two devices"
    x = jnp.arange(num * 3, dtype=jnp.float32).reshape(num, 3)
    ids = jnp.arange(num, dtype=jnp.int32)[::-1]
    shared = {"scale": jnp.float32(2.0)}
    key = jax.random.PRNGKey(0)
    want = {"y": np.asarray(x) * 2 + np.asarray(ids)[:, None],
            "n": np.array([float(jax.random.uniform(jax.random.fold_in(key, int(i)), ())) for i in ids])}
    for strategy in ("loop", "vmap", "shard"):
        calls = []
        fn = jax.jit(for_each_client(_client_fn(calls), strategy))
        got = fn(shared, {"x": x}, ids, key)
        np.testing.assert_allclose(got["y"], want["y"], rtol=0, atol=0)
        np.testing.assert_allclose(got["n"], want["n"], rtol=0, atol=0)
        if strategy != "vmap":
            # the cohort is padded to the 2 devices; the padding runs no client (lax.cond)
            assert sorted(calls) == sorted(np.asarray(ids).tolist()), (strategy, calls)


def test_negative_ids_give_zeros_and_batched_vmap_agrees():
    x = jnp.arange(12, dtype=jnp.float32).reshape(6, 2)
    ids = jnp.array([0, 1, -1, 3, -1, 5], jnp.int32)
    shared = {"scale": jnp.float32(1.0)}
    key = jax.random.PRNGKey(1)
    outs = {}
    for strategy, batch in (("loop", None), ("vmap", None), ("vmap", 4), ("shard", None)):
        outs[strategy, batch] = jax.jit(for_each_client(_client_fn(), strategy, batch_size=batch))(
            shared, {"x": x}, ids, key)
    for out in outs.values():
        np.testing.assert_array_equal(out["y"][2], [0.0, 0.0])
        np.testing.assert_array_equal(out["y"][4], [0.0, 0.0])
        np.testing.assert_array_equal(out["y"], outs["loop", None]["y"])


def test_balanced_order_is_a_permutation_with_balanced_blocks():
    cost = jnp.array([10, 1, 1, 1, 9, 1, 8, 2], jnp.int32)
    perm = np.asarray(balanced_order(cost, 2))
    assert sorted(perm.tolist()) == list(range(8))
    blocks = np.asarray(cost)[perm].reshape(2, 4).sum(1)
    # snake deal of (10, 9, 8, 2, 1, 1, 1, 1): device 0 gets 10, 2, 1, 1; device 1 gets 9, 8, 1, 1
    assert sorted(blocks.tolist()) == [14, 19]
    naive = np.asarray(cost).reshape(2, 4).sum(1)            # contiguous split: 13, 20
    assert blocks.max() <= naive.max()


def test_cost_balancing_keeps_the_cohort_order():
    x = jnp.arange(8, dtype=jnp.float32).reshape(8, 1)
    ids = jnp.arange(8, dtype=jnp.int32)
    cost = jnp.array([5, 1, 7, 2, 2, 9, 1, 3], jnp.int32)
    fn = jax.jit(for_each_client(_client_fn(), "shard"))
    a = fn({"scale": jnp.float32(1.0)}, {"x": x}, ids, jax.random.PRNGKey(0))
    b = fn({"scale": jnp.float32(1.0)}, {"x": x}, ids, jax.random.PRNGKey(0), cost=cost)
    np.testing.assert_array_equal(a["y"], b["y"])
    np.testing.assert_array_equal(a["n"], b["n"])


def test_meshes():
    assert make_mesh("loop").devices.size == 1
    assert make_mesh("shard").devices.size == jax.device_count()
