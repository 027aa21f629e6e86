"""experiments.tune: one Optuna study per method, each trial an experiments.run process.

Real runs on synthetic data (the preset's real-FMNIST settings overridden through --run_flags,
6 rounds, an evaluation each round). One tune of two methods x 4 trials (pFedMe and a user's
`--import`ed FedAvgM with its own search space, 2 trials at a time) is shared by the tests
that read its outputs: best.json is the argmax of the trials' objective as the study stores
it, each objective is the mean val_acc of the run's last 10% of evaluations, each trial's
values reach its run (config.json). A tune SIGKILLed mid-study resumes and ends with the same
number of COMPLETE + PRUNED trials as an uninterrupted one: the count, not the values (TPE
restarts from its seed on the trials stored so far and the interrupted trials run again in
another order, so the values sampled after a resume may differ). Pruning and failed trials
on a configured case (enqueued values, in process). Bad input in process: one error each.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from absl import flags

from experiments import table, tune
from pfedla_jax.algorithms.registry import unregister
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.workdir.lock import lock_holder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = "table1_fmnist_n10_small"
TINY = ("--dataset=synthetic --synthetic_per_class=40 --num_clients=4 --samples_per_client=0 "
        "--classes_per_client=2 --local_epochs=1 --eval_every=1 --rounds=6 --host_devices=1 "
        "--client_parallelism=loop --tensorboard=false")
# A user's algorithm with its own search space (a narrower client lr, the server momentum);
# its run refuses a client lr above 0.25 when the algorithm is built (exit status 2, one line)
PLUGIN = textwrap.dedent('''
    """FedAvgM: FedAvg with server momentum (Hsu, Qi & Brown 2019)."""
    import dataclasses

    import jax

    from pfedla_jax.algorithms import AlgorithmConfig, LogUniform, Uniform, register
    from pfedla_jax.algorithms.fedavg import FedAvg
    from pfedla_jax.errors import UserInputError


    @dataclasses.dataclass(frozen=True)
    class FedAvgMConfig(AlgorithmConfig):
        server_momentum: float = dataclasses.field(default=0.5, metadata={"help": "beta."})

        def validate(self):
            if not 0 <= self.server_momentum < 1:
                raise UserInputError(f"--fedavgm_server_momentum must be in [0, 1), got "
                                     f"{self.server_momentum}")


    @register("fedavgm", FedAvgMConfig)
    class FedAvgM(FedAvg):
        display_name = "FedAvgM"
        server_state_keys = ("global_params", "momentum")
        search_space = (LogUniform("train.lr", 0.01, 0.2, source="a test range"),
                        Uniform("server_momentum", 0.0, 0.9, source="Hsu et al. 2019: 0.9"))

        def __init__(self, ctx, config=None):
            super().__init__(ctx, config)
            if ctx.train.lr > 0.25:
                raise UserInputError(f"FedAvgM: --lr={ctx.train.lr} above 0.25 diverges here")

        def init_state(self, key):
            state = super().init_state(key)
            state["momentum"] = jax.tree.map(lambda g: g * 0, state["global_params"])
            return state

        def round_step(self, state, round_idx, client_ids, key, data):
            old = state["global_params"]
            plain = {k: v for k, v in state.items() if k != "momentum"}
            new, metrics = super().round_step(plain, round_idx, client_ids, key, data)
            beta = self.config.server_momentum
            momentum = jax.tree.map(lambda m, g, a: beta * m + (g - a), state["momentum"], old,
                                    new["global_params"])
            new["global_params"] = jax.tree.map(lambda g, m: g - m, old, momentum)
            new["momentum"] = momentum
            return new, metrics
''')


def _tool(args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "experiments.tune", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _trials(tune_dir, method):
    study = optuna.load_study(study_name=method, storage=tune.storage_at(str(tune_dir)))
    return study.get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "my_fedavgm.py"
    path.write_text(PLUGIN)
    yield str(path)
    unregister("fedavgm")
    for name in [n for n in sys.modules if n.endswith("my_fedavgm")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def study_run(plugin, tmp_path_factory):
    """One uninterrupted tune: pFedMe and the plugin's FedAvgM, 4 trials each, 2 at a time."""
    out = tmp_path_factory.mktemp("tune") / "t"
    p = _tool([f"--preset={PRESET}", "--methods=pfedme,fedavgm", "--trials=4", "--jobs=2",
               f"--tune_dir={out}", f"--run_flags={TINY}", f"--import={plugin}",
               "--pruner_min_resource=2", "--pruner_reduction_factor=2"])
    stdout, stderr = p.communicate(timeout=600)
    return p.returncode, stdout, stderr, out


