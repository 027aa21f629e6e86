r"""One command for a GPU machine: is the GPU path correct, and how fast is it against PyTorch?

    python -m experiments.bench.gpu_check --out_dir=runs/gpu_check           # = make gpu-check
    python -m experiments.bench.gpu_check --out_dir=runs/gpu_smoke --smoke   # tiny sizes (CPU, CI)

Writes OUT_DIR/gpu_check.json (every figure, the device, versions, per-section status and
errors) and OUT_DIR/gpu_check.md (short tables), and prints progress and the tables. Exit
status 0 when every section ran and the correctness set passed, 1 otherwise (both files are
written either way), 2 for bad flags (one line `error: ...`).

Sections (each runs in its own process, so a crash, an out-of-memory error or a hang in one
costs only that section; its figures are saved after every item, so even a section killed by
its time guard keeps what it measured; --noisolate runs them all in this process):

  correctness  on JAX's default backend, full float32 (matmul precision 'highest'):
               (a) one pFedLA round from one start (3 clients of 40/21/30 examples: partial
                   batches and padding steps; 2 taking part; one model per client; the public
                   code's hypernetwork with a step that moves alpha by > 1e-2), gray model and
                   RGB model with BatchNorm, run with `vmap` and with `loop` (the new state must
                   agree: client models, BN statistics, hypernetworks and their optimizer
                   states, max abs difference <= 1e-4) and by the PyTorch reference on torch's
                   device (cuda when torch sees one; TF32 off), from the same weights and
                   batches (experiments/torch_baseline/parity.py: <= 1e-4 as the CPU test,
                   loss sums to 1e-4 relative);
               (b) the custom ops (pfedla_jax/models/ops.py) equal plain autodiff: conv
                   (canonical and CPU fast path, Cin 1/3/16, values and both gradients, and
                   under vmap over clients), 2x2 max pooling, masked BatchNorm (relative error
                   ||a - b|| / ||b|| <= 1e-4).
  rounds       a full pFedLA round (alpha, aggregation, local training, hypernetwork step),
               FMNIST CNN and CIFAR CNN, 50 local steps x batch 32 (1,600 examples per
               client), at 10, 100 and 1,000 clients per round: JAX `vmap` (one jitted call)
               against the PyTorch reference (clients one after another on the same device):
               ms per round (median after 2 warm-up rounds), examples/s, compile seconds
               (first round minus a steady one), peak device memory (JAX:
               memory_stats()['peak_bytes_in_use'], a process-wide peak: configurations run
               in increasing size; torch: max_memory_allocated, reset per configuration), and
               the JAX/torch time ratio. torch runs whole rounds (up to 3) when they fit the
               time the configuration may use (up to 100 clients); otherwise a subset of the
               participants (each aggregating from all N stored models, as in the full
               round; 2 to 20 of them) and the time is extrapolated linearly to N
               ('torch_extrapolated', 'torch_measured_participants', 'torch_ms_per_participant').
  server       the pFedLA server step alone (alpha + aggregation + hypernetwork update of all
               N clients, FMNIST CNN) at N = 100, 500, 1,000; torch on 5 of the N clients,
               extrapolated to N (experiments.bench.benchmark.server_benchmark).
  strategies   the client-parallel alternatives at 100 clients (local training, 50 steps x
               32, CIFAR then FMNIST CNN): `vmap` (all clients in one batched program: the
               convs become grouped convolutions, jax#26568), `loop` (one client at a time),
               `vmap` in chunks (`lax.map(batch_size=k)`, k = 10, 25), `vmap` of the
               plain-autodiff conv (XLA's own batching rule instead of the custom VJP),
               `shard` when there are several devices; then the conv layers alone (forward +
               both gradients, batch 32, 100 clients) as vmap (custom and autodiff), chunked,
               loop and a client-batched im2col GEMM (one batched matmul per layer, no
               grouped conv): the figures to choose the GPU default strategy from.
  capacity     the largest number of CIFAR-CNN clients per pFedLA round (N = S, all take
               part) that fits: doubling from 1,000 until an out-of-memory error, the cap
               (16,000) or the time guard. With 2 local steps: the memory of a round does
               not depend on the number of steps (one step's activations at a time), its
               time does. pFedLA's hypernetworks hold L x 100 x N floats per client, so the
               state grows as N^2 (2.8 MB per client at N = 1,000 for CIFAR).

Time budget (designed from FLOP counts; no GPU was available when this was written): one
example's SGD step costs about 3x its forward pass, 6.7 MFLOP (FMNIST CNN: conv1 0.23M,
conv2 0.82M, dense 0.07M MACs) and 14.0 MFLOP (CIFAR CNN: 0.94M, 1.28M, 0.11M MACs). A round
at 1,000 clients is 1.6M examples: 10.8 and 22.4 TFLOP (1.1 / 2.2 at 100 clients). An
H100/H200 does ~60 TFLOP/s in float32 without TF32; small grouped convolutions reach perhaps
10-20% of it, so a 1,000-client round takes ~1-4 s: 2 warm-up + <= 5 measured rounds + a
compile of 10-20 s stays under ~45 s per model. torch is launch-bound: ~70 kernels per SGD
step at ~10 us each is ~1 ms per step, 50-80 ms per client, plus its server step (per
participant one Python-level weighted sum per tensor and source client, and autograd through
it: ~0.06 s at N = 100, ~0.6 s at N = 1,000): ~13 s for a 100-client round (measured whole,
once or more as time allows) and ~10 min for 1,000 clients (so a subset of <= 20
participants, ~15 s). The server step's aggregation is S x N x |theta| MACs (0.09 TFLOP at
N = 1,000). XLA compiles a round program in ~10-20 s (6 configurations, 4-5 local-training
programs per model, 2 x 2 parity rounds): compiling is the largest single cost. Shares of
--budget_s (default 450 s, under the 8 minutes asked for): correctness 18%, rounds 42%,
server 10%, strategies 15%, capacity 11%, 4% kept for the parent process; time a section
leaves unused passes to the next ones. Inside a section every item is guarded: before it
starts, its time is estimated from the items already measured (linear in clients, plus the
last compile time) and it is skipped ('skipped': 'time guard: ...') if it would not fit; the
round configurations keep back what the later ones need at least (compile + 4 rounds + 10 s
of torch); the parent kills a section that overruns its deadline by 5 s (status 'timeout',
the figures saved so far are kept). --smoke runs the same code with tiny sizes (2-4 clients,
2 local steps, N = 4 for the server, one model): every section and code path, with JAX's
persistent compilation cache on and XLA's backend optimisations off (a CPU spends a smoke run
compiling): ~50 s of CPU time with --noisolate, ~70 s with a process per section (measured
on the 2-core CI machine).

Precision: --fp32 (default) = full float32 on both sides (JAX matmul precision 'highest',
torch TF32 off for matmuls and cuDNN) for the benchmarks too; --nofp32 measures each
framework's default instead (TF32 on recent GPUs: JAX for convs and matmuls, torch for
convs). The correctness set always runs in full float32.

--torch_device and --fp32 are defined with experiments.bench.benchmark's
`define_torch_flags` (the same flags there); importing this module defines no flag
(`define_flags` does, when the tool runs). From Python: `run_parent(CheckSettings(...))`.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from absl import app, flags, logging

from experiments.bench import benchmark
from experiments.cli import fail, parse_flags, start
from pfedla_jax.core.client_parallel import for_each_client, replicated
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import make_cnn, ops
from pfedla_jax.runtime import enable_compilation_cache

SECTIONS = ("correctness", "rounds", "server", "strategies", "capacity")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this tool's flags on `flag_values`, with --torch_device and --fp32 from
    experiments.bench.benchmark (`python -m experiments.bench.gpu_check` does; importing the
    module defines none)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("out_dir", None, "Directory for gpu_check.json and gpu_check.md "
                        "(created).", **fv)
    flags.DEFINE_bool("smoke", False, "Tiny sizes (2-4 clients, 2 local steps, one model): the "
                      "same code, about a minute of CPU time (what CI runs).", **fv)
    flags.DEFINE_float("budget_s", 450.0, "Wall-clock budget of the whole check in seconds "
                       "(split over the sections; see the module docstring).", **fv)
    flags.DEFINE_list("gpu_sections", list(SECTIONS),
                      f"Sections to run, among {', '.join(SECTIONS)}.", **fv)
    flags.DEFINE_bool("isolate", True, "Run each section in its own process (a crash, an "
                      "out-of-memory error or a hang costs only that section, and the time "
                      "guard can kill it). --noisolate: all in this process, guards "
                      "cooperative only (faster on a CPU: one start-up, shared compilations).",
                      **fv)
    flags.DEFINE_float("kill_grace_s", 5.0, "Seconds past a section's deadline before the "
                       "parent kills its process (at least 1 s is waited).", **fv)
    # internal: the parent process runs each section as `--section=NAME` in a child process
    flags.DEFINE_string("section", None, "(internal) run this one section in this process.", **fv)
    flags.DEFINE_string("section_out", None, "(internal) the section's JSON file.", **fv)
    flags.DEFINE_float("section_deadline", None, "(internal) unix time by which the section "
                       "must have finished.", **fv)
    benchmark.define_torch_flags(flag_values)
    for name in ("torch_device", "fp32"):   # listed by --help as this tool's own
        flags.declare_key_flag(name, flag_values=flag_values)


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    """The check's settings (one field per flag; the defaults are the flags'). The
    construction checks every field (`validate`): a UserInputError names the flag."""

    out_dir: str | None = None
    smoke: bool = False
    budget_s: float = 450.0
    sections: tuple[str, ...] = SECTIONS
    isolate: bool = True
    kill_grace_s: float = 5.0
    torch_device: str = "auto"
    fp32: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "sections", tuple(dict.fromkeys(self.sections)))
        self.validate()

    def validate(self) -> None:
        """Raises UserInputError on a bad setting (run by the constructor)."""
        if not self.out_dir:
            raise UserInputError("--out_dir is required (where gpu_check.json and gpu_check.md go)")
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise UserInputError(f"unknown --gpu_sections {', '.join(unknown) or '(none)'}; "
                                 f"expected among {', '.join(SECTIONS)}")
        if not self.budget_s > 0:
            raise UserInputError(f"--budget_s must be > 0, got {self.budget_s}")
        benchmark.check_torch_device(self.torch_device)


def settings_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> CheckSettings:
    """The CheckSettings of parsed flags (`define_flags`). Raises UserInputError."""
    f = flag_values
    return CheckSettings(out_dir=f.out_dir, smoke=f.smoke, budget_s=f.budget_s,
                         sections=tuple(f.gpu_sections), isolate=f.isolate,
                         kill_grace_s=f.kill_grace_s, torch_device=f.torch_device, fp32=f.fp32)


SHARES = {"correctness": 0.18, "rounds": 0.42, "server": 0.10, "strategies": 0.15, "capacity": 0.11}
RESERVE_FRACTION = 0.04   # of --budget_s, for the parent's own work
# --smoke only: measured on the 2-core CI machine, a pFedLA round compiles in 3.0 s instead of
# 5.7 s with these (and runs 1.5x slower, which a smoke run does not care about)
SMOKE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
CHILD_MARGIN_S = 3.0      # a section stops starting items this long before its deadline
PARITY_ATOL = 1e-4        # vmap vs loop, JAX vs torch: max abs difference (params, alpha, HN)
OPS_RTOL = 1e-4           # custom ops vs autodiff: ||a - b|| / ||b||


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the check uses (full: for an H100/H200; SMOKE: for CI on a CPU)."""

    models: tuple[str, ...] = ("fmnist", "cifar10")
    # correctness: JAX vs torch cases (experiments/torch_baseline/parity.py)
    parity_cases: tuple[str, ...] = ("fmnist_gray", "cifar_rgb_bn")
    # rounds
    round_clients: tuple[int, ...] = (10, 100, 1000)
    local_steps: int = 50
    batch_size: int = 32
    per_client: int = benchmark.TRAIN_PER_CLIENT
    pool: int = 8192               # distinct images (clients draw from them; see synthetic_arrays)
    jax_warmup: int = 2
    jax_rounds: int = 5            # measured JAX rounds (median), fewer if the guard says so
    torch_rounds: int = 3          # measured torch rounds when whole rounds fit
    torch_full_max: int = 100      # torch runs whole rounds up to this many clients
    torch_subset_max: int = 20     # else at most this many participants, extrapolated
    # server
    server_clients: tuple[int, ...] = (100, 500, 1000)
    server_repeats: int = 2
    server_torch_clients: int = 5
    # strategies
    strategy_clients: int = 100
    strategy_chunks: tuple[int, ...] = (10, 25)
    strategy_repeats: int = 3
    conv_repeats: int = 5
    strategy_autodiff: bool = True   # local training with the plain-autodiff conv under vmap
    # capacity
    capacity_model: str = "cifar10"
    capacity_start: int = 1000
    capacity_cap: int = 16000
    capacity_steps: int = 2


