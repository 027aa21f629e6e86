"""Multi-seed tables: the library against hand computation, and a tiny sweep end to end.

`experiments.sweep` runs in this process (its `main`, what `python -m experiments.sweep`
runs); one bad input also through the program (one `error:` line, exit 2).
"""

import json
import os
import statistics
import subprocess
import sys

import pytest

from experiments import sweep
from pfedla_jax.training.tables import format_seed_table, seed_table
from tests.helpers import one_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_seed_table_matches_hand_computation():
    rows = [{"name": "a", "seed": 0, "test_acc": 0.5, "best_test_acc": 0.6},
            {"name": "b", "seed": 0, "test_acc": 0.9, "best_test_acc": 0.9, "local_test_acc": 0.7},
            {"name": "a", "seed": 1, "test_acc": 0.7, "best_test_acc": 0.8},
            {"name": "b", "seed": 1, "test_acc": 0.8, "best_test_acc": 0.95, "local_test_acc": 0.75}]
    table = seed_table(rows)
    assert [e["name"] for e in table] == ["a", "b"]
    a, b = table
    assert a["seeds"] == [0, 1]
    assert a["test_acc_mean"] == pytest.approx(0.6)
    assert a["test_acc_std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert a["best_test_acc_mean"] == pytest.approx(0.7)
    assert "local_test_acc_mean" not in a
    assert b["local_test_acc_mean"] == pytest.approx(0.725)
    text = format_seed_table(table)
    assert "| a | 2 | 60.00 ± 14.14 | 70.00 ± 14.14 | – |" in text
    assert "final test_acc" in text and "best-round test_acc" in text


@pytest.mark.slow  # four training runs
def test_sweep_over_seeds_writes_the_table(tmp_path, capfd):
    root = tmp_path / "sweep"
    capfd.readouterr()
    sweep.main(["experiments.sweep", "--dataset=synthetic", "--synthetic_per_class=40",
                "--num_clients=3", "--classes_per_client=2", "--rounds=2", "--batch_size=16", "--lr=0.05",
                "--seeds=0,1", f"--sweep_dir={root}", "--run=local:algorithm=local",
                "--run=fedavg:algorithm=fedavg"])
    stdout = capfd.readouterr().out
    data = json.loads((root / "seeds.json").read_text())
    by_name = {e["name"]: e for e in data["table"]}
    for name in ("local", "fedavg"):
        finals = [json.loads((root / name / f"seed_{s}" / "summary.json").read_text())["final"]["test_acc"]
                  for s in (0, 1)]
        assert by_name[name]["test_acc_per_seed"] == finals
        assert by_name[name]["test_acc_mean"] == pytest.approx(statistics.fmean(finals))
    assert "local_test_acc_mean" in by_name["fedavg"]
    assert (root / "seeds.md").read_text().startswith("| run | seeds |")
    assert "mean ± std over seeds [0, 1]" in stdout


SWEEP_BAD = [
    (["--seeds=a,b", "--run=x:algorithm=local"], "seeds"),
    (["--seeds=1,1", "--run=x:algorithm=local"], "distinct"),
    ([], "--run"),
    (["--run=x:train.lr=fast"], "number"),
    (["--run=x:no_such_field=1"], "no_such_field"),
    (["--run=x:rounds=2.5"], "integer"),
    (["--run=x:train=5"], "group"),
    (["--seeds=0,1", "--run=x:seed=5"], "sets seed"),
    (["--validation_fraction=0.2", "--run=x:evaluate_test=false"], "experiments.tune"),
]


@pytest.mark.parametrize("args,pattern", SWEEP_BAD)
def test_sweep_bad_input_is_one_line(args, pattern, capfd):
    line = one_error_line(sweep.main, ["experiments.sweep", "--dataset=synthetic", *args], capfd)
    assert pattern in line, line


@pytest.mark.slow  # starts a process
def test_sweep_program_bad_input_is_one_line_and_exit_2():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "experiments.sweep", "--dataset=synthetic",
                        "--run=x:no_such_field=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no_such_field" in err[0], err
