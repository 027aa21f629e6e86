"""A new algorithm is one class in a test file: registered, run end to end, options as
overrides and flags; the experiment refuses unknown names and misplaced options early."""

import dataclasses
import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from pfedla_jax.algorithms import Algorithm, AlgorithmConfig, Evaluation, FLContext, register
from pfedla_jax.algorithms.pfedla import PFedLA
from pfedla_jax.algorithms.registry import config_fields, unregister
from pfedla_jax.core.aggregation import weighted_average
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig, make_optimizer
from pfedla_jax.core.client_update import sgd_update
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import layer_names, make_cnn
from pfedla_jax.training.command_line import config_from_argv, define_flags
from pfedla_jax.training.config import ExperimentConfig, RunOptions, apply_overrides
from pfedla_jax.training.loop import build_experiment, run_experiment
from tests.helpers import small_store


@dataclasses.dataclass(frozen=True)
class FrozenHeadConfig(AlgorithmConfig):
    frozen_layer: str = "FC3"
    server_lr: float = 1.0

    def validate(self):
        if self.frozen_layer not in ("Conv1", "Conv2", "FC1", "FC2", "FC3"):
            raise UserInputError(f"--frozenhead_frozen_layer: no layer {self.frozen_layer!r}")
        if not 0 < self.server_lr <= 1:
            raise UserInputError(f"--frozenhead_server_lr must be in (0, 1], got {self.server_lr}")


class FrozenHeadFedAvg(Algorithm):
    """FedAvg whose clients never train one layer (a trainable mask), with a server step size."""

    server_state_keys = ("global_params",)

    def __init__(self, ctx, config=None):
        super().__init__(ctx, config)
        frozen = self.config.frozen_layer
        update = sgd_update(ctx.model, make_optimizer(ctx.train),
                            trainable=lambda p: {k: jax.tree.map(lambda _: k != frozen, v)
                                                 for k, v in p.items()})
        self.trainer = ctx.trainer.with_update(update)

    def init_state(self, key):
        params, stats = self.ctx.init_client_variables(key)
        return {"global_params": jax.tree.map(lambda a: a[0], params), "batch_stats": stats}

    def round_step(self, state, round_idx, client_ids, key, data):
        params, stats, metrics = self.trainer.train(
            state["global_params"], self.take(state["batch_stats"], client_ids), client_ids,
            key, data, shared_params=True)
        avg = weighted_average(params, jnp.take(data.train_count, client_ids))
        lr = self.config.server_lr
        new_global = jax.tree.map(lambda g, a: g + lr * (a - g), state["global_params"], avg)
        model = jnp.full(client_ids.shape, self.ctx.model_bytes, jnp.int32)
        return ({"global_params": new_global,
                 "batch_stats": self.put(state["batch_stats"], client_ids, stats)},
                {**metrics, "bytes_up": model, "bytes_down": model})

    def evaluate(self, state, round_idx, key):
        return Evaluation({"": View(state["global_params"], state["batch_stats"], shared=True)},
                          scalars={"server_lr": self.config.server_lr})


@pytest.fixture
def toy():
    register("frozenhead", FrozenHeadConfig)(FrozenHeadFedAvg)
    yield FrozenHeadFedAvg
    unregister("frozenhead")


BASE = dict(dataset="synthetic", synthetic_per_class=40, num_clients=4, classes_per_client=2,
            rounds=3, participation=0.5, train=LocalTrainConfig(batch_size=16, local_steps=2, lr=0.1))


@pytest.mark.slow
def test_toy_algorithm_end_to_end_through_the_registry(toy, tmp_path):
    config = apply_overrides(ExperimentConfig(algorithm="frozenhead", **BASE),
                             {"frozenhead.server_lr": "0.5", "frozenhead.frozen_layer": "FC3"})
    assert config.algorithm_config == FrozenHeadConfig(server_lr=0.5)
    summary = run_experiment(config, str(tmp_path / "run"), log=lambda s: None,
                             options=RunOptions(checkpoint_every=0, tensorboard=False))
    assert summary["algorithm"] == "frozenhead"
    assert summary["config"]["frozenhead"] == {"frozen_layer": "FC3", "server_lr": 0.5}
    assert [r["round"] for r in summary["records"]] == [1, 2, 3]
    assert summary["final"]["server_lr"] == 0.5 and 0 <= summary["final"]["test_acc"] <= 1
    assert summary["final"]["bytes_up_total"] == 3 * 2 * 85822 * 4

    # the mask really freezes the layer (and only it): the global FC3 never moves
    exp = build_experiment(config, RunOptions(client_parallelism="shard"))
    state = exp.algorithm.init(exp.keys.init)
    start = jax.tree.map(np.asarray, state["global_params"])
    for t in range(2):
        state, _ = exp.algorithm.round(state, t, exp.schedule[t], exp.round_key(t))
    end = state["global_params"]
    for layer in start:
        same = all(np.array_equal(start[layer][k], np.asarray(end[layer][k])) for k in start[layer])
        assert same == (layer == "FC3"), layer


