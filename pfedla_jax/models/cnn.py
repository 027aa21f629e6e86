"""pFedHN's `CNNTarget`, the client model of every pFedLA experiment.

The pFedLA paper (Ma et al., CVPR 2022) uses "the same CNN architectures as in FedFomo,
FedBN and pFedHN"; pFedHN's `CNNTarget` (AvivSham/pFedHN models.py, n_kernels = 16) is the
one whose parameter counts reproduce the paper's Table 3 communication costs:

    Conv1 5x5 Cin->16 [BN1] ReLU MaxPool2 | Conv2 5x5 16->32 [BN2] ReLU MaxPool2 |
    flatten | FC1 ->120 ReLU | FC2 120->84 ReLU | FC3 84->num_classes

Parameter counts: 85,822 (1x28x28, 10 classes, no BN); 121,278 (3x32x32, 10 classes, BN);
128,928 (3x32x32, 100 classes, BN). The top-level module names are the pFedLA aggregation
layers (`LAYER_ORDER`).

Differences from the PyTorch original that a weight converter must know:
  * Layouts are NHWC / HWIO: conv kernel [kh, kw, Cin, Cout] = torch weight.permute(2, 3, 1, 0);
    dense kernel [in, out] = torch weight.T.
  * The flatten before FC1 is in (h, w, c) order (NHWC), torch's is (c, h, w): FC1's kernel
    rows are permuted accordingly (torch fc1.weight [120, C*H*W] -> reshape(120, C, H, W)
    .permute(2, 3, 1, 0).reshape(H*W*C, 120)).
  * ReLU is applied after the max pool. max and ReLU commute (ReLU is monotonic), so values
    are identical; with the first-maximum gradient rule of ops.max_pool_2x2 (PyTorch's) the
    gradients are identical too (a window whose maximum is <= 0 gets zero gradient either
    way). Pooling first makes the ReLU 4x cheaper.

Conv and dense layers are small custom modules: Flax's `nn.Conv`/`nn.max_pool` take the slow
XLA:CPU paths under `lax.scan`/`vmap` (see ops.py). BatchNorm is custom too, for PyTorch
semantics (momentum 0.1, unbiased running variance), a padding mask and a closed-form VJP.
`conv_impl='reference'` builds the same model from plain-autodiff conv, pooling and BatchNorm.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from pfedla_jax.errors import UserInputError
from pfedla_jax.models import ops

# All layers the model can have, in forward order (BN layers only when use_bn).
LAYER_ORDER: tuple[str, ...] = ("Conv1", "BN1", "Conv2", "BN2", "FC1", "FC2", "FC3")

CONV_IMPLS: tuple[str, ...] = ("custom", "reference")

_KERNEL = 5
_CONV_FEATURES = (16, 32)
_FC_FEATURES = (120, 84)


def torch_default_uniform(fan_in: int) -> Callable[..., jax.Array]:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's Conv2d/Linear default init.

    kaiming_uniform(a=sqrt(5)) gives bound gain*sqrt(3/fan_in) with gain = sqrt(2/(1+5)),
    i.e. 1/sqrt(fan_in); PyTorch draws the bias from the same interval.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv2dValid(nn.Module):
    """5x5 (by default) stride-1 VALID convolution with bias, NHWC.

    Attributes:
      features: output channels Cout.
      kernel_size: (kh, kw).
      impl: 'custom' (ops.conv2d_valid, fast CPU backward) or 'reference' (plain autodiff).
    """

    features: int
    kernel_size: tuple[int, int] = (_KERNEL, _KERNEL)
    impl: str = "custom"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, Cin] -> [B, H - kh + 1, W - kw + 1, features]."""
        kh, kw = self.kernel_size
        cin = x.shape[-1]
        init = torch_default_uniform(kh * kw * cin)
        kernel = self.param("kernel", init, (kh, kw, cin, self.features))
        bias = self.param("bias", init, (self.features,))
        if self.impl == "custom":
            y = ops.conv2d_valid(x, kernel)
        elif self.impl == "reference":
            y = ops.conv2d_valid_reference(x, kernel)
        else:
            raise UserInputError(f"unknown conv_impl {self.impl!r}; expected one of {', '.join(CONV_IMPLS)}")
        return y + bias


