"""training/workdir/checkpoints.py: orbax checkpoints of a run's state."""

import jax.numpy as jnp
import numpy as np
import pytest

from pfedla_jax.errors import UserInputError
from pfedla_jax.training.workdir.checkpoints import Checkpoints, tree_checksum


def _scaled(state, r):
    return {"w": state["w"] * r, "k": state["k"] * r}


def test_checkpoints_save_restore_and_schedule(tmp_path):
    """A save is restored bit for bit (state, arrays, meta); a round is saved once; the
    newest `keep` steps stay; due: every `every` rounds and at the end (every=0: the end only)."""
    ckpt = Checkpoints(str(tmp_path / "run"), every=2, keep=2)
    assert ckpt.latest_round() is None
    assert [r for r in range(1, 8) if ckpt.due(r, final=r == 7)] == [2, 4, 6, 7]
    end_only = Checkpoints(str(tmp_path / "end"), every=0)
    assert [r for r in range(1, 4) if end_only.due(r, final=r == 3)] == [3]
    end_only.close()
    state = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "k": jnp.array([1, 2], jnp.uint32)}
    for r in (1, 2, 3):
        ckpt.save(r, _scaled(state, r), {"schedule": np.arange(r)}, {"round": r, "times": [0.5] * r})
    ckpt.wait()
    ckpt.save(3, {"w": jnp.zeros((2, 3)), "k": jnp.zeros(2, jnp.uint32)}, {"schedule": np.arange(9)}, {"round": 0})
    ckpt.close()
    again = Checkpoints(str(tmp_path / "run"), every=2)
    assert sorted(again.manager.all_steps()) == [2, 3]
    step, got, arrays, meta, damaged = again.restore(state)
    assert step == 3 and damaged == []
    assert meta == {"round": 3, "times": [0.5] * 3, "checksum": tree_checksum(_scaled(state, 3))}
    np.testing.assert_array_equal(arrays["schedule"], np.arange(3))
    for k in state:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(_scaled(state, 3)[k]))
        assert got[k].dtype == state[k].dtype
    again.close()


def test_checkpoint_of_another_state_structure_is_a_one_line_error(tmp_path):
    """A checkpoint written with other state entries (e.g. by an older version that kept
    pFedLA's delta_ref) is refused with a UserInputError naming the entry, not a raw orbax
    ValueError."""
    old = Checkpoints(str(tmp_path), every=1)
    old.save(1, {"client_params": jnp.ones(3), "delta_ref": jnp.zeros(2)}, {"k": np.ones(1)}, {"round": 1})
    old.close()
    new = Checkpoints(str(tmp_path), every=1)
    with pytest.raises(UserInputError, match="delta_ref.*another version"):
        new.restore({"client_params": jnp.ones(3)})
    step, state, _, _, _ = new.restore({"client_params": jnp.ones(3), "delta_ref": jnp.zeros(2)})
    assert step == 1 and float(state["delta_ref"].sum()) == 0.0
    new.close()
