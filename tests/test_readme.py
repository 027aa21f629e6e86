"""README.md as a new user meets it: its Python example and its quick-start block run as
written (after `make run`'s main job), and every other command it shows parses."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags

from experiments import launch, plots, sweep, table, tune
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.command_line import config_from_argv, help_text, wants_help

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def marked_block(name: str) -> str:
    """The code block between `<!-- name -->` and `<!-- /name -->`."""
    body = README.split(f"<!-- {name} -->", 1)[1].split(f"<!-- /{name} -->", 1)[0]
    return re.search(r"```\w*\n(.*?)```", body, re.S).group(1)


def commands(block: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def sandbox(tmp_path):
    """A folder that looks like the repository root after `make run`'s setup: the project's
    .venv (or this interpreter in its place) and experiments/ (presets), nothing else, so
    that what the commands write lands in tmp_path/runs."""
    venv = os.path.join(ROOT, ".venv")
    if os.path.isdir(venv):
        os.symlink(venv, tmp_path / ".venv")
    else:
        (tmp_path / ".venv" / "bin").mkdir(parents=True)
        os.symlink(sys.executable, tmp_path / ".venv" / "bin" / "python")
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    return tmp_path


def _shell(command: str, cwd, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _main_job_command() -> str:
    """`make run`'s command, as the Makefile has it (checked by test_cli against the Makefile)."""
    make = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    line = next(l for l in make.splitlines() if "-m experiments.run --flagfile" in l)
    return line.strip().replace("$(PY)", ".venv/bin/python").replace("$(WORKDIR)", "runs/pfedla_fmnist")


@pytest.mark.slow
def test_quick_start_block_runs_as_written(tmp_path):
    if not os.path.exists(FMNIST):
        pytest.skip("the real Fashion-MNIST files are not installed (make data)")
    box = sandbox(tmp_path)
    p = _shell(_main_job_command(), box)  # `make run` (its setup is this environment)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pfedla: final test_acc" in p.stdout
    for command in commands(marked_block("quick-start")):
        p = _shell(command, box)
        assert p.returncode == 0, (command, p.stderr[-3000:])
    assert "pFedLA options (--algorithm=pfedla):" in _shell(commands(marked_block("quick-start"))[0], box).stdout
    for run in ("pfedla_fmnist", "fedavg_fmnist"):
        assert (box / "runs" / run / "metrics.jsonl").read_text().count("\n") == 10
    assert (box / "runs" / "pfedla_fmnist" / "plots" / "accuracy.png").stat().st_size > 1000


@pytest.mark.slow
def test_python_example_runs_as_written(tmp_path):
    if not os.path.exists(FMNIST):
        pytest.skip("the real Fashion-MNIST files are not installed (make data)")
    box = sandbox(tmp_path)
    (box / "example.py").write_text(marked_block("python-api"))
    p = subprocess.run([os.path.join(box, ".venv", "bin", "python"), "example.py"], cwd=box,
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr[-3000:]
    printed = [line.split() for line in p.stdout.splitlines()
               if re.fullmatch(r"[0-9.]+ [0-9.e-]+", line.strip())]  # after the progress lines
    assert len(printed) == 1, p.stdout[-2000:]
    assert 0.1 < float(printed[0][0]) <= 1.0 and float(printed[0][1]) > 0
    assert "'pfedla'" in p.stdout  # algorithm_names()
    assert (box / "runs" / "python_api" / "summary.json").exists()


def readme_commands() -> list[list[str]]:
    """Every `.venv/bin/python -m experiments.*` command in README's code blocks (usage lines
    with [optional] parts or `...` left out), as argv lists."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for command in commands(block):
            for part in command.split("&&"):
                part = part.strip()
                if part.startswith(".venv/bin/python -m experiments.") and "[" not in part and "..." not in part:
                    out.append(shlex.split(part)[2:])
    return out


def _tool_flags(define, argv):
    values = flags.FlagValues()
    define(values)
    values(argv)


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:80])
def test_every_readme_command_parses(argv, tmp_path):
    module, args = argv[0], argv[1:]
    prog = [module]
    try:
        if module == "experiments.run" and wants_help(prog + args):
            assert "local training:" in help_text(module, prog + args)
        elif module == "experiments.run":
            config_from_argv(prog + args)
        elif module == "experiments.sweep":
            config_from_argv(prog + args, strict=False, extra=sweep.define_flags)
        elif module == "experiments.launch":
            cut = args.index("--")
            _tool_flags(launch.define_flags, prog + args[:cut])
            config_from_argv(["experiments.run", *args[cut + 1:]])
        elif module == "experiments.table":
            _tool_flags(table.define_flags, prog + args)
        elif module == "experiments.plots":
            _tool_flags(plots.define_flags, prog + args)
        elif module == "experiments.tune":
            _tool_flags(tune.define_flags, prog + args)
        else:  # the measurement tools: the module exists and its --help (absl's: exit 1) names the flags
            p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
            assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr[-2000:]
            for arg in args:
                name = arg.split("=", 1)[0].lstrip("-")
                assert f"--{name}" in p.stdout or f"--[no]{name}" in p.stdout, (module, name)
    except (UserInputError, flags.Error) as e:
        pytest.fail(f"{' '.join(argv)}: {e}")