@pytest.mark.slow  # the shared tune: 8 experiments.run processes
def test_best_json_is_the_argmax_of_the_study_and_each_objective_the_runs_val_acc(study_run):
    code, stdout, stderr, out = study_run
    assert code == 0, stderr[-3000:] + stdout[-3000:]
    best = json.loads((out / "best.json").read_text())
    assert {k: best[k] for k in ("format", "preset", "budget", "validation_fraction", "seed")} == \
        {"format": 1, "preset": PRESET, "budget": "paper", "validation_fraction": 0.15, "seed": 0}
    assert best["objective"] == "val_acc, mean over the last 10% of evaluated rounds"
    assert list(best["methods"]) == ["pfedme", "fedavgm"]  # the table's order
    for method in ("pfedme", "fedavgm"):
        trials = _trials(out, method)
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
        failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        assert len(done) + len(pruned) == 4 and done
        top = max(done, key=lambda t: (t.value, -t.number))
        entry = best["methods"][method]
        assert entry["params"] == top.params and entry["val_acc"] == top.value
        assert entry["best_trial"] == top.number
        assert (entry["trials"], entry["complete"], entry["pruned"], entry["failed"]) == \
            (4, len(done), len(pruned), len(failed))
        for t in done:  # the objective: mean val_acc of the last ceil(10%) evaluations
            rows = _metrics(out / t.user_attrs["workdir"])
            assert [r["round"] for r in rows] == list(range(1, 7))
            assert all("val_acc" in r and "test_acc" not in r for r in rows)  # never the test split
            assert t.value == table.last_fraction([r["val_acc"] for r in rows]) == rows[-1]["val_acc"]
            assert t.intermediate_values == {r["round"]: r["val_acc"] for r in rows}
        for t in done + pruned:  # every tuned value reaches its run exactly
            config = json.loads((out / t.user_attrs["workdir"] / "config.json").read_text())
            assert config["train"]["lr"] == t.params["train.lr"]
            assert config["validation_fraction"] == 0.15 and config["evaluate_test"] is False
            for key, value in t.params.items():
                if not key.startswith("train."):
                    assert config[method][key.split(".", 1)[1]] == value
        assert os.path.getsize(out / "plots" / f"{method}.png") > 1000
        lines = [ln for ln in stdout.splitlines() if ln.startswith(f"tune {method} trial ")]
        assert len(lines) == 4 + len(failed)
        assert sum(ln.endswith(" s") and "complete in" in ln for ln in lines) == len(done)
    assert best["methods"]["pfedme"]["search_space"] == [
        "train.lr ~ log-uniform [0.001, 0.09]", "lam ~ log-uniform [1, 20]",
        "personal_lr ~ log-uniform [0.001, 0.09]", "inner_steps ~ int uniform [1, 10]"]
    # the imported algorithm is tuned in its own space
    fedavgm = best["methods"]["fedavgm"]
    assert fedavgm["algorithm"] == "fedavgm" and set(fedavgm["params"]) == {"train.lr", "fedavgm.server_momentum"}
    assert 0.01 <= fedavgm["params"]["train.lr"] <= 0.2
    assert "tune fedavgm: best val_acc" in stdout and "tune pfedme: best val_acc" in stdout


@pytest.mark.slow  # reads the shared tune
def test_a_tune_dir_refuses_another_command(study_run, plugin):
    out = study_run[3]
    before = (out / "best.json").read_text()
    for change, what in (({"validation_fraction": 0.2}, "validation_fraction"), ({"seed": 1}, "seed"),
                         ({"budget": "cpu"}, "budget")):
        kw = dict(preset_name=PRESET, methods_text="fedavgm", trials=4, budget="paper", tune_dir=str(out),
                  imports=[plugin], run_flags_text=TINY)
        with pytest.raises(tune.TuneError, match=f"holds studies made with {what}"):
            tune.tune(**{**kw, **change}, log=lambda line: None)
    assert (out / "best.json").read_text() == before


