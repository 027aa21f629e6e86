"""experiments.bench.state_size: every algorithm's closed-form state size (its
`state_size_terms`) equals the bytes of jax.eval_shape(init_state); an algorithm without a
formula gets its measured row; the command line's output and errors."""

import json
import os
import subprocess
import sys
import types

import jax.numpy as jnp
import pytest

from experiments.bench import state_size as ss
from pfedla_jax.algorithms import Algorithm, Evaluation, algorithm_class, algorithm_names, register
from pfedla_jax.algorithms.registry import unregister

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=["fmnist", "tfds:cifar10"])
def dims(request):
    return ss.model_dims(request.param, train_per_client=50)


def all_rows(d):
    return [*algorithm_names(), *ss.variant_labels()]


@pytest.mark.parametrize("n", [7, 60])
def test_formula_equals_eval_shape(dims, n):
    """Every part of every algorithm's state that has a formula (variants included), at two
    N, with and without BN."""
    with_formula = [label for label in all_rows(dims) if ss.formula(label, dims) is not None]
    # every algorithm of the package has one (a plugin's may not: its row is measured only)
    ours = [label for label in all_rows(dims)
            if algorithm_class(label.partition("+")[0]).__module__.startswith("pfedla_jax.")]
    assert ours and set(ours) <= set(with_formula)
    for label in with_formula:
        measured = ss.measure(label, n, dims.dataset, dims.train)
        assert ss.formula_parts(label, dims, n) == measured["parts"], label
        sharded = {(t.group, t.part): t.sharded for t in ss.formula(label, dims) if t.bytes(n)}
        assert sharded == measured["sharded"], label   # per-client vs server_state_keys


def test_pfedla_heads_grow_as_n_squared():
    d = ss.model_dims("fmnist")
    sym = d.symbols("pfedla")
    heads = lambda n: ss.measure("pfedla", n, "fmnist")["parts"][("hypernetworks", "heads")]
    assert heads(40) == 4 * heads(20) == 4 * 4 * sym["L"] * (sym["F"] + 1) * 20 * 20
    assert (d.P, d.B, sym["L"], sym["F"]) == (85_822, 0, 5, 100)      # the FMNIST CNN (models/cnn.py)
    heur = [row for row in algorithm_class("pfedla").rows() if row.key == "heurpfedla"][0]
    assert ss.same_state("pfedla", heur.options, 5, d)                # HeurpFedLA: pFedLA's state


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


def test_report_has_every_algorithm():
    """The report at N = 4 on the FMNIST CNN (what the command line prints and writes)."""
    d = ss.model_dims("fmnist")
    report = ss.build_report(ss.row_labels("all", d), [4], d, [1.0], [1, 2])
    text = ss.markdown(report)
    assert "| pfedla | 4 |" in text and "Largest N" in text
    rows = {(r["algorithm"], r["num_clients"]) for r in report["rows"]}
    # the FMNIST CNN has no BN: FedBN (its table row needs BatchNorm) is left out
    expected = [n for n in algorithm_names() if not algorithm_class(n).rows()[0].needs_batchnorm]
    assert "fedbn" not in expected
    assert {a for a, _ in rows} == {*expected, *ss.variant_labels()}
    assert {n for _, n in rows} == {4} and not report["mismatches"]
    assert {lim["devices"] for lim in report["limits"]} == {1, 2}


class _Toy(Algorithm):
    """A registered algorithm without a formula: every client's model, BN statistics and a
    step counter per client."""

    def init_state(self, key):
        params, stats = self.ctx.init_client_variables(key)
        return {"client_params": params, "batch_stats": stats,
                "steps": jnp.zeros((self.ctx.num_clients,), jnp.int32)}

    def round_step(self, state, round_idx, client_ids, key, data):
        raise NotImplementedError

    def evaluate(self, state, round_idx, key):
        return Evaluation({})


def test_algorithm_without_formula_gets_its_measured_row():
    """A newly registered algorithm needs no edit of the tool: it is listed (after the
    table's algorithms), measured with eval_shape, and has no formula or largest-N row."""
    register("toystate")(_Toy)
    try:
        d = ss.model_dims("fmnist")
        labels = ss.row_labels("all", d)
        assert "toystate" in labels and labels.index("toystate") > labels.index("pfedla")
        assert ss.formula("toystate", d) is None
        assert ss.formula_parts("toystate", d, 3) is None
        report = ss.build_report(["local", "toystate"], [3], d, [1.0], [1])
        row = [r for r in report["rows"] if r["algorithm"] == "toystate"][0]
        assert row["keys"] == {"client_params": 4 * 3 * d.P, "batch_stats": 0, "steps": 4 * 3}
        assert row["groups"]["client params"] == 4 * 3 * d.P and row["groups"]["other"] == 12
        assert row["total"] == 4 * 3 * d.P + 12 and not report["mismatches"]
        assert report["formulas"]["toystate"] is None
        assert {lim["algorithm"] for lim in report["limits"]} == {"local"}
        assert "| toystate | – | – | – (no formula: measured only) | – |" in ss.markdown(report)
    finally:
        unregister("toystate")
    assert "toystate" not in algorithm_names()


def _flags(**values):
    defaults = dict(clients="10,100,1000", dataset="fmnist", train_per_client=50, algorithms="all",
                    capacity_gib="24,80,141", devices="1,2,4,8", out=None)
    return types.SimpleNamespace(**{**defaults, **values})


@pytest.mark.parametrize("values", [dict(clients="1"), dict(clients="ten"), dict(dataset="svhn"),
                                    dict(algorithms="fedsgd"), dict(devices="0"),
                                    dict(capacity_gib="-3"), dict(train_per_client=1)])
def test_bad_input_is_one_error(values):
    """Each bad value is one StateSizeError of one line (main prints it as `error: ...`,
    exit 2: the command-line tests below)."""
    with pytest.raises(ss.StateSizeError) as err:
        ss.settings(_flags(**values))
    assert len(str(err.value).splitlines()) == 1


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.bench.state_size", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_json_has_every_algorithm(tmp_path):
    out = tmp_path / "s.json"
    proc = run_cli("--clients=4", f"--out={out}", "--capacity_gib=1", "--devices=1,2")
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert "| pfedla | 4 |" in proc.stdout and "Largest N" in proc.stdout
    report = json.loads(out.read_text())
    rows = {(r["algorithm"], r["num_clients"]) for r in report["rows"]}
    expected = [n for n in algorithm_names() if not algorithm_class(n).rows()[0].needs_batchnorm]
    assert {a for a, _ in rows} == {*expected, *ss.variant_labels()}
    assert {n for _, n in rows} == {4} and not report["mismatches"]
    assert {lim["devices"] for lim in report["limits"]} == {1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--clients=1"], ["--clients=ten"], ["--dataset=svhn"],
                                  ["--algorithms=fedsgd"], ["--devices=0"], ["--bogus=1"],
                                  ["--capacity_gib=-3"], ["extra"]])
def test_cli_bad_input_is_one_error_line(args):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
