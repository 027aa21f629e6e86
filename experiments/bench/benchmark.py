r"""JAX engine vs the idiomatic PyTorch reference, side by side, in one process.

For each model, a full FL round (pFedLA by default: aggregation, local training of every
client, hypernetwork update; or FedAvg) on the same synthetic data, the same number of
clients, local steps and batch size. After warm-up, JAX and PyTorch rounds alternate (so a
slow phase of the machine hits both) and the table reports medians:

  ms/round, examples/s, JAX compile time (the warm-up rounds' excess over the median), the JAX/torch
  time ratio, peak memory,

and the server step alone (alpha, aggregation and hypernetwork update of every client;
no local training) at N in --server_clients for both. Three JAX-only sections follow:

  overhead  the fixed cost of a round: ms/round at 1 and at 11 local steps (FMNIST CNN,
            --num_clients clients); fixed = t(1) - (t(11) - t(1)) / 10, i.e. everything a
            round costs besides its local steps (dispatch, gathers, server step, host reads).
  memory    a pFedLA round at N = --memory_clients, S = 10%: the state's bytes, the process's
            resident memory before the round and its peak during it, and XLA's own account of
            the compiled round (temporaries, donated/aliased buffers).
  compile   the main job (real FMNIST if installed, else synthetic) run twice in fresh
            processes sharing one empty compilation cache: first round minus a steady round,
            i.e. the compile time, without and with the persistent cache.

--sections picks among rounds, server, overhead, memory, compile. A JSON file records the
machine, versions and every figure.

  python -m experiments.bench.benchmark                       # FMNIST + CIFAR CNN, 10 clients x 50 steps
  python -m experiments.bench.benchmark --models=fmnist --num_clients=100 --local_steps=20 --out=runs/bench.json

torch runs on --torch_device (auto = cuda if torch sees one, else cpu; `cuda` without CUDA is
an error) with --torch_threads intra-op threads (default: all cores); JAX on its default
backend, on CPU with one XLA device per core (--host_devices) and `--client_parallelism=auto`
(BUILD_NOTES (performance)). On a GPU, --fp32 (default) runs both in full float32 (torch
TF32 off, JAX matmul precision 'highest'); --nofp32 leaves each framework's default (TF32
where the GPU has it). torch GPU times are taken after torch.cuda.synchronize(). Bad flags:
one line `error: ...`, exit status 2.

The pieces (`synthetic_arrays`, `jax_setup`, `JaxRounds`, `TorchRounds`, `server_benchmark`,
...) take explicit arguments and read no flag; `run_benchmark(BenchmarkOptions(...))` is the
whole tool from Python. experiments.bench.gpu_check reuses the pieces with its own sizes and
time guards, and shares --torch_device and --fp32 (`define_torch_flags`). Importing this module
defines no flag: `define_flags` does, when the tool runs.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.cli import fail, parse_flags, start
from pfedla_jax.algorithms import FLContext
from pfedla_jax.algorithms.fedavg import FedAvg
from pfedla_jax.algorithms.pfedla import PFedLA, PFedLAConfig
from pfedla_jax.core.local_training import STRATEGIES, ClientTrainer, LocalTrainConfig
from pfedla_jax.data import DEFAULT_FMNIST_DIR, Dataset, Partition, build_client_store
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import layer_names, make_cnn

MODELS = {"fmnist": ((28, 28, 1), False), "cifar10": ((32, 32, 3), True)}
TRAIN_PER_CLIENT = 512  # per client (511 train + 1 unused test example)
ALGORITHMS = ("pfedla", "fedavg")
SECTIONS = ("rounds", "server", "overhead", "memory", "compile")
TORCH_DEVICES = ("auto", "cpu", "cuda")


def define_torch_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines --torch_device and --fp32, the flags this tool shares with
    experiments.bench.gpu_check (each tool's `define_flags` calls it)."""
    flags.DEFINE_string("torch_device", "auto", "Where the PyTorch reference runs: auto (cuda if "
                        "torch sees a CUDA device, else cpu) | cpu | cuda.", flag_values=flag_values)
    flags.DEFINE_bool("fp32", True, "On GPUs: full float32 matmuls and convolutions in both "
                      "frameworks (torch TF32 off for matmul and cuDNN; JAX "
                      "jax_default_matmul_precision='highest'). --nofp32: each framework's "
                      "default (TF32 where the GPU has it). No effect on CPUs.",
                      flag_values=flag_values)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this tool's flags on `flag_values` (`python -m experiments.bench.benchmark` does;
    importing the module defines none)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_list("models", ["fmnist", "cifar10"], "fmnist (1x28x28 CNN, 85,822 params) | "
                      "cifar10 (3x32x32 CNN with BN, 121,278 params).", **fv)
    flags.DEFINE_string("algorithm", "pfedla", "The FL round measured: pfedla | fedavg.", **fv)
    flags.DEFINE_integer("num_clients", 10, "Clients N (all take part in every round).", **fv)
    flags.DEFINE_integer("local_steps", 50, "Local SGD steps per client per round.", **fv)
    flags.DEFINE_integer("batch_size", 32, "Local batch size (<= 511).", **fv)
    flags.DEFINE_integer("rounds", 7, "Measured rounds per framework (median).", **fv)
    flags.DEFINE_integer("warmup", 2, "Warm-up rounds per framework (not measured).", **fv)
    flags.DEFINE_string("client_parallelism", "auto", "JAX's client strategy: "
                        f"{' | '.join(STRATEGIES)}.", **fv)
    flags.DEFINE_integer("host_devices", -1, "CPU only: split the host into this many XLA "
                         "devices, one per core (-1 = one per available core; 0 = XLA's "
                         "default of one device).", **fv)
    flags.DEFINE_list("server_clients", ["10", "100", "500"],
                      "Client counts for the server-step-only measurement ('' = skip).", **fv)
    flags.DEFINE_integer("server_repeats", 3, "Measured server steps (median).", **fv)
    flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0 = all cores).", **fv)
    flags.DEFINE_float("pause_s", 0.3, "Seconds of sleep before each measured round (not "
                       "timed): the other framework's worker threads (torch's OpenMP threads "
                       "spin after a parallel region) go idle first.", **fv)
    flags.DEFINE_bool("skip_torch", False, "Measure JAX only.", **fv)
    define_torch_flags(flag_values)
    flags.DEFINE_string("out", None, "Write the figures to this JSON file.", **fv)
    flags.DEFINE_list("sections", list(SECTIONS), f"Parts to run, among {', '.join(SECTIONS)}.",
                      **fv)
    flags.DEFINE_integer("overhead_rounds", 30, "overhead: measured rounds per step count "
                         "(median).", **fv)
    flags.DEFINE_integer("memory_clients", 1000, "memory: clients N (10% take part in the "
                         "round).", **fv)


