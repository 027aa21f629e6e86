"""experiments.bench.gpu_check: --smoke runs every section on the CPU and writes the JSON and table.

The smoke run runs on a "bare machine" (tests/test_bare_imports.py: no tensorflow-datasets,
tensorflow or tensorboardX, as on the GPU machines), with --noisolate (all sections in one
process: one start-up, shared compilations). The process-per-section path is checked by
tests/test_bare_imports.py (one section in its own process) and here by a section killed by
its time guard (the report is still written). Bad flags: one line, exit 2 (in this process
through `main`, and one case through the command line).
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags

from experiments.bench import benchmark, gpu_check
from tests.test_bare_imports import BLOCKED, bare_env, run_bare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`python -m experiments.bench.gpu_check --smoke --noisolate` on the bare machine:
    (process, report or None, out_dir)."""
    env = bare_env(tmp_path_factory.mktemp("bare_machine"))
    out = tmp_path_factory.mktemp("gpu_check_smoke")
    p = run_bare(env, ["-m", "experiments.bench.gpu_check", f"--out_dir={out}", "--smoke", "--noisolate",
                       "--budget_s=900"], timeout=1200)
    path = out / "gpu_check.json"
    return p, json.loads(path.read_text()) if path.exists() else None, out


FLAG_NAMES = {"out_dir", "smoke", "budget_s", "gpu_sections", "isolate", "kill_grace_s", "section",
              "section_out", "section_deadline", "torch_device", "fp32"}


def _flag_values(args):
    """A fresh FlagValues with gpu_check's flags, parsed from `args`; returns it and argv."""
    fv = flags.FlagValues()
    gpu_check.define_flags(fv)
    return fv, fv(["gpu_check", *args])


