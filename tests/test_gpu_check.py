"""experiments.gpu_check: --smoke runs every section on the CPU and writes the JSON and table.

The smoke run runs on a "bare machine" (tests/test_bare_imports.py: no tensorflow-datasets,
tensorflow or tensorboardX, as on the GPU machines), with --noisolate (all sections in one
process: one start-up, shared compilations). The process-per-section path is checked by
tests/test_bare_imports.py (one section in its own process) and here by a section killed by
its time guard (the report is still written). Bad flags: one line, exit 2.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.test_bare_imports import BLOCKED, bare_env, run_bare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`python -m experiments.gpu_check --smoke --noisolate` on the bare machine:
    (process, report or None, out_dir)."""
    env = bare_env(tmp_path_factory.mktemp("bare_machine"))
    out = tmp_path_factory.mktemp("gpu_check_smoke")
    p = run_bare(env, ["-m", "experiments.gpu_check", f"--out_dir={out}", "--smoke", "--noisolate",
                       "--budget_s=900"], timeout=1200)
    path = out / "gpu_check.json"
    return p, json.loads(path.read_text()) if path.exists() else None, out


def _gpu_check(args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


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


def test_time_guard_kills_a_section_and_the_report_is_written(tmp_path):
    # no grace past a ~1.4 s deadline (a section with less than 1 s is not started): the parent
    # kills the section before it has imported JAX and torch and run its rounds, whatever the
    # compilation cache holds
    p = _gpu_check([f"--out_dir={tmp_path}", "--smoke", "--gpu_sections=rounds", "--budget_s=1.5",
                    "--kill_grace_s=0"])
    assert p.returncode == 1, p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rounds = report["sections"]["rounds"]
    assert rounds["status"] == "timeout" and rounds["error"].startswith("time guard: killed after")
    assert rounds["seconds"] < 30 and report["summary"]["section_status"] == {"rounds": "timeout"}
    assert "| rounds | timeout |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.parametrize("args,pattern", [
    ([], "--out_dir"),
    (["--gpu_sections=rounds,nosuch"], "nosuch"),
    (["--torch_device=tpu"], "torch_device"),
    (["--num_clients=5"], "--num_clients is not a gpu_check flag"),
    (["--budget_s=0"], "budget_s"),
])
def test_bad_flags(tmp_path, args, pattern):
    out = [] if not args else [f"--out_dir={tmp_path}"]
    p = _gpu_check(out + args, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-2000:]
    assert err[0].startswith("error: ") and pattern in err[0], err
    assert not (tmp_path / "gpu_check.json").exists()


def test_cuda_without_cuda_is_one_error_line(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --torch_device=cuda is valid here")
    p = _gpu_check([f"--out_dir={tmp_path}", "--torch_device=cuda"], timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and "CUDA" in err[0], err


def test_capacity_stops_at_the_first_out_of_memory_error():
    """The capacity search records an allocation failure (as XLA reports one) and stops there."""
    code = textwrap.dedent("""\
        import json, time
        from absl import flags
        from experiments import benchmark, gpu_check
        flags.FLAGS(["gpu_check", "--smoke"])

        real = benchmark.JaxRounds

        def fake(model, n, **kwargs):   # the first allocation of a too large cohort fails
            if n >= 4:
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                   "123456789 bytes.")
            return real(model, n, **kwargs)

        benchmark.JaxRounds = fake
        res = gpu_check.Results(None)
        gpu_check.section_capacity(gpu_check.SMOKE, gpu_check.Guard(time.time() + 600), res, None)
        print(json.dumps(res.data["capacity"]))
        """)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    cap = json.loads(p.stdout.strip().splitlines()[-1])
    assert [(a["clients"], a["fits"]) for a in cap["attempts"]] == [(2, True), (4, False)]
    failed = cap["attempts"][1]
    assert failed["out_of_memory"] is True and failed["error"].startswith("RuntimeError: RESOURCE_EXHAUSTED")
    assert (cap["largest_that_fits"], cap["first_that_failed"], cap["limited_by"]) == (2, 4, "out of memory")
