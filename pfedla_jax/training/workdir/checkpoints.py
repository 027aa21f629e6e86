"""WORKDIR/checkpoints/<round>/: orbax checkpoints of a run, every `every` rounds and at the end.

Each step holds three items: 'state' (the algorithm's state, StandardSave), 'arrays' (the
arrays that make a resumed run reproduce an uninterrupted one: the participation schedule,
the training key) and 'meta' (JSON: the loop's round times and byte totals, and `checksum`,
a position-weighted sum of the bits of every state leaf: `tree_checksum`). Saves are
asynchronous; a save cut by an interruption leaves an orbax temporary directory, removed
by the next Checkpoints of the workdir. The newest `keep` steps are kept.

A checkpoint can also be damaged after it committed (a crash of the machine during the
write-back, a full disk, a bad copy): files truncated or missing, or holding other bytes
(tensorstore reads a missing chunk as zeros without an error). `restore` therefore checks
every restored state against its checksum, falls back to the newest intact checkpoint and
deletes the damaged newer ones (their rounds are recomputed, to the same numbers).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pfedla_jax.core import multihost
from pfedla_jax.core.client_parallel import client_sharding, make_mesh, replicated
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.workdir import files


_HASH_MULTIPLIER = np.uint32(2654435761)  # Knuth's multiplicative hash constant


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """sum_i bits(x_i) * (i * 2654435761 + 1) mod 2^32 over the flattened leaf: a change
    of any element, or two elements swapped, changes it (up to 2^-32 by chance)."""
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:  # 8 bytes (jax_enable_x64): both halves
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * _HASH_MULTIPLIER + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)  # integer sums wrap: order-independent


@jax.jit
def _checksums(tree: Any) -> list[jax.Array]:
    return [_leaf_checksum(x) for x in jax.tree.leaves(tree)]


def tree_checksum(tree: Any) -> list[int]:
    """One uint32 per leaf of `tree` (in jax.tree.leaves order), from its bits: what a
    checkpoint's state is checked against when it is restored. Integer sums wrap modulo
    2^32, so the value does not depend on how the leaves are split over devices."""
    return [int(v) for v in multihost.host_tree(_checksums(tree))]


class Checkpoints:
    """Orbax checkpoints of (algorithm state, loop arrays, loop meta) in WORKDIR/checkpoints.

    Args:
      workdir: the run directory (checkpoints/ is created in it).
      every: checkpoint every `every` rounds (0: only at the end).
      keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, workdir: str, every: int, keep: int = 2):
        self.every = every
        self.directory = os.path.abspath(os.path.join(workdir, files.CHECKPOINT_DIR))
        with _quiet_failed_reads():  # (a damaged step's metadata: restore reports it)
            self.manager = ocp.CheckpointManager(
                self.directory,
                # cleanup_tmp_directories: a save cut by an interruption leaves a temporary
                # directory that no later save of this run may replace
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                     enable_async_checkpointing=True,
                                                     cleanup_tmp_directories=True))

    def latest_round(self) -> int | None:
        """The round of the newest committed checkpoint, None without one."""
        return self.manager.latest_step()

    def committed_round(self) -> int | None:
        """The newest committed step, read from the folder names alone (orbax renames a step's
        temporary folder to its round when the save commits): safe where orbax may not be
        called, e.g. after a signal interrupted it."""
        try:
            steps = [int(n) for n in os.listdir(self.directory) if n.isdigit()]
        except OSError:
            return None
        return max(steps) if steps else None

    def due(self, round_done: int, final: bool) -> bool:
        """Whether to checkpoint after `round_done` rounds: every `every` rounds and at the end."""
        return final or (self.every > 0 and round_done % self.every == 0)

    def save(self, round_done: int, state: Any, arrays: dict, meta: dict) -> None:
        """Saves after `round_done` rounds, asynchronously (once per round: a re-save is
        skipped); `meta` gets the state's `tree_checksum` under 'checksum'."""
        if round_done in self.manager.all_steps():
            return
        meta = dict(meta, checksum=tree_checksum(state))
        with _write_errors_as_oserror(), _stderr_dropped_on_failure():
            self.manager.save(round_done, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), arrays=ocp.args.StandardSave(arrays),
                meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        """Blocks until an asynchronous save in flight has committed.

        Raises:
          OSError: the save could not write a file (errno, path and reason from tensorstore).
        """
        with _write_errors_as_oserror(), _stderr_dropped_on_failure():
            self.manager.wait_until_finished()

    def restore(self, state_like: Any) -> tuple[int, Any, dict, dict, list[tuple[int, str]]]:
        """The newest intact checkpoint: (round, state, arrays, meta, damaged), the state
        shaped like `state_like`; `damaged` lists (round, why) of the newer checkpoints that
        could not be read or whose state differs from its checksum; they are deleted, so
        the run recomputes their rounds and saves them again.

        Raises:
          UserInputError: no checkpoint is intact (the message names the newest damaged one
            and how to start over), or a checkpoint's state does not have this algorithm's
            structure (e.g. written by an older version of the package with other entries).
        """
        with _quiet_failed_reads():
            return self._restore(state_like)

    def _restore(self, state_like: Any) -> tuple[int, Any, dict, dict, list[tuple[int, str]]]:
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            out, why = None, None
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_restore_target(state_like)),
                    arrays=ocp.args.StandardRestore(),
                    meta=ocp.args.JsonRestore()))
            except ValueError as err:
                if "tree structures do not match" in str(err):
                    first = str(err).splitlines()[1:2]
                    raise UserInputError(
                        f"the checkpoint of round {step} in {self.directory} holds a state of "
                        f"another structure than this run's ({first[0].strip().rstrip(':') if first else 'entries differ'}: "
                        f"written by another version?); resume with that version or use a new "
                        "--workdir") from None
                why = _reason(err)
            except Exception as err:  # pylint: disable=broad-except  (whatever a damaged file raises)
                why = _reason(err)
            if why is None and not isinstance(out["meta"], dict):
                why = "its meta item is not a JSON object"
            # every process decides alike (each read its own rows; the checksum is a collective)
            if not multihost.all_true(why is None):
                damaged.append((step, why or "another process could not read its part"))
                continue
            meta = out["meta"]
            expected = meta.get("checksum")  # (absent in checkpoints of earlier versions)
            if expected is not None and tree_checksum(out["state"]) != list(expected):
                damaged.append((step, "its state differs from the state that was saved"))
                continue
            for bad, _ in damaged:
                self.manager.delete(bad)
            # One process: orbax returns arrays committed to a device; a fresh run's state is
            # uncommitted and may be placed anywhere (e.g. split over the host devices by the
            # 'shard' strategy). The host round trip copies the bits exactly. Several: the
            # arrays are global, split or whole as _restore_target asked; the caller places them.
            state = out["state"]
            if jax.process_count() == 1:
                state = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), state)
            return step, state, out["arrays"], meta, damaged
        newest, why = damaged[0] if damaged else (None, "none found")
        raise UserInputError(
            f"no intact checkpoint in {self.directory} (the newest, of round {newest}: {why}); "
            "start the run over with --overwrite (or use another --workdir)")

    def close(self) -> None:
        """Waits for a save in flight, then releases the manager (also when the save failed:
        its error is raised after the release)."""
        try:
            self.wait()
        except BaseException:
            with _stderr_dropped_on_failure(always=True):
                try:
                    self.manager.close()
                except Exception:  # pylint: disable=broad-except  (the save's error is raised)
                    pass
                gc.collect()
                time.sleep(0.5)  # (the threads' last prints of the failure)
            raise
        self.manager.close()


