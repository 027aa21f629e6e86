"""pFedHN (pfedla_jax/algorithms/pfedhn.py) against independent oracles.

  * the batched VJP = jax.grad of the surrogate sum_i <theta_i(phi), sg(delta_i)> = a
    Python loop of single-client VJPs; a linear hypernetwork by hand; a finite difference;
  * the optimizer = a numpy reimplementation of PyTorch's clip_grad_norm_ + SGD with param
    groups, momentum and weight decay (every embedding row decays, participant or not);
  * 'sequential' = a Python loop (generate from the current phi, train alone, VJP, step);
  * the sign: one small step lowers the client's loss (and the opposite step raises it);
  * end to end through the experiment loop; vmap = loop = shard; bad flags -> one line.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.pfedhn import (ModelHypernetwork, PFedHN, PFedHNConfig, generate,
                                          hn_gradient, make_hn_optimizer, target_shapes)
from pfedla_jax.core.client_update import masked_cross_entropy
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.data.store import normalize_images
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import layer_names, make_cnn
from pfedla_jax.training.command_line import config_from_argv
from pfedla_jax.training.config import ExperimentConfig, RunOptions
from pfedla_jax.training.loop import build_experiment, run_experiment
from pfedla_jax.training.workdir import Checkpoints
from tests.helpers import small_store

# A small stand-in for a client model's params (all the generator sees are leaf shapes).
TOY = {"A": {"bias": np.zeros(4), "kernel": np.zeros((3, 4))}, "B": {"scale": np.zeros(2)},
       "C": {"kernel": np.zeros((2, 2, 1, 3))}}
N = 5


def _toy_hn(n_hidden=2, hidden=6, embed=3):
    return ModelHypernetwork(num_clients=N, embed_dim=embed, hidden_dim=hidden, n_hidden=n_hidden,
                             targets=target_shapes(TOY))


def _f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _random_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), tree)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def test_config_defaults_and_validation():
    cfg = PFedHNConfig()
    assert (cfg.hidden_dim, cfg.n_hidden, cfg.hn_lr, cfg.hn_momentum, cfg.hn_weight_decay,
            cfg.hn_clip, cfg.semantics) == (100, 3, 1e-2, 0.9, 1e-3, 50.0, "synchronous")
    assert cfg.resolved_embed_dim(10) == 3 and cfg.resolved_embed_dim(100) == 26   # int(1 + N/4)
    assert cfg.resolved_embed_lr == 1e-2 and PFedHNConfig(embed_lr=0.5).resolved_embed_lr == 0.5
    for bad, flag in [(dict(hidden_dim=0), "--pfedhn_hidden_dim must be >= 1, got 0"),
                      (dict(embed_dim=-1), "--pfedhn_embed_dim"), (dict(n_hidden=-1), "--pfedhn_n_hidden"),
                      (dict(hn_lr=float("nan")), "--pfedhn_hn_lr"), (dict(embed_lr=-1.0), "--pfedhn_embed_lr"),
                      (dict(hn_momentum=1.0), "--pfedhn_hn_momentum"),
                      (dict(hn_weight_decay=-1e-3), "--pfedhn_hn_weight_decay"),
                      (dict(hn_clip=float("inf")), "--pfedhn_hn_clip"),
                      (dict(semantics="async"), "--pfedhn_semantics")]:
        with pytest.raises(UserInputError, match=flag):
            PFedHNConfig(**bad).validate()


def test_generator_shapes_and_pytorch_init():
    hn = ModelHypernetwork(num_clients=40, embed_dim=11, hidden_dim=100, n_hidden=3,
                           targets=target_shapes(TOY))
    phi = hn.init_params(jax.random.PRNGKey(0))
    # the fast init (two draws) has the structure of the module's own `init`
    flax_init = jax.eval_shape(hn.init, jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32))["params"]
    assert jax.tree.structure(phi) == jax.tree.structure(dict(flax_init))
    assert [a.shape for a in jax.tree.leaves(phi)] == [a.shape for a in jax.tree.leaves(flax_init)]
    assert set(phi) == {"embedding", "trunk0", "trunk1", "trunk2", "trunk3", "heads"}
    assert phi["embedding"].shape == (40, 11) and phi["trunk0"]["kernel"].shape == (11, 100)
    assert phi["heads"]["C"]["kernel"]["kernel"].shape == (100, 12)
    theta = generate(hn, phi, jnp.array([3, 1], jnp.int32))
    assert jax.tree.structure(theta) == jax.tree.structure(TOY)
    assert theta["C"]["kernel"].shape == (2, 2, 2, 1, 3)
    # nn.Embedding: N(0, 1); nn.Linear: U(+-1/sqrt(fan_in)) for weights and biases
    emb = np.asarray(phi["embedding"])
    assert abs(emb.std() - 1) < 0.15 and abs(emb.mean()) < 0.15
    for name, fan_in in (("trunk0", 11), ("trunk1", 100)):
        for leaf in phi[name].values():
            assert np.abs(leaf).max() <= 1 / np.sqrt(fan_in) and np.abs(leaf).max() > 0.9 / np.sqrt(fan_in)
    head = phi["heads"]["A"]["kernel"]
    assert np.abs(head["kernel"]).max() <= 0.1 and np.abs(head["bias"]).max() <= 0.1


def test_sync_gradient_is_grad_of_surrogate_and_sum_of_per_client_vjps():
    """The one batched VJP = jax.grad of sum_i <theta_i(phi), sg(delta_i)>
    through the whole generator (embeddings included) = a loop of single-client VJPs."""
    with jax.enable_x64(True):
        hn = _toy_hn()
        phi = _f64(hn.init_params(jax.random.PRNGKey(1)))
        ids = jnp.array([4, 0, 2], jnp.int32)
        delta = _f64(_random_like(generate(hn, phi, ids), 0))
        grad_fn = jax.jit(functools.partial(hn_gradient, hn))
        got = grad_fn(phi, ids, delta)

        def surrogate(p):
            theta = generate(hn, p, ids)
            return sum(jnp.vdot(t, jax.lax.stop_gradient(d))
                       for t, d in zip(jax.tree.leaves(theta), jax.tree.leaves(delta)))

        want = jax.jit(jax.grad(surrogate))(phi)
        loop = jax.tree.map(jnp.zeros_like, phi)
        for s in range(3):
            one = grad_fn(phi, ids[s:s + 1], jax.tree.map(lambda d: d[s:s + 1], delta))
            loop = jax.tree.map(jnp.add, loop, one)
        for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(loop), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-12)
        emb = np.asarray(got["embedding"])
        assert np.all(emb[[1, 3]] == 0) and np.all(np.abs(emb[[0, 2, 4]]).sum(1) > 0)


def test_linear_hypernetwork_by_hand_and_finite_difference():
    """n_hidden = 0: theta = W (A^T e + a) + b per head, so dW = h (x) delta,
    db = delta, dA = e (x) W^T delta, de = A W^T delta; one coordinate by central differences."""
    with jax.enable_x64(True):
        hn = _toy_hn(n_hidden=0)
        phi = _f64(hn.init_params(jax.random.PRNGKey(2)))
        ids = jnp.array([1, 3], jnp.int32)
        delta = _f64(_random_like(generate(hn, phi, ids), 1))
        got = hn_gradient(hn, phi, ids, delta)

        A, a = np.asarray(phi["trunk0"]["kernel"]), np.asarray(phi["trunk0"]["bias"])
        E = np.asarray(phi["embedding"])
        h = E[np.asarray(ids)] @ A + a                                   # [S, H]
        dh = np.zeros_like(h)
        for path, shape in target_shapes(TOY):
            head = phi["heads"][path[0]][path[1]]
            d = np.asarray(delta[path[0]][path[1]]).reshape(2, -1)      # [S, size]
            np.testing.assert_allclose(got["heads"][path[0]][path[1]]["kernel"], h.T @ d, rtol=1e-12)
            np.testing.assert_allclose(got["heads"][path[0]][path[1]]["bias"], d.sum(0), rtol=1e-12)
            dh += d @ np.asarray(head["kernel"]).T
        np.testing.assert_allclose(got["trunk0"]["kernel"], E[np.asarray(ids)].T @ dh, rtol=1e-12)
        np.testing.assert_allclose(got["trunk0"]["bias"], dh.sum(0), rtol=1e-12)
        want_e = np.zeros_like(E)
        want_e[np.asarray(ids)] = dh @ A.T
        np.testing.assert_allclose(got["embedding"], want_e, rtol=1e-12, atol=1e-15)

        # finite difference of the surrogate in one embedding coordinate and one head weight
        def surrogate(p):
            theta = generate(hn, p, ids)
            return float(sum(np.vdot(t, d) for t, d in zip(jax.tree.leaves(theta), jax.tree.leaves(delta))))

        for path, index in ((("embedding",), (3, 1)), (("heads", "C", "kernel", "kernel"), (2, 5))):
            eps = 1e-6
            bump = lambda sign: jax.tree_util.tree_map_with_path(
                lambda kp, x: x.at[index].add(sign * eps)
                if tuple(k.key for k in kp) == path else x, phi)
            fd = (surrogate(bump(1)) - surrogate(bump(-1))) / (2 * eps)
            leaf = got
            for k in path:
                leaf = leaf[k]
            np.testing.assert_allclose(float(leaf[index]), fd, rtol=1e-6)


def _torch_sgd_reference(phi, grads_per_step, cfg):
    """numpy PyTorch: clip_grad_norm_(all params, clip) then SGD param groups (embedding:
    embed_lr), momentum (buf = g first, then m * buf + g) and weight decay (g += wd * p)."""
    p = {k: _flat(v) for k, v in phi.items()}
    buf = {}
    for grads in grads_per_step:
        g = {k: _flat(v) for k, v in grads.items()}
        norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
        coef = min(1.0, cfg.hn_clip / (norm + 1e-6)) if cfg.hn_clip > 0 else 1.0
        for k in p:
            d = coef * g[k] + cfg.hn_weight_decay * p[k]
            buf[k] = d if k not in buf else cfg.hn_momentum * buf[k] + d
            lr = cfg.resolved_embed_lr if k == "embedding" else cfg.hn_lr
            p[k] = p[k] - lr * buf[k]
    return p


@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["noclip", "clipped"])
def test_optimizer_is_pytorch_sgd_and_every_embedding_row_decays(clip):
    """Two steps (clients 0 then 2): non-participants' embedding rows
    shrink by weight decay and drift with momentum, exactly as torch.optim.SGD does."""
    with jax.enable_x64(True):
        cfg = PFedHNConfig(hn_lr=0.3, embed_lr=0.7, hn_momentum=0.9, hn_weight_decay=0.05, hn_clip=clip)
        hn = _toy_hn()
        tx = make_hn_optimizer(cfg)
        grad_fn = jax.jit(functools.partial(hn_gradient, hn))
        phi = _f64(hn.init_params(jax.random.PRNGKey(3)))
        opt = tx.init(phi)
        start, steps = phi, []
        for step, cid in enumerate((0, 2)):
            ids = jnp.array([cid], jnp.int32)
            grads = grad_fn(phi, ids, _f64(_random_like(generate(hn, phi, ids), 10 + step)))
            steps.append(grads)
            updates, opt = tx.update(grads, opt, phi)
            phi = jax.tree.map(jnp.add, phi, updates)
        want = _torch_sgd_reference(start, steps, cfg)
        norm = np.sqrt(sum(np.sum(_flat(g) ** 2) for g in steps[0].values()))
        assert (norm > clip) if clip else True    # the clipped case really clips
        for k in phi:   # (torch's clip divides by norm + 1e-6, optax's by norm)
            np.testing.assert_allclose(_flat(phi[k]), want[k], rtol=1e-6 if clip else 1e-12, atol=1e-12)
        # rows 1, 3, 4 never had a gradient: pure decay with momentum,
        # v2 = v0 - lr (wd v0) - lr (m wd v0 + wd v1), v1 = (1 - lr wd) v0
        lr, wd, m = 0.7, 0.05, 0.9
        v0 = np.asarray(start["embedding"])[[1, 3, 4]]
        v1 = (1 - lr * wd) * v0
        v2 = v1 - lr * (m * wd * v0 + wd * v1)
        np.testing.assert_allclose(np.asarray(phi["embedding"])[[1, 3, 4]], v2, rtol=1e-12)


# ---------------------------------------------------------------------------- with the CNN
@functools.cache
def _cohort():
    """3 clients of 28 training examples; local training = ONE full-batch SGD step (lr 0.1)."""
    ds, store = small_store(num_clients=3, samples_per_client=40)
    model = make_cnn(ds.input_shape, ds.num_classes)
    trainer = ClientTrainer(model, store, LocalTrainConfig(batch_size=64, local_steps=1, lr=0.1), "loop")
    return ds, store, model, trainer


def _algo(config):
    ds, store, model, trainer = _cohort()
    ctx = FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                    num_clients=3, input_shape=ds.input_shape)
    return PFedHN(ctx, config)


def _close(a, b, atol=1e-5, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


@pytest.mark.slow
def test_sequential_round_equals_a_python_loop_of_single_client_steps():
    """The scan = generate from the current phi, train alone, VJP, optax
    step, one client after another."""
    cfg = PFedHNConfig(semantics="sequential", hn_lr=0.5, hn_clip=0.5)
    algo = _algo(cfg)
    state = algo.init(jax.random.PRNGKey(0))
    order, key = np.array([2, 0, 1]), jax.random.PRNGKey(7)
    new_state, info = algo.round(state, 0, order, key)

    trainer, tx = algo.trainer, make_hn_optimizer(cfg)

    @jax.jit
    def hn_step(phi, opt, ids, theta, trained):
        delta = jax.tree.map(jnp.subtract, theta, trained)
        updates, opt = tx.update(hn_gradient(algo.hn, phi, ids, delta), opt, phi)
        return jax.tree.map(jnp.add, phi, updates), opt

    phi, opt = state["hn_params"], state["hn_opt_state"]
    params = jax.tree.map(np.array, state["client_params"])
    first = algo.generate(phi, jnp.arange(3, dtype=jnp.int32))
    for cid in order:
        ids = jnp.array([cid], jnp.int32)
        theta = algo.generate(phi, ids)
        trained, _, _ = trainer.train(theta, {}, ids, key)
        phi, opt = hn_step(phi, opt, ids, theta, trained)
        jax.tree.map(lambda a, r: a.__setitem__(cid, np.asarray(r[0])), params, trained)
        if cid == 1:   # the last client was generated from the phi the first two updated
            moved = max(float(np.max(np.abs(np.asarray(a)[0] - np.asarray(b)[1])))
                        for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(first)))
            assert moved > 1e-3, moved
    _close(new_state["hn_params"], phi)
    _close(new_state["client_params"], params)
    assert np.asarray(info["num_examples"]).tolist() == [28, 28, 28]
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        jax.tree.leaves(new_state["hn_params"]), jax.tree.leaves(state["hn_params"]))) > 1e-3


@pytest.mark.slow
def test_the_hypernetwork_step_is_descent_on_the_clients_loss():
    """The sign: one full-batch local SGD step gives delta = lr grad L, so a
    small hypernetwork step (`server_update`, as the round takes it) lowers L(h(v; phi)) on
    that batch; the opposite step raises it."""
    algo = _algo(PFedHNConfig(hn_lr=1e-3, hn_momentum=0.0, hn_weight_decay=0.0, hn_clip=0.0))
    state = algo.init(jax.random.PRNGKey(4))
    store, cid = algo.ctx.store, 1
    n = int(store.train_count[cid])
    rows = np.asarray(store.train_idx)[cid, :n]
    x = normalize_images(store.images[rows], store.mean, store.std)
    y = store.labels[rows]

    @jax.jit
    def loss(phi):
        theta = jax.tree.map(lambda a: a[0], generate(algo.hn, phi, jnp.array([cid], jnp.int32)))
        logits = algo.ctx.model.apply({"params": theta, "batch_stats": {}}, x, train=False)
        total, count = masked_cross_entropy(logits, y, jnp.ones(n))
        return total / count

    before, ids = state["hn_params"], jnp.array([cid], jnp.int32)
    theta = algo.generate(before, ids)
    trained, _, _ = algo.trainer.train(theta, {}, ids, jax.random.PRNGKey(5))
    after, _ = jax.jit(algo.server_update)(before, state["hn_opt_state"], ids, theta, trained)
    backwards = jax.tree.map(lambda a, b: 2 * a - b, before, after)
    l0, l1, l_back = float(loss(before)), float(loss(after)), float(loss(backwards))
    assert l1 < l0 < l_back, (l1, l0, l_back)


@pytest.mark.slow
def test_end_to_end_and_vmap_equals_shard(tmp_path):
    """The experiment loop runs pFedHN (both views reported, one program for all rounds) on
    `shard`; `vmap` gives the same two rounds (the final checkpoint's state). `loop` = `shard`
    is tests/test_cohort_sizes.py's check, which covers every registered algorithm."""
    base = ExperimentConfig(algorithm="pfedhn", dataset="synthetic", synthetic_per_class=40, num_clients=4,
                            classes_per_client=2, rounds=2, participation=0.5, seed=3,
                            train=LocalTrainConfig(batch_size=16, local_steps=2, lr=0.1),
                            algorithm_config=PFedHNConfig(hn_lr=0.05))
    workdir = str(tmp_path / "run")
    summary = run_experiment(base, workdir, log=lambda s: None,
                             options=RunOptions(checkpoint_every=0, tensorboard=False,
                                                client_parallelism="shard"))
    assert summary["algorithm"] == "pfedhn" and summary["config"]["pfedhn"]["hn_lr"] == 0.05
    records = summary["records"]
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["local_test_acc"] <= 1
    assert summary["final"]["bytes_up_total"] == summary["final"]["bytes_down_total"] == 2 * 2 * 85822 * 4

    exp = build_experiment(base, RunOptions(client_parallelism="vmap"))
    algo = exp.algorithm
    state = algo.init(exp.keys.init)
    for t in range(2):
        state, info = algo.round(state, t, exp.schedule[t], exp.round_key(t))
        info = jax.device_get(info)
        loss = float(np.sum(info["loss_sum"]) / np.sum(info["num_examples"]))
        np.testing.assert_allclose(loss, records[t]["train_loss"], rtol=1e-5)
    assert algo.trace_count == 1   # no retrace after round 1
    mine = jax.device_get(algo.to_checkpoint(state))
    checkpoints = Checkpoints(workdir, 0)
    step, saved, _, _, _ = checkpoints.restore(mine)
    checkpoints.close()
    assert step == 2
    # the hypernetwork moved, and both strategies moved it the same way
    assert not np.allclose(mine["hn_params"]["trunk0"]["kernel"],
                           np.asarray(jax.device_get(algo.init(exp.keys.init)["hn_params"]["trunk0"]["kernel"])))
    _close(mine, jax.device_get(saved), atol=2e-5, rtol=2e-4)


BAD_ARGV = ["--dataset=synthetic", "--synthetic_per_class=40", "--num_clients=4", "--rounds=1",
            "--algorithm=pfedhn", "--pfedhn_hidden_dim=0"]


def test_command_line_bad_hypernetwork_size_is_one_line():
    with pytest.raises(UserInputError, match="--pfedhn_hidden_dim") as err:
        config_from_argv(["run", *BAD_ARGV])
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.slow
def test_cli_bad_hypernetwork_size_is_one_line_error(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "experiments.run", *BAD_ARGV, f"--workdir={tmp_path}"],
                       cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--pfedhn_hidden_dim" in err[0], p.stderr[-2000:]


@pytest.mark.slow
def test_client_gradient_clip_bounds_each_local_step():
    """--pfedhn_client_clip (official clip_grad_norm_(net.parameters(), 50) at every local
    step): with a tiny clip, one full-batch step moves each client's model by exactly
    lr * clip (the gradient's norm is far above it); with 0 the plain trainer runs."""
    clip = 1e-3
    algo = _algo(PFedHNConfig(client_clip=clip))
    assert algo.trainer is not algo.ctx.trainer
    assert _algo(PFedHNConfig(client_clip=0.0)).trainer is algo.ctx.trainer
    state = algo.init(jax.random.PRNGKey(4))
    ids = jnp.array([0, 2], jnp.int32)
    theta = algo.generate(state["hn_params"], ids)
    clipped, _, _ = algo.trainer.train(theta, {}, ids, jax.random.PRNGKey(5))
    plain, _, _ = algo.ctx.trainer.train(theta, {}, ids, jax.random.PRNGKey(5))
    norm = lambda a, b: np.sqrt(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2, axis=tuple(range(1, x.ndim)))
                                    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
    np.testing.assert_allclose(norm(clipped, theta), [0.1 * clip] * 2, rtol=1e-3)
    assert np.all(norm(plain, theta) > 100 * 0.1 * clip)
