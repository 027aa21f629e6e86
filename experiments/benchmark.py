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

  python -m experiments.benchmark                       # FMNIST + CIFAR CNN, 10 clients x 50 steps
  python -m experiments.benchmark --models=fmnist --num_clients=100 --local_steps=20 --out=runs/bench.json

torch runs with --torch_threads intra-op threads (default: all cores); JAX on CPU with
one XLA device per core and `--client_parallelism=auto` (BUILD_NOTES.md "performance").
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time

from absl import app, flags

from experiments.run import fail, start

_MODELS = flags.DEFINE_list("models", ["fmnist", "cifar10"], "fmnist (1x28x28 CNN, 85,822 params) | "
                            "cifar10 (3x32x32 CNN with BN, 121,278 params).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Warm-up rounds per framework (not measured).")
# --num_clients, --local_steps, --batch_size, --algorithm, --rounds (measured rounds, median)
# and --client_parallelism are experiments.run's flags, with benchmark defaults:
for _name, _default in (("num_clients", 10), ("local_steps", 50), ("algorithm", "pfedla"), ("rounds", 7)):
    flags.FLAGS.set_default(_name, _default)
_F = flags.FLAGS
_SERVER_N = flags.DEFINE_list("server_clients", ["10", "100", "500"],
                              "Client counts for the server-step-only measurement ('' = skip).")
_SERVER_REPEATS = flags.DEFINE_integer("server_repeats", 3, "Measured server steps (median).")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0 = all cores).")
_PAUSE = flags.DEFINE_float("pause_s", 0.3, "Seconds of sleep before each measured round (not "
                            "timed): the other framework's worker threads (torch's OpenMP threads "
                            "spin after a parallel region) go idle first.")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Measure JAX only.")
_OUT = flags.DEFINE_string("out", None, "Write the figures to this JSON file.")
SECTIONS = ("rounds", "server", "overhead", "memory", "compile")
_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS), f"Parts to run, among {', '.join(SECTIONS)}.")
_OVERHEAD_ROUNDS = flags.DEFINE_integer("overhead_rounds", 30, "overhead: measured rounds per step count (median).")
_MEMORY_N = flags.DEFINE_integer("memory_clients", 1000, "memory: clients N (10% take part in the round).")

MODELS = {"fmnist": ((28, 28, 1), False), "cifar10": ((32, 32, 3), True)}
TRAIN_PER_CLIENT = 512  # per client (511 train + 1 unused test example)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _machine() -> dict:
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
                     per_client: int = TRAIN_PER_CLIENT):
    """uint8 NHWC images (class templates + noise), labels, per-client train index lists."""
    import numpy as np

    rng = np.random.default_rng(seed)
    m = num_clients * per_client
    templates = rng.uniform(0, 255, (num_classes,) + tuple(shape))
    labels = rng.integers(0, num_classes, m).astype(np.int32)
    images = np.clip(templates[labels] + rng.normal(0, 40, (m,) + tuple(shape)), 0, 255).astype(np.uint8)
    train = [np.arange(i * per_client, (i + 1) * per_client) for i in range(num_clients)]
    return images, labels, train


def _jax_setup(model_name: str, num_clients: int, images, labels, train, local_steps: int | None = None):
    """A JAX FL context + algorithm over the given client data (all clients train each round)."""
    import numpy as np

    from pfedla_jax.algorithms import FedAvg, FLContext, PFedLA, PFedLAConfig
    from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
    from pfedla_jax.data.partition import Partition
    from pfedla_jax.data.sources import Dataset
    from pfedla_jax.data.store import build_client_store
    from pfedla_jax.models import layer_names, make_cnn

    shape, use_bn = MODELS[model_name]
    x = images.astype(np.float32) / 255.0
    mean = tuple(float(v) for v in x.mean(axis=(0, 1, 2)))
    std = tuple(float(v) for v in x.std(axis=(0, 1, 2)))
    dataset = Dataset(name=f"bench_{model_name}", images=images, labels=labels, num_classes=10,
                      mean=mean, std=std)
    # one test example per client (the store wants a test split; it is not used here)
    part = Partition(train_indices=[t[:-1] for t in train], test_indices=[t[-1:] for t in train],
                     client_classes=[np.unique(labels[t]) for t in train], scheme="manual",
                     samples_per_client=None)
    store = build_client_store(dataset, part)
    model = make_cnn(shape, 10, use_bn=use_bn)
    trainer = ClientTrainer(model, store, LocalTrainConfig(batch_size=_F.batch_size,
                                                           local_steps=local_steps or _F.local_steps,
                                                           lr=0.01),
                            _F.client_parallelism)
    # donate_state: rounds update the state in place, as in an experiment
    ctx = FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                    num_clients=num_clients, input_shape=shape, donate_state=True)
    algo = PFedLA(ctx, PFedLAConfig(hn_lr=0.5)) if _F.algorithm == "pfedla" else FedAvg(ctx)
    return algo, dataset, part


