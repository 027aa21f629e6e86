"""experiments/presets/*.flags: every preset parses with experiments.run's flags and builds a
valid ExperimentConfig; the paper presets match the paper's settings (the pFedLA paper's
Sec. 5.1 and Tables 1-3).

Nothing is trained. Data that is not available offline (TFDS) is not loaded: the partition
is checked on labels with the dataset's class counts instead.
"""

import glob
import os
import re
from pathlib import Path

import numpy as np
import pytest

from experiments import table
from pfedla_jax.algorithms import algorithm_class, algorithm_names
from pfedla_jax.data import load_dataset, make_partition, scheme_parameters
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import layer_names, make_cnn
from pfedla_jax.training.command_line import config_from_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET_DIR = os.path.join(ROOT, "experiments", "presets")
PRESETS = sorted(glob.glob(os.path.join(PRESET_DIR, "*.flags")))
NAMES = [os.path.basename(p)[: -len(".flags")] for p in PRESETS]

# (input shape, classes, examples per class) of the datasets the presets use. TFDS counts
# are those of the public datasets (EMNIST digits: 240,000 train + 40,000 test).
DATASETS = {
    "fmnist": ((28, 28, 1), 10, 7000),
    "tfds:emnist/digits": ((28, 28, 1), 10, 28000),
    "tfds:cifar10": ((32, 32, 3), 10, 6000),
    "tfds:cifar100": ((32, 32, 3), 100, 600),
}
SHORT = {"fmnist": "fmnist", "emnist": "tfds:emnist/digits", "cifar10": "tfds:cifar10",
         "cifar100": "tfds:cifar100"}


def _config(path):
    """Parses a preset the way `python -m experiments.run --flagfile=PATH` does."""
    return config_from_argv(["experiments.run", f"--flagfile={path}"]).config


def _flag_lines(path):
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    return [ln for ln in lines if not ln.startswith("#")], [ln for ln in lines if ln.startswith("#")]


def test_presets_exist():
    expected = {f"table{t}_{d}_n{n}" for t in (1, 2) for d in SHORT for n in (10, 100)}
    expected |= {"table3_emnist_k1", "table3_emnist_k2", "table3_cifar10_k1", "table3_cifar10_k2",
                 "table3_cifar10_k3", "fmnist_quick", "fig6_fmnist_quick",
                 "table1_fmnist_n10_small", "table2_fmnist_n10_small", "fig5_fmnist_small"}
    expected |= {f"fig6_{d}" for d in SHORT}
    assert expected <= set(NAMES), expected - set(NAMES)


@pytest.mark.parametrize("path", PRESETS, ids=NAMES)
def test_preset_parses_and_validates(path, capsys):
    name = os.path.basename(path)[: -len(".flags")]
    body, comments = _flag_lines(path)
    assert Path(path).read_text(encoding="utf-8").startswith("#"), "starts with a comment"
    assert all(re.fullmatch(r"--[a-z_]+=\S+", ln) for ln in body), body
    # The header names the exact command that runs this very file.
    assert any(f"--flagfile=experiments/presets/{name}.flags" in c for c in comments), name
    try:
        cfg = _config(path)  # built = validated
    except UserInputError as e:
        pytest.fail(f"{name}: {e}")
    assert cfg.dataset in DATASETS, cfg.dataset
    shape, num_classes, per_class = DATASETS[cfg.dataset]
    use_bn = None if cfg.use_bn == "auto" else cfg.use_bn == "true"
    model = make_cnn(shape, num_classes, use_bn=use_bn)
    if cfg.algorithm == "pfedla":
        assert cfg.algorithm_config.heur_k < len(layer_names(model))
    # The partition is feasible on labels with the dataset's class counts (no data loaded).
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    params = {name: getattr(cfg, name) for name in scheme_parameters(cfg.partition)}
    part = make_partition(labels, num_classes, cfg.num_clients, cfg.partition,
                          samples_per_client=cfg.samples_per_client or None, seed=cfg.seed, **params)
    assert part.num_clients == cfg.num_clients
    assert min(len(t) for t in part.test_indices) > 0


@pytest.mark.parametrize("path", [p for p, n in zip(PRESETS, NAMES) if n.startswith(("table", "fig6_"))
                                  and not n.endswith("_quick")],
                         ids=[n for n in NAMES if n.startswith(("table", "fig6_")) and not n.endswith("_quick")])
