"""experiments.bench.benchmark: one tiny benchmark run (in this process, shared by the tests
that check its figures), its options as its flags give them, bad flags in one line.

The benchmark's pieces that gpu_check reuses (JaxRounds, TorchRounds, server_benchmark with
torch extrapolation) are also run by tests/test_gpu_check.py's smoke run; the round, overhead
and memory sections and the report are this tool's alone and are checked here.
"""

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from experiments.bench import benchmark
from pfedla_jax.errors import UserInputError
from pfedla_jax.runtime import enable_compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the tiny run: its command line and the options it stands for. N = 2 in every section and
# one local step: the sections share programs (the round is the overhead section's 1-step
# round; the state's initialisation is the same) and JAX's persistent compilation cache
# compiles them once (as it does the memory section's second compile of its round).
TINY_ARGS = ["--models=fmnist", "--num_clients=2", "--local_steps=1", "--rounds=2", "--warmup=2",
             "--server_clients=2", "--server_repeats=1", "--torch_threads=1", "--pause_s=0",
             "--sections=rounds,server,overhead,memory", "--overhead_rounds=2", "--memory_clients=2"]
TINY = benchmark.BenchmarkOptions(
    models=("fmnist",), num_clients=2, local_steps=1, rounds=2, warmup=2, server_clients=(2,),
    server_repeats=1, torch_threads=1, pause_s=0.0,
    sections=("rounds", "server", "overhead", "memory"), overhead_rounds=2, memory_clients=2)
FLAG_NAMES = {"models", "algorithm", "num_clients", "local_steps", "batch_size", "rounds", "warmup",
              "client_parallelism", "host_devices", "server_clients", "server_repeats",
              "torch_threads", "pause_s", "skip_torch", "torch_device", "fp32", "out", "sections",
              "overhead_rounds", "memory_clients"}


def _flag_values(args):
    """A fresh FlagValues with the benchmark's flags, parsed from `args`; returns it and argv."""
    fv = flags.FlagValues()
    benchmark.define_flags(fv)
    return fv, fv(["benchmark", *args])


def _bench(args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.bench.benchmark", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """run_benchmark(TINY) in this process, with JAX's persistent compilation cache on (at
    conftest's directory, as experiments run by other tests have it): (report as written to
    --out, stdout). torch's threads and TF32 flags are set back afterwards."""
    if os.environ.get("PFEDLA_REQUIRE_TORCH") != "1":
        pytest.importorskip("torch")
    import torch

    out = tmp_path_factory.mktemp("benchmark") / "bench.json"
    threads = torch.get_num_threads()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    stdout = io.StringIO()
    enable_compilation_cache(None)
    try:
        with contextlib.redirect_stdout(stdout):
            returned = benchmark.run_benchmark(dataclasses.replace(TINY, out=str(out)))
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    return report, stdout.getvalue()


def test_tiny_flags_are_the_tiny_options():
    fv, _ = _flag_values(TINY_ARGS)
    assert benchmark.options_from_flags(fv) == TINY


@pytest.mark.slow
def test_tiny_rounds(tiny):
    report, stdout = tiny
    (r,) = report["rounds"]
    assert r["examples_per_round"] == 2 * 1 * 32
    for key in ("jax_ms_per_round", "torch_ms_per_round", "ratio_jax_over_torch", "jax_compile_s",
                "jax_examples_per_s", "torch_examples_per_s", "peak_rss_mb_after_jax_warmup"):
        assert r[key] > 0, key
    assert len(r["jax_ms_all"]) == len(r["torch_ms_all"]) == 2
    assert "JAX/torch" in stdout


@pytest.mark.slow
def test_tiny_server_step(tiny):
    report, _ = tiny
    (s,) = report["server"]
    assert s["clients"] == 2 and s["jax_ms"] > 0 and s["torch_ms"] > 0
    assert s["torch_measured_clients"] == 2 and s["torch_extrapolated"] is False


@pytest.mark.slow
def test_tiny_machine_versions_and_devices(tiny):
    report, _ = tiny
    assert report["machine"]["cores"] >= 1 and report["versions"]["torch"].startswith("2.13.0")
    # --torch_device=auto is the CPU here; --fp32 (default) turns TF32 off (JAX: CPU is float32)
    versions = report["versions"]
    (r,), (s,) = report["rounds"], report["server"]
    assert versions["torch_device"] == r["torch_device"] == s["torch_device"] == "cpu"
    assert versions["torch_tf32"] == {"matmul": False, "cudnn": False}
    assert versions["jax_matmul_precision"] == "default"


@pytest.mark.slow
def test_tiny_overhead_and_memory(tiny):
    report, _ = tiny
    o = report["overhead"]
    assert o["clients"] == 2 and o["ms_per_round_11_steps"] > o["ms_per_round_1_step"] > 0
    m = report["memory"]
    assert m["clients"] == 2 and m["participants"] == 1 and m["state_mb"] > 0
    assert m["peak_rss_during_round_mb"] >= m["rss_before_round_mb"] > 0 and m["xla_argument_mb"] > 0


def test_flags_are_defined_by_define_flags_only():
    """Importing the module defines no flag; define_flags defines exactly the tool's."""
    assert "experiments.bench.benchmark" not in flags.FLAGS.flags_by_module_dict()
    fv, _ = _flag_values([])
    assert set(fv) == FLAG_NAMES
    assert benchmark.options_from_flags(fv) == benchmark.BenchmarkOptions()   # same defaults
    with pytest.raises(flags.UnrecognizedFlagError):   # a gpu_check flag is not the benchmark's
        _flag_values(["--out_dir=x"])


@pytest.mark.parametrize("args,pattern", [
    (["--models=resnet"], "resnet"),
    (["--algorithm=nosuch"], "algorithm"),
    (["--local_steps=0"], "local_steps"),
    (["--server_clients=1"], "server_clients"),
    (["--server_clients=ten"], "server_clients"),
    (["--sections=rounds,nosuch"], "nosuch"),
    (["--client_parallelism=magic", "--models=fmnist", "--num_clients=2", "--local_steps=1"], "client_parallelism"),
    (["--torch_device=tpu"], "torch_device"),
])
def test_bad_flags(args, pattern, capsys):
    """In this process: main's one `error:` line and exit status 2 (the subprocess below
    checks the same through the command line)."""
    fv, argv = _flag_values(args + ["--skip_torch"])
    with pytest.raises(UserInputError, match=pattern):
        benchmark.options_from_flags(fv)
    with pytest.raises(SystemExit) as e:
        benchmark.main(argv, fv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], err


def test_bad_flag_is_one_error_line():
    p = _bench(["--models=resnet", "--skip_torch"], timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "resnet" in err[0], err


def test_cuda_without_cuda_is_one_error_line(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --torch_device=cuda is valid here")
    fv, argv = _flag_values(["--torch_device=cuda", "--models=fmnist", "--num_clients=2",
                             "--local_steps=1"])
    with pytest.raises(SystemExit) as e:
        benchmark.main(argv, fv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and "CUDA" in err[0], err


@pytest.mark.slow
def test_help_lists_the_tools_flags():
    p = _bench(["--help"], timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]   # (absl's --help exits with status 1)
    listed = {line.split(":")[0].strip().removeprefix("--[no]").removeprefix("--")
              for line in p.stdout.splitlines() if line.startswith("  --")}
    assert listed == FLAG_NAMES
