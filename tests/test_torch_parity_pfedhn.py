"""The PyTorch pFedHN (experiments/torch_baseline/pfedhn.py) agrees with pfedla_jax's.

From identical weights (our hypernetwork converted to the torch `CNNHyper`, whose heads emit
the torch layout) and the identical batch order (`ClientTrainer.batch_plan`), one round of
each semantics gives the same generated models, client models, BN statistics and
hypernetwork to 1e-4, and the same hypernetwork update to 0.1% of its size. The torch side
generates with nn.Embedding/nn.Linear, trains clients one after another with
torch.optim.SGD, and steps the hypernetwork with torch.autograd.grad,
clip_grad_norm_ and torch.optim.SGD (param groups, momentum, weight decay): an independent
check of the batched VJP, of the optax chain and of the round semantics.

torch is an optional extra: without it this module is skipped, unless PFEDLA_REQUIRE_TORCH=1
(CI), in which case a missing torch is an error. The reference runs on every torch device of
tests/test_torch_parity.TORCH_DEVICES (cpu; cuda when there is one), TF32 off.
"""


import pytest

from tests.helpers import import_torch

torch = import_torch()

import functools

import jax
import numpy as np

from experiments.torch_baseline import (
    ClientData,
    CNNHyper,
    CNNTarget,
    LocalConfig,
    PFedHNServer,
    params_from_jax,
    params_to_jax,
    pfedhn_from_jax,
    pfedhn_to_jax,
    shuffled_batches,
    synthetic_client_data,
)
from experiments.torch_baseline.parity import disjoint_splits, plan_order as _plan_order, row as _row
from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.pfedhn import PFedHN, PFedHNConfig
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.models import layer_names, make_cnn
from tests.helpers import store_from_indices, synthetic
from tests.test_torch_parity import TORCH_DEVICES, _full_fp32  # noqa: F401  (an autouse fixture)

torch.set_num_threads(1)   # (see tests/test_torch_parity.py)

ATOL = 1e-4
LR = 0.05
# batch 16, 2 epochs = 6 steps: 16+16+8 twice | (16+5) twice + 2 padding steps | (16+14) twice + 2
SIZES = (40, 21, 30)
PARTICIPANTS = np.array([2, 0])  # client 1 sits out; order matters for 'sequential'
ROUND_KEY = jax.random.PRNGKey(5)


@functools.cache
def _cohort(use_bn: bool):
    """(dataset, store, model, trainer, torch data) for the gray (no BN) or RGB (BN) model."""
    ds = synthetic("synthetic_rgb" if use_bn else "synthetic")
    train, tests = disjoint_splits(len(ds.labels), SIZES)
    store = store_from_indices(ds, train, tests)
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=use_bn)
    trainer = ClientTrainer(model, store, LocalTrainConfig(batch_size=16, local_epochs=2, lr=LR), "loop")
    counts = np.asarray(store.train_count)
    data = ClientData.from_arrays(np.asarray(store.images), np.asarray(store.labels),
                                  [np.asarray(store.train_idx)[i, :counts[i]] for i in range(len(SIZES))],
                                  np.asarray(store.mean), np.asarray(store.std))
    return ds, store, model, trainer, data


def _torch_model(use_bn):
    ds = _cohort(use_bn)[0]
    h, w, c = ds.input_shape
    return CNNTarget(in_channels=c, num_classes=ds.num_classes, use_bn=use_bn, input_hw=(h, w))



