"""The PyTorch reference (experiments/torch_baseline) agrees with the JAX implementation.

From identical initial weights (JAX init, converted to torch) and the identical batch order
(`ClientTrainer.batch_plan`), one round of pFedLA (synchronous and sequential) and of FedAvg
give the same client models, BN statistics, alpha and hypernetwork params to 1e-4. The
torch side trains clients one after another with torch.optim.SGD and takes the
hypernetwork gradient with torch.autograd through the aggregation, so this is an
independent check of the closed-form cotangent and of the stacked training.

Every parity test runs with the reference on each torch device: 'cpu' always, 'cuda' when torch
sees a CUDA device (skipped otherwise, with the reason). The same code path runs on both
(the servers' `device=`), the same tolerance (1e-4) holds on both, with TF32 off (full float32
convs and matmuls in torch; JAX runs on its CPU backend here).

torch is an optional extra: without it this module is skipped, unless PFEDLA_REQUIRE_TORCH=1
(CI), in which case a missing torch is an error.
"""


import pytest

from tests.helpers import import_torch

torch = import_torch()

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.torch_baseline import (
    ClientData,
    resolve_device,
    CNNTarget,
    FedAvgServer,
    LayerWeightHypernetwork,
    LocalConfig,
    PFedLAServer,
    aggregation_units,
    hn_from_jax,
    hn_to_jax,
    params_from_jax,
    params_to_jax,
    shuffled_batches,
    synthetic_client_data,
)
from experiments.torch_baseline.parity import disjoint_splits, plan_order as _plan_order, row as _row
from experiments.torch_baseline.device import no_tf32, tf32_settings
from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.fedavg import FedAvg
from pfedla_jax.algorithms.pfedla import PFedLA, PFedLAConfig
from pfedla_jax.errors import UserInputError
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.data.store import normalize_images
from pfedla_jax.models import init_variables, layer_names, make_cnn
from pfedla_jax.models.hypernetwork import HNConfig, stacked_alpha
from tests.helpers import store_from_indices, synthetic

# Tiny shapes: torch's intra-op threads only contend with XLA's on a small CI machine (on the
# shared 2-core machine two threads made a backward pass ~50x slower than one).
torch.set_num_threads(1)

ATOL = 1e-4
LR = 0.05
# the reference implements the public code's rule: ReLU-normalised U(0,1) heads, raw cotangent
PUBLIC_HN = HNConfig(normalization="relu", head_init="uniform")
HN_LR = 10.0  # large enough that one round moves alpha by > 1e-2 (0.5 moves it ~2e-3)
# batch 16, 2 epochs = 6 steps: 16+16+8 twice | (16+5) twice + 2 padding steps | (16+14) twice + 2
SIZES = (40, 21, 30)
PARTICIPANTS = np.array([2, 0])  # client 1 sits out; order matters for 'sequential'
ROUND_KEY = jax.random.PRNGKey(5)

CUDA = torch.cuda.is_available()
# the reference's device in every parity test (tests/test_torch_parity_{fedrep,pfedhn}.py too)
TORCH_DEVICES = [
    pytest.param("cpu", id="torch-cpu"),
    pytest.param("cuda", id="torch-cuda", marks=pytest.mark.skipif(
        not CUDA, reason=f"torch {torch.__version__} sees no CUDA device (CPU-only build or no "
                         "GPU): the CUDA parity runs on a GPU machine (also in experiments.bench.gpu_check)")),
]


@pytest.fixture(autouse=True)
def _full_fp32():
    """TF32 off around every test (full float32 cuDNN convs and matmuls; the 1e-4 tolerance
    assumes it; no effect on the CPU)."""
    with no_tf32():
        yield


