"""The package runs on a bare machine: no tensorflow-datasets, tensorflow or tensorboardX.

The GPU machines this project is checked on have jax, flax, optax, chex, absl-py, numpy,
orbax-checkpoint, matplotlib and torch, but not tensorflow-datasets or tensorboardX. Each
test here runs a subprocess whose `sitecustomize` installs a `sys.meta_path` finder that makes
importing those packages fail as if they were not installed (whether or not they are), and
checks: every entry point imports; a synthetic-data experiment with a workdir runs, warns once
about the missing tensorboardX and still writes its metrics; an explicit `tfds:` dataset is one
`error: ...` line; `experiments.gpu_check --smoke` runs a section in its own process. (The whole
`gpu_check --smoke` runs on the bare machine in tests/test_gpu_check.py, which checks its
figures.)
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("tensorflow_datasets", "tensorflow", "tensorboardX")

# The path finder is replaced by one that does not see the blocked packages: `import x` fails
# with Python's own "No module named 'x'" and importlib.util.find_spec('x') is None, exactly as
# when they are not installed (libraries probe for tensorflow with find_spec).
SITECUSTOMIZE = textwrap.dedent(f"""\
    # written by tests/test_bare_imports.py: these packages behave as if not installed
    import sys
    from importlib.machinery import PathFinder

    class _BareMachinePathFinder(PathFinder):
        BLOCKED = {BLOCKED!r}

        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            if fullname.partition(".")[0] in cls.BLOCKED:
                return None
            return PathFinder.find_spec(fullname, path, target)

    sys.meta_path[:] = [_BareMachinePathFinder if f is PathFinder else f for f in sys.meta_path]
    """)


def bare_env(directory) -> dict:
    """os.environ for a subprocess on a 'bare machine': `directory` gets a sitecustomize.py
    that blocks BLOCKED, and goes first on PYTHONPATH (with the repository root)."""
    with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    path = [str(directory), ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), JAX_PLATFORMS="cpu")


def run_bare(env, args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def bare(tmp_path_factory):
    return bare_env(tmp_path_factory.mktemp("bare_machine"))


# experiments' CLIs define absl flags at import and some share names (--out): one process each
# for those that cannot be imported together
ENTRY_POINT_GROUPS = [
    ("experiments.run", "experiments.benchmark", "experiments.gpu_check",
     "experiments.torch_baseline", "experiments.torch_baseline.parity"),
    ("experiments.plots",),
    ("experiments.sweep",),
    ("experiments.table",),  # its own process: it and sweep both define --seeds
    # launch passes --distributed_timeout_s on to experiments.run: both define it
    ("experiments.launch", "experiments.state_size"),
]


@pytest.mark.parametrize("modules", ENTRY_POINT_GROUPS, ids=lambda m: m[0])
def test_blocked_packages_are_missing_and_everything_imports(bare, modules):
    """Every module of pfedla_jax (walked) and the experiments' entry points import on the
    bare machine, and none of them loads a blocked package."""
    code = textwrap.dedent(f"""\
        import importlib, importlib.util, pkgutil, sys
        for name in {BLOCKED!r}:
            assert importlib.util.find_spec(name) is None, name
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                pass
            else:
                raise SystemExit(f"{{name}} imported: the blocker does not work")
        import pfedla_jax
        for info in pkgutil.walk_packages(pfedla_jax.__path__, "pfedla_jax."):
            importlib.import_module(info.name)
        for name in {modules!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in {BLOCKED!r})
        assert not loaded, loaded
        print("ok")
        """)
    p = run_bare(bare, ["-c", code], timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_synthetic_experiment_runs_without_tensorboardx(bare, tmp_path):
    workdir = tmp_path / "run"
    p = run_bare(bare, ["-m", "experiments.run", "--algorithm=fedavg", "--dataset=synthetic",
                        "--synthetic_per_class=20", "--num_clients=2", "--samples_per_client=40",
                        "--rounds=2", "--local_steps=2", "--batch_size=8", "--lr=0.05",
                        "--quiet", f"--workdir={workdir}"])   # --tensorboard: its default, true
    assert p.returncode == 0, p.stderr[-3000:]
    warnings = [ln for ln in p.stderr.splitlines() if "tensorboardX" in ln]
    assert warnings == ["warning: tensorboardX is not installed: no TensorBoard events are written "
                        "(pip install tensorboardX)"], p.stderr[-3000:]
    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert len((workdir / "metrics.csv").read_text().splitlines()) == 3   # header + 2 rows
    assert (workdir / "summary.json").exists()
    tb = workdir / "tb"
    assert not tb.exists() or not any("tfevents" in n for n in os.listdir(tb))


def test_tfds_dataset_without_tfds_is_one_error_line(bare, tmp_path):
    p = run_bare(bare, ["-m", "experiments.run", "--dataset=tfds:mnist", "--num_clients=2",
                        "--rounds=1", f"--workdir={tmp_path / 'run'}"], timeout=300)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-3000:]
    assert err[0].startswith("error: ") and "tensorflow-datasets" in err[0], err


def test_gpu_check_smoke_section_runs_bare(bare, tmp_path):
    """One section of `gpu_check --smoke` in its own process (as on a GPU machine)."""
    p = run_bare(bare, ["-m", "experiments.gpu_check", f"--out_dir={tmp_path}", "--smoke",
                        "--gpu_sections=capacity"])
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (name, section), = report["sections"].items()
    assert (name, section["status"], section["returncode"]) == ("capacity", "ok", 0)
    assert section["results"]["capacity"]["largest_that_fits"] == 4
    assert (tmp_path / "gpu_check_logs" / "capacity.json").exists() and (tmp_path / "gpu_check.md").exists()
    # it really ran without them (the section's process reports what it could import)
    assert report["environment"]["optional_modules"] == {name: False for name in BLOCKED}


def test_metrics_writer_without_tensorboardx(tmp_path, monkeypatch, capsys):
    """In-process: with tensorboardX missing, one warning line; a resumed run's events are left
    as they were (not truncated, nothing added); metrics.jsonl/csv are written as always."""
    pytest.importorskip("tensorboardX")   # to write the first run's events
    from pfedla_jax.training import workdir as wd

    first = wd.MetricsWriter(str(tmp_path), tensorboard=True)
    for r in (1, 2):
        first.round_scalars(r, {"train_loss": 1.0 / r})
        first.evaluation({"round": r, "test_acc": 0.5 + r / 10})
    first.close()
    events = {n: (tmp_path / "tb" / n).read_bytes() for n in wd.event_files(str(tmp_path / "tb"))}
    assert len(events) == 1
    capsys.readouterr()

    monkeypatch.setattr(wd, "tensorboardx_available", lambda: False)
    monkeypatch.setattr(wd, "_warned", set())
    resumed = wd.MetricsWriter(str(tmp_path), keep=lambda r: r <= 1, resume_round=1, tensorboard=True)
    resumed.round_scalars(2, {"train_loss": 0.4})
    resumed.evaluation({"round": 2, "test_acc": 0.8})
    resumed.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [wd.TENSORBOARDX_MISSING + f"; the events already in {tmp_path / 'tb'} are left as they were"]
    assert {n: (tmp_path / "tb" / n).read_bytes() for n in wd.event_files(str(tmp_path / "tb"))} == events
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"round": 1, "test_acc": 0.6}, {"round": 2, "test_acc": 0.8}]
    # a fresh writer in the same process does not warn again
    (tmp_path / "other").mkdir()
    wd.MetricsWriter(str(tmp_path / "other"), tensorboard=True).close()
    assert capsys.readouterr().err == ""