class Dense(nn.Module):
    """Fully connected layer with bias, PyTorch's Linear init. Kernel [in, out]."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, in] -> [B, features]."""
        init = torch_default_uniform(x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        return jnp.dot(x, kernel) + bias


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch semantics over NHWC input, with an optional example mask.

    Train mode normalises with the biased batch statistics over (B, H, W), counting only the
    examples with mask == 1, so padded examples change neither the statistics nor the
    outputs of real examples (their own outputs are finite but meaningless). The running
    statistics (collection 'batch_stats': 'mean', 'var'; updated only when the caller passes
    mutable=['batch_stats'] to apply) are updated as
    running = (1 - momentum) * running + momentum * batch, with the unbiased variance
    (n / (n - 1)) for 'var'; a batch without real examples leaves them unchanged. Gradients
    flow through the batch statistics, as in PyTorch. Eval mode uses the running statistics.

    Attributes:
      momentum: PyTorch-style momentum (weight of the new batch statistic).
      epsilon: added to the variance.
      impl: 'custom' (ops.batch_norm_train, closed-form VJP) or 'reference' (plain autodiff).
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    impl: str = "custom"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """Normalises x.

        Args:
          x: [B, H, W, C].
          train: batch statistics (and running-stat update) if True, running stats if False.
          mask: optional [B], 1 (or True) for real examples, 0 for padding. Train mode only.

        Returns:
          [B, H, W, C].
        """
        if self.impl not in CONV_IMPLS:
            raise UserInputError(f"unknown BatchNorm impl {self.impl!r}; expected one of {', '.join(CONV_IMPLS)}")
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))

        if not train:
            mean, var = ra_mean.value, ra_var.value
            return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        if mask is None:
            mask = jnp.ones(x.shape[:1], x.dtype)
        elif mask.shape != x.shape[:1]:
            raise ValueError(f"BatchNorm mask must have shape [B]={x.shape[:1]}; got {mask.shape}")
        bn = ops.batch_norm_train if self.impl == "custom" else ops.batch_norm_train_reference
        y, mean, var, n = bn(x, scale, bias, mask.astype(x.dtype), self.epsilon)
        # Update only when the caller made 'batch_stats' mutable (and not at init): a train-mode
        # forward with frozen stats (e.g. to evaluate a loss) then simply doesn't update.
        if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
            batch_mean = jax.lax.stop_gradient(mean)
            batch_var = jax.lax.stop_gradient(var) * n / jnp.maximum(n - 1.0, 1.0)
            has_real = n > 0
            new_mean = (1.0 - self.momentum) * ra_mean.value + self.momentum * batch_mean
            new_var = (1.0 - self.momentum) * ra_var.value + self.momentum * batch_var
            ra_mean.value = jnp.where(has_real, new_mean, ra_mean.value)
            ra_var.value = jnp.where(has_real, new_var, ra_var.value)
        return y


def _spatial_after_convs(size: int) -> int | None:
    """Spatial size after two (conv5 VALID, pool2) stages, or None if the size can't pass."""
    for _ in range(2):
        size -= _KERNEL - 1
        if size < 2 or size % 2:
            return None
        size //= 2
    return size


