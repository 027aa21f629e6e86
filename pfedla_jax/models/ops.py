"""Convolution and pooling ops for the client CNN, written for fast XLA:CPU training loops.

Why these exist instead of `flax.linen.Conv` / `nn.max_pool` (see DESIGN.md, "Performance
lessons"): inside `lax.scan` (a per-client loop of SGD steps), plain autodiff of
`lax.conv_general_dilated` lowers the gradient convolutions to forms that XLA:CPU runs
10-20x slower than the same step called from Python. Writing the backward pass ourselves,
as *canonical* NHWC/HWIO convolutions plus explicit transposes, keeps XLA:CPU on its fast
convolution kernel everywhere. `lax.reduce_window` max pooling has a slow gradient too;
reshape-then-max is faster.

All ops are pure `jax.numpy`/`lax`: they work under `jax.jit`, `lax.scan`, `jax.vmap` and
`jax.grad` (including reverse-over-reverse). Forward-mode (`jax.jvp`, `jax.jacfwd`,
`jax.hessian`) is not supported by `conv2d_valid`, because it is a `jax.custom_vjp`; use
`conv2d_valid_reference` where forward mode is needed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Layouts everywhere: activations NHWC, kernels HWIO (the layouts XLA:CPU's fast conv uses).
_DIMS = ("NHWC", "HWIO", "NHWC")

# Use the Cin == 1 specialisation (shifted multiply-adds forward, matmul + col2im input
# gradient) when `conv2d_valid` is not told otherwise. Measured with
# `python -m pfedla_jax.models.bench_ops` (FMNIST CNN, one client, 50 SGD steps x batch 32
# inside `lax.scan`, shared 2-core CPU): ~10-15% faster per client than the generic custom
# VJP (e.g. 143 vs 165 ms median). Read at trace time: flip it before jitting, not after.
# Only measured on CPU; on GPU the generic path may be as good.
CIN1_FAST_PATH_DEFAULT = True

# The shifted multiply-add forward costs one fused elementwise pass per kernel tap; beyond
# this many taps a real convolution is the better choice (e.g. a large kernel with B == 1).
_MAX_SHIFT_TAPS = 49


def _conv(x: jax.Array, w: jax.Array, padding) -> jax.Array:
    """Canonical stride-1 NHWC x HWIO -> NHWC convolution (the form XLA:CPU runs fast)."""
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DIMS)


def conv2d_valid_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """Stride-1 VALID 2-D convolution (cross-correlation, as PyTorch's Conv2d), plain autodiff.

    The reference implementation the custom-gradient version is tested against.

    Args:
      x: input, float [B, H, W, Cin] (NHWC).
      w: kernel, float [kh, kw, Cin, Cout] (HWIO).

    Returns:
      [B, H - kh + 1, W - kw + 1, Cout].
    """
    _check_conv_shapes(x, w)
    return _conv(x, w, "VALID")


def _check_conv_shapes(x: jax.Array, w: jax.Array) -> None:
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d_valid expects x [B,H,W,Cin] and w [kh,kw,Cin,Cout]; "
                         f"got x{tuple(x.shape)} and w{tuple(w.shape)}")
    if x.shape[3] != w.shape[2]:
        raise ValueError(f"conv2d_valid: input has {x.shape[3]} channels but the kernel expects "
                         f"{w.shape[2]} (x{tuple(x.shape)}, w{tuple(w.shape)})")
    if x.shape[1] < w.shape[0] or x.shape[2] < w.shape[1]:
        raise ValueError(f"conv2d_valid: input spatial size {tuple(x.shape[1:3])} is smaller than "
                         f"the kernel {tuple(w.shape[:2])}")


def _use_shift_path(x: jax.Array, w: jax.Array, fast: bool) -> bool:
    kh, kw, cin, _ = w.shape
    return fast and cin == 1 and kh * kw <= _MAX_SHIFT_TAPS


def _conv_fwd_shift(x: jax.Array, w: jax.Array) -> jax.Array:
    """VALID conv for Cin == 1 as kh*kw shifted multiply-adds.

    With a single input channel a convolution is a 25-tap stencil: XLA fuses the taps into
    one elementwise loop vectorised over Cout, which beats the generic conv kernel on CPU.

    Args:
      x: [B, H, W, 1].
      w: [kh, kw, 1, Cout].

    Returns:
      [B, H - kh + 1, W - kw + 1, Cout].
    """
    kh, kw, _, _ = w.shape
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    acc = None
    for i in range(kh):
        for j in range(kw):
            # [B, oh, ow, 1] * [Cout] -> [B, oh, ow, Cout]
            tap = x[:, i:i + oh, j:j + ow, :] * w[i, j, 0]
            acc = tap if acc is None else acc + tap
    # Materialise the result: otherwise XLA may duplicate the whole 25-tap fusion into every
    # consumer (bias add, BatchNorm's reductions, ...), recomputing it several times.
    return lax.optimization_barrier(acc)


def _conv_dx_col2im(dy: jax.Array, w: jax.Array, x_shape) -> jax.Array:
    """Input gradient of a VALID conv as one matmul followed by col2im (shifted pad-adds).

    Args:
      dy: output cotangent [B, oh, ow, Cout].
      w: kernel [kh, kw, Cin, Cout].
      x_shape: the input shape (B, H, W, Cin).

    Returns:
      dx, [B, H, W, Cin].
    """
    kh, kw, cin, cout = w.shape
    b, oh, ow, _ = dy.shape
    # Patch gradients: every output pixel sends dy @ W^T back to the kh*kw*Cin inputs it saw.
    patches = jnp.dot(dy.reshape(-1, cout), w.reshape(kh * kw * cin, cout).T)
    patches = patches.reshape(b, oh, ow, kh * kw, cin)
    dx = jnp.zeros(x_shape, dy.dtype)
    for i in range(kh):
        for j in range(kw):
            tap = patches[:, :, :, i * kw + j, :]
            dx = dx + jnp.pad(tap, ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
    return dx


def _conv_dx_canonical(dy: jax.Array, w: jax.Array) -> jax.Array:
    """Input gradient: full-padded conv of dy with the flipped, in/out-swapped kernel.

    Args:
      dy: [B, oh, ow, Cout].
      w: [kh, kw, Cin, Cout].

    Returns:
      dx, [B, oh + kh - 1, ow + kw - 1, Cin].
    """
    kh, kw = w.shape[:2]
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)  # [kh, kw, Cout, Cin]
    return _conv(dy, w_t, ((kh - 1, kh - 1), (kw - 1, kw - 1)))


def _conv_dw_canonical(x: jax.Array, dy: jax.Array) -> jax.Array:
    """Kernel gradient as one canonical conv: the batch becomes the contracted channel axis.

    dW[i, j, c, o] = sum_{b, p, q} x[b, p + i, q + j, c] * dy[b, p, q, o], i.e. a VALID conv of
    x viewed as [N=Cin, H, W, C=B] with dy viewed as a kernel [oh, ow, I=B, O=Cout].

    Args:
      x: [B, H, W, Cin].
      dy: [B, oh, ow, Cout].

    Returns:
      dW, [kh, kw, Cin, Cout].
    """
    dw = _conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), "VALID")  # [Cin, kh, kw, Cout]
    return dw.transpose(1, 2, 0, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d_valid(x: jax.Array, w: jax.Array, fast: bool) -> jax.Array:
    if _use_shift_path(x, w, fast):
        return _conv_fwd_shift(x, w)
    return _conv(x, w, "VALID")


def _conv2d_valid_fwd(x, w, fast):
    return _conv2d_valid(x, w, fast), (x, w)


def _conv2d_valid_bwd(fast, res, dy):
    x, w = res
    if _use_shift_path(x, w, fast):
        dx = _conv_dx_col2im(dy, w, x.shape)
    else:
        dx = _conv_dx_canonical(dy, w)
    return dx, _conv_dw_canonical(x, dy)


_conv2d_valid.defvjp(_conv2d_valid_fwd, _conv2d_valid_bwd)


def conv2d_valid(x: jax.Array, w: jax.Array, *, cin1_fast_path: bool | None = None) -> jax.Array:
    """Stride-1 VALID 2-D convolution with a hand-written, CPU-friendly backward pass.

    Same values and gradients as `conv2d_valid_reference` (up to float rounding), but the
    backward pass is written as canonical NHWC/HWIO convolutions so XLA:CPU keeps its fast
    conv kernel even inside `lax.scan`:
      dx = conv(dy, flip(w) with in/out swapped, full padding)
      dW = conv(x as [Cin, H, W, B], dy as [oh, ow, B, Cout]), transposed back to HWIO.
    Under `jax.vmap` the batching rules turn these into grouped convolutions (correct; how
    fast depends on the backend). Higher-order reverse-mode derivatives work (they
    differentiate the backward pass with plain autodiff); forward mode does not.

    Args:
      x: input, float [B, H, W, Cin] (NHWC).
      w: kernel, float [kh, kw, Cin, Cout] (HWIO).
      cin1_fast_path: for Cin == 1, compute the forward pass as kh*kw shifted multiply-adds
        and dx as a matmul then col2im (faster on CPU). None = `CIN1_FAST_PATH_DEFAULT`.

    Returns:
      [B, H - kh + 1, W - kw + 1, Cout].
    """
    _check_conv_shapes(x, w)
    fast = CIN1_FAST_PATH_DEFAULT if cin1_fast_path is None else bool(cin1_fast_path)
    return _conv2d_valid(x, w, fast)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 (NHWC), by reshape-then-max.

    Faster on CPU than `lax.reduce_window`, whose gradient (select-and-scatter) is slow.
    Values equal reduce_window's. Gradients equal too except at ties inside a window:
    reshape-then-max splits the cotangent equally among the tied maxima, while
    reduce_window (and PyTorch's MaxPool2d) sends all of it to one of them. Ties have
    measure zero for continuous float data (but see ReLU: pooling *after* ReLU creates
    tied zeros; their gradient is zero either way since ReLU's derivative there is 0).

    Args:
      x: [..., H, W, C] with H and W even; any number of leading axes.

    Returns:
      [..., H // 2, W // 2, C].
    """
    if x.ndim < 3:
        raise ValueError(f"max_pool_2x2 expects [..., H, W, C]; got shape {tuple(x.shape)}")
    *lead, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"max_pool_2x2 needs even H and W; got H={h}, W={w} (shape {tuple(x.shape)})")
    x = x.reshape(*lead, h // 2, 2, w // 2, 2, c)
    return x.max(axis=(-4, -2))