def _gpu_check(args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.bench.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_smoke_report_has_every_figure(smoke):
    p, report, out = smoke
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert report["schema"] == 1 and report["smoke"] is True and report["total_s"] > 0
    env = report["environment"]
    assert env["backend"] == "cpu" and env["jax"] and env["torch"] and env["devices"] == ["cpu:0 cpu"]
    assert env["optional_modules"] == {name: False for name in BLOCKED}   # the bare machine
    sec = {name: s["results"] for name, s in report["sections"].items()}
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in report["sections"].values())

    # correctness: really ran, and passed
    corr = sec["correctness"]
    assert corr["passed"] is True and corr["not_run"] == []
    (case,) = corr["round_parity"].values()
    assert case["strategies"] == {"vmap": "vmap", "loop": "loop"} and case["initial_state_diff"] == 0.0
    assert set(case["strategies_per_entry"]) == {"client_params", "batch_stats", "hn_params", "hn_opt_state"}
    assert case["strategies_max_abs_diff"] <= case["atol"] == 1e-4
    assert case["alpha_moved"] > 1e-2 and case["params_moved"] > 1e-3
    torch_part = case["torch"]
    assert torch_part["device"] == "cpu" and torch_part["passed"] is True
    assert max(torch_part["max_abs_diff"].values()) <= 1e-4
    assert set(torch_part["max_abs_diff"]) == {"client_params", "batch_stats", "alpha_used", "hn_params",
                                               "alpha_after"}
    ops = corr["ops"]
    assert ops["passed"] is True and len(ops["rel_errors"]) == 10 and ops["max_rel_error"] <= ops["rtol"]

    # rounds: one entry per (model, clients); whole torch rounds at 2 clients, 2 of 4 extrapolated
    rounds = sec["rounds"]["rounds"]
    assert [(r["model"], r["clients"]) for r in rounds] == [("fmnist", 2), ("fmnist", 4)]
    for r in rounds:
        assert r["examples_per_round"] == r["clients"] * 2 * 8 and r["jax_strategy"] == "vmap"
        for key in ("jax_ms_per_round", "jax_examples_per_s", "torch_ms_per_round",
                    "torch_examples_per_s", "ratio_jax_over_torch", "jax_state_mb"):
            assert r[key] > 0, key
        assert r["jax_compile_s"] >= 0 and r["torch_device"] == "cpu"
        assert r["ratio_jax_over_torch"] == pytest.approx(r["jax_ms_per_round"] / r["torch_ms_per_round"])
    assert (rounds[0]["torch_measured_participants"], rounds[0]["torch_extrapolated"]) == (2, False)
    assert (rounds[1]["torch_measured_participants"], rounds[1]["torch_extrapolated"]) == (2, True)

    (server,) = sec["server"]["server"]
    assert server["clients"] == 4 and server["jax_ms"] > 0 and server["torch_ms"] > 0
    assert server["torch_measured_clients"] == 2 and server["torch_extrapolated"] is True

    local = sec["strategies"]["local_training"]["fmnist"]
    variants = ("vmap", "vmap_chunks_of_2", "loop")
    assert all(local[v]["ms"] > 0 and local[v]["compile_s"] >= 0 for v in variants)
    assert [local[v]["strategy"] for v in variants] == ["vmap", "vmap", "loop"]
    assert "skipped" in local["shard"] and local["fastest"] in variants
    assert local["ms_relative_to_vmap"]["vmap"] == 1.0
    micro = sec["strategies"]["conv_micro"]["fmnist"]
    for layer in ("conv1", "conv2"):
        for v in ("vmap_custom_vjp", "vmap_autodiff", "loop", "im2col_batched_gemm", "chunks_of_2"):
            assert micro[layer][v]["ms"] > 0 and micro[layer][v]["rel_diff_to_vmap"] < 1e-4, (layer, v)

    cap = sec["capacity"]["capacity"]
    assert [(a["clients"], a["fits"]) for a in cap["attempts"]] == [(2, True), (4, True)]
    assert cap["largest_that_fits"] == 4 and cap["limited_by"] == "cap"

    summary = report["summary"]
    assert summary["correctness_passed"] is True
    assert set(summary["ratio_jax_over_torch"]["fmnist"]) == {"2", "4"}
    assert summary["fastest_strategy"]["fmnist"] == local["fastest"]
    assert summary["cifar_clients_that_fit"] == 4 and summary["server_speedup_jax"]["4"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "Correctness: PASSED" in md and "## pFedLA round" in md and "| fmnist | 4 |" in md
    assert "figures:" in p.stdout


@pytest.mark.slow
def test_time_guard_kills_a_section_and_the_report_is_written(tmp_path, capsys):
    # no grace past a ~1.4 s deadline (a section with less than 1 s is not started): the parent
    # (this process) kills the section's process before it has imported JAX and torch and run
    # its rounds, whatever the compilation cache holds
    fv, _ = _flag_values([f"--out_dir={tmp_path}", "--smoke", "--gpu_sections=rounds",
                          "--budget_s=1.5", "--kill_grace_s=0"])
    rc = gpu_check.run_parent(gpu_check.settings_from_flags(fv))
    assert rc == 1, capsys.readouterr()
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rounds = report["sections"]["rounds"]
    assert rounds["status"] == "timeout" and rounds["error"].startswith("time guard: killed after")
    assert rounds["seconds"] < 30 and report["summary"]["section_status"] == {"rounds": "timeout"}
    assert "| rounds | timeout |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.parametrize("args,pattern", [
    ([], "--out_dir"),
    (["--gpu_sections=rounds,nosuch"], "nosuch"),
    (["--torch_device=tpu"], "torch_device"),
    (["--budget_s=0"], "budget_s"),
])
def test_bad_flags(tmp_path, args, pattern, capsys):
    """In this process: main's one `error:` line and exit status 2, nothing written."""
    out = [] if not args else [f"--out_dir={tmp_path}"]
    fv, argv = _flag_values(out + args)
    with pytest.raises(SystemExit) as e:
        gpu_check.main(argv, fv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and pattern in err[0], err
    assert not (tmp_path / "gpu_check.json").exists()


def test_another_tools_flag_is_one_error_line(tmp_path):
    """Through the command line: a flag of experiments.bench.benchmark (or experiments.run) is
    not gpu_check's (importing benchmark adds none of its flags)."""
    p = _gpu_check([f"--out_dir={tmp_path}", "--num_clients=5"], timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-2000:]
    assert err[0].startswith("error: ") and "num_clients" in err[0], err
    assert not (tmp_path / "gpu_check.json").exists()


def test_cuda_without_cuda_is_one_error_line(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --torch_device=cuda is valid here")
    fv, argv = _flag_values([f"--out_dir={tmp_path}", "--torch_device=cuda"])
    with pytest.raises(SystemExit) as e:
        gpu_check.main(argv, fv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "CUDA" in err[0], err


def test_flags_are_defined_by_define_flags_only():
    """Importing gpu_check (and benchmark, which it imports) defines no flag; define_flags
    defines gpu_check's, --torch_device and --fp32 (benchmark's) among its key flags."""
    defined_by = flags.FLAGS.flags_by_module_dict()
    assert "experiments.bench.gpu_check" not in defined_by
    assert "experiments.bench.benchmark" not in defined_by
    fv, _ = _flag_values([])
    assert set(fv) == FLAG_NAMES
    assert {f.name for f in fv.get_key_flags_for_module(gpu_check.__name__)} == FLAG_NAMES
    with pytest.raises(flags.UnrecognizedFlagError):
        _flag_values(["--num_clients=5"])


class _StubRounds:
    """What section_capacity uses of benchmark.JaxRounds: the state and timed rounds."""

    def __init__(self, model, n, **kwargs):
        del model, kwargs
        self.state = {"hn": np.zeros((n, 3), np.float32)}

    def run(self, t):
        return 0.01 * (t + 1)


def test_capacity_stops_at_the_first_out_of_memory_error(monkeypatch):
    """The capacity search records an allocation failure (as XLA reports one) and stops there.
    (A cohort that fits is a stub here: the real rounds of the capacity section run in the
    smoke run above and in tests/test_bare_imports.py.)"""

    def fake(model, n, **kwargs):   # the first allocation of a too large cohort fails
        if n >= 4:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                               "123456789 bytes.")
        return _StubRounds(model, n, **kwargs)

    monkeypatch.setattr(benchmark, "JaxRounds", fake)
    res = gpu_check.Results(None)
    gpu_check.section_capacity(gpu_check.SMOKE, gpu_check.Guard(time.time() + 600), res, None)
    cap = res.data["capacity"]
    assert [(a["clients"], a["fits"]) for a in cap["attempts"]] == [(2, True), (4, False)]
    failed = cap["attempts"][1]
    assert failed["out_of_memory"] is True and failed["error"].startswith("RuntimeError: RESOURCE_EXHAUSTED")
    assert (cap["largest_that_fits"], cap["first_that_failed"], cap["limited_by"]) == (2, 4, "out of memory")


@pytest.mark.slow
def test_help_lists_the_tools_flags():
    p = _gpu_check(["--help"], timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]   # (absl's --help exits with status 1)
    listed = {line.split(":")[0].strip().removeprefix("--[no]").removeprefix("--")
              for line in p.stdout.splitlines() if line.startswith("  --")}
    assert listed == FLAG_NAMES