@pytest.mark.slow  # starts the tool three times, kills it once
def test_a_killed_tune_resumes_to_the_same_count(tmp_path):
    out = tmp_path / "t"
    args = [f"--preset={PRESET}", "--methods=fedavg", "--trials=3", "--jobs=2", f"--tune_dir={out}",
            f"--run_flags={TINY} --checkpoint_every=1 --rounds=300", "--pruner_min_resource=1000"]
    p = _tool(args, start_new_session=True)
    try:
        trials_dir = out / "trials" / "fedavg"
        listed = lambda: [os.path.join(trials_dir, d) for d in os.listdir(trials_dir)] if trials_dir.is_dir() else []
        rows = lambda d: len(_metrics(d)) if os.path.exists(os.path.join(d, "metrics.jsonl")) else 0
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and len(listed()) < 2:
            time.sleep(0.2)
        assert p.poll() is None and len(listed()) == 2, p.communicate()
        # a second tune on the same dir while this one runs: one error line, exit 2
        second = _tool(args)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: --tune_dir") and "in use by another tune (pid" in err
        while time.time() < deadline and p.poll() is None and not any(rows(d) >= 2 for d in listed()):
            time.sleep(0.1)  # one trial evaluated (and checkpointed) twice; 300 rounds: not done
        running = listed()
        advanced = {os.path.basename(d) for d in running if rows(d) >= 2}
        assert p.poll() is None and advanced, p.communicate()
        os.kill(p.pid, signal.SIGKILL)  # the tool only: its runs die with it (PR_SET_PDEATHSIG)
        p.communicate(timeout=60)
        deadline = time.time() + 30
        while any(lock_holder(d) is not None for d in running) and time.time() < deadline:
            time.sleep(0.2)
        assert all(lock_holder(d) is None for d in running)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    states = [t.state for t in _trials(out, "fedavg")]
    interrupted = states.count(optuna.trial.TrialState.RUNNING)
    assert interrupted >= 1 and states.count(optuna.trial.TrialState.COMPLETE) + interrupted <= 3
    p = _tool(args)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:] + stdout[-3000:]
    assert "were interrupted: run again" in stdout
    trials = _trials(out, "fedavg")
    counted = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(counted) == 3  # what an uninterrupted tune ends with: --trials
    stale = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(stale) == interrupted and all(t.state == optuna.trial.TrialState.FAIL for t in stale)
    resumed = []
    for t in stale:  # each ran again with its values, in its workdir (resumed from its checkpoint)
        again = [r for r in trials if r.user_attrs.get("resumes") == t.number]
        assert len(again) == 1 and again[0].params == t.params
        assert again[0].user_attrs["workdir"] == t.user_attrs["workdir"]
        if os.path.basename(t.user_attrs["workdir"]) in advanced:
            summary = json.loads((out / t.user_attrs["workdir"] / "summary.json").read_text())
            resumed.append(summary["resumed_from_round"])
    # a trial that had evaluated twice was checkpointed (every round) and went on from there
    assert resumed and min(resumed) >= 1, resumed
    best = json.loads((out / "best.json").read_text())["methods"]["fedavg"]
    assert (best["trials"], best["failed"]) == (3, 0)


@pytest.mark.slow  # 3 experiments.run processes
def test_pruning_stops_a_bad_trial_early_and_refused_values_fail(tmp_path, plugin):
    """Enqueued values, in this order: a good client lr; a server momentum the config refuses
    (no run starts); a client lr the run refuses when it builds the algorithm (exit 2); a client
    lr too small to learn (pruned at the first rung, round 3, by the first trial's val_acc)."""
    out = tmp_path / "t"
    lines = []
    enqueue = {"fedavgm": [{"train.lr": 0.2, "fedavgm.server_momentum": 0.0},
                           {"train.lr": 0.1, "fedavgm.server_momentum": 1.0},
                           {"train.lr": 0.28, "fedavgm.server_momentum": 0.0},
                           {"train.lr": 0.001, "fedavgm.server_momentum": 0.0}]}
    with pytest.warns(UserWarning, match="out of range"):
        code = tune.tune(PRESET, "fedavgm", 2, "paper", str(out), imports=[plugin],
                         run_flags_text=TINY + " --rounds=60",  # runs that last while they are watched
                         pruner_min_resource=3, pruner_reduction_factor=2, log=lines.append, enqueue=enqueue)
    assert code == 0, lines
    trials = _trials(out, "fedavgm")
    S = optuna.trial.TrialState
    assert [t.state for t in trials] == [S.COMPLETE, S.FAIL, S.FAIL, S.PRUNED], lines
    assert "fedavgm_server_momentum must be in [0, 1)" in trials[1].user_attrs["error"]
    assert not (out / "trials" / "fedavgm" / "trial_1").exists()  # refused before any run
    assert "above 0.25 diverges here" in trials[2].user_attrs["error"]
    assert trials[3].last_step == 3 and trials[3].value == trials[3].intermediate_values[3]
    assert trials[3].value < trials[0].intermediate_values[3]
    assert len(_metrics(out / "trials" / "fedavgm" / "trial_3")) < 60  # stopped early
    failed = [ln for ln in lines if " failed: " in ln]
    assert len(failed) == 2 and "above 0.25 diverges here" in failed[1] and "error:" not in failed[1]
    assert any(ln.startswith("tune fedavgm trial 2/2 (#3): ") and "pruned at round 3" in ln for ln in lines)
    entry = json.loads((out / "best.json").read_text())["methods"]["fedavgm"]
    assert (entry["trials"], entry["complete"], entry["pruned"], entry["failed"], entry["best_trial"]) == \
        (2, 1, 1, 2, 0)