@functools.cache
def _cohort(use_bn: bool):
    """(dataset, store, model, trainer, torch data) for the gray (no BN) or RGB (BN) model."""
    ds = synthetic("synthetic_rgb" if use_bn else "synthetic")
    train, tests = disjoint_splits(len(ds.labels), SIZES)
    store = store_from_indices(ds, train, tests)
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=use_bn)
    trainer = ClientTrainer(model, store, LocalTrainConfig(batch_size=16, local_epochs=2, lr=LR),
                            "loop")
    counts = np.asarray(store.train_count)
    data = ClientData.from_arrays(np.asarray(store.images), np.asarray(store.labels),
                                  [np.asarray(store.train_idx)[i, :counts[i]] for i in range(len(SIZES))],
                                  np.asarray(store.mean), np.asarray(store.std))
    return ds, store, model, trainer, data


def _ctx(use_bn, init):
    ds, store, model, trainer, _ = _cohort(use_bn)
    return FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                     num_clients=len(SIZES), input_shape=ds.input_shape, init=init)


def _independent_models(state, use_bn):
    """`state` with a different initial model per client (as --init=independent).

    With one common model, the first round's alpha cotangent is the same for every source
    client and the normalised alpha cannot move; distinct models make the HN step real.
    (Drawn with the cached single-model init instead of FLContext's vmapped one, which
    would cost one more compilation.)
    """
    ds, _, model, _, _ = _cohort(use_bn)
    inits = [init_variables(model, jax.random.PRNGKey(100 + j), ds.input_shape)
             for j in range(len(SIZES))]
    stack = lambda key: jax.tree.map(lambda *a: jnp.stack(a), *[v[key] for v in inits])
    return {**state, "client_params": stack("params"), "batch_stats": stack("batch_stats")}


def _torch_model(use_bn):
    ds = _cohort(use_bn)[0]
    h, w, c = ds.input_shape
    return CNNTarget(in_channels=c, num_classes=ds.num_classes, use_bn=use_bn, input_hw=(h, w))



def _torch_states(params, stats):
    return [params_from_jax(_row(params, j), _row(stats, j)) for j in range(len(SIZES))]


def _close(name, got, want, atol=ATOL):
    """Asserts two pytrees (same structure) agree to atol; prints the max difference (-s)."""
    assert jax.tree.structure(got) == jax.tree.structure(want), name
    worst = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert a.shape == b.shape, name
        worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
    print(f"max |jax - torch| {name}: {worst:.2e}")
    assert worst <= atol, f"{name}: max abs difference {worst:.3e} > {atol}"
    return worst


def _compare_clients(name, torch_states, jax_params, jax_stats):
    for j, state in enumerate(torch_states):
        p, s = params_to_jax(state)
        _close(f"{name} params", p, _row(jax_params, j))
        _close(f"{name} batch_stats", s, _row(jax_stats, j))