# CPU compile time dominates a smoke run (a pFedLA round program takes ~5 s to compile on one
# core), so it uses one model, few distinct client counts (2 and 4) and one parity case; every
# section and code path still runs (subset extrapolation, chunked vmap, doubling, ...).
SMOKE = Sizes(models=("fmnist",), parity_cases=("fmnist_gray",), round_clients=(2, 4),
              local_steps=2, batch_size=8, per_client=24, pool=64, jax_warmup=1, jax_rounds=2, torch_rounds=1, torch_full_max=2, torch_subset_max=2,
              server_clients=(4,), server_repeats=1, server_torch_clients=2,
              strategy_clients=4, strategy_chunks=(2,), strategy_repeats=1, conv_repeats=1,
              strategy_autodiff=False,
              capacity_model="fmnist", capacity_start=2, capacity_cap=4, capacity_steps=2)


# ------------------------------------------------------------------------------ plumbing
def _say(message: str) -> None:
    print(message, flush=True)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:400]


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=_jsonable)
    os.replace(tmp, path)


class Guard:
    """A section's deadline: how much time is left and whether an estimated item fits."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        """Seconds until the deadline (negative past it)."""
        return self.deadline - time.time()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds

    def skipped(self, needs: float) -> dict:
        return {"skipped": f"time guard: needs ~{needs:.0f} s, {max(self.left(), 0):.0f} s left"}


class Results:
    """A section's figures, rewritten to its JSON file after every change (so a section killed
    by its time guard keeps what it measured)."""

    def __init__(self, path: str | None):
        self.path = path
        self.data: dict[str, Any] = {"complete": False}

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def put(self, key: str, sub: str, value: Any) -> None:
        """data[key][sub] = value."""
        self.data.setdefault(key, {})[sub] = value
        self.save()

    def append(self, key: str, value: Any) -> None:
        self.data.setdefault(key, []).append(value)
        self.save()

    def save(self) -> None:
        if self.path:
            _write_json(self.path, self.data)


def _guarded(fn: Callable[[], Any]) -> Any:
    """fn(), or {'error': 'Type: message'} if it raises (the traceback goes to stderr)."""
    try:
        return fn()
    except Exception as e:  # pylint: disable=broad-except  (recorded; the section goes on)
        traceback.print_exc()
        return {"error": _one_line(e)}


def _torch():
    """torch, or None when it is not installed."""
    try:
        import torch  # optional dependency: the PyTorch parts are skipped without it
    except ImportError:
        return None
    return torch


def _free_device_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _environment(torch_device: str) -> dict:
    """The device and versions, as a section process sees them."""

    def importable(name):
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    env = {"jax": jax.__version__, "backend": jax.default_backend(),
           "optional_modules": {m: importable(m) for m in ("tensorflow_datasets", "tensorflow",
                                                            "tensorboardX")},
           "devices": [f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip() for d in jax.devices()],
           "machine": benchmark.machine_info(),
           "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")}
    for name, module in (("jaxlib", jaxlib), ("flax", flax), ("optax", optax)):
        version = getattr(module, "__version__", None)
        if version is not None:
            env[name] = version
    env.update({f"jax_memory_{k}_mb": v for k, v in benchmark.jax_device_memory().items()
                if k == "bytes_limit"})
    torch = sys.modules.get("torch")   # (sections without torch do not import it)
    if torch is not None:
        from experiments.torch_baseline.device import describe, tf32_settings  # (imports torch)

        env.update(torch=torch.__version__, torch_cuda_build=torch.version.cuda,
                   torch_cuda_available=bool(torch.cuda.is_available()),
                   torch_device=describe(torch.device(torch_device)) if torch_device else None,
                   torch_tf32=tf32_settings())
    else:
        env["torch"] = None if _torch_missing() else "not imported by this section"
    return env


def _torch_missing() -> bool:
    return importlib.util.find_spec("torch") is None


# ------------------------------------------------------------------------------ correctness
def ops_check() -> dict:
    """pfedla_jax.models.ops against plain autodiff (values and gradients), incl. under vmap."""
    rng = np.random.default_rng(0)
    normal = lambda *shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    def worst(got, want):
        return max(rel(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))

    def value_and_grads(conv, g):
        f = lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) * g)
        return jax.jit(lambda x, w: (conv(x, w), jax.grad(f, argnums=(0, 1))(x, w)))

    errors = {}
    convs = {"canonical": lambda x, w: ops.conv2d_valid(x, w, fast_path=False),
             "fast_path": lambda x, w: ops.conv2d_valid(x, w, fast_path=True)}
    for cin in (1, 3, 16):
        x, w = normal(4, 12, 10, cin), normal(5, 5, cin, 8, scale=1 / np.sqrt(25 * cin))
        g = normal(4, 8, 6, 8)
        want = value_and_grads(ops.conv2d_valid_reference, g)(x, w)
        for name, conv in convs.items():
            errors[f"conv_{name}_cin{cin}"] = worst(value_and_grads(conv, g)(x, w), want)
    # under vmap over 3 clients (per-client kernels: what the vmap strategy runs)
    for cin in (3, 16):
        xs, ws = normal(3, 4, 12, 10, cin), normal(3, 5, 5, cin, 8, scale=1 / np.sqrt(25 * cin))
        gs = normal(3, 4, 8, 6, 8)

        def batched(conv):
            f = lambda x, w, g: jnp.sum(jnp.tanh(conv(x, w)) * g)
            return jax.jit(jax.vmap(lambda x, w, g: (conv(x, w), jax.grad(f, argnums=(0, 1))(x, w, g))))

        errors[f"conv_vmap_canonical_cin{cin}"] = worst(batched(convs["canonical"])(xs, ws, gs),
                                                        batched(ops.conv2d_valid_reference)(xs, ws, gs))
    # max pooling (continuous random input: no ties, so both gradient rules agree)
    x, g = normal(4, 8, 8, 16), normal(4, 4, 4, 16)
    pool = lambda p: jax.jit(lambda x: (p(x), jax.grad(lambda x: jnp.sum(p(x) * g))(x)))
    errors["max_pool"] = worst(pool(ops.max_pool_2x2)(x), pool(ops.max_pool_2x2_reference)(x))
    # BatchNorm, train mode, with padding rows masked out
    x, scale, bias = normal(6, 4, 4, 8), normal(8), normal(8)
    mask = jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)
    g = normal(6, 4, 4, 8)

    def bn(fn):
        def loss(x, s, b):
            y, mean, var, _ = fn(x, s, b, mask, 1e-5)
            return jnp.sum(jnp.tanh(y) * g * mask[:, None, None, None]) + jnp.sum(mean) + jnp.sum(var)
        return jax.jit(lambda x, s, b: (fn(x, s, b, mask, 1e-5)[:3], jax.grad(loss, argnums=(0, 1, 2))(x, s, b)))

    got = bn(ops.batch_norm_train)(x, scale, bias)
    want = bn(ops.batch_norm_train_reference)(x, scale, bias)
    # padding rows' outputs are meaningless: compare the real rows only
    got = ((got[0][0][:4],) + tuple(got[0][1:]), got[1])
    want = ((want[0][0][:4],) + tuple(want[0][1:]), want[1])
    errors["batch_norm_train"] = worst(got, want)
    top = max(errors.values())
    return {"rel_errors": errors, "max_rel_error": top, "rtol": OPS_RTOL, "passed": bool(top <= OPS_RTOL)}


def section_correctness(sz: Sizes, guard: Guard, res: Results, torch_device: str | None) -> None:
    res.set("tolerances", {"vmap_vs_loop_atol": PARITY_ATOL, "torch_parity_atol": PARITY_ATOL,
                           "ops_rtol": OPS_RTOL,
                           "precision": "float32 (JAX matmul precision 'highest', torch TF32 off)"})
    for name in sz.parity_cases:
        use_bn = name == "cifar_rgb_bn"
        if torch_device is None:
            res.put("round_parity", name, {"skipped": f"{_NO_TORCH['reason']} (the round check "
                                                      "builds on experiments.torch_baseline)"})
            continue
        if not guard.allows(20):
            res.put("round_parity", name, guard.skipped(20))
            continue
        _say(f"[correctness] pFedLA round, {name}: JAX vmap vs JAX loop vs the PyTorch reference "
             f"on {torch_device} ...")
        from experiments.torch_baseline.parity import pfedla_round_parity  # (imports torch)

        res.put("round_parity", name, _guarded(lambda: pfedla_round_parity(
            use_bn, torch_device, strategies=("vmap", "loop"))))
    if guard.allows(10):
        _say("[correctness] custom ops vs autodiff ...")
        with _highest():
            res.set("ops", _guarded(ops_check))
    else:
        res.set("ops", guard.skipped(10))
    checks = [*res.data.get("round_parity", {}).values(), res.data.get("ops", {})]
    ran = [c for c in checks if "skipped" not in c]
    res.set("passed", bool(ran) and all(c.get("passed") is True for c in ran))
    res.set("not_run", [c["skipped"] for c in checks if "skipped" in c])


def _highest():
    return jax.default_matmul_precision("highest")


# ------------------------------------------------------------------------------ rounds
def _pool(sz: Sizes, n: int) -> int | None:
    """Distinct images for n clients: their own when they fit in the pool, else the pool."""
    return None if n * sz.per_client <= sz.pool else sz.pool


def _config_need(n: int, prev: dict | None, sz: Sizes, torch_s: float = 10.0) -> float:
    """Estimated seconds of one round configuration with n clients: JAX compile + warm-up +
    2 measured rounds (linear in n from the previous size of the model; 20 s compile and 1 s
    rounds before any is known) + `torch_s` for a minimal torch measurement."""
    compile_s = prev["compile_s"] if prev else 20.0
    round_s = prev["round_s"] * n / prev["clients"] if prev else 1.0
    return compile_s + (sz.jax_warmup + 2) * round_s + torch_s


def round_config(model: str, n: int, sz: Sizes, guard: Guard, reserve_s: float,
                 prev: dict | None, torch_device: str | None) -> dict:
    """One (model, clients) configuration of the round benchmark.

    It may use the section's time but `reserve_s` seconds (kept for the configurations after
    it). prev: the figures of the previous size of this model (round and compile seconds),
    for the time estimates.
    """
    cfg_deadline = guard.deadline - reserve_s
    entry: dict[str, Any] = {"model": model, "clients": n, "local_steps": sz.local_steps,
                             "batch_size": sz.batch_size,
                             "examples_per_round": n * sz.local_steps * sz.batch_size}
    if prev:
        need = _config_need(n, prev, sz, torch_s=0.0)
        if not guard.allows(need):
            entry.update(guard.skipped(need))
            return entry
    mem_before = benchmark.jax_device_memory()
    jr = benchmark.JaxRounds(model, n, local_steps=sz.local_steps, batch_size=sz.batch_size,
                   algorithm="pfedla", strategy="vmap", per_client=sz.per_client,
                   pool=_pool(sz, n))
    warm = [jr.run(t) for t in range(sz.jax_warmup)]
    steady = warm[-1] if len(warm) > 1 else warm[0]
    # at most ~30% of the time this configuration may use goes to measured JAX rounds
    budget = 0.3 * (cfg_deadline - time.time())
    rounds = max(1, min(sz.jax_rounds, int(budget / max(steady, 1e-3))))
    measured = [jr.run(t) for t in range(sz.jax_warmup, sz.jax_warmup + rounds)]
    med = statistics.median(measured)
    mem_after = benchmark.jax_device_memory()
    entry.update({
        "jax_strategy": jr.strategy, "jax_ms_per_round": 1000 * med,
        "jax_ms_all": [1000 * t for t in measured],
        "jax_examples_per_s": entry["examples_per_round"] / med,
        "jax_compile_s": max(0.0, warm[0] - med), "jax_first_round_s": warm[0],
        "jax_state_mb": sum(a.nbytes for a in jax.tree.leaves(jr.state)) / 2**20,
    })
    if "peak_bytes_in_use" in mem_after:
        entry["jax_peak_device_mb"] = mem_after["peak_bytes_in_use"]
        entry["jax_device_mb_in_use_before"] = mem_before.get("bytes_in_use")
    if torch_device is None:
        entry["torch"] = {"skipped": _NO_TORCH["reason"]}
        return entry
    import torch  # optional dependency (torch_device is None without it)

    tr = benchmark.TorchRounds(model, jr.dataset, jr.part, local_steps=sz.local_steps,
                     batch_size=sz.batch_size, algorithm="pfedla", device=torch_device)
    del jr
    gc.collect()
    if tr.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(tr.device)
    tr.run(0, [0])                     # warm-up: one participant (cuDNN plans, allocator)
    per_client = tr.run(1, [1 % n])    # one participant, steady: the per-participant estimate
    left = cfg_deadline - time.time()
    whole = n * per_client * 1.2
    if n <= sz.torch_full_max and whole <= left:
        rounds = max(1, min(sz.torch_rounds, int(left / whole)))
        times = [tr.run(2 + r, range(n)) for r in range(rounds)]
        k, total = n, statistics.median(times)
        entry["torch_ms_all"] = [1000 * t for t in times]
    else:
        k = max(min(n, 2), min(n, sz.torch_subset_max, int(0.8 * left / max(per_client, 1e-3))))
        part = tr.run(2, range(k))
        total = part * n / k
        entry["torch_ms_all"] = [1000 * part]
    entry.update({
        "torch_device": str(tr.device), "torch_ms_per_round": 1000 * total,
        "torch_examples_per_s": entry["examples_per_round"] / total,
        "torch_ms_per_participant": 1000 * total / n,
        "torch_measured_participants": k, "torch_extrapolated": k < n,
        "ratio_jax_over_torch": med / total,
    })
    peak = benchmark.torch_peak_mb(tr.device)
    if peak is not None:
        entry["torch_peak_device_mb"] = peak
    del tr
    return entry


def section_rounds(sz: Sizes, guard: Guard, res: Results, torch_device: str | None) -> None:
    configs = [(n, m) for n in sz.round_clients for m in sz.models]   # increasing sizes
    prev: dict[str, dict] = {}
    res.set("rounds", [])
    for i, (n, model) in enumerate(configs):
        # what the configurations after this one need at least (from what is measured so far)
        reserve = sum(_config_need(n2, prev.get(m2), sz) for n2, m2 in configs[i + 1:])
        _say(f"[rounds] pFedLA round, {model} CNN, {n} clients x {sz.local_steps} steps x "
             f"{sz.batch_size} (may use {max(0.0, guard.left() - reserve):.0f} s) ...")
        entry = _guarded(lambda: round_config(model, n, sz, guard, reserve, prev.get(model), torch_device))
        entry.setdefault("model", model)
        entry.setdefault("clients", n)
        res.append("rounds", entry)
        if "jax_ms_per_round" in entry:
            prev[model] = {"clients": n, "round_s": entry["jax_ms_per_round"] / 1000,
                           "compile_s": entry["jax_compile_s"]}
            line = (f"  JAX {entry['jax_ms_per_round']:.1f} ms (compile {entry['jax_compile_s']:.1f} s)")
            if "torch_ms_per_round" in entry:
                line += (f" | torch {entry['torch_ms_per_round']:.0f} ms"
                         + (f" (from {entry['torch_measured_participants']} participants)"
                            if entry["torch_extrapolated"] else "")
                         + f" | JAX/torch {entry['ratio_jax_over_torch']:.4f}")
            _say(line)
        else:
            _say(f"  {entry.get('error') or entry.get('skipped')}")
        _free_device_memory()


# ------------------------------------------------------------------------------ server
def section_server(sz: Sizes, guard: Guard, res: Results, torch_device: str | None) -> None:
    res.set("server", [])
    prev = None
    for n in sz.server_clients:
        need = prev[1] * n / prev[0] if prev else 0.0
        if prev and not guard.allows(need):
            res.append("server", {"clients": n, **guard.skipped(need)})
            continue
        _say(f"[server] pFedLA server step alone, N={n} (torch on {sz.server_torch_clients} clients, "
             "extrapolated) ...")
        t0 = time.time()
        entry = _guarded(lambda: benchmark.server_benchmark(
            n, repeats=sz.server_repeats, skip_torch=torch_device is None, torch_device=torch_device,
            torch_clients=sz.server_torch_clients, model_name="fmnist"))
        entry.setdefault("clients", n)
        res.append("server", entry)
        prev = (n, time.time() - t0)
        if "jax_ms" in entry:
            _say(f"  JAX {entry['jax_ms']:.1f} ms" + (f" | torch {entry['torch_ms']:.0f} ms | "
                                                     f"JAX {entry['speedup_jax']:.0f}x faster"
                                                     if "torch_ms" in entry else ""))
        _free_device_memory()


# ------------------------------------------------------------------------------ strategies
class ChunkedTrainer(ClientTrainer):
    """ClientTrainer whose `vmap` runs `chunk` clients at a time (lax.map(batch_size=chunk))."""

    def __init__(self, *args, chunk: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._map = for_each_client(self._client_fn, "vmap", self.mesh, batch_size=chunk,
                                    negative_ids=False)


def strategy_variants(model: str, sz: Sizes, guard: Guard, record: Callable[[str, Any], None]) -> dict:
    """Local training of `strategy_clients` clients under each client-parallel alternative.

    record(variant, figures) is called after every variant (the section saves it); returns
    {variant: figures} plus 'fastest' and 'ms_relative_to_vmap'."""
    n = sz.strategy_clients
    images, labels, train = benchmark.synthetic_arrays(n, benchmark.MODELS[model][0],
                                                       per_client=sz.per_client, pool=_pool(sz, n))
    algo, _, _ = benchmark.jax_setup(model, n, images, labels, train, sz.local_steps,
                                     batch_size=sz.batch_size, strategy="vmap", algorithm="fedavg")
    ctx = algo.ctx
    params, stats = ctx.init_client_variables(jax.random.PRNGKey(0))
    cfg = LocalTrainConfig(batch_size=sz.batch_size, local_steps=sz.local_steps, lr=0.01)
    shape, use_bn = benchmark.MODELS[model]
    ref_model = make_cnn(shape, 10, use_bn=use_bn, conv_impl="reference")
    # in order of importance (the time guard may skip the last ones)
    variants: list[tuple[str, Callable[[], Any]]] = [
        ("vmap", lambda: ClientTrainer(ctx.model, ctx.store, cfg, "vmap")),
        ("loop", lambda: ClientTrainer(ctx.model, ctx.store, cfg, "loop"))]
    variants += [(f"vmap_chunks_of_{k}", lambda k=k: ChunkedTrainer(ctx.model, ctx.store, cfg, "vmap", chunk=k))
                 for k in sz.strategy_chunks if k < n]
    if sz.strategy_autodiff:   # (XLA:CPU runs it ~100x slower than the others: not in --smoke)
        variants += [("vmap_autodiff_conv", lambda: ClientTrainer(ref_model, ctx.store, cfg, "vmap"))]
    figures: dict[str, Any] = {}

    def put(name, value):
        figures[name] = value
        record(name, value)

    if jax.device_count() > 1:
        variants.append(("shard", lambda: ClientTrainer(ctx.model, ctx.store, cfg, "shard")))
    else:
        put("shard", {"skipped": "one device: shard runs the clients one after another on it, "
                                 "i.e. loop"})
    ids = jnp.arange(n, dtype=jnp.int32)
    examples = n * sz.local_steps * sz.batch_size
    last = None   # (compile s, run s) of the previous variant, for the guard
    for name, make in variants:
        need = (last[0] + (1 + sz.strategy_repeats) * last[1]) if last else 0.0
        if last and not guard.allows(need):
            put(name, guard.skipped(need))
            continue

        def measure(make=make):
            trainer = make()
            p, s = jax.device_put((params, stats), replicated(trainer.mesh))

            def run(t):
                t0 = time.perf_counter()
                jax.block_until_ready(trainer.train(p, s, ids, jax.random.PRNGKey(t)))
                return time.perf_counter() - t0

            first = run(0)
            times = [run(1 + r) for r in range(sz.strategy_repeats)]
            med = statistics.median(times)
            return {"strategy": trainer.strategy, "ms": 1000 * med, "ms_all": [1000 * t for t in times],
                    "examples_per_s": examples / med, "compile_s": max(0.0, first - med)}

        _say(f"[strategies] {model} CNN, local training of {n} clients: {name} ...")
        out = _guarded(measure)
        put(name, out)
        if "ms" in out:
            last = (out["compile_s"], out["ms"] / 1000)
            _say(f"  {out['ms']:.1f} ms (compile {out['compile_s']:.1f} s)")
        _free_device_memory()
    done = {k: v["ms"] for k, v in figures.items() if isinstance(v, dict) and "ms" in v}
    if done:
        put("fastest", min(done, key=done.get))
        if "vmap" in done:
            put("ms_relative_to_vmap", {k: v / done["vmap"] for k, v in done.items()})
    return figures


def conv_im2col(x, w):
    """Client-batched VALID conv as one batched GEMM: x [S, B, H, W, C], w [S, kh, kw, C, O] ->
    [S, B, oh, ow, O] (patches by kh*kw shifted slices, then einsum over the patch axis)."""
    s, b, h, wd, c = x.shape
    kh, kw, _, o = w.shape[1:]
    oh, ow = h - kh + 1, wd - kw + 1
    cols = jnp.stack([x[:, :, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)], axis=-2)
    cols = cols.reshape(s, b * oh * ow, kh * kw * c)
    y = jnp.einsum("smk,sko->smo", cols, w.reshape(s, kh * kw * c, o))
    return y.reshape(s, b, oh, ow, o)


def conv_micro(model: str, sz: Sizes, guard: Guard) -> dict:
    """The two conv layers of `model` alone, forward + both gradients, for strategy_clients
    clients x batch_size examples, under each way of running a conv over clients."""
    h, w_, c = benchmark.MODELS[model][0]
    layers = {"conv1": (h, w_, c, 16), "conv2": ((h - 4) // 2, (w_ - 4) // 2, 16, 32)}
    s, b = sz.strategy_clients, sz.batch_size
    rng = np.random.default_rng(0)
    out = {"clients": s, "batch": b}
    custom = lambda x, w: ops.conv2d_valid(x, w, fast_path=False)

    def per_client(conv):
        return lambda x, w, g: jax.grad(lambda x, w: jnp.sum(conv(x, w) * g), argnums=(0, 1))(x, w)

    for layer, (hh, ww, cin, cout) in layers.items():
        x = jnp.asarray(rng.standard_normal((s, b, hh, ww, cin)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((s, 5, 5, cin, cout)) / np.sqrt(25 * cin), jnp.float32)
        g = jnp.asarray(rng.standard_normal((s, b, hh - 4, ww - 4, cout)), jnp.float32)
        variants = {
            "vmap_custom_vjp": jax.vmap(per_client(custom)),
            "vmap_autodiff": jax.vmap(per_client(ops.conv2d_valid_reference)),
            "loop": lambda x, w, g: jax.lax.map(lambda a: per_client(custom)(*a), (x, w, g)),
            "im2col_batched_gemm": lambda x, w, g: jax.grad(
                lambda x, w: jnp.sum(conv_im2col(x, w) * g), argnums=(0, 1))(x, w),
        }
        for k in sz.strategy_chunks:
            if k < s:
                variants[f"chunks_of_{k}"] = lambda x, w, g, k=k: jax.lax.map(
                    lambda a: per_client(custom)(*a), (x, w, g), batch_size=k)
        figures, want = {}, None
        for name, fn in variants.items():
            if not guard.allows(5):
                figures[name] = guard.skipped(5)
                continue

            def measure(fn=fn):
                nonlocal want
                f = jax.jit(fn)
                t0 = time.perf_counter()
                got = jax.block_until_ready(f(x, w, g))
                first = time.perf_counter() - t0
                times = []
                for _ in range(sz.conv_repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(x, w, g))
                    times.append(time.perf_counter() - t0)
                if want is None:
                    want = got
                err = max(float(jnp.linalg.norm(a - b_) / jnp.linalg.norm(b_)) for a, b_ in zip(got, want))
                med = statistics.median(times)
                return {"ms": 1000 * med, "compile_s": max(0.0, first - med), "rel_diff_to_vmap": err}

            figures[name] = _guarded(measure)
        out[layer] = {"shape": {"x": [s, b, hh, ww, cin], "w": [s, 5, 5, cin, cout]}, **figures}
    return out


def section_strategies(sz: Sizes, guard: Guard, res: Results, torch_device: str | None) -> None:
    """Local training under each strategy first (what the default is chosen from), CIFAR first
    (the heavier convs); then the conv layers alone (why)."""
    del torch_device
    for model in reversed(sz.models):
        if not guard.allows(20):
            res.put("local_training", model, guard.skipped(20))
            continue
        entry = {"clients": sz.strategy_clients, "local_steps": sz.local_steps,
                 "batch_size": sz.batch_size}
        res.put("local_training", model, entry)

        def record(name, value, entry=entry):
            entry[name] = value
            res.save()

        try:
            strategy_variants(model, sz, guard, record)
        except Exception as e:  # pylint: disable=broad-except  (recorded; the section goes on)
            traceback.print_exc()
            record("error", _one_line(e))
    for model in reversed(sz.models):
        if guard.allows(10):
            _say(f"[strategies] {model} CNN, the conv layers alone over {sz.strategy_clients} clients ...")
            res.put("conv_micro", model, _guarded(lambda: conv_micro(model, sz, guard)))
        else:
            res.put("conv_micro", model, guard.skipped(10))


# ------------------------------------------------------------------------------ capacity
def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in type(err).__name__.lower()


def section_capacity(sz: Sizes, guard: Guard, res: Results, torch_device: str | None) -> None:
    del torch_device
    model = sz.capacity_model
    res.set("capacity", {"model": model, "algorithm": "pfedla", "local_steps": sz.capacity_steps,
                         "batch_size": sz.batch_size, "attempts": [],
                         "note": "all N clients take part (S = N); memory per round does not depend "
                                 "on the number of local steps"})
    cap = res.data["capacity"]
    n, last = sz.capacity_start, None
    while n <= sz.capacity_cap:
        need = last * 2 if last else 0.0
        if last and not guard.allows(need):
            cap["stopped"] = guard.skipped(need)["skipped"]
            break
        _say(f"[capacity] pFedLA round, {model} CNN, {n} clients ({sz.capacity_steps} local steps) ...")
        t0 = time.time()
        attempt: dict[str, Any] = {"clients": n}
        try:
            jr = benchmark.JaxRounds(model, n, local_steps=sz.capacity_steps, batch_size=sz.batch_size,
                           algorithm="pfedla", strategy="vmap", per_client=sz.per_client,
                           pool=_pool(sz, n))
            attempt["state_mb"] = sum(a.nbytes for a in jax.tree.leaves(jr.state)) / 2**20
            first = jr.run(0)
            second = jr.run(1)
            attempt.update(fits=True, first_round_s=first, round_s=second)
            mem = benchmark.jax_device_memory()
            if "peak_bytes_in_use" in mem:
                attempt["jax_peak_device_mb"] = mem["peak_bytes_in_use"]
            del jr
        except Exception as e:  # pylint: disable=broad-except  (an OOM is the expected end)
            attempt.update(fits=False, out_of_memory=_is_oom(e), error=_one_line(e))
        attempt["seconds"] = time.time() - t0
        cap["attempts"].append(attempt)
        res.save()
        _say(f"  {'fits' if attempt['fits'] else 'does not fit: ' + attempt['error'][:160]} "
             f"({attempt['seconds']:.1f} s)")
        _free_device_memory()
        if not attempt["fits"]:
            break
        last = attempt["seconds"]
        n *= 2
    fits = [a["clients"] for a in cap["attempts"] if a["fits"]]
    fails = [a for a in cap["attempts"] if not a["fits"]]
    cap["largest_that_fits"] = max(fits) if fits else None
    cap["first_that_failed"] = fails[0]["clients"] if fails else None
    cap["limited_by"] = ("out of memory" if fails and fails[0]["out_of_memory"] else
                         "error" if fails else "cap" if n > sz.capacity_cap else "time guard")
    res.save()


SECTION_FUNCS = {"correctness": section_correctness, "rounds": section_rounds,
                 "server": section_server, "strategies": section_strategies,
                 "capacity": section_capacity}


# ------------------------------------------------------------------------------ a section
TORCH_SECTIONS = ("correctness", "rounds", "server")
_NO_TORCH = {"reason": "torch is not installed"}   # why torch_device is None in a section


def run_section(name: str, out_path: str | None, deadline: float, settings: CheckSettings) -> int:
    """Runs one section in this process (the parent's child): returns the exit status.

    The conv runs its canonical (GPU) form on every backend (ops.FAST_PATH_DEFAULT = False;
    the CPU fast path is checked by the correctness set all the same)."""
    ops.FAST_PATH_DEFAULT = False
    # JAX's backend first, then torch: both CUDA builds bring cuDNN (and cuBLAS), and a library
    # already loaded by the first is used by the second; JAX checks that the loaded cuDNN is
    # not older than the one it was built with, torch accepts newer minor versions.
    jax.devices()
    torch = _torch() if name in TORCH_SECTIONS else None
    torch_device, torch_problem = None, None
    if torch is not None:
        from experiments.torch_baseline import resolve_device  # (imports torch)

        try:
            torch_device = str(resolve_device(settings.torch_device))
        except UserInputError as e:   # (the parent checked; CUDA may still fail after JAX's)
            torch_problem = _NO_TORCH["reason"] = str(e)
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else (os.cpu_count() or 1))
    precision = benchmark.set_precision(settings.fp32)
    sz = SMOKE if settings.smoke else Sizes()
    cache = "off (compile times are measured)"
    if settings.smoke:
        # CI: compile time dominates, and the smoke sizes repeat programs across sections
        cache = enable_compilation_cache(None) or "off"
    res = Results(out_path)
    res.set("environment", {**_environment(torch_device), **precision, "compilation_cache": cache,
                            "xla_flags": os.environ.get("XLA_FLAGS", ""),
                            **({"torch_problem": torch_problem} if torch_problem else {})})
    guard = Guard(deadline - CHILD_MARGIN_S)
    cpu0 = _cpu_seconds()
    SECTION_FUNCS[name](sz, guard, res, torch_device)
    res.set("host_cpu_s", _cpu_seconds() - cpu0)
    res.set("complete", True)
    return 0


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------------------ the parent
def _child_command(name: str, out_path: str, deadline: float, settings: CheckSettings) -> list[str]:
    cmd = [sys.executable, "-m", "experiments.bench.gpu_check", f"--section={name}",
           f"--section_out={out_path}", f"--section_deadline={deadline:.3f}",
           f"--out_dir={settings.out_dir}", f"--torch_device={settings.torch_device}",
           "--fp32" if settings.fp32 else "--nofp32"]
    if settings.smoke:
        cmd.append("--smoke")
    return cmd


def _stderr_tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            text = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-600:]


def _one_device_env(environ, smoke: bool) -> None:
    """One XLA device on a CPU too (as on one GPU: no shard_map); no effect on a GPU run. And
    no preallocation of 75% of the GPU by JAX (its allocator grows instead): JAX and torch share
    the GPU, and JAX's peak_bytes_in_use then reflects what was used."""
    xla = [f for f in environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
    if smoke:
        # CI: compiling dominates a smoke run; XLA's backend optimisations halve it on a CPU
        xla += [f for f in SMOKE_XLA_FLAGS if f.split("=")[0] not in " ".join(xla)]
    environ["XLA_FLAGS"] = " ".join(xla)
    environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def run_parent(settings: CheckSettings) -> int:
    """Runs settings.sections (each in its own process unless not settings.isolate), writes
    OUT_DIR/gpu_check.json and gpu_check.md; returns the exit status (module docstring)."""
    sections = list(settings.sections)
    out_dir = settings.out_dir
    os.makedirs(out_dir, exist_ok=True)
    log_dir = os.path.join(out_dir, "gpu_check_logs")
    os.makedirs(log_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "gpu_check.json")
    t_start = time.time()
    budget = float(settings.budget_s)
    global_deadline = t_start + budget * (1 - RESERVE_FRACTION)
    report: dict[str, Any] = {
        "schema": 1, "smoke": bool(settings.smoke), "budget_s": budget,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "experiments.bench.gpu_check"] + sys.argv[1:]),
        "sizes": dataclasses.asdict(SMOKE if settings.smoke else Sizes()),
        "settings": {"torch_device": settings.torch_device, "fp32": bool(settings.fp32)},
        "environment": None, "sections": {}, "summary": {},
    }
    _write_json(json_path, report)
    env = dict(os.environ)
    _one_device_env(env, settings.smoke)
    if not settings.isolate:   # before JAX starts its backend in this process
        _one_device_env(os.environ, settings.smoke)
        logging.set_verbosity(logging.WARNING)
    for i, name in enumerate(sections):
        later = sum(SHARES[s] for s in sections[i + 1:]) / sum(SHARES[s] for s in sections)
        deadline = global_deadline - later * budget * (1 - RESERVE_FRACTION)
        section_json = os.path.join(log_dir, f"{name}.json")
        stderr_path = os.path.join(log_dir, f"{name}.stderr")
        if os.path.exists(section_json):
            os.remove(section_json)
        t0 = time.time()
        entry: dict[str, Any] = {"budget_s": max(0.0, deadline - t0)}
        if deadline - t0 < 1.0:
            entry.update(status="skipped", error="time guard: no time left for this section")
        elif not settings.isolate:
            _say(f"== {name} (up to {deadline - t0:.0f} s, in this process) ==")
            try:
                run_section(name, section_json, deadline, settings)
                entry.update(status="ok", returncode=0)
            except Exception as e:  # pylint: disable=broad-except  (recorded; the next section runs)
                traceback.print_exc()
                entry.update(status="error", returncode=None, error=_one_line(e))
        else:
            _say(f"== {name} (up to {deadline - t0:.0f} s) ==")
            with open(stderr_path, "w") as err:
                proc = subprocess.Popen(_child_command(name, section_json, deadline, settings),
                                        stdout=None, stderr=err, env=env)
                try:
                    rc = proc.wait(timeout=max(1.0, deadline - time.time() + settings.kill_grace_s))
                    status = "ok" if rc == 0 else "error"
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    rc, status = None, "timeout"
            entry.update(status=status, returncode=rc)
            if status == "timeout":
                entry["error"] = (f"time guard: killed after {time.time() - t0:.0f} s "
                                  f"(deadline {deadline - t0:.0f} s + {settings.kill_grace_s:.0f} s grace)")
            elif status == "error":
                entry["error"] = _stderr_tail(stderr_path) or f"exit status {rc}"
        entry["seconds"] = time.time() - t0
        try:
            with open(section_json) as f:
                results = json.load(f)
        except (OSError, json.JSONDecodeError):
            results = {}
        if results and not results.pop("complete", False) and entry["status"] == "ok":
            entry.update(status="error", error="the section ended without completing")
        environment = results.pop("environment", None)
        if environment and report["environment"] is None:
            report["environment"] = environment
        entry["results"] = results
        report["sections"][name] = entry
        report["summary"] = summarize(report)
        report["total_s"] = time.time() - t_start
        _write_json(json_path, report)
        if entry["status"] != "ok":
            _say(f"   {name}: {entry['status']}: {entry.get('error', '')}")
    report["summary"] = summarize(report)
    report["total_s"] = time.time() - t_start
    _write_json(json_path, report)
    md = markdown(report)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(md)
    _say(md)
    _say(f"figures: {json_path} and {os.path.join(out_dir, 'gpu_check.md')} ({report['total_s']:.0f} s)")
    ok = all(s["status"] == "ok" for s in report["sections"].values())
    passed = report["summary"].get("correctness_passed")
    return 0 if ok and passed is not False else 1