def _torch_setup(model_name: str, dataset, part):
    from experiments.torch_baseline import (
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
    order = shuffled_batches(data, batch_size=_F.batch_size, local_steps=_F.local_steps)
    model = CNNTarget(shape[2], 10, use_bn=use_bn, input_hw=shape[:2])
    local = LocalConfig(lr=0.01)
    if _F.algorithm == "pfedla":
        return PFedLAServer(model, data, order, local, hn_lr=0.5)
    return FedAvgServer(model, data, order, local)


def _median_ms(times):
    return 1000.0 * statistics.median(times)


def round_benchmark(model_name: str) -> dict:
    """Full rounds, JAX and torch alternating after warm-up."""
    import jax
    import numpy as np

    n = _F.num_clients
    images, labels, train = synthetic_arrays(n, MODELS[model_name][0])
    algo, dataset, part = _jax_setup(model_name, n, images, labels, train)
    key = jax.random.PRNGKey(0)
    state = algo.init(key)
    participants = np.arange(n, dtype=np.int32)
    examples = n * _F.local_steps * _F.batch_size

    def jax_round(t):
        nonlocal state
        time.sleep(_PAUSE.value)
        t0 = time.perf_counter()
        state, info = algo.round(state, t, participants, jax.random.fold_in(key, t))
        jax.device_get(info)  # what the experiment loop reads every round
        jax.block_until_ready(state)
        return time.perf_counter() - t0

    rss0 = _peak_rss_mb()
    jax_times = [jax_round(t) for t in range(_WARMUP.value)]
    rss_jax = _peak_rss_mb()
    server = None
    if not _SKIP_TORCH.value:
        server = _torch_setup(model_name, dataset, part)

        def torch_round(t):
            time.sleep(_PAUSE.value)
            t0 = time.perf_counter()
            server.round(t, range(n))
            return time.perf_counter() - t0

        for t in range(_WARMUP.value):
            torch_round(t)
    rss_torch = _peak_rss_mb()
    jax_measured, torch_measured = [], []
    for t in range(_WARMUP.value, _WARMUP.value + _F.rounds):
        jax_measured.append(jax_round(t))
        if server is not None:
            torch_measured.append(torch_round(t))
    out = {
        "model": model_name, "algorithm": _F.algorithm, "clients": n, "local_steps": _F.local_steps,
        "batch_size": _F.batch_size, "examples_per_round": examples,
        "jax_strategy": algo.ctx.trainer.strategy,
        "jax_ms_per_round": _median_ms(jax_measured),
        "jax_ms_all": [1000 * t for t in jax_measured],
        "jax_examples_per_s": examples / statistics.median(jax_measured),
        # the warm-up rounds' excess over a steady round (the first compiles the round)
        "jax_compile_s": sum(max(0.0, w - statistics.median(jax_measured)) for w in jax_times),
        "jax_first_round_s": jax_times[0],
        "peak_rss_mb_after_jax_warmup": rss_jax, "peak_rss_mb_before": rss0,
    }
    if server is not None:
        out.update({
            "torch_ms_per_round": _median_ms(torch_measured),
            "torch_ms_all": [1000 * t for t in torch_measured],
            "torch_examples_per_s": examples / statistics.median(torch_measured),
            "ratio_jax_over_torch": statistics.median(jax_measured) / statistics.median(torch_measured),
            "peak_rss_mb_after_torch_warmup": rss_torch,
        })
    _gpu_memory(out)
    return out


def _gpu_memory(out: dict) -> None:
    import jax

    if jax.default_backend() != "cpu":
        stats = jax.local_devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["jax_peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
    try:
        import torch

        if torch.cuda.is_available():
            out["torch_peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass


def server_benchmark(num_clients: int) -> dict:
    """The pFedLA server step alone (FMNIST CNN): alpha + aggregation + HN update, all clients."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    images, labels, train = synthetic_arrays(num_clients, MODELS["fmnist"][0])
    algo, dataset, part = _jax_setup("fmnist", num_clients, images, labels, train)
    state = algo.to_checkpoint(algo.init(jax.random.PRNGKey(0)))  # [N, ...] (no mesh padding)
    ids = jnp.arange(num_clients, dtype=jnp.int32)
    # distinct stored models (a common init would make every source identical)
    noise = lambda k, a: a + 0.01 * jax.random.normal(k, a.shape, a.dtype)
    leaves, tree = jax.tree.flatten(state["client_params"])
    keys = jax.random.split(jax.random.PRNGKey(1), 2 * len(leaves))
    stored = jax.tree.unflatten(tree, [noise(k, a) for k, a in zip(keys, leaves)])
    delta = jax.tree.unflatten(tree, [1e-3 * jax.random.normal(k, a.shape, a.dtype)
                                      for k, a in zip(keys[len(leaves):], leaves)])

    def jax_step():
        t0 = time.perf_counter()
        _, retained, theta_bar = algo.personalize(state["hn_params"], stored, ids)
        new = algo.hn_update(state["hn_params"], state["hn_opt_state"], stored, ids, retained, delta)
        jax.block_until_ready((theta_bar, new))
        return time.perf_counter() - t0

    first = jax_step()
    jax_times = [jax_step() for _ in range(_SERVER_REPEATS.value)]
    out = {"clients": num_clients, "jax_ms": _median_ms(jax_times),
           "jax_compile_s": max(0.0, first - statistics.median(jax_times))}
    if not _SKIP_TORCH.value:
        import torch

        from experiments.torch_baseline import params_from_jax

        server = _torch_setup("fmnist", dataset, part)
        host = jax.tree.map(np.asarray, stored)
        host_delta = jax.tree.map(np.asarray, delta)
        row = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
        for i in range(num_clients):
            sd = params_from_jax(row(host, i))
            server.client_states[i].update({k: torch.as_tensor(v) for k, v in sd.items()})
        deltas = [{k: torch.as_tensor(v) for k, v in params_from_jax(row(host_delta, i)).items()}
                  for i in range(num_clients)]

        def torch_step():
            # what the PyTorch server does per round, minus local training
            t0 = time.perf_counter()
            snapshot = server.stored_params()
            for i in range(num_clients):
                _, _, theta_bar = server.personalize(i, snapshot)
                server.update_hypernetwork(i, theta_bar, deltas[i])
            return time.perf_counter() - t0

        torch_step()
        torch_times = [torch_step() for _ in range(_SERVER_REPEATS.value)]
        out.update(torch_ms=_median_ms(torch_times),
                   speedup_jax=statistics.median(torch_times) / statistics.median(jax_times))
    return out


def overhead_benchmark() -> dict:
    """Fixed cost per round: pFedLA (or --algorithm), FMNIST CNN, rounds of 1 and 11 local steps.

    The two configurations alternate round by round (a slow phase of the machine hits both),
    each round as the experiment loop runs it: one compiled round, one read of its metrics.
    """
    import jax
    import numpy as np

    n = _F.num_clients
    images, labels, train = synthetic_arrays(n, MODELS["fmnist"][0])
    participants = np.arange(n, dtype=np.int32)
    key = jax.random.PRNGKey(0)
    algos = {steps: _jax_setup("fmnist", n, images, labels, train, local_steps=steps)[0]
             for steps in (1, 11)}
    states = {steps: algo.init(key) for steps, algo in algos.items()}
    times: dict[int, list[float]] = {1: [], 11: []}
    for t in range(2 + _OVERHEAD_ROUNDS.value):
        for steps, algo in algos.items():
            t0 = time.perf_counter()
            states[steps], info = algo.round(states[steps], t, participants, jax.random.fold_in(key, t))
            jax.device_get(info)
            jax.block_until_ready(states[steps])
            if t >= 2:  # the first two rounds compile and warm up
                times[steps].append(time.perf_counter() - t0)
    medians = {steps: statistics.median(v) for steps, v in times.items()}
    per_step = (medians[11] - medians[1]) / 10
    return {"clients": n, "algorithm": _F.algorithm, "ms_per_round_1_step": 1000 * medians[1],
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


def memory_benchmark(num_clients: int) -> dict:
    """Memory of one pFedLA round at N clients, S = N/10, one local step (FMNIST CNN)."""
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np

    per_client = 24  # 23 train examples + 1 test example each: the state, not the data, is measured
    images, labels, train = synthetic_arrays(num_clients, MODELS["fmnist"][0], per_client=per_client)
    flags.FLAGS.algorithm = "pfedla"
    algo, _, _ = _jax_setup("fmnist", num_clients, images, labels, train, local_steps=1)
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
    import subprocess
    import sys
    import tempfile

    from pfedla_jax.data.sources import DEFAULT_FMNIST_DIR

    real = os.path.exists(os.path.join(DEFAULT_FMNIST_DIR, "train-images-idx3-ubyte.gz"))
    job = (["--flagfile=experiments/presets/fmnist_quick.flags"] if real else
           ["--algorithm=pfedla", "--dataset=synthetic", "--num_clients=10", "--samples_per_client=200",
            "--lr=0.05"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def main(argv):
    start(argv)
    import jax

    if _F.algorithm not in ("pfedla", "fedavg"):
        fail(f"unknown --algorithm {_F.algorithm!r}; expected pfedla or fedavg")
    for name in _MODELS.value:
        if name not in MODELS:
            fail(f"unknown model {name!r} in --models; expected {', '.join(MODELS)}")
    for flag, value in (("num_clients", _F.num_clients), ("local_steps", _F.local_steps),
                        ("batch_size", _F.batch_size), ("rounds", _F.rounds),
                        ("server_repeats", _SERVER_REPEATS.value)):
        if value < 1:
            fail(f"--{flag} must be >= 1, got {value}")
    if _WARMUP.value < 1:
        fail(f"--warmup must be >= 1, got {_WARMUP.value}")
    unknown = sorted(set(_SECTIONS.value) - set(SECTIONS))
    if unknown:
        fail(f"unknown --sections {', '.join(unknown)}; expected among {', '.join(SECTIONS)}")
    if _OVERHEAD_ROUNDS.value < 1 or _MEMORY_N.value < 2:
        fail("--overhead_rounds must be >= 1 and --memory_clients >= 2")
    if _F.batch_size > TRAIN_PER_CLIENT - 1:
        fail(f"--batch_size must be <= {TRAIN_PER_CLIENT - 1}, got {_F.batch_size}")
    try:
        server_ns = [int(v) for v in _SERVER_N.value if v.strip()]
    except ValueError:
        fail(f"--server_clients must be integers, got {_SERVER_N.value}")
    if any(v < 2 for v in server_ns):
        fail("--server_clients values must be >= 2")
    versions = {"jax": jax.__version__, "backend": jax.default_backend(),
                "devices": [str(d) for d in jax.devices()]}
    if not _SKIP_TORCH.value:
        try:
            import torch
        except ImportError:
            fail("torch is not installed: pip install -e '.[torch]' (torch==2.13.0), or --skip_torch")
        threads = _THREADS.value or _machine()["cores"]
        torch.set_num_threads(threads)
        versions.update(torch=torch.__version__, torch_threads=threads,
                        torch_cuda=torch.cuda.is_available())
    from pfedla_jax.errors import UserInputError

    try:
        _run(versions, server_ns)
    except UserInputError as e:
        fail(str(e))


def _run(versions: dict, server_ns: list[int]) -> None:
    import jax

    sections = set(_SECTIONS.value)
    report = {"machine": _machine(), "versions": versions, "rounds": [], "server": []}
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
          f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices)"
          + (f"; torch {versions['torch']} ({versions['torch_threads']} threads)" if "torch" in versions else ""),
          flush=True)
    for name in _MODELS.value if "rounds" in sections else ():
        r = round_benchmark(name)
        report["rounds"].append(r)
        line = (f"{_F.algorithm} round, {name} CNN, {r['clients']} clients x {r['local_steps']} steps x "
                f"batch {r['batch_size']}: JAX ({r['jax_strategy']}) {r['jax_ms_per_round']:.0f} ms "
                f"({r['jax_examples_per_s']:,.0f} ex/s, compile {r['jax_compile_s']:.1f} s)")
        if "torch_ms_per_round" in r:
            line += (f" | torch {r['torch_ms_per_round']:.0f} ms ({r['torch_examples_per_s']:,.0f} ex/s)"
                     f" | JAX/torch {r['ratio_jax_over_torch']:.2f}")
        line += (f" | peak RSS {r['peak_rss_mb_after_jax_warmup']:.0f} MB after JAX warm-up"
                 + (f", {r['peak_rss_mb_after_torch_warmup']:.0f} MB after torch warm-up"
                    if "torch_ms_per_round" in r else ""))
        print(line, flush=True)
    for n in server_ns if "server" in sections else ():
        s = server_benchmark(n)
        report["server"].append(s)
        line = f"server step (alpha + aggregation + HN update), N={n}: JAX {s['jax_ms']:.1f} ms"
        if "torch_ms" in s:
            line += f" | torch {s['torch_ms']:.1f} ms | JAX {s['speedup_jax']:.0f}x faster"
        print(line, flush=True)
    if "overhead" in sections:
        o = report["overhead"] = overhead_benchmark()
        print(f"round overhead, {o['algorithm']}, fmnist CNN, {o['clients']} clients: "
              f"{o['ms_per_round_1_step']:.1f} ms/round at 1 local step, {o['ms_per_round_11_steps']:.1f} "
              f"at 11 -> {o['ms_per_local_step']:.1f} ms per step, fixed cost {o['fixed_ms_per_round']:.1f} ms/round",
              flush=True)
    if "memory" in sections:
        m = report["memory"] = memory_benchmark(_MEMORY_N.value)
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
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)
        print(f"figures: {_OUT.value}", flush=True)


if __name__ == "__main__":
    from experiments.run import parse_flags
    app.run(main, flags_parser=parse_flags)