# ---------------------------------------------------------------------------- converters
@pytest.mark.parametrize("use_bn", [False, True])
def test_converters_round_trip_and_forward_parity(use_bn):
    ds, store, model, _, data = _cohort(use_bn)
    v = init_variables(model, jax.random.PRNGKey(3), ds.input_shape)
    params, stats = v["params"], v["batch_stats"]
    if use_bn:  # non-trivial running statistics, so eval-mode BN is really compared
        rng = np.random.default_rng(1)
        stats = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32), stats)
    sd = params_from_jax(params, stats)
    back_p, back_s = params_to_jax(sd)
    for a, b in zip(jax.tree.leaves((back_p, back_s)), jax.tree.leaves((params, stats)), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    tm = _torch_model(use_bn)
    tm.load_state_dict(sd)
    assert sum(p.numel() for p in tm.parameters()) == sum(np.size(a) for a in jax.tree.leaves(params))

    idx = np.asarray(store.train_idx)[0, :24]
    x = normalize_images(store.images[idx], store.mean, store.std)
    for train in (False, True):
        want = jax.jit(functools.partial(model.apply, train=train))(
            {"params": params, "batch_stats": stats}, x)
        tm.train(train)
        with torch.no_grad():
            got = tm(data.images[torch.from_numpy(idx.astype(np.int64))])
        _close("logits", got.numpy(), np.asarray(want), atol=1e-5)


def test_batch_plan_covers_each_epoch_once():
    _, store, _, trainer, _ = _cohort(False)
    for cid, n in enumerate(SIZES):
        idx, mask = trainer.batch_plan(cid, ROUND_KEY)
        assert idx.shape == mask.shape == (trainer.num_steps, 16)
        own = np.sort(np.asarray(store.train_idx)[cid, :n])
        steps = -(-n // 16)
        for e in range(2):
            rows = slice(e * steps, (e + 1) * steps)
            np.testing.assert_array_equal(np.sort(idx[rows][mask[rows]]), own)
        assert not mask[2 * steps:].any()   # padding steps of the smaller clients
        # the real examples of every step are a prefix of its row
        assert all(np.all(m[:m.sum()]) for m in mask)
    # a different round, a different order
    assert not np.array_equal(trainer.batch_plan(0, ROUND_KEY)[0],
                              trainer.batch_plan(0, jax.random.fold_in(ROUND_KEY, 1))[0])


# ---------------------------------------------------------------------------- rounds
PFEDLA_CASES = [  # (each case compiles its own JAX server steps: a few, for the CPU budget)
    pytest.param("synchronous", False, "layer", 0, id="sync"),
    pytest.param("sequential", False, "layer", 0, id="seq"),
    pytest.param("sequential", True, "tensor", 1, id="seq-bn-tensor-heur1"),
]


@pytest.mark.slow  # compiles a round per case
@pytest.mark.parametrize("semantics,use_bn,granularity,heur_k", PFEDLA_CASES)
@pytest.mark.parametrize("torch_device", TORCH_DEVICES)
def test_pfedla_round_parity(semantics, use_bn, granularity, heur_k, torch_device):
    n = len(SIZES)
    _, _, _, trainer, data = _cohort(use_bn)
    algo = PFedLA(_ctx(use_bn, "common"),
                  PFedLAConfig(hn=PUBLIC_HN, hn_cotangent="raw", hn_lr=HN_LR, semantics=semantics,
                               granularity=granularity, heur_k=heur_k))
    state = _independent_models(algo.init(jax.random.PRNGKey(0)), use_bn)
    ids = jnp.arange(n, dtype=jnp.int32)
    alpha0 = np.asarray(stacked_alpha(algo.hn, state["hn_params"], ids))

    tmodel = _torch_model(use_bn)
    units = aggregation_units(tmodel, granularity)
    # the same aggregation units in the same order
    assert [u[0].rsplit(".", 1)[0] if granularity == "layer" else u[0] for u in units] == [
        name.lower() if granularity == "layer" else
        name.lower().replace("/kernel", ".weight").replace("/scale", ".weight").replace("/", ".")
        for name in algo.layer_map.names]
    hns = []
    for j in range(n):
        hn = LayerWeightHypernetwork(n, len(units), j)
        hn.load_state_dict(hn_from_jax(_row(state["hn_params"], j)))
        hns.append(hn)
        # the HN converters round-trip exactly
        for a, b in zip(jax.tree.leaves(hn_to_jax(hn.state_dict())),
                        jax.tree.leaves(_row(state["hn_params"], j)), strict=True):
            np.testing.assert_array_equal(a, b)
    server = PFedLAServer(tmodel, data, _plan_order(trainer, ROUND_KEY), LocalConfig(lr=LR),
                          client_states=_torch_states(state["client_params"], state["batch_stats"]),
                          hypernetworks=hns, hn_lr=HN_LR, semantics=semantics,
                          granularity=granularity, heur_k=heur_k, device=torch_device)
    assert server.device.type == torch_device and not tf32_settings()["cudnn"]
    _close("alpha before the round", server.all_alpha().cpu().numpy(), alpha0)

    new_state, info = algo.round(state, 0, PARTICIPANTS, ROUND_KEY)
    tinfo = server.round(0, PARTICIPANTS)

    # alpha as used (each HN_i is only updated at its own client's turn)
    _close("alpha used", np.stack([a.cpu().numpy() for a in tinfo["alpha"]]), alpha0[PARTICIPANTS])
    if heur_k:
        expect = np.zeros((len(PARTICIPANTS), len(units)), bool)
        for s, i in enumerate(PARTICIPANTS):
            expect[s, np.argsort(-alpha0[i, :, i], kind="stable")[:heur_k]] = True
        np.testing.assert_array_equal(np.array(tinfo["retained"]), expect)
    np.testing.assert_allclose(tinfo["num_examples"], np.asarray(info["num_examples"]))
    np.testing.assert_allclose(tinfo["loss_sum"], np.asarray(info["loss_sum"]), rtol=1e-4)

    # all N stored models and BN statistics (client 1 untouched on both sides)
    _compare_clients("pfedla", server.client_states, new_state["client_params"],
                     new_state["batch_stats"])
    # every hypernetwork after the update, and the alpha it now gives
    for j in range(n):
        _close("hn params", hn_to_jax(server.hypernetworks[j].state_dict()),
               _row(new_state["hn_params"], j))
    alpha1 = np.asarray(stacked_alpha(algo.hn, new_state["hn_params"], ids))
    _close("alpha after the round", server.all_alpha().cpu().numpy(), alpha1)

    # the hypernetwork *update* itself agrees to 0.1% of its size (the params are O(1), so
    # the absolute check above alone would be weak), and is not vacuous: the participants'
    # hypernetworks and alpha really moved, client 1's did not
    for j in range(n):
        before = _row(state["hn_params"], j)
        want = jax.tree.map(np.subtract, _row(new_state["hn_params"], j), before)
        got = jax.tree.map(np.subtract, hn_to_jax(server.hypernetworks[j].state_dict()), before)
        moved = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(want))
        if j in PARTICIPANTS:
            assert moved > 1e-3, (j, moved)
            _close("hn update", got, want, atol=1e-3 * moved)
        else:
            assert moved == 0.0
            assert max(float(np.max(np.abs(a))) for a in jax.tree.leaves(got)) == 0.0
    assert np.max(np.abs(alpha1 - alpha0)) > 1e-2
    # and the clients did train
    trained = _row(new_state["client_params"], int(PARTICIPANTS[0]))
    start = _row(state["client_params"], int(PARTICIPANTS[0]))
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(trained), jax.tree.leaves(start))) > 1e-2