def test_paper_presets_match_the_paper(path):
    name = os.path.basename(path)[: -len(".flags")]
    cfg = _config(path)
    kind, ds, variant = re.fullmatch(r"(table[123]|fig6)_([a-z0-9]+)_?(.*)", name).groups()
    assert cfg.dataset == SHORT[ds]
    assert cfg.algorithm == "pfedla"
    # per-client size unknown: the largest feasible; the `_small` variants use 200
    assert cfg.samples_per_client == (200 if variant.endswith("small") else 0)
    assert cfg.train.batch_size == 32 and cfg.train.local_steps == 0
    assert cfg.train.lr == (0.01 if ds.startswith("cifar") else 0.005)
    n = 100 if variant.startswith("n100") else 8 if kind == "fig6" else 10
    assert cfg.num_clients == n
    if n == 100:
        assert (cfg.participation, cfg.rounds, cfg.train.local_epochs) == (0.1, 2500, 20)
    else:
        assert (cfg.participation, cfg.rounds, cfg.train.local_epochs) == (1.0, 600, 10)
    if kind == "table2":
        assert cfg.partition == "noniid2"
        assert cfg.dominant_classes == (6 if ds == "cifar100" else 2)
    elif kind == "fig6":
        assert (cfg.partition, cfg.classes_per_client) == ("adjacent", 4)
    else:
        assert cfg.partition == "noniid1"
        assert cfg.classes_per_client == (12 if ds == "cifar100" else 4)
    assert cfg.algorithm_config.heur_k == (int(variant[1:]) if kind == "table3" else 0)
    if kind == "table3":
        assert ds in ("emnist", "cifar10")
    assert "# Paper" in Path(path).read_text(encoding="utf-8")


def test_fmnist_presets_on_real_data():
    try:
        ds = load_dataset("fmnist")
    except UserInputError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    for path, name in zip(PRESETS, NAMES):
        cfg = _config(path)
        if cfg.dataset != "fmnist":
            continue
        params = {name: getattr(cfg, name) for name in scheme_parameters(cfg.partition)}
        part = make_partition(ds.labels, ds.num_classes, cfg.num_clients, cfg.partition,
                              samples_per_client=cfg.samples_per_client or None, seed=cfg.seed,
                              **params)
        sizes = {len(a) + len(b) for a, b in zip(part.train_indices, part.test_indices)}
        assert len(sizes) == 1, (name, sizes)


def test_bad_preset_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.flags"
    bad.write_text("# a typo\n--num_clientz=10\n")
    with pytest.raises(UserInputError, match="num_clientz") as e:
        _config(str(bad))
    assert "\n" not in str(e.value)


def test_fig5_preset_is_the_paper_fig5_setting():
    cfg = _config(os.path.join(os.path.dirname(PRESETS[0]), "fig5_fmnist_small.flags"))
    assert (cfg.partition, cfg.num_clients, cfg.classes_per_client) == ("fig5", 8, 4)
    assert (cfg.rounds, cfg.train.local_epochs, cfg.train.lr, cfg.train.batch_size) == (600, 10, 0.005, 32)
    assert cfg.algorithm == "pfedla" and cfg.samples_per_client == 200


@pytest.mark.parametrize("path", [p for p, n in zip(PRESETS, NAMES) if re.match(r"table[12]_", n)],
                         ids=[n for n in NAMES if re.match(r"table[12]_", n)])
def test_table_presets_list_every_built_method(path):
    """Every Table 1/2 preset's header gives the command of every method of the paper's
    table that this project has (FedBN where the model has BN), with the paper's number.
    The paper's methods: the algorithms with a row of the paper's (`TableRow.in_paper`; the
    registry's table metadata), but the preset's own (its flags' --algorithm, whose command
    is the flagfile alone)."""
    name = os.path.basename(path)[: -len(".flags")]
    body, comments = _flag_lines(path)
    commands = [c for c in comments if f"--flagfile=experiments/presets/{name}.flags" in c]
    given = {m.group(1) for c in commands for m in [re.search(r"--algorithm=(\w+)", c)] if m}
    has_bn = table.model_has_bn(body)
    expected = {algorithm for algorithm in algorithm_names() for row in algorithm_class(algorithm).rows()
                if row.in_paper and (has_bn or not row.needs_batchnorm)}
    expected -= {_config(path).algorithm}
    assert expected, "no algorithm declares a row of the paper's table"
    assert expected <= given, expected - given
    assert given <= set(algorithm_names())
    workdirs = [re.search(r"--workdir=(\S+)", c).group(1) for c in commands]
    assert len(set(workdirs)) == len(workdirs), "one workdir per method"
    assert any(c.startswith("# Paper, the baselines") and "FedFomo" in c for c in comments)