def check_torch_device(value: str) -> None:
    """Raises UserInputError unless `value` is auto, cpu, cuda or cuda:K (whether CUDA is there
    is checked where torch is used: experiments.torch_baseline.resolve_device)."""
    text = value.strip().lower()
    if text not in TORCH_DEVICES and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise UserInputError(f"unknown --torch_device {value!r}; expected one of auto, cpu, cuda "
                             "(or cuda:K)")


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions:
    """What the benchmark measures (one field per flag; the defaults are the flags').

    The construction checks every field (`validate`): a UserInputError names the flag.
    """

    models: tuple[str, ...] = ("fmnist", "cifar10")
    algorithm: str = "pfedla"
    num_clients: int = 10
    local_steps: int = 50
    batch_size: int = 32
    rounds: int = 7
    warmup: int = 2
    client_parallelism: str = "auto"
    server_clients: tuple[int, ...] = (10, 100, 500)
    server_repeats: int = 3
    torch_threads: int = 0
    pause_s: float = 0.3
    skip_torch: bool = False
    torch_device: str = "auto"
    fp32: bool = True
    out: str | None = None
    sections: tuple[str, ...] = SECTIONS
    overhead_rounds: int = 30
    memory_clients: int = 1000

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises UserInputError on a bad setting (run by the constructor)."""
        if self.algorithm not in ALGORITHMS:
            raise UserInputError(f"unknown --algorithm {self.algorithm!r}; expected pfedla or fedavg")
        for name in self.models:
            if name not in MODELS:
                raise UserInputError(f"unknown model {name!r} in --models; expected {', '.join(MODELS)}")
        for flag, value in (("num_clients", self.num_clients), ("local_steps", self.local_steps),
                            ("batch_size", self.batch_size), ("rounds", self.rounds),
                            ("server_repeats", self.server_repeats)):
            if value < 1:
                raise UserInputError(f"--{flag} must be >= 1, got {value}")
        if self.warmup < 1:
            raise UserInputError(f"--warmup must be >= 1, got {self.warmup}")
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise UserInputError(f"unknown --sections {', '.join(unknown)}; expected among "
                                 f"{', '.join(SECTIONS)}")
        if self.overhead_rounds < 1 or self.memory_clients < 2:
            raise UserInputError("--overhead_rounds must be >= 1 and --memory_clients >= 2")
        if self.batch_size > TRAIN_PER_CLIENT - 1:
            raise UserInputError(f"--batch_size must be <= {TRAIN_PER_CLIENT - 1}, got {self.batch_size}")
        if any(v < 2 for v in self.server_clients):
            raise UserInputError("--server_clients values must be >= 2")
        check_torch_device(self.torch_device)
        if self.client_parallelism not in STRATEGIES:
            raise UserInputError(f"unknown --client_parallelism {self.client_parallelism!r}; "
                                 f"expected one of {', '.join(STRATEGIES)}")


def options_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> BenchmarkOptions:
    """The BenchmarkOptions of parsed flags (`define_flags`). Raises UserInputError."""
    f = flag_values
    try:
        server_ns = tuple(int(v) for v in f.server_clients if v.strip())
    except ValueError:
        raise UserInputError(f"--server_clients must be integers, got {f.server_clients}") from None
    return BenchmarkOptions(
        models=tuple(f.models), algorithm=f.algorithm, num_clients=f.num_clients,
        local_steps=f.local_steps, batch_size=f.batch_size, rounds=f.rounds, warmup=f.warmup,
        client_parallelism=f.client_parallelism, server_clients=server_ns,
        server_repeats=f.server_repeats, torch_threads=f.torch_threads, pause_s=f.pause_s,
        skip_torch=f.skip_torch, torch_device=f.torch_device, fp32=f.fp32, out=f.out,
        sections=tuple(f.sections), overhead_rounds=f.overhead_rounds,
        memory_clients=f.memory_clients)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_info() -> dict:
    """The host: CPU model, cores this process may use, platform, Python version."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "platform": platform.platform(),
            "python": platform.python_version()}


