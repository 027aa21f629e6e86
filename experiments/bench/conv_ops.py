"""Times one client's local training (SGD steps inside `lax.scan`) per conv implementation.

    python -m experiments.bench.conv_ops [--dataset=fmnist|cifar10] [--steps=50] [--batch=32]
                                          [--repeats=5] [--impls=custom,custom_generic,reference]

Implementations:
  custom          ops.conv2d_valid with the fast path at its default (on for the CPU backend)
  custom_generic  ops.conv2d_valid with the fast path off (canonical convolutions only)
  reference       ops.conv2d_valid_reference (plain autodiff of lax.conv)
(Max pooling and BatchNorm are the custom-VJP ops in `custom` and `custom_generic`; `reference`
uses plain autodiff for conv, pooling and BatchNorm.)

Prints compile+first-call time and the median / min over `--repeats` timed calls after one
warm-up call, in ms; the timed calls alternate between the implementations. Every
implementation trains from the same weights on the same batches, so their per-step losses
agree (up to float32 rounding); `time_impls` returns them. Run it on an otherwise idle
machine: on a shared CPU the numbers are noisy. Bad flags: one line `error: ...`, exit 2.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

from experiments.cli import fail, parse_flags, start
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import cnn, ops

SHAPES = {"fmnist": ((28, 28, 1), 10), "cifar10": ((32, 32, 3), 10)}
IMPLS = ("custom", "custom_generic", "reference")
_LR = 0.005


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this tool's flags on `flag_values` (`python -m experiments.bench.conv_ops`
    does; importing the module defines none)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_enum("dataset", "fmnist", sorted(SHAPES), "The client CNN: fmnist (1x28x28) "
                      "or cifar10 (3x32x32, with BatchNorm).", **fv)
    flags.DEFINE_integer("steps", 50, "SGD steps of the client (one lax.scan).", **fv)
    flags.DEFINE_integer("batch", 32, "Examples per step.", **fv)
    flags.DEFINE_integer("repeats", 5, "Timed calls per implementation (median and min).", **fv)
    flags.DEFINE_list("impls", list(IMPLS), f"Implementations, among {', '.join(IMPLS)}.", **fv)


def make_client_train(model: cnn.CNNTarget):
    """jit(params, batch_stats, X [S,B,H,W,C], Y [S,B]) -> (params, batch_stats, losses [S])."""

    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        logp = jax.nn.log_softmax(logits)
        loss = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
        return loss, updates.get("batch_stats", {})

    def step(carry, xy):
        params, batch_stats = carry
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, *xy)
        params = jax.tree.map(lambda p, g: p - _LR * g, params, grads)
        return (params, batch_stats), loss

    @jax.jit
    def train(params, batch_stats, xs, ys):
        (params, batch_stats), losses = lax.scan(step, (params, batch_stats), (xs, ys))
        return params, batch_stats, losses

    return train


def initial_variables(dataset: str) -> dict:
    """The client's initial variables (key 0); the same for every implementation (conv_impl
    changes the ops, not the variables)."""
    shape, num_classes = SHAPES[dataset]
    return cnn.init_variables(cnn.make_cnn(shape, num_classes), jax.random.key(0), shape)


def build(impl: str, dataset: str, steps: int, batch: int, variables: dict | None = None):
    """Compiles one client's training for `impl`.

    Args:
      impl: one of IMPLS.
      dataset: a key of SHAPES.
      steps, batch: SGD steps of the scan and examples per step.
      variables: the initial variables (None: `initial_variables(dataset)`).

    Returns:
      (run, first, losses): run() trains once (from the same start each call) and returns the
      per-step losses; first = compile + first-call seconds; losses float32 [steps] of the
      first call. Weights and batches (numpy seed 1) are the same for every impl.
    """
    shape, num_classes = SHAPES[dataset]
    conv_impl = "reference" if impl == "reference" else "custom"
    model = cnn.make_cnn(shape, num_classes, conv_impl=conv_impl)
    if variables is None:
        variables = initial_variables(dataset)
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.standard_normal((steps, batch) + shape, dtype=np.float32))
    ys = jnp.asarray(rng.integers(0, num_classes, (steps, batch)), jnp.int32)

    def run():
        return jax.block_until_ready(train(variables["params"], variables["batch_stats"], xs, ys))[2]

    # The fast-path switch is read when the conv is traced, so flip it around the first
    # (compiling) call only; the compiled executable keeps whatever it saw.
    saved = ops.FAST_PATH_DEFAULT
    if impl == "custom_generic":
        ops.FAST_PATH_DEFAULT = False
    try:
        train = make_client_train(model)
        t = time.perf_counter()
        losses = run()
        first = time.perf_counter() - t
    finally:
        ops.FAST_PATH_DEFAULT = saved
    run()  # warm-up
    return run, first, np.asarray(losses)


def check_arguments(impls, dataset: str, steps: int, batch: int, repeats: int) -> None:
    """Raises UserInputError for an unknown implementation or dataset, or steps, batch or
    repeats < 1."""
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise UserInputError(f"unknown --impls {unknown}; choose from {', '.join(IMPLS)}")
    if dataset not in SHAPES:
        raise UserInputError(f"unknown --dataset {dataset!r}; expected one of {', '.join(SHAPES)}")
    for name, value in (("steps", steps), ("batch", batch), ("repeats", repeats)):
        if value < 1:
            raise UserInputError(f"--{name} must be >= 1, got {value}")


def time_impls(impls, dataset: str = "fmnist", steps: int = 50, batch: int = 32,
               repeats: int = 5) -> dict[str, dict]:
    """Builds every implementation in `impls`, then times `repeats` calls of each, alternating
    between them (so background load on a shared machine hits them alike).

    Returns:
      {impl: {'median_ms', 'min_ms', 'first_s' (compile + first call), 'losses' (float32
      [steps], of the first call)}}.

    Raises:
      UserInputError: as `check_arguments`.
    """
    impls = list(impls)
    check_arguments(impls, dataset, steps, batch, repeats)
    variables = initial_variables(dataset)
    built = {impl: build(impl, dataset, steps, batch, variables) for impl in impls}
    times = {impl: [] for impl in impls}
    for _ in range(repeats):
        for impl in impls:
            t = time.perf_counter()
            built[impl][0]()
            times[impl].append(time.perf_counter() - t)
    return {impl: {"median_ms": 1e3 * statistics.median(times[impl]),
                   "min_ms": 1e3 * min(times[impl]), "first_s": built[impl][1],
                   "losses": built[impl][2]} for impl in impls}


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    start(argv)
    f = flag_values
    try:
        check_arguments(f.impls, f.dataset, f.steps, f.batch, f.repeats)
    except UserInputError as e:
        fail(str(e))
    print(f"{f.dataset}: one client, {f.steps} SGD steps x batch {f.batch} in lax.scan, "
          f"backend {jax.default_backend()}, {len(jax.devices())} device(s)")
    figures = time_impls(f.impls, f.dataset, f.steps, f.batch, f.repeats)
    for impl, fig in figures.items():
        print(f"  {impl:15s} median {fig['median_ms']:9.1f} ms  "
              f"min {fig['min_ms']:9.1f} ms  (compile + first call {fig['first_s']:.1f} s)")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