def summarize(report: dict) -> dict:
    """The headline figures: correctness, JAX/torch ratios per model and clients, the server
    speed-ups, the fastest strategy per model, the largest CIFAR cohort that fits."""
    sec = {k: v.get("results", {}) for k, v in report["sections"].items()}
    out: dict[str, Any] = {"section_status": {k: v["status"] for k, v in report["sections"].items()}}
    if "correctness" in sec:
        out["correctness_passed"] = sec["correctness"].get("passed")
    rounds = [r for r in sec.get("rounds", {}).get("rounds", []) if "jax_ms_per_round" in r]
    if rounds:
        table = lambda key: {m: {str(r["clients"]): r.get(key) for r in rounds if r["model"] == m}
                             for m in dict.fromkeys(r["model"] for r in rounds)}
        out["ratio_jax_over_torch"] = table("ratio_jax_over_torch")
        out["jax_ms_per_round"] = table("jax_ms_per_round")
        out["torch_ms_per_round"] = table("torch_ms_per_round")
        out["goal_ratio_at_most"] = 0.05
        out["goal_met_at_100_clients"] = {m: (v.get("100") is not None and v["100"] <= 0.05)
                                          for m, v in out["ratio_jax_over_torch"].items() if "100" in v}
    server = [s for s in sec.get("server", {}).get("server", []) if "jax_ms" in s]
    if server:
        out["server_speedup_jax"] = {str(s["clients"]): s.get("speedup_jax") for s in server}
    local = sec.get("strategies", {}).get("local_training", {})
    if local:
        out["fastest_strategy"] = {m: v.get("fastest") for m, v in local.items() if isinstance(v, dict)}
    cap = sec.get("capacity", {}).get("capacity")
    if cap:
        out["cifar_clients_that_fit"] = cap.get("largest_that_fits")
        out["capacity_limited_by"] = cap.get("limited_by")
    return out