def synthetic_arrays(num_clients: int, shape, num_classes: int = 10, seed: int = 0,
                     per_client: int = TRAIN_PER_CLIENT, pool: int | None = None):
    """Synthetic client data: class templates + noise.

    Args:
      num_clients: N.
      shape: one image, (H, W, C).
      num_classes: labels are uniform over 0..num_classes-1.
      seed: numpy seed.
      per_client: examples per client (the benchmark uses the last as the test split).
      pool: None: every client has its own `per_client` images (N * per_client in all).
        An int P: only P distinct images are made and each client holds a random subset
        of per_client of them (P >= per_client): the same work per client at any N, without
        making (and storing) N * per_client images (1,000 CIFAR clients: 1.6e9 values).

    Returns:
      (images uint8 [M, H, W, C], labels int32 [M], per-client int64 index lists into them).

    Raises:
      ValueError: pool < per_client.
    """
    rng = np.random.default_rng(seed)
    m = num_clients * per_client if pool is None else int(pool)
    if pool is not None and pool < per_client:
        raise ValueError(f"pool ({pool}) must be >= per_client ({per_client})")
    templates = rng.uniform(0, 255, (num_classes,) + tuple(shape))
    labels = rng.integers(0, num_classes, m).astype(np.int32)
    images = np.clip(templates[labels] + rng.normal(0, 40, (m,) + tuple(shape)), 0, 255).astype(np.uint8)
    if pool is None:
        train = [np.arange(i * per_client, (i + 1) * per_client) for i in range(num_clients)]
    else:
        train = [np.sort(rng.choice(m, per_client, replace=False)) for _ in range(num_clients)]
    return images, labels, train


def jax_setup(model_name: str, num_clients: int, images, labels, train, local_steps: int, *,
              batch_size: int = 32, strategy: str = "auto", algorithm: str = "pfedla", config=None,
              lr: float = 0.01, init: str = "common", conv_impl: str = "custom",
              test_examples: int = 1):
    """A JAX FL algorithm over the given client data (all clients train each round).

    Args:
      model_name: a key of MODELS.
      num_clients: N.
      images, labels, train: as `synthetic_arrays` returns (the last `test_examples` of each
        client's list form its test split, the rest its train split).
      local_steps, batch_size: each client's work per round.
      strategy: the client strategy, 'auto' | 'vmap' | 'loop' | 'shard'.
      algorithm: 'pfedla' | 'fedavg'.
      config: the PFedLAConfig (default: hn_lr 0.5); ignored for FedAvg.
      lr: client SGD learning rate.
      init: 'common' or 'independent' client models.
      conv_impl: 'custom' (ops.conv2d_valid) or 'reference' (plain autodiff lax.conv).

    Returns:
      (algorithm, Dataset, Partition).
    """
    shape, use_bn = MODELS[model_name]
    x = images.astype(np.float32) / 255.0
    mean = tuple(float(v) for v in x.mean(axis=(0, 1, 2)))
    std = tuple(float(v) for v in x.std(axis=(0, 1, 2)))
    dataset = Dataset(name=f"bench_{model_name}", images=images, labels=labels, num_classes=10,
                      mean=mean, std=std)
    # test_examples per client (the store wants a test split; it is not used here)
    k = test_examples
    part = Partition(train_indices=[t[:-k] for t in train], test_indices=[t[-k:] for t in train],
                     client_classes=[np.unique(labels[t]) for t in train], scheme="manual",
                     samples_per_client=None)
    store = build_client_store(dataset, part)
    model = make_cnn(shape, 10, use_bn=use_bn, conv_impl=conv_impl)
    trainer = ClientTrainer(model, store, LocalTrainConfig(batch_size=batch_size,
                                                           local_steps=local_steps, lr=lr),
                            strategy)
    # donate_state: rounds update the state in place, as in an experiment
    ctx = FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                    num_clients=num_clients, input_shape=shape, donate_state=True, init=init)
    if algorithm == "pfedla":
        algo = PFedLA(ctx, config if config is not None else PFedLAConfig(hn_lr=0.5))
    else:
        algo = FedAvg(ctx)
    return algo, dataset, part


