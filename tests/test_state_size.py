"""experiments.state_size: every algorithm's closed-form state size equals the bytes of
jax.eval_shape(init_state), and the command line's output and errors."""

import json
import os
import subprocess
import sys

import pytest

from experiments import state_size as ss
from pfedla_jax.algorithms import algorithm_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=["fmnist", "tfds:cifar10"])
def dims(request):
    return ss.model_dims(request.param, train_per_client=50)


def all_rows(d):
    return [*algorithm_names(), *(v[0] for v in ss.VARIANTS)]


@pytest.mark.parametrize("n", [7, 60])
def test_formula_equals_eval_shape(dims, n):
    """Every part of every algorithm's state (variants included), at two N, with and without BN."""
    for label in all_rows(dims):
        measured = ss.measure(label, n, dims.dataset, dims.train)
        assert ss.formula_parts(label, dims, n) == measured["parts"], label
        sharded = {(t.group, t.part): t.sharded for t in ss.formula(label, dims) if t.bytes(n)}
        assert sharded == measured["sharded"], label   # per-client vs server_state_keys


def test_pfedla_heads_grow_as_n_squared():
    d = ss.model_dims("fmnist")
    heads = lambda n: ss.measure("pfedla", n, "fmnist")["parts"][("hypernetworks", "heads")]
    assert heads(40) == 4 * heads(20) == 4 * 4 * d.L * (d.F + 1) * 20 * 20
    assert (d.P, d.B, d.L, d.F) == (85_822, 0, 5, 100)      # the FMNIST CNN (models/cnn.py)
    assert ss.heur_same_state(5, d)


def test_limits_and_sharding():
    d = ss.model_dims("fmnist")
    terms = ss.formula("pfedla", d)
    cap = 24 * ss.GIB
    one, four = ss.largest_n(terms, cap, 1), ss.largest_n(terms, cap, 4)
    assert ss.bytes_per_device(terms, one, 1) <= cap < ss.bytes_per_device(terms, one + 1, 1)
    assert ss.bytes_per_device(terms, four, 4) <= cap < ss.bytes_per_device(terms, four + 1, 4)
    # everything pFedLA keeps is per client: per device a N^2 + b N over 4, so N a bit over x2
    assert 2 * one < four < 2.1 * one
    # replicated entries are not divided: FedFomo's N x N affinity stays whole on each device
    fomo = ss.formula("fedfomo", d)
    assert ss.bytes_per_device(fomo, 1000, 4) >= 4 * 1000**2
    assert ss.largest_n(ss.formula("perfedavg", d), cap, 1) == ss.UNBOUNDED_N   # no BN: nothing per client
    assert ss.largest_n(terms, 10**5, 1) is None                 # not even N = 2 fits 100 kB


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.state_size", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_json_has_every_algorithm(tmp_path):
    out = tmp_path / "s.json"
    proc = run_cli("--clients=4", f"--out={out}", "--capacity_gib=1", "--devices=1,2")
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert "| pfedla | 4 |" in proc.stdout and "Largest N" in proc.stdout
    report = json.loads(out.read_text())
    rows = {(r["algorithm"], r["num_clients"]) for r in report["rows"]}
    expected = [n for n in algorithm_names() if n != "fedbn"]    # the FMNIST CNN has no BN
    assert {a for a, _ in rows} == {*expected, *(v[0] for v in ss.VARIANTS)}
    assert {n for _, n in rows} == {4} and not report["mismatches"]
    assert {lim["devices"] for lim in report["limits"]} == {1, 2}


@pytest.mark.parametrize("args", [["--clients=1"], ["--clients=ten"], ["--dataset=svhn"],
                                  ["--algorithms=fedsgd"], ["--devices=0"], ["--bogus=1"],
                                  ["--capacity_gib=-3"], ["extra"]])
def test_cli_bad_input_is_one_error_line(args):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
