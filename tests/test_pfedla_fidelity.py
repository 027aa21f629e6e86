"""What pFedLA learns: the paper's Fig. 5 ordering on the Fig. 5 partition, no
dead alpha rows, and an update whose size does not depend on the clients' step size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.plots import client_groups
from pfedla_jax.algorithms.pfedla import (PFedLAConfig, delta_sq_norms, hn_cotangent,
                                          normalized_cotangent)
from pfedla_jax.core.layers import make_layer_map
from pfedla_jax.core.local_training import LocalTrainConfig
from pfedla_jax.errors import UserInputError
from pfedla_jax.models.hypernetwork import HNConfig
from pfedla_jax.training.config import ExperimentConfig, RunOptions
from pfedla_jax.training.loop import build_experiment


@pytest.fixture(scope="module")
def fig5_run():
    """pFedLA with its defaults on the Fig. 5 partition (30 rounds: the early, gradual phase)."""
    cfg = ExperimentConfig(
        algorithm="pfedla", dataset="synthetic", synthetic_per_class=100, partition="fig5",
        num_clients=8, classes_per_client=4, samples_per_client=40, rounds=30, seed=0,
        train=LocalTrainConfig(batch_size=16, local_steps=10, lr=0.05),
        algorithm_config=PFedLAConfig(hn_lr=0.1))
    exp = build_experiment(cfg)
    algo = exp.algorithm
    state = algo.init(exp.keys.init)
    for t in range(cfg.rounds):
        state, _ = algo.round(state, t, exp.schedule[t], exp.round_key(t))
    alpha = np.asarray(algo.all_alpha(state)[0])                       # [N, L, N]
    hist = np.zeros((cfg.num_clients, 10), int)
    for c, classes in enumerate(exp.partition.client_classes):
        hist[c, list(classes)] = 1
    return alpha, client_groups(hist, 0), list(exp.context.layer_order)


@pytest.mark.slow
def test_fig5_target_weights_self_same_similar_others(fig5_run):
    alpha, groups, layers = fig5_run
    assert list(groups[:3]) == [0, 1, 2] and np.all(groups[3:] == 3)   # the partition's roles
    fc = [l for l, name in enumerate(layers) if name.startswith("FC")]
    assert len(fc) == 3
    for l in fc:
        w = alpha[0, l]
        self_w, same, similar, others = w[0], w[groups == 1].mean(), w[groups == 2].mean(), w[groups == 3].mean()
        assert self_w >= same > similar > others, (layers[l], w)
    # the first conv layer stays shared: its self-weight well below the FC layers'
    assert alpha[0, 0, 0] < min(alpha[0, l, 0] for l in fc)


@pytest.mark.slow
def test_no_alpha_row_is_one_hot_after_training(fig5_run):
    alpha, _, _ = fig5_run
    assert np.all(alpha.max(-1) < 1.0)
    assert np.all(alpha > 0)                     # every client keeps a (small) weight: no dead score
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-5)


def _params(rng, n):
    shapes = {"Conv1": {"kernel": (5, 5, 1, 4), "bias": (4,)}, "FC1": {"kernel": (6, 3), "bias": (3,)}}
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal((n,) + s), jnp.float32),
                        shapes, is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("cotangent", ["model", "layer"])
def test_first_update_reference_makes_the_step_independent_of_the_client_step_size(cotangent):
    """Scaling every update of a client (a larger lr or budget) by c scales its reference by
    c too: the cotangent is unchanged. A client whose updates shrink relative to its first
    gets a proportionally smaller cotangent (the step anneals); the raw cotangent scales."""
    rng = np.random.default_rng(0)
    stacked, delta = _params(rng, 5), _params(rng, 3)
    lm = make_layer_map(jax.tree.map(lambda a: a[0], stacked), ("Conv1", "FC1"), "layer")
    first = jax.tree.map(lambda d: 3.0 * d + 0.1, delta)                # the clients' first updates
    ref = delta_sq_norms(first, lm)
    retained = jnp.zeros((3, lm.num_layers), bool)
    base = hn_cotangent(stacked, delta, lm, 5, retained, cotangent, delta_sq=ref)
    for c in (1e-3, 0.1, 40.0):
        got = hn_cotangent(stacked, jax.tree.map(lambda d: c * d, delta), lm, 5, retained, cotangent,
                           delta_sq=c * c * ref)
        np.testing.assert_allclose(got, base, rtol=2e-4, atol=1e-6)
    # halving this round's update relative to the reference halves the cotangent
    half = hn_cotangent(stacked, jax.tree.map(lambda d: 0.5 * d, delta), lm, 5, retained, cotangent,
                        delta_sq=ref)
    np.testing.assert_allclose(half, 0.5 * base, rtol=2e-4, atol=1e-6)
    # with the current update as reference the size never changes
    current = normalized_cotangent(stacked, jax.tree.map(lambda d: 0.5 * d, delta), lm, 5, scope=cotangent)
    np.testing.assert_allclose(current, normalized_cotangent(stacked, delta, lm, 5, scope=cotangent),
                               rtol=2e-4, atol=1e-6)


@pytest.mark.slow
def test_reference_is_the_first_update_and_kept():
    """With --hn_delta_reference=first, delta_ref holds each client's first |delta|^2 per
    layer; later rounds leave it (the default, `current`, keeps no such entry)."""
    cfg = ExperimentConfig(
        algorithm="pfedla", dataset="synthetic", synthetic_per_class=30, num_clients=4,
        samples_per_client=40, rounds=3, seed=1, participation=0.5,
        train=LocalTrainConfig(batch_size=8, local_steps=2, lr=0.05),
        algorithm_config=PFedLAConfig(hn_delta_reference="first"))
    exp = build_experiment(cfg, RunOptions(client_parallelism="loop"))
    algo = exp.algorithm
    state = algo.init(exp.keys.init)
    seen = {}
    for t, ids in enumerate(([0, 1], [1, 2], [0, 3])):
        before = np.asarray(state["delta_ref"])
        state, _ = algo.round(state, t, np.array(ids, np.int32), exp.round_key(t))
        after = np.asarray(state["delta_ref"])
        for i in range(4):
            if i in ids and i not in seen:
                assert np.all(after[i] > 0) and np.all(before[i] == 0)
                seen[i] = after[i]
            elif i in seen:
                np.testing.assert_array_equal(after[i], seen[i])
            else:
                assert np.all(after[i] == 0)
    assert sorted(seen) == [0, 1, 2, 3]


def test_zero_heads_need_softmax():
    HNConfig().validate()                                               # softmax, zeros: the default
    HNConfig(normalization="relu").validate()                           # auto -> U(0, 1) heads
    assert HNConfig(normalization="relu").resolved_head_init == "uniform"
    with pytest.raises(UserInputError, match="needs --hn_normalization=softmax"):
        HNConfig(normalization="relu", head_init="zeros").validate()
    with pytest.raises(UserInputError, match="hn_delta_reference"):
        PFedLAConfig(hn_delta_reference="last").validate()
