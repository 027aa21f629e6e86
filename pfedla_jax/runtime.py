"""Process-wide JAX setup shared by the command line and the Python API.

`set_host_devices` splits the CPU into XLA devices (one per core: the `shard` strategy runs
one client per core, measured faster than XLA's intra-op threads); it must run before JAX
creates its CPU backend. `enable_compilation_cache` turns JAX's persistent compilation cache
on (every program cached, so a configuration compiled once starts without compiling).
`check_random_streams` refuses a JAX configured with non-partitionable threefry keys, on
which a client's shuffle would depend on how the client store is padded.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from pfedla_jax.errors import UserInputError

COMPILATION_CACHE_ENV = "PFEDLA_JAX_COMPILATION_CACHE"
_HOST_DEVICE_FLAG = "xla_force_host_platform_device_count"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_host_devices(count: int = -1) -> int:
    """Asks XLA for `count` CPU devices (-1: one per available core; 0 or 1: XLA's default).

    Call before the first JAX computation of the process: once JAX has created its CPU
    backend the count is fixed, and this call changes nothing (`host_device_count` tells
    what the process got). A device count already set in `XLA_FLAGS` (e.g. by a launcher or
    a test harness) wins. Only the CPU platform is affected; GPU and TPU runs are unchanged.

    Returns:
      the count asked for (after resolving -1).

    Raises:
      UserInputError: count < -1.
    """
    if count < -1:
        raise UserInputError(f"--host_devices must be -1, 0 or a positive count, got {count}")
    if count == -1:
        count = available_cores()
    flags_now = os.environ.get("XLA_FLAGS", "")
    if count > 1 and _HOST_DEVICE_FLAG not in flags_now:
        os.environ["XLA_FLAGS"] = f"{flags_now} --{_HOST_DEVICE_FLAG}={count}".strip()
    return count


def compilation_cache_dir(option: str | None) -> str:
    """The cache directory an option means: the option itself ('' = disabled), else
    $PFEDLA_JAX_COMPILATION_CACHE, else ~/.cache/pfedla_jax/jax ($XDG_CACHE_HOME respected)."""
    if option is not None:
        return option
    env = os.environ.get(COMPILATION_CACHE_ENV)
    if env is not None:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pfedla_jax", "jax")


def enable_compilation_cache(option: str | None) -> str:
    """Turns JAX's persistent compilation cache on at the directory `option` means.

    Every compiled program is cached (no minimum compile time or size), keyed by JAX on the
    program, its shapes, devices, flags and versions, so a run of a configuration compiled
    once before (another seed, another workdir) loads its programs. Off in a run over
    several processes (there a process with the cache on stalled in its first compilation
    until the others declared it dead; BUILD_NOTES, several processes).

    Returns:
      the directory ('' if disabled).

    Raises:
      UserInputError: the directory cannot be created.
    """
    path = compilation_cache_dir(option)
    if jax.process_count() > 1:
        path = ""
    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
        return ""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot create the compilation cache directory {path!r}: "
                             f"{e.strerror or e}") from None
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()  # the cache opens the new directory on next use
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def check_random_streams() -> None:
    """Raises UserInputError unless JAX uses partitionable threefry keys (JAX's default since
    0.5): with them the first k draws of uniform(key, (n,)) equal uniform(key, (k,)), so a
    client's shuffle depends only on (seed, round, client, its own size)."""
    if not jax.config.jax_threefry_partitionable:
        raise UserInputError("jax_threefry_partitionable is off in this process; pfedla_jax's "
                             "random streams need it on (JAX's default): unset "
                             "JAX_THREEFRY_PARTITIONABLE or jax.config.update("
                             "'jax_threefry_partitionable', True)")
