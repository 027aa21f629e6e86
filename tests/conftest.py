"""Shared test setup: CPU, two host devices (so the sharded path is tested), offline."""

import os
import tempfile

# Before jax is imported anywhere: two XLA CPU devices, so the 'shard' strategy and the
# device mesh code are exercised by the suite on any machine.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache (on by default in run_experiment): one fresh directory
# per test session, shared with the CLI subprocesses, never the user's ~/.cache.
os.environ.setdefault("PFEDLA_JAX_COMPILATION_CACHE",
                      tempfile.mkdtemp(prefix="pfedla_jax_test_cache_"))
