"""Times one client's local training (SGD steps inside `lax.scan`) per conv implementation.

    python -m pfedla_jax.models.bench_ops [--dataset fmnist|cifar10] [--steps 50] [--batch 32]
                                          [--repeats 5] [--impls custom,custom_generic,reference]

Implementations:
  custom          ops.conv2d_valid with the fast path at its default (on for the CPU backend)
  custom_generic  ops.conv2d_valid with the fast path off (canonical convolutions only)
  reference       ops.conv2d_valid_reference (plain autodiff of lax.conv)
(Max pooling and BatchNorm are the custom-VJP ops in `custom` and `custom_generic`; `reference`
uses plain autodiff for conv, pooling and BatchNorm.)

Prints compile+first-call time and the median / min over `--repeats` timed calls after one
warm-up call, in ms; the timed calls alternate between the implementations. Run it on an
otherwise idle machine: on a shared CPU the numbers are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pfedla_jax.models import cnn, ops

_SHAPES = {"fmnist": ((28, 28, 1), 10), "cifar10": ((32, 32, 3), 10)}
_LR = 0.005
_IMPLS = ("custom", "custom_generic", "reference")


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


def build(impl: str, dataset: str, steps: int, batch: int):
    """Compiles one client's training for `impl`; returns (run: () -> None, compile+first-call s)."""
    shape, num_classes = _SHAPES[dataset]
    conv_impl = "reference" if impl == "reference" else "custom"
    model = cnn.make_cnn(shape, num_classes, conv_impl=conv_impl)
    variables = cnn.init_variables(model, jax.random.key(0), shape)
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.standard_normal((steps, batch) + shape, dtype=np.float32))
    ys = jnp.asarray(rng.integers(0, num_classes, (steps, batch)), jnp.int32)

    def run():
        jax.block_until_ready(train(variables["params"], variables["batch_stats"], xs, ys))

    # The fast-path switch is read when the conv is traced, so flip it around the first
    # (compiling) call only; the compiled executable keeps whatever it saw.
    saved = ops.FAST_PATH_DEFAULT
    if impl == "custom_generic":
        ops.FAST_PATH_DEFAULT = False
    try:
        train = make_client_train(model)
        t = time.perf_counter()
        run()
        first = time.perf_counter() - t
    finally:
        ops.FAST_PATH_DEFAULT = saved
    run()  # warm-up
    return run, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fmnist", choices=sorted(_SHAPES))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--impls", default="custom,custom_generic,reference")
    args = ap.parse_args()
    print(f"{args.dataset}: one client, {args.steps} SGD steps x batch {args.batch} in lax.scan, "
          f"backend {jax.default_backend()}, {len(jax.devices())} device(s)")
    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(_IMPLS))
    if unknown:
        ap.error(f"unknown --impls {unknown}; choose from {', '.join(_IMPLS)}")
    runs, first = {}, {}
    for impl in impls:
        runs[impl], first[impl] = build(impl, args.dataset, args.steps, args.batch)
    # Alternate the implementations so background load on a shared machine hits them alike.
    times = {impl: [] for impl in impls}
    for _ in range(args.repeats):
        for impl in impls:
            t = time.perf_counter()
            runs[impl]()
            times[impl].append(time.perf_counter() - t)
    for impl in impls:
        print(f"  {impl:15s} median {1e3 * statistics.median(times[impl]):9.1f} ms  "
              f"min {1e3 * min(times[impl]):9.1f} ms  (compile + first call {first[impl]:.1f} s)")


if __name__ == "__main__":
    main()
