"""LG-FedAvg: two rounds against a naive per-client Python loop (tests/test_fedper.py's
`naive_split_rounds`: jax.grad + SGD by hand over the batch plan, the server's average by
hand), the split on the E/FMNIST and CIFAR CNNs, the strategies, bad options."""

import jax
import numpy as np
import pytest

import experiments.run as run_tool
from pfedla_jax.algorithms.lgfedavg import LGFedAvg, LGFedAvgConfig
from pfedla_jax.algorithms.search_space import check_search_space
from pfedla_jax.core.local_training import LocalTrainConfig
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import make_cnn
from pfedla_jax.training.config import ExperimentConfig
from tests.helpers import one_error_line, small_store
from tests.test_fedper import ARGV as FEDPER_ARGV, check_rounds, check_strategies, make_ctx


@pytest.fixture(scope="module")
def ragged():
    ds, store = small_store(num_clients=3, scheme="dirichlet", samples_per_client=40,
                            dirichlet_alpha=1.0, min_client_size=15)
    return ds, store


def test_split_on_the_models(ragged):
    """Default: FC2 and FC3 global, the representation (convs, FC1, and BN on CIFAR) local;
    the bytes are FC2 + FC3 (11,014 floats)."""
    ds, store = ragged
    ctx = make_ctx(ds, store, LocalTrainConfig(batch_size=16, local_epochs=1, lr=0.05))
    algo = LGFedAvg(ctx)
    assert algo.global_layers == ("FC2", "FC3")
    assert algo.local_layers() == ("Conv1", "Conv2", "FC1")
    assert algo.shared_bytes == 4 * 11_014
    assert LGFedAvg(ctx, LGFedAvgConfig(global_layers=1)).local_layers() == ("Conv1", "Conv2", "FC1", "FC2")
    with pytest.raises(UserInputError, match="--lgfedavg_global_layers=5: .*leave no lower layer"):
        LGFedAvg(ctx, LGFedAvgConfig(global_layers=5))
    rgb, rgb_store = small_store(num_clients=3, samples_per_client=20, name="synthetic_rgb")
    cifar = make_ctx(rgb, rgb_store, LocalTrainConfig(batch_size=8, local_epochs=1, lr=0.05),
                     model=make_cnn(rgb.input_shape, rgb.num_classes, use_bn=True))
    assert LGFedAvg(cifar).local_layers() == ("Conv1", "BN1", "Conv2", "BN2", "FC1")
    assert LGFedAvg(cifar, LGFedAvgConfig(global_layers=4)).local_layers() == ("Conv1", "BN1")


@pytest.mark.slow
def test_two_rounds_equal_a_naive_per_client_loop(ragged):
    """Independent initial models (each client's own representation), participants [2, 0]
    then [1, 2] (client 2 trains from its round-1 lower layers, client 1 from its initial
    ones), 2 local epochs of batches of 16, the official code's uniform weights."""
    ds, store = ragged
    cfg = LocalTrainConfig(batch_size=16, local_epochs=2, lr=0.05)
    algo = LGFedAvg(make_ctx(ds, store, cfg, init="independent"), LGFedAvgConfig(weighting="uniform"))
    assert check_rounds(algo, store, [[2, 0], [1, 2]], cfg.lr, uniform=True) == 4 * 11_014


@pytest.mark.slow
def test_every_strategy_agrees_with_one_trace(ragged):
    ds, store = ragged
    final = check_strategies(ds, store, lambda ctx: LGFedAvg(ctx, LGFedAvgConfig(global_layers=1)))
    # the toy model's FC1 is each client's own; FC2 is global
    lower = final["client_params"]["FC1"]["kernel"][:3]
    assert not np.allclose(lower[0], lower[1])


@pytest.mark.parametrize("options,pattern", [
    (dict(global_layers=0), "--lgfedavg_global_layers must be >= 1"),
    (dict(weighting="median"), "unknown --lgfedavg_weighting 'median'"),
])
def test_bad_options_are_refused(options, pattern):
    with pytest.raises(UserInputError, match=pattern):
        LGFedAvgConfig(**options)


ARGV = [a.replace("fedper", "lgfedavg") for a in FEDPER_ARGV]


@pytest.mark.parametrize("flag,fragment", [
    ("--lgfedavg_global_layers=0", "--lgfedavg_global_layers must be >= 1"),
    ("--lgfedavg_global_layers=5", "leave no lower layer"),
])
def test_command_line_bad_option_is_one_line(flag, fragment, capfd):
    assert fragment in one_error_line(run_tool.main, [*ARGV, flag], capfd)


def test_search_space_fits_the_config():
    check_search_space(ExperimentConfig(algorithm="lgfedavg"))