@pytest.mark.slow  # compiles a round
@pytest.mark.parametrize("torch_device", TORCH_DEVICES)
def test_fedavg_round_parity_bn(torch_device):
    """FedAvg with the BN model (BN scale/bias averaged, running statistics kept local)."""
    use_bn = True
    _, _, _, trainer, data = _cohort(use_bn)
    algo = FedAvg(_ctx(use_bn, "common"))
    state = algo.init(jax.random.PRNGKey(1))
    tmodel = _torch_model(use_bn)
    server = FedAvgServer(tmodel, data, _plan_order(trainer, ROUND_KEY), LocalConfig(lr=LR),
                          client_states=_torch_states(state["client_params"], state["batch_stats"]),
                          global_params=params_from_jax(state["global_params"],
                                                        _row(state["batch_stats"], 0)),
                          device=torch_device)
    assert server.global_params["conv1.weight"].device.type == torch_device
    new_state, info = algo.round(state, 0, np.array([0, 1, 2]), ROUND_KEY)
    tinfo = server.round(0, [0, 1, 2])
    _close("fedavg global params", params_to_jax(server.global_params)[0],
           jax.tree.map(np.asarray, new_state["global_params"]))
    _compare_clients("fedavg", server.client_states, new_state["client_params"],
                     new_state["batch_stats"])
    np.testing.assert_allclose(tinfo["loss_sum"], np.asarray(info["loss_sum"]), rtol=1e-4)
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        jax.tree.leaves(new_state["global_params"]), jax.tree.leaves(state["global_params"])))
    assert moved > 1e-2