def test_toy_algorithm_gets_generated_flags(toy):
    command = config_from_argv(["prog", "--algorithm=frozenhead", "--frozenhead_server_lr=0.25"])
    assert command.config.algorithm_config == FrozenHeadConfig(server_lr=0.25)
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["prog", "--frozenhead_server_lr=0.25", "--hn_lr=0.1"])
    assert fv["frozenhead_server_lr"].value == 0.25 and fv["frozenhead_frozen_layer"].value == "FC3"
    assert fv["pfedla_hn_lr"].value == 0.1  # pFedLA's historical flag names are aliases
    assert {f.flag for f in config_fields("frozenhead")} == {"frozenhead_server_lr",
                                                              "frozenhead_frozen_layer"}
    with pytest.raises(UserInputError, match="--frozenhead_server_lr is an option of "
                       "--algorithm=frozenhead, not of --algorithm=fedavg"):
        config_from_argv(["prog", "--frozenhead_server_lr=0.25"])


def test_config_errors_come_before_any_data_is_loaded(toy):
    # a bad option is refused when the config is built, before any data could be read
    with pytest.raises(UserInputError, match="server_lr"):
        apply_overrides(ExperimentConfig(algorithm="frozenhead", **BASE),
                        {"frozenhead.server_lr": 2.0, "dataset": "fmnist"})
    with pytest.raises(UserInputError, match="server_lr"):
        FrozenHeadConfig(server_lr=2.0)
    with pytest.raises(UserInputError, match="unknown --algorithm 'nosuch'"):
        ExperimentConfig(algorithm="nosuch").validate()
    with pytest.raises(UserInputError, match="option of --algorithm=pfedla"):
        apply_overrides(ExperimentConfig(algorithm="frozenhead"), {"pfedla.hn_lr": 0.1})
    with pytest.raises(UserInputError, match="unknown config field"):
        apply_overrides(ExperimentConfig(algorithm="frozenhead"), {"frozenhead.nosuch": 1})
    with pytest.raises(UserInputError, match="integer"):
        apply_overrides(ExperimentConfig(), {"rounds": 2.5})
    # switching algorithm switches the options
    cfg = apply_overrides(ExperimentConfig(algorithm="frozenhead"), {"algorithm": "pfedla", "pfedla.hn_lr": 0.1})
    assert cfg.algorithm_config.hn_lr == 0.1 and cfg.to_dict()["pfedla"]["hn_lr"] == 0.1
    assert "frozenhead" not in cfg.to_dict()


@pytest.mark.slow
def test_algorithms_and_their_data_are_freed():
    """No class-level jit cache keeps an algorithm (and its client data) alive."""
    ds, store = small_store(num_clients=3, samples_per_client=40)
    model = make_cnn(ds.input_shape, ds.num_classes)
    trainer = ClientTrainer(model, store, LocalTrainConfig(batch_size=16, local_steps=1, lr=0.05), "shard")
    ctx = FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                    num_clients=3, input_shape=ds.input_shape, donate_state=True)
    algo = PFedLA(ctx)
    state = algo.init(jax.random.PRNGKey(0))
    state, _ = algo.round(state, 0, np.arange(3), jax.random.PRNGKey(1))
    algo.evaluate(state, 1, jax.random.PRNGKey(2))
    refs = [weakref.ref(algo), weakref.ref(trainer), weakref.ref(trainer.store.images)]
    del algo, trainer, ctx, state, store
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]


@pytest.mark.slow
def test_round_is_one_program_on_a_sharded_donated_state():
    ds, store = small_store(num_clients=3, samples_per_client=40)
    model = make_cnn(ds.input_shape, ds.num_classes)
    trainer = ClientTrainer(model, store, LocalTrainConfig(batch_size=16, local_steps=1, lr=0.05), "shard")
    ctx = FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                    num_clients=3, input_shape=ds.input_shape, donate_state=True)
    algo = PFedLA(ctx)
    state = algo.init(jax.random.PRNGKey(0))
    assert jax.tree.leaves(state["client_params"])[0].shape[0] == 4   # 3 clients padded to 2 devices
    for t, ids in enumerate(([0, 2], [1, 2], [0, 1])):
        old = state
        state, _ = algo.round(state, t, np.array(ids), jax.random.PRNGKey(t))
        assert all(a.is_deleted() for a in jax.tree.leaves(old))       # updated in place
        for leaf in jax.tree.leaves(state["hn_params"]):               # still split over clients
            assert leaf.sharding.spec[0] == "clients", leaf.sharding
    assert algo.trace_count == 1