def check_input_shape(input_shape: Any) -> tuple[int, int, int]:
    """Validates an (H, W, C) input shape for CNNTarget.

    Raises:
      UserInputError: if the architecture cannot take the shape.
    """
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise UserInputError(f"input shape must be (H, W, C) integers; got {input_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise UserInputError(f"input shape must be (H, W, C) with positive sizes; got {input_shape!r}")
    h, w, _ = shape
    if _spatial_after_convs(h) is None or _spatial_after_convs(w) is None:
        raise UserInputError(
            f"CNN input {h}x{w} does not fit two conv5+pool2 stages: need (S-4) even and >= 2, "
            f"then ((S-4)/2 - 4) even and >= 2 (e.g. 28 or 32)")
    return shape


class CNNTarget(nn.Module):
    """pFedHN's CNNTarget (n_kernels = 16).

    Attributes:
      num_classes: output logits.
      use_bn: BatchNorm after each conv (the paper uses it for CIFAR only).
      conv_impl: 'custom' (ops.conv2d_valid, ops.max_pool_2x2, ops.batch_norm_train) or
        'reference' (their plain-autodiff versions).
    """

    num_classes: int = 10
    use_bn: bool = False
    conv_impl: str = "custom"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """Logits for a batch.

        Args:
          x: float32 [B, H, W, C], normalised, NHWC.
          train: BatchNorm uses (and updates, if 'batch_stats' is mutable) batch statistics.
          mask: optional [B], 1 = real example, 0 = padding; only BatchNorm uses it (the loss
            masking is the caller's job). Without BN it is ignored.

        Returns:
          logits, float32 [B, num_classes].
        """
        if x.ndim != 4:
            raise UserInputError(f"CNNTarget expects input [B, H, W, C]; got shape {tuple(x.shape)}")
        check_input_shape(x.shape[1:])
        if self.conv_impl not in CONV_IMPLS:
            raise UserInputError(
                f"unknown conv_impl {self.conv_impl!r}; expected one of {', '.join(CONV_IMPLS)}")

        for i, features in enumerate(_CONV_FEATURES, start=1):
            x = Conv2dValid(features, impl=self.conv_impl, name=f"Conv{i}")(x)
            if self.use_bn:
                x = BatchNorm(impl=self.conv_impl, name=f"BN{i}")(x, train=train, mask=mask)
            # Pool before ReLU: same values (ReLU is monotonic), ReLU on 4x fewer elements.
            pool = ops.max_pool_2x2 if self.conv_impl == "custom" else ops.max_pool_2x2_reference
            x = nn.relu(pool(x))
        x = x.reshape(x.shape[0], -1)
        for i, features in enumerate(_FC_FEATURES, start=1):
            x = nn.relu(Dense(features, name=f"FC{i}")(x))
        return Dense(self.num_classes, name="FC3")(x)


def make_cnn(input_shape: tuple[int, int, int], num_classes: int, use_bn: bool | None = None,
             conv_impl: str = "custom") -> CNNTarget:
    """Builds the CNNTarget for a dataset.

    Args:
      input_shape: (H, W, C) of one example.
      num_classes: number of classes (>= 1).
      use_bn: BatchNorm after the convs; None = True iff C == 3 (the paper: BN for CIFAR only).
      conv_impl: 'custom' or 'reference'.

    Returns:
      The (unbound) module.

    Raises:
      UserInputError: for shapes the architecture can't take, bad num_classes or conv_impl.
    """
    _, _, c = check_input_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserInputError(f"num_classes must be a positive integer; got {num_classes!r}")
    if conv_impl not in CONV_IMPLS:
        raise UserInputError(f"unknown conv_impl {conv_impl!r}; expected one of {', '.join(CONV_IMPLS)}")
    if use_bn is None:
        use_bn = c == 3
    return CNNTarget(num_classes=num_classes, use_bn=bool(use_bn), conv_impl=conv_impl)


def layer_names(model: CNNTarget) -> tuple[str, ...]:
    """The model's layers (top-level param keys) in forward order."""
    return tuple(n for n in LAYER_ORDER if model.use_bn or not n.startswith("BN"))


def batchnorm_layers(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[str, ...]:
    """Top-level layers of `model` that are BatchNorm modules, found by module type.

    Detected by intercepting the module calls of an abstract init (no FLOPs): any instance
    of this package's `BatchNorm` or of `flax.linen.BatchNorm` counts, whatever its name
    (FedBN keeps these layers with each client; matching names like 'bn' is what the
    reference code does and what breaks on renamed modules).

    Returns:
      The names, e.g. ('BN1', 'BN2') for the CIFAR model; () for a model without BN.
    """
    found: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, (BatchNorm, nn.BatchNorm)) and module.path and module.path[0] not in found:
            found.append(module.path[0])
        return next_fun(*args, **kwargs)

    shape = check_input_shape(input_shape)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape, jnp.float32),
                                          train=False))
    return tuple(found)


@functools.lru_cache(maxsize=32)
def _jitted_init(model: CNNTarget) -> Callable[..., Any]:
    # Compiling the init (10 threefry draws) takes seconds on CPU, about as long as eager
    # dispatch; cache it so further inits of the same model (other keys, other clients) are free.
    return jax.jit(functools.partial(model.init, train=False))


def init_variables(model: CNNTarget, key: jax.Array, input_shape: tuple[int, int, int]) -> dict:
    """Initial variables for one client.

    Args:
      model: the CNNTarget.
      key: PRNG key.
      input_shape: (H, W, C) of one example.

    Returns:
      {'params': {layer: {leaf: array}}, 'batch_stats': {BN layer: {'mean', 'var'}}}, plain
      dicts; 'batch_stats' is {} when the model has no BN.
    """
    shape = check_input_shape(input_shape)
    variables = flax.core.unfreeze(_jitted_init(model)(key, jnp.zeros((1,) + shape, jnp.float32)))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def count_params(params: Any) -> int:
    """Number of scalars in a (single-client, unstacked) params pytree."""
    return int(sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(params)))
