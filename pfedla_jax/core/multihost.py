"""One run over several processes: JAX's distributed (multi-controller) runtime.

Every process runs the same program over ONE global device mesh (`jax.devices()` lists the
devices of all processes, ordered by process): the per-client state is split over the mesh
axis `clients` across processes, and XLA inserts the collectives (Gloo on CPU, NCCL on GPU).
The engine needs three things from this module:

  initialize(...)   joins the cluster before any device is touched (experiments.run);
  is_primary()      process 0 writes the run's files (metrics, summary, exports);
  host_array(x)     a numpy copy of any array, also one split over other processes' devices
                    (`np.asarray` refuses those); a collective: every process calls it.

What was measured with this runtime on the project's CPU machine, and every failure mode
seen, is in BUILD_NOTES (several processes).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from pfedla_jax.errors import UserInputError

# A process that sends no heartbeat for this long is declared dead and the others abort
# (JAX's default: 100 s). Measured on the 2-core machine under load (BUILD_NOTES (several
# processes)): with 10 s, a process compiling beside other busy processes missed its
# heartbeats and the run aborted. experiments.launch does not wait for it: it stops the run
# as soon as one of its processes exits.
HEARTBEAT_TIMEOUT_S = 60


def process_count() -> int:
    return jax.process_count()


def process_index() -> int:
    return jax.process_index()


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always true in one process)."""
    return jax.process_index() == 0


def host_array(x: Any) -> np.ndarray:
    """`x` as a numpy array on this host.

    An array split over devices of other processes is gathered first
    (`multihost_utils.process_allgather`, a collective: every process must call this at the
    same point of the program); any other array is copied directly.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def host_tree(tree: Any) -> Any:
    """`host_array` of every leaf; in one process `jax.device_get` (all leaves fetched in
    one batch)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(host_array, tree)