def _torch_setup(model_name: str, dataset, part, *, local_steps: int, batch_size: int = 32,
                 algorithm: str = "pfedla", device="auto", lr: float = 0.01):
    """The PyTorch reference server over the same data as `jax_setup` (device: a
    --torch_device value or torch.device). Raises UserInputError for a CUDA device without
    CUDA."""
    from experiments.torch_baseline import (  # optional dependency: torch
        ClientData,
        CNNTarget,
        FedAvgServer,
        LocalConfig,
        PFedLAServer,
        shuffled_batches,
    )

    shape, use_bn = MODELS[model_name]
    data = ClientData.from_arrays(dataset.images, dataset.labels, part.train_indices,
                                  dataset.mean, dataset.std)
    # same number of steps and examples per step as JAX: train sets are 511 examples, so
    # 16 batches per epoch (the last one of 31) in both frameworks
    order = shuffled_batches(data, batch_size=batch_size, local_steps=local_steps)
    model = CNNTarget(shape[2], 10, use_bn=use_bn, input_hw=shape[:2])
    local = LocalConfig(lr=lr)
    if algorithm == "pfedla":
        return PFedLAServer(model, data, order, local, hn_lr=0.5, device=device)
    return FedAvgServer(model, data, order, local, device=device)


class JaxRounds:
    """Rounds of a JAX FL algorithm (all clients take part) over synthetic client data.

    Args:
      model_name: 'fmnist' or 'cifar10' (MODELS).
      num_clients: N (= the clients per round).
      local_steps, batch_size: each client's work per round (local_steps x batch_size examples).
      algorithm: 'pfedla' or 'fedavg'.
      strategy: --client_parallelism ('auto', 'vmap', 'loop', 'shard').
      per_client, pool, seed: `synthetic_arrays`' arguments.
      **setup: more `jax_setup` arguments (config, lr, init, conv_impl).

    Attributes: algo, dataset, part (for `TorchRounds` on the same data), state,
    examples_per_round (= N * local_steps * batch_size).
    """

    def __init__(self, model_name: str, num_clients: int, *, local_steps: int, batch_size: int,
                 algorithm: str = "pfedla", strategy: str = "auto",
                 per_client: int = TRAIN_PER_CLIENT, pool: int | None = None, seed: int = 0,
                 **setup):
        images, labels, train = synthetic_arrays(num_clients, MODELS[model_name][0], seed=seed,
                                                 per_client=per_client, pool=pool)
        self.algo, self.dataset, self.part = jax_setup(
            model_name, num_clients, images, labels, train, local_steps, batch_size=batch_size,
            strategy=strategy, algorithm=algorithm, **setup)
        self.key = jax.random.PRNGKey(seed)
        self.state = self.algo.init(self.key)
        self.participants = np.arange(num_clients, dtype=np.int32)
        self.examples_per_round = num_clients * local_steps * batch_size

    @property
    def strategy(self) -> str:
        return self.algo.ctx.trainer.strategy

    def run(self, t: int) -> float:
        """Round t, as the experiment loop runs it (one compiled call, its metrics read back);
        returns its wall seconds (after block_until_ready)."""
        t0 = time.perf_counter()
        self.state, info = self.algo.round(self.state, t, self.participants,
                                           jax.random.fold_in(self.key, t))
        jax.device_get(info)  # what the experiment loop reads every round
        jax.block_until_ready(self.state)
        return time.perf_counter() - t0


class TorchRounds:
    """Rounds of the PyTorch reference on the data of a `JaxRounds` (clients one after another).

    Args:
      model_name, dataset, part: as `JaxRounds` has them.
      local_steps, batch_size, algorithm: as for `JaxRounds`.
      device: --torch_device value or torch.device (UserInputError for CUDA without CUDA).

    Attributes: server (the reference's FedAvgServer / PFedLAServer), device.
    """

    def __init__(self, model_name: str, dataset, part, *, local_steps: int, batch_size: int,
                 algorithm: str = "pfedla", device="auto", lr: float = 0.01):
        self.server = _torch_setup(model_name, dataset, part, local_steps=local_steps,
                                   batch_size=batch_size, algorithm=algorithm, device=device, lr=lr)
        self.device = self.server.device

    def run(self, t: int, participants) -> float:
        """Round t for `participants` (client ids, in order); wall seconds, after the device's
        queued work finished (torch.cuda.synchronize on a GPU)."""
        from experiments.torch_baseline import synchronize  # optional dependency: torch

        synchronize(self.device)
        t0 = time.perf_counter()
        self.server.round(t, participants)
        synchronize(self.device)
        return time.perf_counter() - t0


def _median_ms(times):
    return 1000.0 * statistics.median(times)


