"""The PyTorch FedRep reference (experiments/torch_baseline/fedrep.py) agrees with the JAX one.

From identical initial weights (a different JAX init per client, so the heads differ,
converted to torch) and the identical batch order (`ClientTrainer.batch_plan`), two rounds
of FedRep (local_epochs=2: 1 head epoch, then 1 body epoch) give the same global body,
client models, BN statistics, evaluated personalised models and train losses to 1e-4. The
torch side freezes with requires_grad and trains each phase with a fresh torch.optim.SGD,
one client after another, so this is an independent check of the JAX phase masks (per
client epoch boundaries, clients of different sizes, padding steps) and of the
body-only aggregation.

torch is an optional extra: without it this module is skipped, unless PFEDLA_REQUIRE_TORCH=1
(CI), in which case a missing torch is an error. The reference runs on every torch device of
tests/test_torch_parity.TORCH_DEVICES (cpu; cuda when there is one), TF32 off.
"""


import pytest

from tests.helpers import import_torch

torch = import_torch()

import jax
import numpy as np

from experiments.torch_baseline.fedrep import FedRepServer, train_phase
from experiments.torch_baseline.fl import LocalConfig, shuffled_batches, synthetic_client_data
from experiments.torch_baseline.model import CNNTarget, params_from_jax, params_to_jax
from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.fedrep import FedRep, FedRepConfig
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

# Tiny shapes: torch's intra-op threads only contend with XLA's on a small CI machine.
torch.set_num_threads(1)

BATCH, EPOCHS, BODY_EPOCHS = 16, 2, 1
# batch 16: 3 / 2 / 2 batches per epoch (40 / 21 / 30 examples), so the head->body switch
# falls at step 3 for client 0 and at step 2 for clients 1 and 2 (then 2 padding steps)
ROUNDS = (np.array([2, 0]), np.array([1, 2]))  # round 0: client 1 sits out; round 1: client 0
ROUND_KEYS = (ROUND_KEY, jax.random.fold_in(ROUND_KEY, 1))
HEAD = "FC3"


def _jax_fedrep(use_bn, momentum):
    """The JAX FedRep and the trainer whose batch plan both sides follow."""
    ds, store, model, _, _ = _cohort(use_bn)
    trainer = ClientTrainer(model, store, LocalTrainConfig(batch_size=BATCH, local_epochs=EPOCHS,
                                                           lr=LR, momentum=momentum), "loop")
    ctx = FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                    num_clients=len(SIZES), input_shape=ds.input_shape, init="common")
    return FedRep(ctx, FedRepConfig(head=HEAD, body_epochs=BODY_EPOCHS)), trainer


def _round_order(trainer):
    """A torch BatchOrder: round r feeds the JAX trainer's minibatches of ROUND_KEYS[r]."""
    per_round = [_plan_order(trainer, key) for key in ROUND_KEYS]
    return lambda client_id, round_idx: per_round[round_idx](client_id, round_idx)


def _body(params):
    return {k: v for k, v in params.items() if k != HEAD}


def _max_diff(a, b):
    return max((float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)), default=0.0)


@pytest.mark.slow  # compiles a round and an evaluation per case
@pytest.mark.parametrize("use_bn,momentum", [pytest.param(False, 0.0, id="gray-sgd"),
                                             pytest.param(True, 0.5, id="bn-momentum")])
