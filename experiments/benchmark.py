r"""JAX engine vs the idiomatic PyTorch reference, side by side, in one process.

For each model, a full FL round (pFedLA by default: aggregation, local training of every
client, hypernetwork update; or FedAvg) on the same synthetic data, the same number of
clients, local steps and batch size. After warm-up, JAX and PyTorch rounds alternate (so a
slow phase of the machine hits both) and the table reports medians:

  ms/round, examples/s, JAX compile time (the warm-up rounds' excess over the median), the JAX/torch
  time ratio, peak memory,

and the server step alone (alpha, aggregation and hypernetwork update of every client;
no local training) at N in --server_clients for both. A JSON file records the machine,
versions and every figure.

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
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Measure JAX only.")
_OUT = flags.DEFINE_string("out", None, "Write the figures to this JSON file.")

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


def synthetic_arrays(num_clients: int, shape, num_classes: int = 10, seed: int = 0):
    """uint8 NHWC images (class templates + noise), labels, per-client train index lists."""
    import numpy as np

    rng = np.random.default_rng(seed)
    m = num_clients * TRAIN_PER_CLIENT
    templates = rng.uniform(0, 255, (num_classes,) + tuple(shape))
    labels = rng.integers(0, num_classes, m).astype(np.int32)
    images = np.clip(templates[labels] + rng.normal(0, 40, (m,) + tuple(shape)), 0, 255).astype(np.uint8)
    train = [np.arange(i * TRAIN_PER_CLIENT, (i + 1) * TRAIN_PER_CLIENT) for i in range(num_clients)]
    return images, labels, train


def _jax_setup(model_name: str, num_clients: int, images, labels, train):
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
                                                           local_steps=_F.local_steps, lr=0.01),
                            _F.client_parallelism)
    ctx = FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                    num_clients=num_clients, input_shape=shape)
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
        t0 = time.perf_counter()
        state, _ = algo.round(state, t, participants, jax.random.fold_in(key, t))
        jax.block_until_ready(state)
        return time.perf_counter() - t0

    rss0 = _peak_rss_mb()
    jax_times = [jax_round(t) for t in range(_WARMUP.value)]
    rss_jax = _peak_rss_mb()
    server = None
    if not _SKIP_TORCH.value:
        server = _torch_setup(model_name, dataset, part)

        def torch_round(t):
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
        # the first two rounds compile (the second for the sharded layout the first returns)
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
    state = algo.init(jax.random.PRNGKey(0))
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

    report = {"machine": _machine(), "versions": versions, "rounds": [], "server": []}
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
          f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices)"
          + (f"; torch {versions['torch']} ({versions['torch_threads']} threads)" if "torch" in versions else ""),
          flush=True)
    for name in _MODELS.value:
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
    for n in server_ns:
        s = server_benchmark(n)
        report["server"].append(s)
        line = f"server step (alpha + aggregation + HN update), N={n}: JAX {s['jax_ms']:.1f} ms"
        if "torch_ms" in s:
            line += f" | torch {s['torch_ms']:.1f} ms | JAX {s['speedup_jax']:.0f}x faster"
        print(line, flush=True)
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)
        print(f"figures: {_OUT.value}", flush=True)


if __name__ == "__main__":
    from experiments.run import parse_flags
    app.run(main, flags_parser=parse_flags)