def round_benchmark(model_name: str, *, num_clients: int = 10, local_steps: int = 50,
                    batch_size: int = 32, rounds: int = 7, warmup: int = 2,
                    algorithm: str = "pfedla", strategy: str = "auto", skip_torch: bool = False,
                    torch_device="auto", pause_s: float = 0.3) -> dict:
    """Full rounds, JAX and torch alternating after warm-up (the arguments are the flags').

    Returns a dict: ms per round (median) and all rounds, examples/s, JAX compile seconds,
    the JAX/torch ratio, peak host memory (MB), peak device memory (MB) on GPUs.
    """
    n, steps, batch, pause = num_clients, local_steps, batch_size, pause_s
    rss0 = _peak_rss_mb()
    jr = JaxRounds(model_name, n, local_steps=steps, batch_size=batch, algorithm=algorithm,
                   strategy=strategy)
    examples = jr.examples_per_round

    def jax_round(t):
        time.sleep(pause)
        return jr.run(t)

    jax_times = [jax_round(t) for t in range(warmup)]
    rss_jax = _peak_rss_mb()
    tr = None
    if not skip_torch:
        tr = TorchRounds(model_name, jr.dataset, jr.part, local_steps=steps, batch_size=batch,
                         algorithm=algorithm, device=torch_device)
        _reset_torch_peak(tr.device)

        def torch_round(t):
            time.sleep(pause)
            return tr.run(t, range(n))

        for t in range(warmup):
            torch_round(t)
    rss_torch = _peak_rss_mb()
    jax_measured, torch_measured = [], []
    for t in range(warmup, warmup + rounds):
        jax_measured.append(jax_round(t))
        if tr is not None:
            torch_measured.append(torch_round(t))
    out = {
        "model": model_name, "algorithm": algorithm, "clients": n, "local_steps": steps,
        "batch_size": batch, "examples_per_round": examples,
        "jax_strategy": jr.strategy,
        "jax_ms_per_round": _median_ms(jax_measured),
        "jax_ms_all": [1000 * t for t in jax_measured],
        "jax_examples_per_s": examples / statistics.median(jax_measured),
        # the warm-up rounds' excess over a steady round (the first compiles the round)
        "jax_compile_s": sum(max(0.0, w - statistics.median(jax_measured)) for w in jax_times),
        "jax_first_round_s": jax_times[0],
        "peak_rss_mb_after_jax_warmup": rss_jax, "peak_rss_mb_before": rss0,
    }
    if tr is not None:
        out.update({
            "torch_device": str(tr.device),
            "torch_ms_per_round": _median_ms(torch_measured),
            "torch_ms_all": [1000 * t for t in torch_measured],
            "torch_examples_per_s": examples / statistics.median(torch_measured),
            "ratio_jax_over_torch": statistics.median(jax_measured) / statistics.median(torch_measured),
            "peak_rss_mb_after_torch_warmup": rss_torch,
        })
    _gpu_memory(out, tr.device if tr is not None else None)
    return out


def jax_device_memory() -> dict[str, float]:
    """The default JAX device's allocator figures in MB ({} on a CPU or when the backend
    reports none): 'bytes_in_use', 'peak_bytes_in_use' (since the process started: JAX
    has no reset), 'bytes_limit'."""
    if jax.default_backend() == "cpu":
        return {}
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  (a backend without the API)
        return {}
    return {k: stats[k] / 2**20 for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
            if k in stats}


def _reset_torch_peak(device) -> None:
    if device is not None and device.type == "cuda":
        import torch  # optional dependency (a CUDA device means torch is there)

        torch.cuda.reset_peak_memory_stats(device)


def torch_peak_mb(device) -> float | None:
    """torch.cuda.max_memory_allocated(device) in MB since the last reset; None off CUDA."""
    if device is None or device.type != "cuda":
        return None
    import torch  # optional dependency (a CUDA device means torch is there)

    return torch.cuda.max_memory_allocated(device) / 2**20


def _gpu_memory(out: dict, torch_device=None) -> None:
    jax_mem = jax_device_memory()
    if "peak_bytes_in_use" in jax_mem:
        out["jax_peak_device_mb"] = jax_mem["peak_bytes_in_use"]
    peak = torch_peak_mb(torch_device)
    if peak is not None:
        out["torch_peak_device_mb"] = peak


