"""experiments.table: the paper's table in one command.

The tool runs real experiments.run processes on synthetic data (the preset's real-FMNIST
settings overridden through --run_flags); its numbers are checked against each run's own
metrics.jsonl, mean and std recomputed here with numpy, the paper column against the paper.
Bad input is checked in process (the tool's flags parsed as its program parses them, then
`make_table`), and through the program for a few (one `error:` line, exit 2).
"""

import csv
import glob
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags

from experiments import table
from pfedla_jax.algorithms.registry import unregister
from pfedla_jax.errors import UserInputError
from tests.helpers import one_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("--dataset=synthetic --synthetic_per_class=40 --num_clients=4 --samples_per_client=0 "
        "--classes_per_client=2 --local_epochs=1 --lr=0.05 --eval_every=1 --host_devices=1 "
        "--client_parallelism=loop --tensorboard=false")


def _tool(args, timeout=600, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.table", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- presets


TABLE_PRESETS = sorted(glob.glob(os.path.join(table.PRESET_DIR, "table[12]_*.flags")))


@pytest.mark.parametrize("path", TABLE_PRESETS, ids=[os.path.basename(p) for p in TABLE_PRESETS])
def test_every_table_preset_gives_the_paper_number_of_every_row(path):
    preset = table.read_preset(path)
    has_bn = table.model_has_bn(preset.flags)
    expected = {k for k, m in table.methods().items() if m.in_paper and (has_bn or not m.needs_batchnorm)}
    assert set(preset.paper) == expected, (preset.name, set(preset.paper) ^ expected)
    for mean, std in preset.paper.values():
        assert 10 < mean < 100 and 0 < std < 5


def test_paper_numbers_parse_the_papers_fmnist_cells():
    t1 = table.read_preset(table.resolve_preset("table1_fmnist_n10_small")).paper
    t2 = table.read_preset(table.resolve_preset("table2_fmnist_n10_small")).paper
    # the paper's Table 1 / Table 2, FMNIST 10 clients
    assert t1 == {"local": (85.83, 0.17), "fedavg": (91.24, 0.98), "perfedavg": (93.63, 1.83),
                  "pfedme": (90.43, 0.86), "pfedhn": (94.83, 0.33), "fedrep": (93.17, 0.26),
                  "fedfomo": (86.17, 0.34), "pfedla": (94.34, 0.29), "heurpfedla": (95.47, 0.47)}
    assert t2["local"] == (65.60, 0.59) and t2["pfedla"] == (93.89, 0.91) and t2["fedfomo"] == (64.10, 0.38)
    # a wrapped sentence, a row left empty, and 'Per-FedAvg' is not 'FedAvg'
    text = "# Paper (x): pFedLA 1.5±0.1, HeurpFedLA (k=1)\n# 2.5±0.2, Per-FedAvg 3±1.\n# Paper, the baselines: FedBN –, FedAvg 4.0±0.3."
    assert table.paper_numbers(text) == {"pfedla": (1.5, 0.1), "heurpfedla": (2.5, 0.2),
                                         "perfedavg": (3.0, 1.0), "fedavg": (4.0, 0.3)}


def test_methods_and_budget(tmp_path):
    assert table.parse_methods("all", has_bn=False) == [k for k in table.methods() if k != "fedbn"]
    assert "fedbn" in table.parse_methods("all", has_bn=True)
    assert table.parse_methods("pfedla,local", has_bn=False) == ["local", "pfedla"]  # the paper's order
    paper = ["local", "fedavg", "perfedavg", "pfedme", "pfedhn", "fedbn", "fedrep", "fedfomo",
             "pfedla", "heurpfedla"]
    assert table.parse_methods("paper", has_bn=True) == paper
    assert table.parse_methods("paper", has_bn=False) == [m for m in paper if m != "fedbn"]
    assert table.parse_methods("all", has_bn=True)[:len(paper)] == paper
    assert table.model_has_bn(["--dataset=tfds:cifar10"]) and not table.model_has_bn(["--dataset=fmnist"])
    assert table.model_has_bn(["--dataset=fmnist", "--use_bn=true"])
    preset = table.read_preset(table.resolve_preset("table1_fmnist_n10_small"))
    specs = table.plan_runs(preset, [0], ["heurpfedla"], "cpu", [], str(tmp_path))
    argv = specs[0].argv
    # budget after the preset, method flags after the budget, seed and workdir last
    assert argv.index("--rounds=100") < argv.index("--algorithm=pfedla") < argv.index("--heur_k=1")
    assert argv[-3:] == ("--seed=0", f"--workdir={tmp_path}/runs/heurpfedla/seed_0", "--quiet")


def test_rows_beyond_the_paper_are_below_a_rule(monkeypatch):
    rows = dict(table.methods())
    rows["mine"] = table.Method("mine", "Mine", "fedavg", ("--algorithm=fedavg",), in_paper=False)
    monkeypatch.setattr(table, "methods", lambda: rows)
    meta = {"preset": "p", "budget": "cpu", "seeds": [0], "command": "c"}
    lines = table.format_markdown([{"method": k, "name": k, "seeds": [], "paper": None}
                                   for k in ("local", "pfedla", "mine")], meta).splitlines()
    at = lines.index(next(l for l in lines if "beyond the paper" in l))
    assert [l.split("|")[1].strip() for l in lines[at - 2:at + 2]] == ["local", "pfedla", "**beyond the paper**", "mine"]
    assert lines[at].count("|") == lines[at - 1].count("|")
    # a table of the paper's rows alone, or of other rows alone, has no rule
    for keys in (("local", "pfedla"), ("mine",)):
        text = table.format_markdown([{"method": k, "name": k, "seeds": [], "paper": None} for k in keys], meta)
        assert "beyond the paper" not in text


def test_aggregate_and_order_differences_by_hand():
    res = [{"method": m, "seed": s, "final": f, "last10": l, "best": b, "views": v,
            "median_round_seconds": t}
           for m, s, f, l, b, v, t in [
               ("local", 0, 0.80, 0.79, 0.81, {}, 1.0), ("local", 1, 0.90, 0.88, 0.91, {}, 3.0),
               ("fedavg", 0, 0.70, 0.70, 0.75, {"local": 0.85}, 2.0)]]
    rows = table.aggregate(res, ["local", "fedavg", "pfedla"], {"local": (85.83, 0.17), "fedavg": (91.24, 0.98)})
    local, fedavg, pfedla = rows
    assert local["final"] == pytest.approx((85.0, float(np.std([80, 90], ddof=1))))
    assert local["last10"] == pytest.approx((83.5, float(np.std([79, 88], ddof=1))))
    assert local["diff_final"] == pytest.approx(85.0 - 85.83)
    assert local["median_round_seconds"] == 2.0
    assert fedavg["final"] == pytest.approx((70.0, 0.0)) and fedavg["views"]["local"] == pytest.approx((85.0, 0.0))
    assert pfedla["seeds"] == [] and "final" not in pfedla
    diffs = table.order_differences(rows)
    assert len(diffs) == 1 and "paper: FedAvg > Local" in diffs[0]
    assert table.last_fraction(list(range(1, 21))) == pytest.approx(19.5)  # ceil(0.1 x 20) = 2
    assert table.last_fraction([0.3, 0.5]) == 0.5


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow  # starts the tool, which starts 4 runs (twice)
def test_two_methods_two_seeds_numbers_are_the_runs_metrics(tmp_path):
    out = tmp_path / "t"
    args = ["--preset=table1_fmnist_n10_small", "--seeds=0,1", "--methods=fedavg,local",
            f"--table_dir={out}", f"--run_flags={TINY} --rounds=12"]
    p = _tool(args)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    assert p.stdout.count("final test_acc") == 4 and "[4/4]" in p.stdout
    data = json.loads((out / "table.json").read_text())
    assert data["methods"] == ["local", "fedavg"] and data["seeds"] == [0, 1]
    for row in data["rows"]:
        finals, tails = [], []
        for seed in (0, 1):
            recs = _metrics(out / "runs" / row["method"] / f"seed_{seed}")
            acc = [r["test_acc"] for r in recs]
            assert len(acc) == 12
            finals.append(acc[-1])
            tails.append(np.mean(acc[-math.ceil(0.1 * len(acc)):]))  # last 2 of 12 evaluations
            run = next(r for r in data["runs"] if r["method"] == row["method"] and r["seed"] == seed)
            assert run["final"] == acc[-1] and run["curve"] == acc
        assert row["final"] == pytest.approx([100 * np.mean(finals), 100 * np.std(finals, ddof=1)])
        assert row["last10"] == pytest.approx([100 * np.mean(tails), 100 * np.std(tails, ddof=1)])
        paper = {"local": [85.83, 0.17], "fedavg": [91.24, 0.98]}[row["method"]]
        assert row["paper"] == paper
        assert row["diff_final"] == pytest.approx(row["final"][0] - paper[0])
    fedavg = next(r for r in data["rows"] if r["method"] == "fedavg")
    assert "local" in fedavg["views"]  # FedAvg's second view: after local training
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["local", "fedavg"]
    assert float(rows[0]["final_mean"]) == pytest.approx(data["rows"][0]["final"][0], abs=1e-4)
    md = (out / "table.md").read_text()
    assert "| Local | 0,1 |" in md and "85.83 ± 0.17" in md and "last 10%" in md
    for png in ("curves.png", "label_histogram_seed0.png"):
        assert (out / png).stat().st_size > 1000
    # the same command again: nothing re-runs, the same table
    again = _tool(args)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 4
    assert json.loads((out / "table.json").read_text())["rows"] == data["rows"]


@pytest.mark.slow  # starts the tool (three times)
def test_a_killed_table_resumes_to_the_uninterrupted_numbers(tmp_path):
    run_flags = f"{TINY} --rounds=40 --checkpoint_every=1"
    args = ["--preset=table1_fmnist_n10_small", "--seeds=0", "--methods=fedavg", f"--run_flags={run_flags}"]
    full = _tool([*args, f"--table_dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]
    killed_dir = tmp_path / "killed"
    workdir = killed_dir / "runs" / "fedavg" / "seed_0"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "experiments.table", *args, f"--table_dir={killed_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and len(_metrics(workdir)) >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the tool and its experiments.run child (Ctrl-C kills both too)
    proc.wait()
    assert not (workdir / "summary.json").exists(), "the run ended before it could be killed"
    resumed = _tool([*args, f"--table_dir={killed_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after round" in resumed.stdout
    strip = lambda recs: [{k: v for k, v in r.items() if "seconds" not in k} for r in recs]
    assert strip(_metrics(workdir)) == strip(_metrics(tmp_path / "full" / "runs" / "fedavg" / "seed_0"))
    a = json.loads((killed_dir / "table.json").read_text())["rows"]
    b = json.loads((tmp_path / "full" / "table.json").read_text())["rows"]
    assert [r["final"] for r in a] == [r["final"] for r in b]


BAD = [
    (["--preset=nosuch"], "unknown --preset 'nosuch'"),
    (["--preset=table1_fmnist_n10_small", "--methods=fedavg,nosuch"], "unknown --methods nosuch"),
    (["--preset=table1_fmnist_n10_small", "--seeds=0,x"], "--seeds must be comma-separated integers"),
    (["--preset=table1_fmnist_n10_small", "--seeds=1,1"], "distinct"),
    (["--preset=table1_cifar10_n10", "--budget=cpu"], "defines no CPU budget"),
    (["--preset=table1_fmnist_n10_small", "--budget=tiny"], "unknown --budget"),
    (["--preset=table1_fmnist_n10_small", "--run_flags=--seed=3"], "may not set --seed"),
    (["--preset=table1_fmnist_n10_small", "--rounds=3"], "rounds"),
    (["--preset=table1_fmnist_n10_small", "--run_flags=--no_such_flag=1"], "no_such_flag"),
    (["--preset=table1_fmnist_n10_small", "--run_flags=--lr=-1"], "lr"),
    (["--preset=README.md"], "is not a preset"),
    ([], "--preset is required"),
]


def _refusal(args) -> str:
    """What the tool refuses, in process: its flags parsed as its program parses them (a
    fresh FlagValues), then `make_table` (which plans and checks before it runs anything).
    Returns the message of the error that `main` prints as one `error:` line."""
    values = flags.FlagValues()
    table.define_flags(values)
    try:
        values(["experiments.table", *args])
        table.make_table(values.preset, values.seeds, values.methods, values.budget, values.table_dir,
                         values.run_flags, values.jobs, imports=values["import"].value)
    except (flags.Error, table.TableError, UserInputError) as e:
        return str(e)
    raise AssertionError(f"accepted: {args}")


@pytest.mark.parametrize("args,needle", BAD, ids=[b[1][:24] for b in BAD])
def test_bad_input_is_one_line(tmp_path, args, needle):
    message = _refusal([*args, f"--table_dir={tmp_path / 't'}"])
    assert "\n" not in message and needle in message, message
    assert not (tmp_path / "t").exists()  # nothing was run or written


# through the program: a bad flag value (absl's parse), a refusal of make_table
PROGRAM_BAD = [(["--preset=table1_fmnist_n10_small", "--rounds=3"], "rounds"),
               (["--preset=nosuch"], "unknown --preset 'nosuch'")]


@pytest.mark.slow  # starts a process
@pytest.mark.parametrize("args,needle", PROGRAM_BAD, ids=[b[1][:24] for b in PROGRAM_BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    p = _tool([*args, f"--table_dir={tmp_path / 't'}"], timeout=60)
    assert p.returncode == 2, (p.returncode, p.stdout[-500:], p.stderr[-1500:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not (tmp_path / "t").exists()  # nothing was run or written


@pytest.mark.slow  # starts the tool, which starts 2 runs
def test_a_failed_run_is_reported_and_the_rest_tabulated(tmp_path):
    # Local's workdir already holds another run (a FedAvg config): experiments.run refuses it
    # at run time; FedAvg runs; the table has FedAvg's row, Local's is empty; exit status 1
    out = tmp_path / "t"
    taken = out / "runs" / "local" / "seed_0"
    taken.mkdir(parents=True)
    (taken / "config.json").write_text(json.dumps({"algorithm": "fedavg", "rounds": 2}))
    p = _tool(["--preset=table1_fmnist_n10_small", "--seeds=0", "--methods=local,fedavg",
               f"--table_dir={out}", f"--run_flags={TINY} --rounds=2"])
    assert p.returncode == 1, p.stderr[-2000:]
    assert "FAILED" in p.stdout and "error: local seed 0: error:" in p.stderr
    md = (out / "table.md").read_text()
    assert "| Local | none |" in md and "| FedAvg | 0 |" in md
    assert json.loads((taken / "config.json").read_text())["algorithm"] == "fedavg"  # left as it was


# ----------------------------------------------------------------------------- tuned values (--params)


# TINY without its --lr: with --params a run's tuned lr may not be overridden by --run_flags
TINY_NO_LR = " ".join(f for f in TINY.split() if not f.startswith("--lr="))


def _best(path, rows, preset="table1_fmnist_n10_small", budget="cpu", **top):
    """A hand-made best.json in experiments.tune's format 1; `rows`: {row: (algorithm, params)};
    `top`: top-level fields to set instead."""
    data = {"format": 1, "preset": preset, "budget": budget, "validation_fraction": 0.15, "seed": 0,
            "objective": "val_acc, mean over the last 10% of evaluated rounds",
            "methods": {key: {"algorithm": algorithm, "params": params, "val_acc": 0.87, "trials": 12,
                              "complete": 9, "pruned": 3, "failed": 0, "best_trial": 4,
                              "search_space": ["train.lr ~ log-uniform [0.001, 0.3]"]}
                        for key, (algorithm, params) in rows.items()}}
    data.update(top)
    path.write_text(json.dumps(data))
    return path


def test_params_plan_flag_order_and_default_table_dir(tmp_path):
    best = _best(tmp_path / "best.json", {"pfedla": ("pfedla", {"train.lr": 0.0321, "pfedla.hn_lr": 0.0123}),
                                          "heurpfedla": ("pfedla", {"train.lr": 0.2})})
    tuned = table.read_params(str(best))
    preset = table.read_preset(table.resolve_preset("table1_fmnist_n10_small"))
    table.check_params(tuned, preset, "cpu")
    specs = table.plan_runs(preset, [0], ["local", "pfedla", "heurpfedla"], "cpu", ["--data_dir=/d"],
                            str(tmp_path), tuned=tuned)
    local, pfedla, heur = (s.argv for s in specs)
    # preset, budget, the row's flags, the tuned values, --run_flags, --seed, --workdir
    assert pfedla[2:] == (f"--flagfile={preset.path}", "--rounds=100", "--local_epochs=5", "--eval_every=5",
                          "--algorithm=pfedla", "--lr=0.0321", "--pfedla_hn_lr=0.0123", "--data_dir=/d",
                          "--seed=0", f"--workdir={tmp_path}/runs/pfedla/seed_0", "--quiet")
    assert heur.index("--heur_k=1") < heur.index("--lr=0.2") < heur.index("--data_dir=/d")
    assert not any(a.startswith("--lr=") for a in local) and specs[0].tuned_flags == ()
    table.check_tuned_configs(specs, tuned, ["--data_dir=/d"])
    # the tune's --run_flags recorded: execution options may differ, the computation may not
    for flags_ in (["--host_devices=1", "--client_parallelism=loop", "--tensorboard=false"], []):
        table.check_tuned_configs(specs, dataclasses.replace(tuned, run_flags=tuple(flags_)),
                                  ["--data_dir=/d"])
    # a method whose study has no complete trial runs untuned
    data = json.loads(best.read_text())
    data["methods"]["fedavg"] = {"algorithm": "fedavg", "params": None, "val_acc": None, "trials": 12,
                                 "complete": 0, "pruned": 12, "failed": 0, "best_trial": None}
    best.write_text(json.dumps(data))
    again = table.read_params(str(best))
    assert set(again.methods) == {"pfedla", "heurpfedla"} and again.no_result == ("fedavg",)
    assert table.default_table_dir("p", "cpu", tuned=True) == os.path.join("runs", "table", "p_cpu_tuned")
    assert table.default_table_dir("p", "cpu", tuned=False) == os.path.join("runs", "table", "p_cpu")
    # the table's cells, by hand: chosen values and their validation accuracy, untuned rows marked
    rows = [{"method": m, "name": m, "seeds": [0], "paper": None, "final": (90.0, 0.0)}
            for m in ("local", "pfedla")]
    table.add_tuned(rows, tuned)
    assert rows[0]["tuned"] is False and rows[1]["tuned"] is True
    assert rows[1]["params"] == {"train.lr": 0.0321, "pfedla.hn_lr": 0.0123} and rows[1]["val_acc"] == 87.0
    md = table.format_markdown(rows, {"preset": "p", "budget": "cpu", "seeds": [0], "command": "c",
                                      "params": {"validation_fraction": 0.15, "objective": "o"}})
    assert "| local | untuned (defaults) | – | 0 |" in md
    assert "| pfedla | lr=0.0321, hn_lr=0.0123 | 87.00 (12 trials, 3 pruned) | 0 |" in md
    assert "15% of each client's training split" in md


def _params_refusal(tmp_path, capfd, best, *args, methods="local,pfedla"):
    """The one `error:` line of the tool's main (in process) for a table with --params=best."""
    out = tmp_path / "t"
    line = one_error_line(table.main, ["experiments.table", "--preset=table1_fmnist_n10_small",
                                       "--budget=cpu", f"--methods={methods}", f"--params={best}",
                                       f"--table_dir={out}", *args], capfd)
    assert not out.exists()  # nothing was run or written
    return line


PFEDLA = {"train.lr": 0.05, "pfedla.hn_lr": 0.1}
BAD_PARAMS = [  # (best.json's methods, its top-level fields, extra args, what the error says)
    ({"pfedla": ("pfedla", PFEDLA)}, {"format": 2}, [], "format 2, expected 1"),
    ({"pfedla": ("pfedla", PFEDLA)}, {"preset": "table2_fmnist_n10_small"}, [],
     "tuned on preset 'table2_fmnist_n10_small', not 'table1_fmnist_n10_small'"),
    ({"pfedla": ("pfedla", PFEDLA)}, {"budget": "paper"}, [], "tuned at budget 'paper', not --budget=cpu"),
    ({"nosuch": ("nosuch", {"train.lr": 0.1})}, {}, [], "tunes method 'nosuch', which is not a table row"),
    ({"heurpfedla": ("fedavg", {"train.lr": 0.1})}, {}, [], "'heurpfedla' is algorithm 'fedavg' there"),
    ({"pfedla": ("pfedla", {"pfedla.hn_lr": -0.1})}, {}, [], "hn_lr must be >= 0"),
    ({"pfedla": ("pfedla", {"train.lr": "fast"})}, {}, [], "method pfedla: "),
    ({"pfedla": ("pfedla", {"perfedavg.beta": 0.01})}, {}, [], "is an option of --algorithm=perfedavg"),
    ({"pfedla": ("pfedla", {"pfedla.no_such_field": 1})}, {}, [], "no_such_field"),
    ({"pfedla": ("pfedla", {"seed": 3})}, {}, [], "sets --seed=3, which the table tool sets"),
    ({"heurpfedla": ("pfedla", {"pfedla.heur_k": 2})}, {}, [], "an option that defines the row 'heurpfedla'"),
    ({"pfedla": ("pfedla", PFEDLA)}, {}, ["--run_flags=--lr=0.1"], "may not set --lr: --params gives it"),
    ({"pfedla": ("pfedla", PFEDLA)}, {"methods": {}}, [], "no 'methods'"),
    ({"pfedla": ("pfedla", PFEDLA)}, {"methods": {"pfedla": {"algorithm": "pfedla", "params": 3}}}, [],
     "'params' must be"),
    # a study without a complete trial (params and val_acc null), and no other method
    ({"pfedla": ("pfedla", PFEDLA)}, {"methods": {"pfedla": {"algorithm": "pfedla", "params": None,
                                                             "val_acc": None}}}, [],
     "no method has a complete trial (pfedla)"),
    # values tuned at another setting than this table's runs
    ({"pfedla": ("pfedla", PFEDLA)}, {"run_flags": ["--rounds=20"]}, [],
     "tuned on another setting (rounds: 20 -> 100"),
    ({"pfedla": ("pfedla", PFEDLA)}, {"run_flags": "--rounds=20"}, [], "'run_flags' must be a list"),
]


@pytest.mark.parametrize("methods,top,args,needle", BAD_PARAMS, ids=[b[3][:28] for b in BAD_PARAMS])
def test_bad_params_are_one_error_line(tmp_path, capfd, methods, top, args, needle):
    best = _best(tmp_path / "best.json", methods, **top)
    line = _params_refusal(tmp_path, capfd, best, *args)
    assert needle in line, line


def test_unreadable_params_and_split_flags_are_one_error_line(tmp_path, capfd):
    assert "cannot read --params" in _params_refusal(tmp_path, capfd, tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    assert "is not JSON" in _params_refusal(tmp_path, capfd, tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    assert "expected a JSON object" in _params_refusal(tmp_path, capfd, tmp_path / "list.json")
    best = _best(tmp_path / "best.json", {"pfedla": ("pfedla", PFEDLA)})
    # every table (tuned or not) trains on the full training split and reports test accuracy
    for flag in ("--validation_fraction=0.1", "--evaluate_test=false", "--noevaluate_test"):
        assert "may not set --" in _params_refusal(tmp_path, capfd, best, f"--run_flags={flag}")


def test_params_of_an_imported_algorithm_need_its_import(tmp_path, capfd):
    plugin = tmp_path / "my_tuned_fedavg.py"
    plugin.write_text("from pfedla_jax.algorithms import register\n"
                      "from pfedla_jax.algorithms.fedavg import FedAvg\n"
                      "register('tunedavg')(type('TunedAvg', (FedAvg,), {}))\n")
    best = _best(tmp_path / "best.json", {"tunedavg": ("tunedavg", {"train.lr": 0.1})})
    assert "tunes method 'tunedavg', which is not a table row" in _params_refusal(tmp_path, capfd, best)
    try:
        table.import_plugins([str(plugin)])
        preset = table.read_preset(table.resolve_preset("table1_fmnist_n10_small"))
        tuned = table.read_params(str(best))
        table.check_params(tuned, preset, "cpu")  # with its module imported: accepted
        specs = table.plan_runs(preset, [0], ["tunedavg"], "cpu", [], str(tmp_path), (str(plugin),), tuned)
        assert "--lr=0.1" in specs[0].argv
        table.check_tuned_configs(specs, tuned)
    finally:
        unregister("tunedavg")
        for name in [n for n in sys.modules if n.endswith("my_tuned_fedavg")]:
            del sys.modules[name]


def _config(workdir):
    return json.loads((workdir / "config.json").read_text())


@pytest.mark.slow  # starts the tool, which starts 2 runs (then 1 that refuses)
def test_params_pass_each_chosen_value_to_its_run_and_mark_untuned_rows(tmp_path):
    out = tmp_path / "t"
    chosen = {"train.lr": 0.0321, "pfedla.hn_lr": 0.0123, "pfedla.hn.embed_dim": 7}
    best = _best(tmp_path / "best.json", {"pfedla": ("pfedla", chosen), "fedavg": ("fedavg", {"train.lr": 0.2})})
    args = ["--preset=table1_fmnist_n10_small", "--budget=cpu", "--seeds=0", "--methods=local,pfedla",
            f"--table_dir={out}", f"--run_flags={TINY_NO_LR} --rounds=2"]
    p = _tool([*args, f"--params={best}"])
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    assert (f"tuned values from {best}: pfedla; untuned: local; in best.json but not in --methods "
            "(not run): fedavg") in p.stdout
    pfedla = _config(out / "runs" / "pfedla" / "seed_0")
    assert pfedla["train"]["lr"] == 0.0321 and pfedla["pfedla"]["hn_lr"] == 0.0123
    assert pfedla["pfedla"]["hn"]["embed_dim"] == 7
    assert "validation_fraction" not in pfedla or not pfedla["validation_fraction"]  # the full training split
    local = _config(out / "runs" / "local" / "seed_0")
    assert local["train"]["lr"] == 0.005  # untuned: the preset's (the paper's) lr
    data = json.loads((out / "table.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["pfedla"]["tuned"] and rows["pfedla"]["params"] == chosen and rows["pfedla"]["val_acc"] == 87.0
    assert rows["local"]["tuned"] is False and "fedavg" not in rows  # only the methods asked for
    assert data["params"]["path"] == str(best) and f"--params={best}" in data["command"]
    for r in data["runs"]:
        assert "test_acc" in _metrics(out / "runs" / r["method"] / "seed_0")[-1]  # evaluated on test
    md = (out / "table.md").read_text()
    assert "| Local | untuned (defaults) | – |" in md
    assert "| pFedLA | lr=0.0321, hn_lr=0.0123, hn.embed_dim=7 | 87.00 (12 trials, 3 pruned) |" in md
    with open(out / "table.csv") as f:
        csv_rows = {r["method"]: r for r in csv.DictReader(f)}
    assert csv_rows["local"]["tuned"] == "false" and json.loads(csv_rows["pfedla"]["params"]) == chosen
    # other values into the same table folder: not mixed in. The changed run's command differs
    # (not "finished"); experiments.run refuses the workdir's other configuration: that run is
    # reported failed (exit 1), its workdir left as it was; the unchanged untuned run is skipped
    best2 = _best(tmp_path / "best2.json", {"pfedla": ("pfedla", {**chosen, "train.lr": 0.1})})
    again = _tool([*args, f"--params={best2}"])
    assert again.returncode == 1, again.stderr[-3000:]
    assert "error: pfedla seed 0:" in again.stderr and "different configuration" in again.stderr
    assert "local seed 0: final test_acc" in again.stdout and "finished earlier, skipped" in again.stdout
    assert _config(out / "runs" / "pfedla" / "seed_0")["train"]["lr"] == 0.0321
    md = (out / "table.md").read_text()  # the row of the new values: no run of them finished
    assert "| pFedLA | lr=0.1, hn_lr=0.0123, hn.embed_dim=7 | 87.00 (12 trials, 3 pruned) | none | – |" in md
