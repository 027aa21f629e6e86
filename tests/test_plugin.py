"""A user's algorithm, in a module outside the package, through every command.

The module (written to the test's tmp dir, nothing in the project edited) registers FedAvgM,
FedAvg with server momentum (Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", 2019: v <- beta v + (w - avg), w <- w - lr v),
with two options. `--import` makes it usable by name in experiments.run, sweep, table and
launch, its options as generated flags.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from experiments import table
from pfedla_jax.algorithms import algorithm_names
from pfedla_jax.algorithms.registry import unregister
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.command_line import config_from_argv, help_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = textwrap.dedent('''
    """FedAvgM: FedAvg with server momentum (Hsu, Qi & Brown 2019)."""
    import dataclasses

    import jax

    from pfedla_jax.algorithms import AlgorithmConfig, register
    from pfedla_jax.algorithms.fedavg import FedAvg
    from pfedla_jax.errors import UserInputError


    @dataclasses.dataclass(frozen=True)
    class FedAvgMConfig(AlgorithmConfig):
        server_momentum: float = dataclasses.field(default=0.9, metadata={"help": "beta."})
        server_lr: float = dataclasses.field(default=1.0, metadata={"help": "Server step size."})

        def validate(self):
            if not 0 <= self.server_momentum < 1:
                raise UserInputError(f"--fedavgm_server_momentum must be in [0, 1), got "
                                     f"{self.server_momentum}")


    @register("fedavgm", FedAvgMConfig)
    class FedAvgM(FedAvg):
        display_name = "FedAvgM"
        server_state_keys = ("global_params", "momentum")

        def init_state(self, key):
            state = super().init_state(key)
            state["momentum"] = jax.tree.map(lambda g: g * 0, state["global_params"])
            return state

        def round_step(self, state, round_idx, client_ids, key, data):
            old = state["global_params"]
            plain = {k: v for k, v in state.items() if k != "momentum"}
            new, metrics = super().round_step(plain, round_idx, client_ids, key, data)
            beta, lr = self.config.server_momentum, self.config.server_lr
            momentum = jax.tree.map(lambda m, g, a: beta * m + (g - a), state["momentum"], old,
                                    new["global_params"])
            new["global_params"] = jax.tree.map(lambda g, m: g - lr * m, old, momentum)
            new["momentum"] = momentum
            return new, metrics
''')
TINY = ["--dataset=synthetic", "--synthetic_per_class=40", "--num_clients=4",
        "--classes_per_client=2", "--local_epochs=1", "--batch_size=16", "--lr=0.05"]


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "my_fedavgm.py"
    path.write_text(PLUGIN)
    yield path
    unregister("fedavgm")
    for name in [n for n in sys.modules if n.endswith("my_fedavgm")]:
        del sys.modules[name]


def _tool(module, args, env=None, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_import_registers_the_algorithm_its_flags_help_and_table_row(plugin):
    assert "fedavgm" not in algorithm_names()
    command = config_from_argv(["experiments.run", f"--import={plugin}", "--algorithm=fedavgm",
                                "--fedavgm_server_momentum=0.5", "--rounds=3"])
    assert command.config.algorithm == "fedavgm" and command.config.rounds == 3
    assert command.config.algorithm_config.server_momentum == 0.5
    assert command.config.to_dict()["fedavgm"] == {"server_momentum": 0.5, "server_lr": 1.0}
    with pytest.raises(UserInputError, match="fedavgm_server_momentum must be in"):
        config_from_argv(["experiments.run", f"--import={plugin}", "--algorithm=fedavgm",
                          "--fedavgm_server_momentum=1.5"])
    page = help_text("experiments.run", ["experiments.run", f"--import={plugin}",
                                         "--algorithm=fedavgm", "--help"])
    assert "FedAvgM options (--algorithm=fedavgm):" in page and "--fedavgm_server_lr" in page
    rows = table.methods()
    assert rows["fedavgm"].display == "FedAvgM" and list(rows)[-1] == "fedavgm"  # after the paper's
    with pytest.raises(UserInputError, match="--import=no_such_plugin_xyz: ModuleNotFoundError"):
        config_from_argv(["experiments.run", "--import=no_such_plugin_xyz"])


@pytest.mark.slow
def test_run_sweep_launch_and_table_use_an_imported_algorithm(plugin, tmp_path):
    # experiments.run, by path
    run_dir = tmp_path / "run"
    p = _tool("experiments.run", [f"--import={plugin}", "--algorithm=fedavgm", *TINY, "--rounds=2",
                                  "--fedavgm_server_momentum=0.5", f"--workdir={run_dir}", "--quiet"])
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == "fedavgm"
    assert summary["config"]["fedavgm"] == {"server_momentum": 0.5, "server_lr": 1.0}
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]
    # experiments.sweep, by module name on PYTHONPATH
    p = _tool("experiments.sweep", ["--import=my_fedavgm", *TINY, "--rounds=2",
                                    "--run=m:algorithm=fedavgm,fedavgm.server_lr=0.5"],
              env={"PYTHONPATH": str(plugin.parent)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "m seed 0" in p.stdout
    # experiments.launch, one process (a plain run started by the launcher)
    p = _tool("experiments.launch", ["--processes=1", "--", f"--import={plugin}", "--algorithm=fedavgm",
                                     *TINY, "--rounds=1", f"--workdir={tmp_path / 'launched'}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "launched" / "summary.json").read_text())["algorithm"] == "fedavgm"
    # experiments.table: the plugin's row beside a paper row
    out = tmp_path / "table"
    run_flags = " ".join([*TINY, "--samples_per_client=0", "--rounds=2", "--host_devices=1",
                          "--client_parallelism=loop", "--tensorboard=false"])
    p = _tool("experiments.table", ["--preset=table1_fmnist_n10_small", f"--import={plugin}",
                                    "--methods=fedavgm,fedavg", f"--table_dir={out}",
                                    f"--run_flags={run_flags}"])
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    data = json.loads((out / "table.json").read_text())
    assert data["methods"] == ["fedavg", "fedavgm"]
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["fedavgm"]["name"] == "FedAvgM" and rows["fedavgm"]["paper"] is None
    assert "final" in rows["fedavgm"] and "| FedAvgM |" in (out / "table.md").read_text()
