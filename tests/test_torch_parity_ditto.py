"""The PyTorch Ditto reference (experiments/torch_baseline/ditto.py) agrees with the JAX one.

From identical initial weights (one global model; a different JAX init per client's
personal model, converted to torch) and the identical batch order (`ClientTrainer.
batch_plan`), two rounds of Ditto (participants [2, 0], then [1, 2]: client 2 trains twice,
its personal model persisting) give the same global model, personal models, both BN
statistics stacks, evaluated views and train losses to 1e-4. The torch side trains one
client after another with two nn.Modules and two torch.optim.SGD, the proximal gradient
added to `.grad`, so this is an independent check of the interleaved stacked update, the
fixed anchor w^t and the per-client state.

torch is an optional extra: without it this module is skipped, unless PFEDLA_REQUIRE_TORCH=1
(CI), in which case a missing torch is an error. The reference runs on every torch device of
tests/test_torch_parity.TORCH_DEVICES (cpu; cuda when there is one), TF32 off.
"""


import pytest

from tests.helpers import import_torch

torch = import_torch()

import jax
import jax.numpy as jnp
import numpy as np

from experiments.torch_baseline.ditto import DittoServer
from experiments.torch_baseline.fl import LocalConfig
from experiments.torch_baseline.model import params_from_jax, params_to_jax
from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.ditto import Ditto, DittoConfig
from pfedla_jax.models import init_variables, layer_names
from tests.test_torch_parity import (  # noqa: F401  (_full_fp32: an autouse fixture)
    LR,
    ROUND_KEY,
    SIZES,
    TORCH_DEVICES,
    _full_fp32,
    _close,
    _cohort,
    _plan_order,
    _row,
    _torch_model,
)

torch.set_num_threads(1)

LAM = 0.5
ROUNDS = (np.array([2, 0]), np.array([1, 2]))
ROUND_KEYS = (ROUND_KEY, jax.random.fold_in(ROUND_KEY, 1))


def _jax_ditto(use_bn):
    """Ditto on the parity cohort (batch 16, 2 local epochs, lr LR), its initial state with
    a different personal model per client, and its trainer (whose batch plan both follow)."""
    ds, store, model, trainer, _ = _cohort(use_bn)
    ctx = FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                    num_clients=len(SIZES), input_shape=ds.input_shape, init="common")
    algo = Ditto(ctx, DittoConfig(lam=LAM))
    state = algo.init(jax.random.PRNGKey(0))
    inits = [init_variables(model, jax.random.PRNGKey(300 + j), ds.input_shape) for j in range(len(SIZES))]
    stack = lambda key: jax.tree.map(lambda *a: jnp.stack(a), *[v[key] for v in inits])
    return algo, {**state, "personal_params": stack("params"), "personal_stats": stack("batch_stats")}


def _round_order(trainer):
    per_round = [_plan_order(trainer, key) for key in ROUND_KEYS]
    return lambda client_id, round_idx: per_round[round_idx](client_id, round_idx)


@pytest.mark.slow  # compiles a round and an evaluation per case
@pytest.mark.parametrize("use_bn", [pytest.param(False, id="gray"), pytest.param(True, id="bn")])
@pytest.mark.parametrize("torch_device", TORCH_DEVICES)
def test_ditto_two_rounds_parity(use_bn, torch_device):
    n = len(SIZES)
    data = _cohort(use_bn)[4]
    algo, state = _jax_ditto(use_bn)
    row = lambda tree, j: params_from_jax(_row(tree[0], j), _row(tree[1], j))
    server = DittoServer(
        _torch_model(use_bn), data, _round_order(algo.trainer), LocalConfig(lr=LR), lam=LAM,
        client_states=[row((state["personal_params"], state["batch_stats"]), j) for j in range(n)],
        global_params=params_from_jax(jax.tree.map(np.asarray, state["global_params"]),
                                      _row(state["batch_stats"], 0)),
        personal_states=[row((state["personal_params"], state["personal_stats"]), j) for j in range(n)],
        device=torch_device)
    assert server.global_params["conv1.weight"].device.type == torch_device
    for r, participants in enumerate(ROUNDS):
        before = jax.tree.map(np.asarray, state)
        state, info = algo.round(state, r, participants, ROUND_KEYS[r])
        tinfo = server.round(r, participants)
        tag = f"round {r}"
        np.testing.assert_allclose(tinfo["num_examples"], np.asarray(info["num_examples"]))
        np.testing.assert_allclose(tinfo["loss_sum"], np.asarray(info["loss_sum"]), rtol=1e-4)
        _close(f"{tag} global", params_to_jax(server.global_params)[0],
               jax.tree.map(np.asarray, state["global_params"]))
        views = algo.evaluate(state, r, jax.random.PRNGKey(9)).views
        for j in range(n):
            p, s = params_to_jax(server.personal_states[j])
            _close(f"{tag} personal params {j}", p, _row(state["personal_params"], j))
            _close(f"{tag} personal stats {j}", s, _row(state["personal_stats"], j))
            _close(f"{tag} '' view {j}", p, _row(views[""].params, j))
            p, s = params_to_jax(server.global_view(j))
            _close(f"{tag} global-model stats {j}", s, _row(state["batch_stats"], j))
            _close(f"{tag} 'global' view {j}", p, jax.tree.map(np.asarray, views["global"].params))
            # a client sitting out keeps its personal model bit for bit
            if j not in participants:
                for a, b in zip(jax.tree.leaves(_row(state["personal_params"], j)),
                                jax.tree.leaves(_row(before["personal_params"], j))):
                    np.testing.assert_array_equal(a, b)
        # the personal models moved, and differ from the global model
        for j in participants:
            moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
                jax.tree.leaves(_row(state["personal_params"], j)), jax.tree.leaves(_row(before["personal_params"], j))))
            assert moved > 1e-3, (tag, j)