# ----------------------------------------------------------------------------- bad input


def _error(args, tmp_path):
    """The tool's flags parsed as its program parses them, then `tune` (which checks everything
    before it runs anything). Returns the message `main` prints as one `error:` line."""
    values = flags.FlagValues()
    tune.define_flags(values)
    try:
        values(["experiments.tune", f"--tune_dir={tmp_path / 'never'}", *args])
        tune.tune(values.preset, values.methods, values.trials, values.budget, values.tune_dir,
                  values.jobs, values["import"].value, values.validation_fraction, values.run_flags,
                  values.seed, values.pruner_min_resource, values.pruner_reduction_factor,
                  log=lambda line: None)
    except (flags.Error, tune.TuneError, table.TableError, UserInputError) as e:
        assert "\n" not in str(e)
        return str(e)
    raise AssertionError(f"no error for {args}")


def test_bad_input_is_one_error_before_anything_runs(tmp_path):
    p = f"--preset={PRESET}"
    cases = [
        ([p, "--methods=nope"], "unknown --methods nope"),
        (["--preset=no_such_preset"], "unknown --preset 'no_such_preset'"),
        ([], "--preset is required"),
        ([p, "--trials=0"], "--trials must be >= 1, got 0"),
        ([p, "--jobs=0"], "--jobs must be >= 1"),
        ([p, "--validation_fraction=1"], "--validation_fraction must be in (0, 1), got 1.0"),
        ([p, "--validation_fraction=0"], "--validation_fraction must be in (0, 1)"),
        (["--preset=fig6_cifar10", "--budget=cpu"], "preset fig6_cifar10 defines no CPU budget"),
        ([p, "--budget=huge"], "unknown --budget 'huge'"),
        ([p, "--methods=pfedme", "--run_flags=--pfedme_mu=30"],
         "pfedme: the search space of pfedme does not fit its config: personal_lr"),
        ([p, "--methods=pfedme", "--run_flags=--lr=0.01"], "--run_flags may not set --lr: a tuned hyperparameter"),
        ([p, "--methods=pfedla", "--run_flags=--hn_lr=0.01"], "may not set --hn_lr: a tuned hyperparameter"),
        ([p, "--run_flags=--seed=3"], "--run_flags may not set --seed: the tuning tool sets it"),
        ([p, "--run_flags=--validation_fraction=0.2"], "may not set --validation_fraction"),
        ([p, "--run_flags=--heur_k=2"], "may not set --heur_k"),
        ([p, "--methods=fedavg", "--run_flags=--no_such_flag=1"], "fedavg: Unknown command line flag 'no_such_flag'"),
        ([p, "--pruner_reduction_factor=1"], "--pruner_reduction_factor >= 2"),
        ([p, "--import=no_such_plugin_xyz"], "--import=no_such_plugin_xyz: ModuleNotFoundError"),
    ]
    for args, message in cases:
        assert message in _error(args, tmp_path), (args, _error(args, tmp_path))
    assert not (tmp_path / "never").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(tune.TuneError, match="is a file"):
        tune.tune(PRESET, "fedavg", 2, "paper", str(tmp_path / "file"), log=lambda line: None)


def test_heurpfedla_tunes_pfedla_space_with_its_row_option_fixed():
    preset = table.read_preset(table.resolve_preset(PRESET))
    plans = {pl.key: pl for pl in tune.plan_methods(preset, ["pfedla", "heurpfedla"], "cpu", [], [], 0.15, 0)}
    heur = plans["heurpfedla"]
    assert heur.algorithm == "pfedla" and heur.config.algorithm_config.heur_k == 1
    assert [h.path for h in heur.space] == [h.path for h in plans["pfedla"].space] == ["train.lr", "hn_lr", "hn_optimizer"]
    argv = heur.argv({"train.lr": 0.01, "pfedla.hn_lr": 0.2, "pfedla.hn_optimizer": "adam"}, "/w")
    assert argv.index("--heur_k=1") < argv.index("--lr=0.01") < argv.index("--validation_fraction=0.15")
    assert argv[-4:] == ["--evaluate_test=false", "--seed=0", "--workdir=/w", "--quiet"]
    assert "--rounds=100" in argv and heur.config.rounds == 100
