"""The package runs on a bare machine: no tensorflow-datasets, tensorflow or tensorboardX.

The GPU machines this project is checked on have jax, flax, optax, chex, absl-py, numpy,
orbax-checkpoint, matplotlib and torch, but not tensorflow-datasets or tensorboardX. Each
test here runs a subprocess whose `sitecustomize` installs a `sys.meta_path` finder that makes
importing those packages fail as if they were not installed (whether or not they are), and
checks: every module imports; a synthetic-data experiment with a workdir runs, warns once
about the missing tensorboardX and still writes its metrics; an explicit `tfds:` dataset is one
`error: ...` line; `experiments.bench.gpu_check --smoke` runs a section in its own process. (The whole
`gpu_check --smoke` runs on the bare machine in tests/test_gpu_check.py, which checks its
figures; the metrics writer without tensorboardX, in process, is in
tests/test_workdir_metrics.py.) Every test here starts a process: all slow.
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


@pytest.mark.slow  # starts a process
def test_blocked_packages_are_missing_and_everything_imports(bare):
    """Every module of pfedla_jax and of experiments (walked: every entry point, the
    measurement tools, the PyTorch reference) imports on the bare machine, all in one
    process (importing a tool defines no flag, so they import together), and none of them
    loads a blocked package."""
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
        import experiments, pfedla_jax
        walked = []
        for package in (pfedla_jax, experiments):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                importlib.import_module(info.name)
                walked.append(info.name)
        for name in ("experiments.run", "experiments.sweep", "experiments.table", "experiments.plots",
                     "experiments.launch", "experiments.torch_baseline.parity"):
            assert name in walked, name
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in {BLOCKED!r})
        assert not loaded, loaded
        print("ok")
        """)
    p = run_bare(bare, ["-c", code], timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


@pytest.mark.slow  # starts a process that trains
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


@pytest.mark.slow  # starts a process
def test_tfds_dataset_without_tfds_is_one_error_line(bare, tmp_path):
    p = run_bare(bare, ["-m", "experiments.run", "--dataset=tfds:mnist", "--num_clients=2",
                        "--rounds=1", f"--workdir={tmp_path / 'run'}"], timeout=300)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-3000:]
    assert err[0].startswith("error: ") and "tensorflow-datasets" in err[0], err


@pytest.mark.slow  # starts processes
def test_gpu_check_smoke_section_runs_bare(bare, tmp_path):
    """One section of `gpu_check --smoke` in its own process (as on a GPU machine)."""
    p = run_bare(bare, ["-m", "experiments.bench.gpu_check", f"--out_dir={tmp_path}", "--smoke",
                        "--gpu_sections=capacity"])
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (name, section), = report["sections"].items()
    assert (name, section["status"], section["returncode"]) == ("capacity", "ok", 0)
    assert section["results"]["capacity"]["largest_that_fits"] == 4
    assert (tmp_path / "gpu_check_logs" / "capacity.json").exists() and (tmp_path / "gpu_check.md").exists()
    # it really ran without them (the section's process reports what it could import)
    assert report["environment"]["optional_modules"] == {name: False for name in BLOCKED}
