"""The PyTorch FedALA reference (experiments/torch_baseline/fedala.py) agrees with the JAX one.

From identical initial weights (a different JAX init per client, converted to torch), the
identical local batch order (`ClientTrainer.batch_plan`) and the identical ALA samples
(`FedALA.ala_batches`, passed in as the reference's `ala_order`), three rounds of FedALA give
the same global model, client models, BN statistics, ALA weights, ALA epochs, evaluated
'ala' views and train losses to 1e-4. The rounds cover a client's first participation (no
ALA), the start phase (trained until the std of the last 10 epoch losses is below the
threshold) and the one-epoch rounds after it. The torch side takes the weights' gradient from
`.grad` of the mixed parameters (the official ALA.py's rule) and trains one client after
another with torch.optim.SGD, so this is an independent check of the JAX ALA loop (the
chain rule through Eq. 1, the clipping, the stop rule under vmap-free `loop`, partial ALA
batches) and of the per-client state.

torch is an optional extra: without it this module is skipped, unless PFEDLA_REQUIRE_TORCH=1
(CI), in which case a missing torch is an error. The reference runs on every torch device of
tests/test_torch_parity.TORCH_DEVICES (cpu; cuda when there is one), TF32 off.
"""


import pytest

from tests.helpers import import_torch

torch = import_torch()

import jax
import numpy as np

from experiments.torch_baseline.fedala import FedALAServer, parameter_layers
from experiments.torch_baseline.fl import LocalConfig
from experiments.torch_baseline.model import params_from_jax, params_to_jax
from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.fedala import FedALA, FedALAConfig
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.models import layer_names
from tests.test_torch_parity import (  # noqa: F401  (_full_fp32: an autouse fixture)
    LR,
    ROUND_KEY,
    SIZES,
    TORCH_DEVICES,
    _full_fp32,
    _close,
    _cohort,
    _compare_clients,
    _independent_models,
    _plan_order,
    _row,
    _torch_model,
    _torch_states,
)

torch.set_num_threads(1)

BATCH, EPOCHS = 16, 1
# round 0: nobody has trained (no ALA); round 1: client 1's first participation, client 2's
# start phase; round 2: client 0's start phase, client 2's one-epoch ALA
ROUNDS = (np.array([2, 0]), np.array([1, 2]), np.array([0, 2]))
ROUND_KEYS = tuple(jax.random.fold_in(ROUND_KEY, r) for r in range(len(ROUNDS)))


def _jax_fedala(use_bn, momentum, config):
    ds, store, model, _, _ = _cohort(use_bn)
    trainer = ClientTrainer(model, store, LocalTrainConfig(batch_size=BATCH, local_epochs=EPOCHS,
                                                           lr=LR, momentum=momentum), "loop")
    ctx = FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                    num_clients=len(SIZES), input_shape=ds.input_shape, init="common")
    return FedALA(ctx, config), trainer


def _orders(algo, trainer):
    """Torch BatchOrders: round r feeds the JAX trainer's minibatches and ALA sample of
    ROUND_KEYS[r]."""
    plans = [_plan_order(trainer, key) for key in ROUND_KEYS]

    def ala(client_id, round_idx):
        idx, mask = algo.ala_batches(client_id, ROUND_KEYS[round_idx])
        return [torch.from_numpy(i[m].astype(np.int64)) for i, m in zip(idx, mask) if m.any()]

    return (lambda client_id, round_idx: plans[round_idx](client_id, round_idx)), ala


def _torch_weights(server, j):
    """Client j's ALA weights in the JAX layout ({top layer: {leaf}})."""
    state = dict(server.client_states[j])
    state.update(dict(zip(server.top_names, server.weights[j])))
    return params_to_jax(state)[0]


@pytest.mark.slow  # compiles a round and an evaluation per case
@pytest.mark.parametrize("use_bn,momentum,layers", [pytest.param(False, 0.0, 1, id="gray-sgd-p1"),
                                                    pytest.param(True, 0.5, 2, id="bn-momentum-p2")])
@pytest.mark.parametrize("torch_device", TORCH_DEVICES)
def test_fedala_three_rounds_parity(use_bn, momentum, layers, torch_device):
    n = len(SIZES)
    data = _cohort(use_bn)[4]
    config = FedALAConfig(layers=layers)
    algo, trainer = _jax_fedala(use_bn, momentum, config)
    state = _independent_models(algo.init(jax.random.PRNGKey(0)), use_bn)
    order, ala = _orders(algo, trainer)
    server = FedALAServer(
        _torch_model(use_bn), data, order, LocalConfig(lr=LR, momentum=momentum), ala_order=ala,
        layers=layers, eta=config.eta, threshold=config.threshold, num_pre_loss=config.num_pre_loss,
        max_start_epochs=config.max_start_epochs,
        client_states=_torch_states(state["client_params"], state["batch_stats"]),
        global_params=params_from_jax(jax.tree.map(np.asarray, state["global_params"]),
                                      _row(state["batch_stats"], 0)),
        device=torch_device)
    top = algo.top
    assert len(server.top_names) == 2 * layers
    assert [g[0].split(".")[0] for g in parameter_layers(server.model)][-layers:] == [t.lower() for t in top]

    epochs = []
    for r, participants in enumerate(ROUNDS):
        state, info = algo.round(state, r, participants, ROUND_KEYS[r])
        tinfo = server.round(r, participants)
        tag = f"round {r}"
        np.testing.assert_array_equal(tinfo["ala_epochs"], np.asarray(info["ala_epochs"]))
        epochs.append(tinfo["ala_epochs"])
        np.testing.assert_allclose(tinfo["num_examples"], np.asarray(info["num_examples"]))
        np.testing.assert_allclose(tinfo["loss_sum"], np.asarray(info["loss_sum"]), rtol=1e-4)
        _close(f"{tag} global", params_to_jax(server.global_params)[0],
               jax.tree.map(np.asarray, state["global_params"]))
        _compare_clients(f"{tag} fedala", server.client_states, state["client_params"],
                         state["batch_stats"])
        np.testing.assert_array_equal(np.asarray(state["trained"])[:n], server.trained)
        np.testing.assert_array_equal(np.asarray(state["started"])[:n], [not s for s in server.start_phase])
        mixed = algo.evaluate(state, r, jax.random.PRNGKey(9)).views["ala"]
        for j in range(n):
            want = _torch_weights(server, j)
            _close(f"{tag} W", {k: want[k] for k in top}, _row(state["ala_weights"], j))
            p, s = params_to_jax(server.mixed(j))
            _close(f"{tag} 'ala' view", p, _row(mixed.params, j))
            _close(f"{tag} 'ala' view batch_stats", s, _row(mixed.batch_stats, j))
    # what ran: no ALA in round 0 or at a first participation, the start phase (>= 11
    # epochs) at a second, then one epoch
    assert epochs[0] == [0, 0] and epochs[1][0] == 0 and epochs[1][1] >= 11
    assert epochs[2][0] >= 11 and epochs[2][1] == 1
    # the weights really moved away from 1 (and not all to a bound)
    w = np.concatenate([np.ravel(a) for a in jax.tree.leaves(_row(state["ala_weights"], 2))])
    assert np.mean(w < 1.0) > 0.05 and np.mean((w > 0.0) & (w < 1.0)) > 0.01
