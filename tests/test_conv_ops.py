"""experiments.bench.conv_ops: every conv implementation trains to the same losses (tiny
shapes, in this process), and bad flags are one `error:` line with exit status 2."""

import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from experiments.bench import conv_ops
from pfedla_jax.errors import UserInputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flag_values(args):
    fv = flags.FlagValues()
    conv_ops.define_flags(fv)
    return fv, fv(["conv_ops", *args])


@pytest.mark.slow
def test_every_implementation_gives_the_same_losses():
    """CIFAR CNN (conv, pooling and BatchNorm), 3 SGD steps of batch 2: the custom ops (with and
    without the CPU fast path) and plain autodiff train from the same start on the same batches,
    so their per-step losses agree to float32 rounding; a wrong gradient would change the
    losses after the first step."""
    figures = conv_ops.time_impls(conv_ops.IMPLS, "cifar10", steps=3, batch=2, repeats=2)
    assert list(figures) == list(conv_ops.IMPLS)
    want = figures["reference"]["losses"]
    assert want.shape == (3,) and np.all(np.isfinite(want)) and want[0] != want[1]
    for impl, fig in figures.items():
        np.testing.assert_allclose(fig["losses"], want, rtol=1e-5, atol=1e-6, err_msg=impl)
        assert fig["min_ms"] > 0 and fig["median_ms"] >= fig["min_ms"] and fig["first_s"] > 0


def test_flags_and_their_checks():
    assert "experiments.bench.conv_ops" not in flags.FLAGS.flags_by_module_dict()
    fv, _ = _flag_values(["--dataset", "cifar10", "--steps", "7", "--impls=custom,reference"])
    assert set(fv) == {"dataset", "steps", "batch", "repeats", "impls"}
    assert (fv.dataset, fv.steps, fv.batch, fv.repeats, fv.impls) == ("cifar10", 7, 32, 5,
                                                                       ["custom", "reference"])
    with pytest.raises(flags.IllegalFlagValueError):
        _flag_values(["--dataset=mnist"])
    with pytest.raises(UserInputError, match="unknown --impls"):
        conv_ops.check_arguments(["custom", "winograd"], "fmnist", 1, 1, 1)
    for name in ("steps", "batch", "repeats"):
        sizes = {"steps": 1, "batch": 1, "repeats": 1, name: 0}
        with pytest.raises(UserInputError, match=f"--{name} must be >= 1"):
            conv_ops.check_arguments(conv_ops.IMPLS, "fmnist", **sizes)


def test_bad_flag_is_one_error_line():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "experiments.bench.conv_ops",
                        "--impls=custom,winograd"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-2000:]
    assert err[0].startswith("error: ") and "winograd" in err[0], err
    assert p.stdout == ""
