"""experiments.benchmark runs end to end (tiny shapes) and rejects bad flags in one line."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.benchmark", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_tiny_benchmark_writes_every_figure(tmp_path):
    if os.environ.get("PFEDLA_REQUIRE_TORCH") != "1":
        pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    p = _bench(["--models=fmnist", "--num_clients=2", "--local_steps=2", "--rounds=2", "--warmup=2",
                "--server_clients=3", "--server_repeats=1", "--torch_threads=1", f"--out={out}",
                "--sections=rounds,server,overhead,memory", "--overhead_rounds=2", "--memory_clients=6"])
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    (r,) = report["rounds"]
    assert r["examples_per_round"] == 2 * 2 * 32
    for key in ("jax_ms_per_round", "torch_ms_per_round", "ratio_jax_over_torch", "jax_compile_s",
                "jax_examples_per_s", "torch_examples_per_s", "peak_rss_mb_after_jax_warmup"):
        assert r[key] > 0, key
    assert len(r["jax_ms_all"]) == len(r["torch_ms_all"]) == 2
    (s,) = report["server"]
    assert s["clients"] == 3 and s["jax_ms"] > 0 and s["torch_ms"] > 0
    assert report["machine"]["cores"] >= 1 and report["versions"]["torch"].startswith("2.13.0")
    # --torch_device=auto is the CPU here; --fp32 (default) turns TF32 off (JAX: CPU is float32)
    versions = report["versions"]
    assert versions["torch_device"] == r["torch_device"] == s["torch_device"] == "cpu"
    assert versions["torch_tf32"] == {"matmul": False, "cudnn": False}
    assert versions["jax_matmul_precision"] == "default"
    assert s["torch_measured_clients"] == 3 and s["torch_extrapolated"] is False
    o = report["overhead"]
    assert o["clients"] == 2 and o["ms_per_round_11_steps"] > o["ms_per_round_1_step"] > 0
    m = report["memory"]
    assert m["clients"] == 6 and m["participants"] == 1 and m["state_mb"] > 0
    assert m["peak_rss_during_round_mb"] >= m["rss_before_round_mb"] > 0 and m["xla_argument_mb"] > 0
    assert "JAX/torch" in p.stdout


@pytest.mark.parametrize("args,pattern", [
    (["--models=resnet"], "resnet"),
    (["--algorithm=fedprox"], "algorithm"),
    (["--local_steps=0"], "local_steps"),
    (["--server_clients=1"], "server_clients"),
    (["--sections=rounds,nosuch"], "nosuch"),
    (["--client_parallelism=magic", "--models=fmnist", "--num_clients=2", "--local_steps=1"], "client_parallelism"),
    (["--torch_device=tpu"], "torch_device"),
])
def test_bad_flags(args, pattern):
    p = _bench(args + ["--skip_torch"], timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], err


def test_cuda_without_cuda_is_one_error_line():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --torch_device=cuda is valid here")
    p = _bench(["--torch_device=cuda", "--models=fmnist", "--num_clients=2", "--local_steps=1"], timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-2000:]
    assert err[0].startswith("error: ") and "CUDA" in err[0], err