def server_benchmark(num_clients: int, *, repeats: int = 3, skip_torch: bool = False,
                     torch_device="auto", torch_clients: int | None = None,
                     model_name: str = "fmnist", batch_size: int = 32,
                     strategy: str = "auto") -> dict:
    """The pFedLA server step alone: alpha + aggregation + HN update of all N clients.

    Args:
      num_clients: N (every client takes part).
      repeats: measured JAX steps (median); torch is measured the same number of times.
      skip_torch, torch_device: as --skip_torch, --torch_device.
      torch_clients: None = torch runs all N clients. k < N: torch runs the first k clients'
        steps (each against all N stored models, as in the full step) and the figure is
        extrapolated linearly to N ('torch_extrapolated' True; per client the work is the
        same, O(N)).
      model_name: the client CNN (MODELS).
      batch_size, strategy: the local trainer's (built, not run: the step trains no client).

    Returns:
      {'clients', 'jax_ms', 'jax_compile_s', and with torch: 'torch_ms' (for all N),
       'torch_measured_clients', 'torch_extrapolated', 'speedup_jax', 'torch_device'}.
    """
    # the server step reads no data: two examples per client (one train, one test) suffice
    images, labels, train = synthetic_arrays(num_clients, MODELS[model_name][0], per_client=2)
    algo, dataset, part = jax_setup(model_name, num_clients, images, labels, train, 1,
                                    batch_size=batch_size, strategy=strategy, algorithm="pfedla")
    state = algo.to_checkpoint(algo.init(jax.random.PRNGKey(0)))  # [N, ...] (no mesh padding)
    ids = jnp.arange(num_clients, dtype=jnp.int32)
    # distinct stored models (a common init would make every source identical), and updates

    @jax.jit
    def perturbed(params):
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), 2 * len(leaves))
        stored = [a + 0.01 * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)]
        delta = [1e-3 * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys[len(leaves):], leaves)]
        return jax.tree.unflatten(tree, stored), jax.tree.unflatten(tree, delta)

    stored, delta = perturbed(state["client_params"])

    def jax_step():
        t0 = time.perf_counter()
        _, retained, theta_bar = algo.personalize(state["hn_params"], stored, ids)
        new = algo.hn_update(state["hn_params"], state["hn_opt_state"], stored, ids, retained, delta)
        jax.block_until_ready((theta_bar, new))
        return time.perf_counter() - t0

    first = jax_step()
    jax_times = [jax_step() for _ in range(repeats)]
    out = {"clients": num_clients, "jax_ms": _median_ms(jax_times),
           "jax_compile_s": max(0.0, first - statistics.median(jax_times))}
    if not skip_torch:
        import torch  # optional dependency

        from experiments.torch_baseline import params_from_jax, synchronize  # (imports torch)

        server = _torch_setup(model_name, dataset, part, algorithm="pfedla", local_steps=1,
                              batch_size=batch_size, device=torch_device)
        dev = server.device
        k = num_clients if torch_clients is None else max(1, min(int(torch_clients), num_clients))
        host = jax.tree.map(np.asarray, stored)
        host_delta = jax.tree.map(np.asarray, delta)
        row = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
        for i in range(num_clients):
            sd = params_from_jax(row(host, i))
            server.client_states[i].update({k: torch.as_tensor(v).to(dev) for k, v in sd.items()})
        deltas = [{k: torch.as_tensor(v).to(dev) for k, v in params_from_jax(row(host_delta, i)).items()}
                  for i in range(k)]

        def torch_step():
            # what the PyTorch server does per round, minus local training (k of N clients)
            synchronize(dev)
            t0 = time.perf_counter()
            snapshot = server.stored_params()
            for i in range(k):
                _, _, theta_bar = server.personalize(i, snapshot)
                server.update_hypernetwork(i, theta_bar, deltas[i])
            synchronize(dev)
            return (time.perf_counter() - t0) * num_clients / k

        torch_step()
        torch_times = [torch_step() for _ in range(repeats)]
        out.update(torch_ms=_median_ms(torch_times), torch_device=str(dev),
                   torch_measured_clients=k, torch_extrapolated=k < num_clients,
                   speedup_jax=statistics.median(torch_times) / statistics.median(jax_times))
    return out


def overhead_benchmark(num_clients: int = 10, rounds: int = 30, *, algorithm: str = "pfedla",
                       batch_size: int = 32, strategy: str = "auto") -> dict:
    """Fixed cost per round: `algorithm`, FMNIST CNN, rounds of 1 and 11 local steps.

    The two configurations alternate round by round (a slow phase of the machine hits both),
    each round as the experiment loop runs it: one compiled round, one read of its metrics;
    `rounds` measured rounds of each after 2 warm-up rounds (medians).
    """
    n = num_clients
    images, labels, train = synthetic_arrays(n, MODELS["fmnist"][0])
    participants = np.arange(n, dtype=np.int32)
    key = jax.random.PRNGKey(0)
    algos = {steps: jax_setup("fmnist", n, images, labels, train, steps, batch_size=batch_size,
                              strategy=strategy, algorithm=algorithm)[0]
             for steps in (1, 11)}
    states = {steps: algo.init(key) for steps, algo in algos.items()}
    times: dict[int, list[float]] = {1: [], 11: []}
    for t in range(2 + rounds):
        for steps, algo in algos.items():
            t0 = time.perf_counter()
            states[steps], info = algo.round(states[steps], t, participants, jax.random.fold_in(key, t))
            jax.device_get(info)
            jax.block_until_ready(states[steps])
            if t >= 2:  # the first two rounds compile and warm up
                times[steps].append(time.perf_counter() - t0)
    medians = {steps: statistics.median(v) for steps, v in times.items()}
    per_step = (medians[11] - medians[1]) / 10
    return {"clients": n, "algorithm": algorithm, "ms_per_round_1_step": 1000 * medians[1],
            "ms_per_round_11_steps": 1000 * medians[11], "ms_per_local_step": 1000 * per_step,
            "fixed_ms_per_round": 1000 * (medians[1] - per_step)}


