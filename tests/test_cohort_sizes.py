"""Cohort sizes on every algorithm finish under `shard` and equal `loop`.

A round is one jitted program, compiled per cohort size S (the participants' ids are an
argument of shape [S]). The sharded path pads a cohort that does not divide over the host
devices, slices it and mixes client-sharded with replicated arrays; an earlier engine that
did this eagerly could deadlock (an all-gather that never completed). This test runs cohorts
of sizes from 1 to 2 x devices + 1 through several rounds of each registered algorithm, on
the sharded path and on the single-device loop, and compares the states and metrics.

Every case compiles a round program per cohort size and an evaluation program, on each path:
slow.
"""

import jax
import numpy as np
import pytest

from pfedla_jax.algorithms import algorithm_names
from pfedla_jax.core.local_training import LocalTrainConfig
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.config import ExperimentConfig, RunOptions
from pfedla_jax.training.loop import build_experiment, evaluate_round


# local training: 3 steps; for an algorithm whose options count in epochs (FedRep splits them
# into head and body epochs), 2 epochs: 40 examples x 70% / 8 = 4 steps each
STEPS = LocalTrainConfig(batch_size=8, local_steps=3, lr=0.02)
EPOCHS = LocalTrainConfig(batch_size=8, local_epochs=2, lr=0.02)


def _config(algorithm: str, rounds: int) -> ExperimentConfig:
    devices = jax.device_count()
    common = dict(algorithm=algorithm, dataset="synthetic", synthetic_per_class=30,
                  num_clients=2 * devices + 1, samples_per_client=40, rounds=rounds,
                  partition="noniid1", classes_per_client=4, seed=5)
    try:
        return ExperimentConfig(**common, train=STEPS)
    except UserInputError:
        return ExperimentConfig(**common, train=EPOCHS)


def _rounds(algorithm: str, strategy: str, cohorts):
    config = _config(algorithm, len(cohorts))
    exp = build_experiment(config, RunOptions(client_parallelism=strategy))
    algo = exp.algorithm
    state = algo.init(exp.keys.init)
    infos = []
    for t, ids in enumerate(cohorts):
        state, info = algo.round(state, t, np.asarray(ids, np.int32), exp.round_key(t))
        infos.append(jax.device_get(info))
    # the evaluation program runs on the final state too (every view, every client)
    record, _ = evaluate_round(exp, state, len(cohorts))
    return jax.device_get(state), infos, record, exp.context.num_stored


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", algorithm_names())
def test_every_cohort_size_under_shard_equals_loop(algorithm):
    devices = jax.device_count()
    assert devices == 2, "conftest splits the host into two devices"
    n = 2 * devices + 1
    rng = np.random.default_rng(0)
    # sizes 1..2D+1, each a random subset (sorted, as the participation schedule draws them).
    # Every size compiles its own round, so most algorithms run the sizes that do not divide
    # over the devices (1, D+1, 2D+1: where the padding and the split happen) and pFedLA
    # (whose server step mixes every pair of clients of the cohort) runs them all.
    sizes = range(1, n + 1) if algorithm == "pfedla" else range(1, n + 1, 2)
    cohorts = [np.sort(rng.choice(n, size, replace=False)) for size in sizes]
    shard_state, shard_infos, shard_record, stored = _rounds(algorithm, "shard", cohorts)
    loop_state, loop_infos, loop_record, _ = _rounds(algorithm, "loop", cohorts)
    assert stored >= n
    # the sharded contractions sum partial results per device: equal up to float rounding
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    for key in shard_state:
        a, b = shard_state[key], loop_state[key]
        leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
        assert len(leaves_a) == len(leaves_b), key
        for x, y in zip(leaves_a, leaves_b):
            if x.ndim and x.shape[0] != y.shape[0]:   # the shard state is padded to the mesh
                x, y = x[:n], y[:n]
            close(x, y)
    for a, b, ids in zip(shard_infos, loop_infos, cohorts):
        assert set(a) == set(b)
        for key in a:
            assert np.shape(a[key])[:1] == np.shape(b[key])[:1], key
            close(a[key], b[key])
        assert np.shape(a["num_examples"]) == (len(ids),)
    assert set(shard_record) == set(loop_record)
    for key, value in loop_record.items():
        if key.endswith("_per_client"):
            assert len(shard_record[key]) == len(value) == n, key
        close(shard_record[key], value)