# tensorstore's message for a failed file write (orbax raises it as a ValueError)
_FAILED_WRITE = re.compile(r'Failed [a-z ]*?: "(?P<path>[^"]+)".*?\[os_error_code=\'(?P<errno>\d+)\'\]')


@contextlib.contextmanager
def _write_errors_as_oserror():
    """Re-raises tensorstore's failed-write errors (a full disk, a file size limit) as the
    OSError they stand for, with the path and the system's reason."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:  # pylint: disable=broad-except
        match = _FAILED_WRITE.search(str(err))
        if match is None:
            raise
        code = int(match["errno"])
        raise OSError(code, os.strerror(code), match["path"]) from err


@contextlib.contextmanager
def _stderr_dropped_on_failure(always: bool = False):
    """Captures what is written to file descriptor 2 in the block and writes it back after,
    unless the block raised (or `always`): a failed save's error is raised (and reported in
    one line) while tensorstore's threads print their own tracebacks of the same failure."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured = tempfile.TemporaryFile()
    failed = always
    try:
        os.dup2(captured.fileno(), 2)
        yield
    except BaseException:
        failed = True
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if not failed:
            captured.seek(0)
            data = captured.read()
            if data:
                os.write(2, data)
        captured.close()


def _drop_unretrieved_task_errors(record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


def _drop_errors(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextlib.contextmanager
def _quiet_failed_reads():
    """While restoring: a damaged checkpoint's read fails in orbax (which logs the error
    through absl) and in several of tensorstore's asyncio tasks (asyncio logs the others when
    the tasks are collected). `restore` reports the first failure in its `damaged` list; the
    logs of the same failure are dropped."""
    absl_logger, asyncio_logger = logging.getLogger("absl"), logging.getLogger("asyncio")
    absl_logger.addFilter(_drop_errors)
    asyncio_logger.addFilter(_drop_unretrieved_task_errors)
    try:
        yield
    finally:
        gc.collect()
        absl_logger.removeFilter(_drop_errors)
        asyncio_logger.removeFilter(_drop_unretrieved_task_errors)


def _reason(err: BaseException) -> str:
    """A short one-line reason for a checkpoint that could not be read."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__


def _restore_target(state_like: Any) -> Any:
    """What orbax restores the state into. One process: `state_like` itself. Several: a
    per-client leaf that this run splits over its mesh without padding rows (N a multiple of
    the devices) straight into that split, so each process reads only its own rows (orbax
    reads any split of what any number of processes wrote); every other leaf (the server's,
    or a client stack this run pads) whole on every device (the caller pads and splits it).
    Either way a run resumes with another process count."""
    if jax.process_count() == 1:
        return state_like
    mesh = make_mesh("shard")
    whole, split = replicated(mesh), client_sharding(mesh)

    def target(a):
        rows_split = (isinstance(a, jax.Array) and a.ndim > 0 and a.shape[0] % mesh.size == 0
                      and a.sharding.is_equivalent_to(split, a.ndim))
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=split if rows_split else whole)

    return jax.tree.map(target, state_like)