def test_standalone_torch_rounds_smoke():
    """The reference runs on its own (random DataLoader order, own init): a quick smoke test."""
    torch.manual_seed(0)
    data = synthetic_client_data(num_clients=3, examples_per_client=20)
    order = shuffled_batches(data, batch_size=8, local_steps=4)
    assert [len(b) for b in order(0, 0)] == [8, 8, 4, 8]   # partial last batch, no drop_last
    assert not torch.equal(torch.cat(list(order(0, 0))), torch.cat(list(order(0, 1))))
    for semantics in ("synchronous", "sequential"):
        server = PFedLAServer(CNNTarget(1, 10), data, order, LocalConfig(lr=0.05),
                              semantics=semantics, init="independent", hn_optimizer="adam",
                              hn_lr=1e-2, heur_k=1)
        before = [dict(s) for s in server.client_states]
        alpha0 = server.all_alpha()
        info = server.round(0, [0, 2])
        assert info["num_examples"] == [28, 28] and len(info["alpha"]) == 2
        assert all(sum(r) == 1 for r in info["retained"])
        assert not torch.equal(before[0]["fc3.weight"], server.client_states[0]["fc3.weight"])
        assert torch.equal(before[1]["fc3.weight"], server.client_states[1]["fc3.weight"])
        assert torch.allclose(server.all_alpha().sum(-1), torch.ones(3, 5))
        assert not torch.allclose(server.all_alpha()[0], alpha0[0])
    fedavg = FedAvgServer(CNNTarget(1, 10), data, order, LocalConfig(lr=0.05, momentum=0.9))
    g0 = {k: v.clone() for k, v in fedavg.global_params.items()}
    assert fedavg.round(0, range(3))["num_examples"] == [28, 28, 28]
    assert not torch.equal(g0["conv1.weight"], fedavg.global_params["conv1.weight"])


def test_torch_device_resolution():
    """--torch_device values: auto, cpu, cuda (an error without CUDA), anything else an error."""
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    for bad in ("tpu", "gpu", "cuda:x", "mps"):
        with pytest.raises(UserInputError, match="torch_device"):
            resolve_device(bad)
    if CUDA:
        assert resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    else:
        with pytest.raises(UserInputError, match="sees no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize("torch_device", TORCH_DEVICES)
def test_servers_keep_everything_on_their_device(torch_device):
    """model, data, client states and hypernetworks on the server's device; a round runs there."""
    data = synthetic_client_data(num_clients=2, examples_per_client=12)
    order = shuffled_batches(data, batch_size=8, local_steps=2)
    server = PFedLAServer(CNNTarget(1, 10), data, order, LocalConfig(lr=0.05), device=torch_device,
                          heur_k=1)
    on = lambda t: t.device.type == torch_device
    assert on(server.data.images) and on(server.data.labels)
    assert all(on(p) for p in server.model.parameters())
    assert all(on(v) for s in server.client_states for v in s.values())
    assert all(on(p) for hn in server.hypernetworks for p in hn.parameters())
    assert data.images.device.type == "cpu"    # the caller's data is copied, not moved
    info = server.round(0, [1, 0])                # 2 steps: batches of 8 and 4
    assert info["num_examples"] == [12, 12] and all(on(a) for a in info["alpha"])
    assert all(on(v) for s in server.client_states for v in s.values())
    fedavg = FedAvgServer(CNNTarget(1, 10), data, order, LocalConfig(lr=0.05), device=torch_device)
    assert fedavg.round(0, [0, 1])["num_examples"] == [12, 12]
    assert all(on(v) for v in fedavg.global_params.values())