def _diff(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    worst = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert a.shape == b.shape
        worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
    return worst


def _close(name, got, want, atol=ATOL):
    worst = _diff(got, want)
    print(f"max |jax - torch| {name}: {worst:.2e}")
    assert worst <= atol, f"{name}: max abs difference {worst:.3e} > {atol}"


def _generated_to_jax(weights):
    return params_to_jax({k: v.detach() for k, v in weights.items()})[0]


CASES = [  # (each case compiles one round program: two, for the CPU budget)
    pytest.param("synchronous", False, 50.0, id="sync"),
    pytest.param("sequential", True, 0.05, id="seq-bn-clipped"),
]


@pytest.mark.slow  # compiles a round per case
@pytest.mark.parametrize("semantics,use_bn,clip", CASES)
@pytest.mark.parametrize("torch_device", TORCH_DEVICES)
def test_pfedhn_round_parity(semantics, use_bn, clip, torch_device):
    n = len(SIZES)
    _, store, model, trainer, data = _cohort(use_bn)
    ds = _cohort(use_bn)[0]
    ctx = FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                    num_clients=n, input_shape=ds.input_shape)
    # lr 0.5 with wd 1e-3 and momentum 0.9: the step is visible (> 1e-3) in one round
    # the reference trains clients with fl.train_client, without the official client clip
    cfg = PFedHNConfig(hn_lr=0.5, embed_lr=0.3, hn_clip=clip, semantics=semantics, client_clip=0.0)
    algo = PFedHN(ctx, cfg)
    state = algo.init(jax.random.PRNGKey(0))

    tmodel = _torch_model(use_bn)
    hyper = CNNHyper(tmodel, n_nodes=n, embedding_dim=cfg.resolved_embed_dim(n),
                     hidden_dim=cfg.hidden_dim, n_hidden=cfg.n_hidden)
    hyper.load_state_dict(pfedhn_from_jax(state["hn_params"], tmodel))
    # the converters round-trip exactly (the heads' rows are only permuted)
    for a, b in zip(jax.tree.leaves(pfedhn_to_jax(hyper.state_dict(), tmodel)),
                    jax.tree.leaves(state["hn_params"]), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    # the torch hypernetwork generates our models, in the torch layout
    with torch.no_grad():
        for j in range(n):
            _close("generated before", _generated_to_jax(hyper(j)), _row(state["client_params"], j), 1e-5)

    server = PFedHNServer(tmodel, data, _plan_order(trainer, ROUND_KEY), LocalConfig(lr=LR), hnet=hyper,
                          client_states=[params_from_jax(_row(state["client_params"], j),
                                                         _row(state["batch_stats"], j)) for j in range(n)],
                          hn_lr=cfg.hn_lr, embed_lr=cfg.embed_lr, hn_momentum=cfg.hn_momentum,
                          hn_weight_decay=cfg.hn_weight_decay, hn_clip=clip, semantics=semantics,
                          device=torch_device)
    assert next(hyper.parameters()).device.type == torch_device
    new_state, info = algo.round(state, 0, PARTICIPANTS, ROUND_KEY)
    tinfo = server.round(0, PARTICIPANTS)

    np.testing.assert_allclose(tinfo["num_examples"], np.asarray(info["num_examples"]))
    np.testing.assert_allclose(tinfo["loss_sum"], np.asarray(info["loss_sum"]), rtol=1e-4)
    # every client's stored model (the 'local' view) and BN statistics (client 1 untouched)
    for j, tstate in enumerate(server.client_states):
        p, s = params_to_jax(tstate)
        _close("client params", p, _row(new_state["client_params"], j))
        _close("batch_stats", s, _row(new_state["batch_stats"], j))
    # the hypernetwork, its update (to 0.1% of its size, and not vacuous), the generated models
    before = jax.tree.map(np.asarray, state["hn_params"])
    after_torch = pfedhn_to_jax(hyper.state_dict(), tmodel)
    _close("hn params", after_torch, new_state["hn_params"])
    want = jax.tree.map(np.subtract, jax.tree.map(np.asarray, new_state["hn_params"]), before)
    got = jax.tree.map(np.subtract, after_torch, before)
    moved = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(want))
    assert moved > 1e-3, moved
    _close("hn update", got, want, atol=1e-3 * moved)
    generated = algo.generated_params(new_state)
    for j, weights in enumerate(server.generated_models()):
        _close("generated after", _generated_to_jax(weights), _row(generated, j))
    # the non-participant's embedding moved too (weight decay + momentum on every row)
    assert np.max(np.abs(want["embedding"][1])) > 0
    # one step per participant or one per round; the clipped case really clips
    assert len(server.grad_norms) == (len(PARTICIPANTS) if semantics == "sequential" else 1)
    print("hypernetwork gradient norms", server.grad_norms)
    assert all(g > clip for g in server.grad_norms) == (clip < 50)


def test_standalone_torch_rounds_smoke():
    """The reference runs on its own (random DataLoader order, torch's own init)."""
    torch.manual_seed(0)
    data = synthetic_client_data(num_clients=3, examples_per_client=20)
    order = shuffled_batches(data, batch_size=8, local_steps=4)
    for semantics in ("synchronous", "sequential"):
        net = CNNTarget(1, 10)
        server = PFedHNServer(net, data, order, LocalConfig(lr=0.05), semantics=semantics,
                              hnet=CNNHyper(net, n_nodes=3, embedding_dim=int(1 + 3 / 4)))
        g0 = server.generated_models()
        info = server.round(0, [0, 2])
        assert info["num_examples"] == [28, 28]
        g1 = server.generated_models()
        assert all(not torch.equal(a["fc3.weight"], b["fc3.weight"]) for a, b in zip(g0, g1))
        assert g1[0]["conv1.weight"].shape == (16, 1, 5, 5)
