"""WORKDIR/checkpoints/<round>/: orbax checkpoints of a run, every `every` rounds and at the end.

Each step holds three items: 'state' (the algorithm's state, StandardSave), 'arrays' (the
arrays that make a resumed run reproduce an uninterrupted one: the participation schedule,
the training key) and 'meta' (JSON: the loop's round times and byte totals). Saves are
asynchronous; a save cut by an interruption leaves an orbax temporary directory, removed
by the next Checkpoints of the workdir. The newest `keep` steps are kept.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pfedla_jax.core.client_parallel import make_mesh, replicated
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.workdir import files


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

    def due(self, round_done: int, final: bool) -> bool:
        """Whether to checkpoint after `round_done` rounds: every `every` rounds and at the end."""
        return final or (self.every > 0 and round_done % self.every == 0)

    def save(self, round_done: int, state: Any, arrays: dict, meta: dict) -> None:
        """Saves after `round_done` rounds, asynchronously (once per round: a re-save is skipped)."""
        if round_done in self.manager.all_steps():
            return
        self.manager.save(round_done, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), arrays=ocp.args.StandardSave(arrays),
            meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        """Blocks until an asynchronous save in flight has committed."""
        self.manager.wait_until_finished()

    def restore(self, state_like: Any) -> tuple[int, Any, dict, dict]:
        """(round, state, arrays, meta) of the latest checkpoint; state shaped like `state_like`.

        Raises:
          UserInputError: the checkpoint's state does not have this algorithm's structure
            (e.g. written by an older version of the package with other state entries).
        """
        step = self.manager.latest_step()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_restore_target(state_like)),
                arrays=ocp.args.StandardRestore(),
                meta=ocp.args.JsonRestore()))
        except ValueError as err:
            if "tree structures do not match" not in str(err):
                raise
            first = str(err).splitlines()[1:2]
            raise UserInputError(
                f"the checkpoint of round {step} in {self.directory} holds a state of another "
                f"structure than this run's ({first[0].strip().rstrip(':') if first else 'entries differ'}: "
                f"written by another version?); resume with that version or use a new --workdir") from None
        # Orbax returns arrays committed to a device; a fresh run's state is uncommitted and
        # may be placed anywhere (e.g. split over the host devices by the 'shard' strategy).
        # The host round trip copies the bits exactly.
        state = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), out["state"])
        return step, state, out["arrays"], out["meta"]

    def close(self) -> None:
        """Waits for a save in flight, then releases the manager."""
        self.wait()
        self.manager.close()


def _restore_target(state_like: Any) -> Any:
    """What orbax restores the state into. One process: `state_like` itself. Several: every
    array whole on every device of the run's mesh, so each process reads the checkpoint
    completely whatever number of processes wrote it (the caller pads and splits it over
    this run's mesh: a run resumes with another process count)."""
    if jax.process_count() == 1:
        return state_like
    whole = replicated(make_mesh("shard"))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole), state_like)