@pytest.mark.parametrize("torch_device", TORCH_DEVICES)
def test_fedrep_two_rounds_parity(use_bn, momentum, torch_device):
    n = len(SIZES)
    data = _cohort(use_bn)[4]
    algo, trainer = _jax_fedrep(use_bn, momentum)
    state = _independent_models(algo.init(jax.random.PRNGKey(0)), use_bn)
    global0 = jax.tree.map(np.asarray, state["global_params"])
    server = FedRepServer(_torch_model(use_bn), data, _round_order(trainer),
                          LocalConfig(lr=LR, momentum=momentum), batch_size=BATCH,
                          local_epochs=EPOCHS, body_epochs=BODY_EPOCHS,
                          client_states=_torch_states(state["client_params"], state["batch_stats"]),
                          global_body=params_from_jax(global0, _row(state["batch_stats"], 0)),
                          device=torch_device)
    assert server.global_body["conv1.weight"].device.type == torch_device
    assert server.head_names == ["fc3.weight", "fc3.bias"]
    assert all(not k.startswith("fc3.") for k in server.body_names)

    # the phase split really is the client's own epochs: each covers its train set once
    for cid, count in enumerate(SIZES):
        head_b, body_b = server.phase_batches(cid, 0)
        per_epoch = -(-count // BATCH)
        assert len(head_b) == per_epoch and all(len(b) for b in head_b)
        assert all(len(b) for b in body_b[:per_epoch]) and not any(len(b) for b in body_b[per_epoch:])
        own = np.sort(data.train_indices[cid].numpy())
        np.testing.assert_array_equal(np.sort(torch.cat(head_b).numpy()), own)
        np.testing.assert_array_equal(np.sort(torch.cat(body_b).numpy()), own)

    for r, participants in enumerate(ROUNDS):
        before = jax.tree.map(np.asarray, state)
        start_global = jax.tree.map(np.asarray, state["global_params"])
        state, info = algo.round(state, r, participants, ROUND_KEYS[r])
        tinfo = server.round(r, participants)
        tag = f"round {r}"

        np.testing.assert_allclose(tinfo["num_examples"], np.asarray(info["num_examples"]))
        np.testing.assert_allclose(tinfo["loss_sum"], np.asarray(info["loss_sum"]), rtol=1e-4)
        # the global body (the head of JAX's global model is unused and keeps its start value)
        _close(f"{tag} global body", params_to_jax(server.global_body)[0],
               _body(jax.tree.map(np.asarray, state["global_params"])))
        np.testing.assert_array_equal(np.asarray(state["global_params"][HEAD]["kernel"]),
                                      global0[HEAD]["kernel"])
        # every client's stored model and BN statistics (the sitting-out one untouched)
        _compare_clients(f"{tag} fedrep", server.client_states, state["client_params"],
                         state["batch_stats"])
        # the evaluated personalised models: global body + own head + own BN statistics
        personal = algo.evaluate(state, r, jax.random.PRNGKey(9)).views[""]
        for j in range(n):
            p, s = params_to_jax(server.personalized(j))
            _close(f"{tag} personalised params", p, _row(personal.params, j))
            _close(f"{tag} personalised batch_stats", s, _row(personal.batch_stats, j))
            # = JAX's new global body + that client's stored head
            _close(f"{tag} personalised = global body + own head", _row(personal.params, j),
                   {**jax.tree.map(np.asarray, state["global_params"]),
                    HEAD: _row(state["client_params"], j)[HEAD]}, atol=0.0)

        # the phases did something: every participant's head moved (head phase) and its
        # stored body moved away from the global body it started from (body phase); the
        # clients sitting out kept everything, bit for bit
        for j in range(n):
            stored = _row(state["client_params"], j)
            old = _row(before["client_params"], j)
            if j in participants:
                assert _max_diff(stored[HEAD], old[HEAD]) > 1e-3, (tag, j)
                assert _max_diff(_body(stored), _body(start_global)) > 1e-3, (tag, j)
            else:
                assert _max_diff(stored, old) == 0.0
                assert _max_diff(_row(state["batch_stats"], j), _row(before["batch_stats"], j)) == 0.0
        if use_bn:  # BN statistics moved for the participants (updated in both phases)
            for j in participants:
                assert _max_diff(_row(state["batch_stats"], j), _row(before["batch_stats"], j)) > 1e-4
    # client 2 trained in both rounds: round 1 started from its round-0 head (checked by
    # the parity above); client 1 from its own initial head, different from client 2's
    assert _max_diff(_row(before["client_params"], 1)[HEAD], _row(before["client_params"], 2)[HEAD]) > 1e-2


def test_fedrep_phases_freeze_the_other_part():
    """The torch reference alone: after a head-only round (pure head phase) the stored
    body is the global body bit for bit; a body phase never moves the trained head."""
    torch.manual_seed(0)
    data = synthetic_client_data(num_clients=3, examples_per_client=20)
    order = shuffled_batches(data, batch_size=8, local_epochs=2)
    server = FedRepServer(CNNTarget(1, 10), data, order, LocalConfig(lr=0.05, momentum=0.9),
                          batch_size=8, local_epochs=2, body_epochs=1, init="independent")
    start = [dict(s) for s in server.client_states]
    body0 = {k: v.clone() for k, v in server.global_body.items()}
    # head phase alone: run the client's head batches through the phase trainer
    server.model.load_state_dict({**server.client_states[0], **server.global_body})
    head_b, body_b = server.phase_batches(0, 0)
    assert [len(b) for b in head_b] == [8, 8, 4] and [len(b) for b in body_b] == [8, 8, 4]
    train_phase(server.model, data, head_b, server.head_names, server.local)
    after_head = {k: v.detach().clone() for k, v in server.model.state_dict().items()}
    assert all(torch.equal(after_head[k], body0[k]) for k in server.body_names)
    assert not torch.equal(after_head["fc3.weight"], start[0]["fc3.weight"])
    train_phase(server.model, data, body_b, server.body_names, server.local)
    after_body = server.model.state_dict()
    assert all(torch.equal(after_body[k], after_head[k]) for k in server.head_names)
    assert not torch.equal(after_body["conv1.weight"], body0["conv1.weight"])
    # a full round: heads stay with the clients, only bodies are averaged
    info = server.round(0, [2, 0])
    assert info["num_examples"] == [40, 40]
    assert torch.equal(server.client_states[1]["fc3.weight"], start[1]["fc3.weight"])
    assert not torch.equal(server.client_states[0]["fc3.weight"], server.client_states[2]["fc3.weight"])
    avg = (server.client_states[0]["conv1.weight"] + server.client_states[2]["conv1.weight"]) / 2
    assert torch.allclose(server.global_body["conv1.weight"], avg, atol=1e-6)
    assert "fc3.weight" not in server.global_body