def put(tree: Any, shardings: Any) -> Any:
    """`jax.device_put(tree, shardings)`, also onto a mesh spanning several processes.

    There, `jax.device_put` of a process-local value first checks that every process holds
    the same value (a collective gather of the whole value, per leaf); here each process
    builds its own shards from its copy instead (`jax.make_array_from_callback`). Every
    process computes the same host values (same seed, same data), as in any multi-controller
    JAX program. `shardings`: one sharding for every leaf, or a tree of them (a prefix of
    `tree`'s structure).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)  # already global: a reshard, no check
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: one(x, s), sub), shardings, tree,
                        is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def sync(name: str) -> None:
    """Waits until every process has reached the point named `name` (no-op in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def broadcast_int(value: int) -> int:
    """Process 0's `value` (an int32) in every process (the value itself in one process)."""
    if jax.process_count() == 1:
        return int(value)
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def all_true(flag: bool) -> bool:
    """True iff `flag` is true in every process (the flag itself in one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


def parse_num_processes(text: str) -> int | None:
    """'auto' -> None (detected by the cluster manager), else a positive int.

    Raises:
      UserInputError: neither.
    """
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserInputError(f"--num_processes must be a positive count or 'auto', got {text!r}")
    return value


def check_arguments(coordinator_address: str, num_processes: int | None, process_id: int,
                    clients_per_round: int | None = None, joined: int | None = None) -> None:
    """The checks made before joining: a bad combination is one error, not a hung cluster.

    Raises:
      UserInputError: a process id outside 0..num_processes-1, a coordinator address that
        is not host:port, more processes than clients per round, or multi-process flags
        without --num_processes > 1.
    """
    if joined is not None and clients_per_round is not None and joined > clients_per_round:
        raise UserInputError(f"{joined} processes joined (--num_processes=auto), more than the "
                             f"{clients_per_round} clients per round: a process would train no client")
    if num_processes is None:  # auto: the cluster manager tells every process its role
        if coordinator_address or process_id:
            raise UserInputError("--num_processes=auto takes the coordinator and process id from "
                                 "the cluster manager; do not pass --coordinator_address or --process_id")
        return
    if num_processes == 1:
        if coordinator_address or process_id:
            raise UserInputError("--coordinator_address and --process_id need --num_processes > 1")
        return
    if not 0 <= process_id < num_processes:
        raise UserInputError(f"--process_id must be in 0..{num_processes - 1} "
                             f"(--num_processes={num_processes}), got {process_id}")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserInputError(f"--coordinator_address must be host:port (process 0's address), "
                             f"got {coordinator_address!r}")
    if clients_per_round is not None and num_processes > clients_per_round:
        raise UserInputError(f"--num_processes={num_processes} is more than the {clients_per_round} "
                             "clients per round: a process would train no client")


def _no_proxy_for(host: str) -> None:
    """gRPC sends the coordination traffic through any *_proxy of the environment (every
    process then times out): when one is set, the coordinator's host is added to
    no_proxy/NO_PROXY."""
    if not any(k.lower().endswith("_proxy") and k.lower() != "no_proxy" for k in os.environ):
        return
    for name in ("no_proxy", "NO_PROXY"):
        hosts = [h for h in os.environ.get(name, "").split(",") if h]
        for h in (host, "127.0.0.1", "localhost"):
            if h not in hosts:
                hosts.append(h)
        os.environ[name] = ",".join(hosts)


def initialize(coordinator_address: str, num_processes: int | None, process_id: int,
               timeout_s: int = 60) -> None:
    """Joins this process to the run's cluster: `jax.distributed.initialize`.

    Must run before anything touches a device (the CPU collectives are set first). With
    `num_processes=None` JAX detects the cluster itself (SLURM, Open MPI, Kubernetes, Cloud
    TPU); otherwise the explicit form. If the processes have not all joined after
    `timeout_s` seconds (an unreachable coordinator, a process that never started), this
    process prints one line `error: ...` on stderr and exits with status 2 (JAX itself
    would abort with a C++ stack trace).

    Raises:
      UserInputError: bad arguments (`check_arguments`).
    """
    check_arguments(coordinator_address, num_processes, process_id)
    if num_processes == 1:
        return
    if timeout_s < 1:
        raise UserInputError(f"--distributed_timeout_s must be >= 1, got {timeout_s}")
    deadline = time.monotonic() + timeout_s  # one deadline for the whole join
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address:
        _no_proxy_for(coordinator_address.rpartition(":")[0].strip("[]"))
        if process_id != 0:
            _wait_for_coordinator(coordinator_address, timeout_s)
    who = "this process" if num_processes is None else f"process {process_id}"

    def give_up():
        where = f"the coordinator {coordinator_address}" if coordinator_address else "the cluster"
        print(f"error: {who}: not every process joined {where} within "
              f"{timeout_s} s (--distributed_timeout_s); is every process started, with the same "
              "--coordinator_address and --num_processes?", file=sys.stderr, flush=True)
        os._exit(2)

    # The C++ join blocks without the GIL, so a timer can still end the process with one
    # line at the deadline; JAX's own deadline (5 s later) would abort with a stack trace.
    watchdog = threading.Timer(max(0.5, deadline - time.monotonic()), give_up)
    watchdog.daemon = True
    watchdog.start()
    kwargs = dict(initialization_timeout=timeout_s + 5, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                  shutdown_timeout_seconds=max(HEARTBEAT_TIMEOUT_S, timeout_s))
    try:
        if num_processes is None:
            jax.distributed.initialize(**kwargs)
        else:
            jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                       process_id=process_id, cluster_detection_method="deactivate",
                                       **kwargs)
    except Exception as e:  # pylint: disable=broad-except  (e.g. auto without a cluster)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserInputError(f"{who} cannot join the run: {first}") from None
    finally:
        watchdog.cancel()


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Polls until the coordinator's port accepts a connection, else one error line."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UserInputError(f"cannot reach the coordinator {address} within {timeout_s} s "
                                     f"(--distributed_timeout_s): {e.strerror or e}") from None
            time.sleep(0.25)