def _memory_now() -> dict[str, int]:
    """Resident set size now and its peak (bytes), from /proc (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def memory_benchmark(num_clients: int, *, batch_size: int = 32, strategy: str = "auto") -> dict:
    """Memory of one pFedLA round at N clients, S = N/10, one local step (FMNIST CNN)."""
    per_client = 24  # 23 train examples + 1 test example each: the state, not the data, is measured
    images, labels, train = synthetic_arrays(num_clients, MODELS["fmnist"][0], per_client=per_client)
    algo, _, _ = jax_setup("fmnist", num_clients, images, labels, train, 1,
                           batch_size=batch_size, strategy=strategy, algorithm="pfedla")
    key = jax.random.PRNGKey(0)
    state = algo.init(key)
    jax.block_until_ready(state)
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(state))
    rng = np.random.default_rng(0)
    cohort = lambda: np.sort(rng.choice(num_clients, max(1, num_clients // 10), replace=False))
    t0 = time.perf_counter()
    state, _ = algo.round(state, 0, cohort(), key)        # compiles
    jax.block_until_ready(state)
    first = time.perf_counter() - t0
    ids = jnp.asarray(cohort(), jnp.int32)
    compiled = algo._round_fn.lower(state, jnp.int32(1), ids, key, algo.ctx.data).compile()
    analysis = compiled.memory_analysis()
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current resident size
        before = _memory_now()
    except OSError:
        before = None
    t0 = time.perf_counter()
    state, _ = algo.round(state, 1, np.asarray(ids), key)
    jax.block_until_ready(state)
    second = time.perf_counter() - t0
    out = {"clients": num_clients, "participants": int(ids.shape[0]),
           "state_mb": state_bytes / 2**20, "first_round_s": first, "second_round_s": second}
    if before is not None:
        after = _memory_now()
        out.update(rss_before_round_mb=before["VmRSS"] / 2**20,
                   peak_rss_during_round_mb=after["VmHWM"] / 2**20,
                   round_increase_mb=(after["VmHWM"] - before["VmRSS"]) / 2**20,
                   peak_over_state=(after["VmHWM"] - before["VmRSS"] + state_bytes) / state_bytes)
    if analysis is not None:
        out.update(xla_argument_mb=analysis.argument_size_in_bytes / 2**20,
                   xla_output_mb=analysis.output_size_in_bytes / 2**20,
                   xla_alias_mb=analysis.alias_size_in_bytes / 2**20,
                   xla_temp_mb=analysis.temp_size_in_bytes / 2**20)
    return out


def compile_benchmark() -> dict:
    """The main job twice, in fresh processes sharing an empty persistent compilation cache."""
    real = os.path.exists(os.path.join(DEFAULT_FMNIST_DIR, "train-images-idx3-ubyte.gz"))
    job = (["--flagfile=experiments/presets/fmnist_quick.flags"] if real else
           ["--algorithm=pfedla", "--dataset=synthetic", "--num_clients=10", "--samples_per_client=200",
            "--lr=0.05"])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = {"job": "fmnist_quick" if real else "synthetic pFedLA, 10 clients", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["PFEDLA_JAX_COMPILATION_CACHE"] = os.path.join(tmp, "cache")
        for attempt in range(2):
            workdir = os.path.join(tmp, f"run{attempt}")
            p = subprocess.run([sys.executable, "-m", "experiments.run", *job, "--rounds=6",
                                "--eval_every=6", "--quiet", "--checkpoint_every=0",
                                "--tensorboard=false", f"--workdir={workdir}"],
                               cwd=root, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"main job failed: {p.stderr.strip()[-500:]}")
            with open(os.path.join(workdir, "summary.json")) as f:
                summary = json.load(f)
            out["runs"].append({"cache": "empty" if attempt == 0 else "warm",
                                "first_round_s": summary["first_round_seconds"],
                                "median_round_s": summary["median_round_seconds"],
                                "compile_s": summary["compile_seconds_estimate"]})
    return out


def run_benchmark(opts: BenchmarkOptions) -> dict:
    """Runs `opts.sections`, prints a line per figure, writes `opts.out`; returns the report.

    Sets process-wide state: torch's intra-op threads (`opts.torch_threads`) and full float32
    on GPUs (`set_precision`).

    Raises:
      UserInputError: torch is not installed (without `skip_torch`), a CUDA `torch_device`
        without CUDA, or a bad setting met while building a measurement.
    """
    versions = {"jax": jax.__version__, "backend": jax.default_backend(),
                "devices": [str(d) for d in jax.devices()]}
    if not opts.skip_torch:
        try:
            import torch  # optional dependency (the `torch` extra)
        except ImportError:
            raise UserInputError("torch is not installed: pip install -e '.[torch]' "
                                 "(torch==2.13.0), or --skip_torch") from None
        from experiments.torch_baseline import resolve_device  # (imports torch)

        device = resolve_device(opts.torch_device)
        threads = opts.torch_threads or machine_info()["cores"]
        torch.set_num_threads(threads)
        versions.update(torch=torch.__version__, torch_threads=threads,
                        torch_cuda=torch.cuda.is_available(), torch_device=str(device))
        opts = dataclasses.replace(opts, torch_device=str(device))
    versions.update(set_precision(opts.fp32))
    return _run(opts, versions)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
    start(argv, host_devices=flag_values.host_devices)
    try:
        run_benchmark(options_from_flags(flag_values))
    except UserInputError as e:
        fail(str(e))


def set_precision(fp32: bool) -> dict:
    """Full float32 in both frameworks on GPUs (see --fp32), process-wide; returns what was set:
    {'jax_matmul_precision': 'highest' | 'default', 'torch_tf32': {...}} (torch only if imported)."""
    out = {"jax_matmul_precision": "default"}
    if fp32 and jax.default_backend() != "cpu":
        jax.config.update("jax_default_matmul_precision", "highest")
        out["jax_matmul_precision"] = "highest"
    if "torch" in sys.modules:
        from experiments.torch_baseline.device import full_fp32, tf32_settings  # (imports torch)

        if fp32:
            full_fp32()
        out["torch_tf32"] = tf32_settings()
    return out


def _run(opts: BenchmarkOptions, versions: dict) -> dict:
    sections = set(opts.sections)
    report = {"machine": machine_info(), "versions": versions, "rounds": [], "server": []}
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
          f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices)"
          + (f"; torch {versions['torch']} on {versions['torch_device']} ({versions['torch_threads']} threads)"
             if "torch" in versions else ""),
          flush=True)
    for name in opts.models if "rounds" in sections else ():
        r = round_benchmark(name, num_clients=opts.num_clients, local_steps=opts.local_steps,
                            batch_size=opts.batch_size, rounds=opts.rounds, warmup=opts.warmup,
                            algorithm=opts.algorithm, strategy=opts.client_parallelism,
                            skip_torch=opts.skip_torch, torch_device=opts.torch_device,
                            pause_s=opts.pause_s)
        report["rounds"].append(r)
        line = (f"{opts.algorithm} round, {name} CNN, {r['clients']} clients x {r['local_steps']} steps x "
                f"batch {r['batch_size']}: JAX ({r['jax_strategy']}) {r['jax_ms_per_round']:.0f} ms "
                f"({r['jax_examples_per_s']:,.0f} ex/s, compile {r['jax_compile_s']:.1f} s)")
        if "torch_ms_per_round" in r:
            line += (f" | torch {r['torch_ms_per_round']:.0f} ms ({r['torch_examples_per_s']:,.0f} ex/s)"
                     f" | JAX/torch {r['ratio_jax_over_torch']:.2f}")
        line += (f" | peak RSS {r['peak_rss_mb_after_jax_warmup']:.0f} MB after JAX warm-up"
                 + (f", {r['peak_rss_mb_after_torch_warmup']:.0f} MB after torch warm-up"
                    if "torch_ms_per_round" in r else ""))
        print(line, flush=True)
    for n in opts.server_clients if "server" in sections else ():
        s = server_benchmark(n, repeats=opts.server_repeats, skip_torch=opts.skip_torch,
                             torch_device=opts.torch_device, batch_size=opts.batch_size,
                             strategy=opts.client_parallelism)
        report["server"].append(s)
        line = f"server step (alpha + aggregation + HN update), N={n}: JAX {s['jax_ms']:.1f} ms"
        if "torch_ms" in s:
            line += (f" | torch {s['torch_ms']:.1f} ms"
                     + (f" (from {s['torch_measured_clients']} clients)" if s["torch_extrapolated"] else "")
                     + f" | JAX {s['speedup_jax']:.0f}x faster")
        print(line, flush=True)
    if "overhead" in sections:
        o = report["overhead"] = overhead_benchmark(
            opts.num_clients, opts.overhead_rounds, algorithm=opts.algorithm,
            batch_size=opts.batch_size, strategy=opts.client_parallelism)
        print(f"round overhead, {o['algorithm']}, fmnist CNN, {o['clients']} clients: "
              f"{o['ms_per_round_1_step']:.1f} ms/round at 1 local step, {o['ms_per_round_11_steps']:.1f} "
              f"at 11 -> {o['ms_per_local_step']:.1f} ms per step, fixed cost {o['fixed_ms_per_round']:.1f} ms/round",
              flush=True)
    if "memory" in sections:
        m = report["memory"] = memory_benchmark(opts.memory_clients, batch_size=opts.batch_size,
                                                strategy=opts.client_parallelism)
        line = (f"memory, pfedla round, N={m['clients']}, S={m['participants']}: state {m['state_mb']:.0f} MB")
        if "peak_rss_during_round_mb" in m:
            line += (f"; resident {m['rss_before_round_mb']:.0f} MB before the round, peak "
                     f"{m['peak_rss_during_round_mb']:.0f} MB during it (+{m['round_increase_mb']:.0f} MB: "
                     f"peak = {m['peak_over_state']:.2f}x the state)")
        if "xla_temp_mb" in m:
            line += (f"; XLA: arguments {m['xla_argument_mb']:.0f} MB, outputs {m['xla_output_mb']:.0f} MB "
                     f"({m['xla_alias_mb']:.0f} MB in place), temporaries {m['xla_temp_mb']:.0f} MB")
        print(line + f"; rounds {m['first_round_s']:.1f} s (compile) / {m['second_round_s']:.1f} s", flush=True)
    if "compile" in sections:
        c = report["compile"] = compile_benchmark()
        print(f"compile, {c['job']}: " + "; ".join(
            f"{r['cache']} cache: first round {r['first_round_s']:.2f} s, steady {r['median_round_s']:.3f} s, "
            f"compile {r['compile_s']:.2f} s" for r in c["runs"]), flush=True)
    if opts.out:
        os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
        with open(opts.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"figures: {opts.out}", flush=True)
    return report


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