def _fmt(v, spec=".1f", none="–"):
    if v is None:
        return none
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def markdown(report: dict) -> str:
    """gpu_check.md: the device, the section status and short tables of the figures."""
    env = report.get("environment") or {}
    sec = {k: v.get("results", {}) for k, v in report["sections"].items()}
    lines = ["# gpu_check" + (" (--smoke)" if report["smoke"] else ""), ""]
    lines.append(f"jax {env.get('jax', '?')} ({env.get('backend', '?')}: {', '.join(env.get('devices', [])[:2])}), "
                 f"torch {env.get('torch', '–')} on {env.get('torch_device', '–')}; matmul precision "
                 f"{env.get('jax_matmul_precision', '?')}, torch TF32 {env.get('torch_tf32', '–')}; "
                 f"{report.get('total_s', 0):.0f} s of {report['budget_s']:.0f} s")
    lines += ["", "| section | status | seconds | host CPU s | note |", "|---|---|---|---|---|"]
    for name, s in report["sections"].items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.0f} | "
                     f"{_fmt(s.get('results', {}).get('host_cpu_s'), '.0f')} | {(s.get('error') or '')[:120]} |")
    corr = sec.get("correctness")
    if corr:
        lines += ["", f"## Correctness: {'PASSED' if corr.get('passed') else 'FAILED'}", "",
                  "| check | max difference | tolerance | passed |", "|---|---|---|---|"]
        for name, c in corr.get("round_parity", {}).items():
            note = c.get("error") or c.get("skipped")
            if note:
                lines.append(f"| pFedLA round, {name} | {note[:100]} | | False |")
                continue
            d = c["strategies_max_abs_diff"]
            lines.append(f"| pFedLA round, {name}: vmap = loop | {d:.2e} | {c['atol']} abs | "
                         f"{d <= c['atol'] and c['initial_state_diff'] <= 1e-6} |")
            t = c.get("torch")
            if t:
                lines.append(f"| pFedLA round, {name}: JAX = torch on {t['device']} | "
                             f"{max(t['max_abs_diff'].values()):.2e} | {c['atol']} abs | {t['passed']} |")
            lines.append(f"| pFedLA round, {name}: alpha moved / params moved | {c['alpha_moved']:.2e} / "
                         f"{c['params_moved']:.2e} | > 1e-2 / > 1e-3 | "
                         f"{c['alpha_moved'] > 1e-2 and c['params_moved'] > 1e-3} |")
        o = corr.get("ops", {})
        lines.append(f"| custom ops = autodiff | {_fmt(o.get('max_rel_error'), '.2e', o.get('error') or o.get('skipped'))} "
                     f"| {o.get('rtol', '')} rel | {o.get('passed', '–')} |")
        for note in corr.get("not_run", []):
            lines.append(f"| not run | {note} | | |")
    rounds = sec.get("rounds", {}).get("rounds", [])
    if rounds:
        lines += ["", "## pFedLA round (JAX vmap vs the PyTorch reference, same device)", "",
                  "| model | clients | JAX ms | compile s | torch ms | torch clients measured | JAX/torch | JAX peak MB | torch peak MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rounds:
            note = r.get("error") or r.get("skipped")
            if note:
                lines.append(f"| {r['model']} | {r['clients']} | {note[:80]} | | | | | | |")
                continue
            lines.append(f"| {r['model']} | {r['clients']} | {_fmt(r.get('jax_ms_per_round'))} | "
                         f"{_fmt(r.get('jax_compile_s'))} | {_fmt(r.get('torch_ms_per_round'), '.0f')} | "
                         f"{_fmt(r.get('torch_measured_participants'), 'd')} | "
                         f"{_fmt(r.get('ratio_jax_over_torch'), '.4f')} | {_fmt(r.get('jax_peak_device_mb'), '.0f')} | "
                         f"{_fmt(r.get('torch_peak_device_mb'), '.0f')} |")
    server = sec.get("server", {}).get("server", [])
    if server:
        lines += ["", "## Server step alone (alpha + aggregation + HN update, FMNIST CNN)", "",
                  "| N | JAX ms | torch ms | torch clients measured | JAX speed-up |", "|---|---|---|---|---|"]
        for s in server:
            note = s.get("error") or s.get("skipped")
            lines.append(f"| {s['clients']} | " + (f"{note[:80]} | | | |" if note else
                         f"{_fmt(s.get('jax_ms'))} | {_fmt(s.get('torch_ms'), '.0f')} | "
                         f"{_fmt(s.get('torch_measured_clients'), 'd')} | {_fmt(s.get('speedup_jax'), '.0f')}x |"))
    strat = sec.get("strategies", {})
    if strat.get("local_training"):
        lines += ["", "## Client-parallel strategies: local training alone", "",
                  "| model | variant | ms | compile s | vs vmap |", "|---|---|---|---|---|"]
        for model, v in strat["local_training"].items():
            rel = v.get("ms_relative_to_vmap", {})
            for name, f in v.items():
                if isinstance(f, dict) and ("ms" in f or "error" in f or "skipped" in f):
                    lines.append(f"| {model} | {name} | {_fmt(f.get('ms'), '.1f', (f.get('error') or f.get('skipped', ''))[:60])} | "
                                 f"{_fmt(f.get('compile_s'))} | {_fmt(rel.get(name), '.2f')} |")
    if strat.get("conv_micro"):
        lines += ["", "## Conv layers alone over clients (forward + both gradients)", "",
                  "| model | layer | variant | ms |", "|---|---|---|---|"]
        for model, v in strat["conv_micro"].items():
            for layer in ("conv1", "conv2"):
                for name, f in (v.get(layer) or {}).items():
                    if isinstance(f, dict) and name != "shape":
                        lines.append(f"| {model} | {layer} | {name} | "
                                     f"{_fmt(f.get('ms'), '.2f', (f.get('error') or f.get('skipped', ''))[:60])} |")
    cap = sec.get("capacity", {}).get("capacity")
    if cap:
        lines += ["", f"## Capacity: {cap.get('model')} CNN, pFedLA, largest N that fits: {cap.get('largest_that_fits')} "
                      f"(limited by {cap.get('limited_by')})", "",
                  "| clients | fits | state MB | JAX peak MB | round s | note |", "|---|---|---|---|---|---|"]
        for a in cap.get("attempts", []):
            lines.append(f"| {a['clients']} | {a['fits']} | {_fmt(a.get('state_mb'), '.0f')} | "
                         f"{_fmt(a.get('jax_peak_device_mb'), '.0f')} | {_fmt(a.get('round_s'), '.2f')} | "
                         f"{(a.get('error') or '')[:80]} |")
    s = report.get("summary", {})
    if s.get("ratio_jax_over_torch"):
        lines += ["", "JAX/torch time per round: " + "; ".join(
            f"{m}: " + ", ".join(f"{n} clients {_fmt(r, '.4f')}" for n, r in v.items())
            for m, v in s["ratio_jax_over_torch"].items()) + " (goal at 100 clients: <= 0.05)"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main
def check_torch(settings: CheckSettings) -> None:
    """Whether the PyTorch parts can run as settings.torch_device asks: a note on stdout when
    torch is not installed (they are skipped; only --torch_device=auto allows that).

    Raises:
      UserInputError: a --torch_device other than auto without torch, or one torch cannot
        use (experiments.torch_baseline.resolve_device).
    """
    torch = _torch()
    if torch is None:
        if settings.torch_device.strip().lower() != "auto":
            raise UserInputError(f"--torch_device={settings.torch_device} but torch is not "
                                 "installed (pip install -e '.[torch]'); --torch_device=auto "
                                 "skips the PyTorch parts")
        _say("note: torch is not installed: the PyTorch reference parts are skipped")
    else:
        from experiments.torch_baseline import resolve_device  # (imports torch)

        resolve_device(settings.torch_device)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
    f = flag_values
    if f.section:
        if f.section not in SECTION_FUNCS or f.section_deadline is None:
            fail(f"--section must be one of {', '.join(SECTIONS)}, with --section_deadline")
        start(argv)
        try:
            settings = settings_from_flags(f)
        except UserInputError as e:
            fail(str(e))
        sys.exit(run_section(f.section, f.section_out, f.section_deadline, settings))
    start(argv)
    try:
        settings = settings_from_flags(f)
        check_torch(settings)
    except UserInputError as e:
        fail(str(e))
    try:
        os.makedirs(settings.out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out_dir {settings.out_dir!r}: {e.strerror}")
    sys.exit(run_parent(settings))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
