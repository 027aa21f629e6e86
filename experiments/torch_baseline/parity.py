"""One pFedLA round of pfedla_jax and of this PyTorch reference from the same start, compared.

What tests/test_torch_parity.py (and, for vmap against loop, tests/test_core_client_parallel.py)
check on the CPU, packaged as a function for experiments.gpu_check, which runs it with JAX on
its default backend (a GPU there) under `vmap` and under `loop`, and torch on
`--torch_device`: identical initial models (one JAX init per client, converted), identical
hypernetworks (converted), identical batch order (`ClientTrainer.batch_plan`), clients of
different sizes (partial batches and padding steps), two of three participating, the public
code's hypernetwork rule (ReLU-normalised U(0, 1) heads, raw cotangent) with a large HN
learning rate so that one round moves alpha visibly. Both sides compute in full float32
(JAX matmul precision 'highest', torch TF32 off).

It imports JAX and pfedla_jax beside torch (it is the comparison); the rest of
experiments/torch_baseline/ needs torch alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from experiments.torch_baseline.device import no_tf32, resolve_device
from experiments.torch_baseline.fl import ClientData, LocalConfig, PFedLAServer, aggregation_units
from experiments.torch_baseline.hypernetwork import LayerWeightHypernetwork, hn_from_jax, hn_to_jax
from experiments.torch_baseline.model import CNNTarget, params_from_jax, params_to_jax
from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.pfedla import PFedLA, PFedLAConfig
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.data import Partition, build_client_store, load_dataset
from pfedla_jax.models import layer_names, make_cnn
from pfedla_jax.models.hypernetwork import HNConfig, stacked_alpha

# The tolerance of tests/test_torch_parity.py: largest |JAX - torch| over every stored model,
# BN statistic, alpha and hypernetwork parameter after one round (measured on the CPU: 2.7e-6).
ATOL = 1e-4


def plan_order(trainer, round_key):
    """A torch BatchOrder (client, round) -> batches feeding exactly the JAX trainer's
    minibatches of the round of `round_key` (CPU LongTensors of store indices)."""

    def order(client_id, round_idx):
        idx, mask = trainer.batch_plan(client_id, round_key)
        return [torch.from_numpy(i[m].astype(np.int64)) for i, m in zip(idx, mask)]

    return order


def row(tree, j):
    """Row j of every leaf of a stacked pytree, as numpy."""

    return jax.tree.map(lambda a: np.asarray(a)[j], tree)


def disjoint_splits(num_examples: int, sizes, test_size: int = 8, seed: int = 0):
    """(train, test) index lists of a small synthetic cohort: client c gets sizes[c] train
    and `test_size` test examples of one seeded permutation of `num_examples`, no example
    twice (the cohort of the parity checks here and in tests/test_torch_parity*.py)."""
    perm = np.random.default_rng(seed).permutation(num_examples)
    train, test, off = [], [], 0
    for n in sizes:
        train.append(perm[off:off + n])
        test.append(perm[off + n:off + n + test_size])
        off += n + test_size
    return train, test


def max_abs_diff(got, want) -> float:
    """Largest |got - want| over two pytrees of the same structure (0 for empty ones).

    Raises:
      ValueError: the structures or a leaf's shape differ.
    """
    if jax.tree.structure(got) != jax.tree.structure(want):
        raise ValueError(f"different structures: {jax.tree.structure(got)} vs {jax.tree.structure(want)}")
    worst = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if a.shape != b.shape:
            raise ValueError(f"leaf shapes differ: {a.shape} vs {b.shape}")
        if a.size:
            worst = max(worst, float(np.max(np.abs(a - b))))
    return worst


def pfedla_round_parity(use_bn: bool, device="auto", *, strategies=("vmap", "loop"),
                        semantics: str = "synchronous", sizes=(40, 21, 30), participants=(2, 0),
                        batch_size: int = 16, local_epochs: int = 2, lr: float = 0.05,
                        hn_lr: float = 10.0, seed: int = 0) -> dict:
    """One pFedLA round from one start: JAX under each client-parallel strategy, and torch.

    Args:
      use_bn: the RGB model with BatchNorm (CIFAR's) or the gray one without (FMNIST's).
      device: torch's device (a --torch_device value or torch.device); None: JAX only.
      strategies: JAX client parallelism to run and compare with each other (e.g. 'vmap',
        one batched program, against 'loop', one client at a time); torch is compared with
        the first.
      semantics: 'synchronous' or 'sequential'.
      sizes: training examples per client (8 test examples each besides): unequal, so that
        partial batches and padding steps are exercised.
      participants: the clients taking part, in order.
      batch_size, local_epochs, lr: local SGD (the same batches on both sides).
      hn_lr: hypernetwork SGD step (large: one round must move alpha by > 1e-2).
      seed: JAX init key (one independent model per client).

    Returns:
      {'model', 'semantics', 'jax_backend', 'strategies', 'atol' (ATOL),
       'initial_state_diff' (between strategies: 0 expected),
       'strategies_max_abs_diff' (largest |difference| of any new-state leaf between the
        strategies), 'strategies_per_entry',
       'torch': None or {'device', 'max_abs_diff': {'client_params', 'batch_stats',
        'alpha_used', 'hn_params', 'alpha_after'}, 'loss_sum_rel_diff', 'passed'},
       'alpha_moved', 'params_moved', 'passed' (every difference <= atol, loss sums within
       1e-4 relative, equal example counts, alpha moved > 1e-2, params moved > 1e-3)}.

    Raises:
      UserInputError: a CUDA `device` without CUDA, an unknown strategy.
    """
    device = None if device is None else resolve_device(device)
    ds = load_dataset("synthetic_rgb" if use_bn else "synthetic", synthetic_per_class=60, seed=0)
    train, test = disjoint_splits(len(ds.labels), sizes)
    part = Partition(train_indices=train, test_indices=test,
                     client_classes=[np.unique(ds.labels[np.concatenate([a, b])]) for a, b in zip(train, test)],
                     scheme="manual", samples_per_client=None)
    store = build_client_store(ds, part)
    model = make_cnn(ds.input_shape, ds.num_classes, use_bn=use_bn)
    num = len(sizes)
    cfg = PFedLAConfig(hn=HNConfig(normalization="relu", head_init="uniform"), hn_cotangent="raw",
                       hn_lr=hn_lr, semantics=semantics)
    round_key = jax.random.PRNGKey(5)
    ids = jnp.arange(num, dtype=jnp.int32)
    order = np.asarray(participants, np.int32)
    runs = {}   # strategy -> (start state, new state, metrics), host arrays, no mesh padding
    resolved = {}
    with jax.default_matmul_precision("highest"):
        for strategy in strategies:
            trainer = ClientTrainer(model, store, LocalTrainConfig(batch_size=batch_size,
                                                                   local_epochs=local_epochs, lr=lr),
                                    strategy)
            ctx = FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                            num_clients=num, input_shape=ds.input_shape, init="independent")
            algo = PFedLA(ctx, cfg)
            state = algo.init(jax.random.PRNGKey(seed))
            start = jax.tree.map(np.asarray, algo.to_checkpoint(state))
            new_state, info = algo.round(state, 0, order, round_key)
            if strategy in runs:
                raise ValueError(f"strategy {strategy!r} given twice")
            runs[strategy] = (start, jax.tree.map(np.asarray, algo.to_checkpoint(new_state)),
                              jax.tree.map(np.asarray, info))
            resolved[strategy] = trainer.strategy
            if len(runs) == 1:
                first_trainer, first_algo = trainer, algo
        state, new_state, info = next(iter(runs.values()))
        alpha0 = np.asarray(stacked_alpha(first_algo.hn, state["hn_params"], ids))
        alpha1 = np.asarray(stacked_alpha(first_algo.hn, new_state["hn_params"], ids))
    out = {"model": "rgb+bn" if use_bn else "gray", "semantics": semantics,
           "jax_backend": jax.default_backend(), "strategies": resolved, "atol": ATOL}
    others = list(runs.values())[1:]
    out["initial_state_diff"] = max((max_abs_diff(o[0], state) for o in others), default=0.0)
    per_entry = {k: max((max_abs_diff(o[1][k], new_state[k]) for o in others), default=0.0)
                 for k in new_state}
    out["strategies_per_entry"] = per_entry
    out["strategies_max_abs_diff"] = max(per_entry.values(), default=0.0)
    out["alpha_moved"] = float(np.max(np.abs(alpha1 - alpha0)))
    out["params_moved"] = max_abs_diff(new_state["client_params"], state["client_params"])
    passed = (out["initial_state_diff"] <= 1e-6 and out["strategies_max_abs_diff"] <= ATOL
              and out["alpha_moved"] > 1e-2 and out["params_moved"] > 1e-3
              and all(np.array_equal(o[2]["num_examples"], info["num_examples"]) for o in others))
    out["torch"] = None
    if device is not None:
        out["torch"] = _torch_round(first_trainer, round_key, store, ds, use_bn, state, new_state,
                                    info, alpha0, alpha1, order, device, lr=lr, hn_lr=hn_lr,
                                    semantics=semantics)
        passed = passed and out["torch"]["passed"]
    out["passed"] = bool(passed)
    return out


def _torch_round(trainer, round_key, store, ds, use_bn, state, new_state, info, alpha0, alpha1,
                 order, device, *, lr, hn_lr, semantics) -> dict:
    """The reference's round from `state` (host arrays) on `device`, compared with JAX's."""
    num = int(np.asarray(store.train_count).shape[0])
    counts = np.asarray(store.train_count)
    data = ClientData.from_arrays(np.asarray(store.images), np.asarray(store.labels),
                                  [np.asarray(store.train_idx)[i, :counts[i]] for i in range(num)],
                                  np.asarray(store.mean), np.asarray(store.std))
    h, w, c = ds.input_shape
    tmodel = CNNTarget(in_channels=c, num_classes=ds.num_classes, use_bn=use_bn, input_hw=(h, w))
    units = aggregation_units(tmodel)
    hns = []
    for j in range(num):
        hn = LayerWeightHypernetwork(num, len(units), j)
        hn.load_state_dict(hn_from_jax(row(state["hn_params"], j)))
        hns.append(hn)
    with no_tf32():
        server = PFedLAServer(tmodel, data, plan_order(trainer, round_key), LocalConfig(lr=lr),
                              client_states=[params_from_jax(row(state["client_params"], j),
                                                             row(state["batch_stats"], j))
                                             for j in range(num)],
                              hypernetworks=hns, hn_lr=hn_lr, semantics=semantics, device=device)
        tinfo = server.round(0, [int(i) for i in order])
        t_alpha1 = server.all_alpha().cpu().numpy()
    params, stats = zip(*(params_to_jax(s) for s in server.client_states))
    diffs = {
        "client_params": max(max_abs_diff(p, row(new_state["client_params"], j))
                             for j, p in enumerate(params)),
        "batch_stats": max(max_abs_diff(s, row(new_state["batch_stats"], j))
                           for j, s in enumerate(stats)),
        "alpha_used": max_abs_diff(np.stack([a.cpu().numpy() for a in tinfo["alpha"]]), alpha0[order]),
        "hn_params": max(max_abs_diff(hn_to_jax(server.hypernetworks[j].state_dict()),
                                      row(new_state["hn_params"], j)) for j in range(num)),
        "alpha_after": max_abs_diff(t_alpha1, alpha1),
    }
    loss_rel = float(np.max(np.abs(np.asarray(tinfo["loss_sum"]) - info["loss_sum"])
                            / np.maximum(np.abs(info["loss_sum"]), 1e-12)))
    passed = (all(v <= ATOL for v in diffs.values()) and loss_rel <= 1e-4
              and list(tinfo["num_examples"]) == [int(v) for v in info["num_examples"]])
    return {"device": str(device), "max_abs_diff": diffs, "loss_sum_rel_diff": loss_rel,
            "passed": bool(passed)}
