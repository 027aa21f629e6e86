"""Client models: the pFedHN CNNTarget family and the ops it is built from."""

from pfedla_jax.models.cnn import (
    CONV_IMPLS,
    LAYER_ORDER,
    BatchNorm,
    CNNTarget,
    Conv2dValid,
    Dense,
    batchnorm_layers,
    check_input_shape,
    count_params,
    init_variables,
    layer_names,
    make_cnn,
)
from pfedla_jax.models.ops import conv2d_valid, conv2d_valid_reference, max_pool_2x2

__all__ = [
    "BatchNorm",
    "CNNTarget",
    "CONV_IMPLS",
    "Conv2dValid",
    "Dense",
    "batchnorm_layers",
    "LAYER_ORDER",
    "check_input_shape",
    "conv2d_valid",
    "conv2d_valid_reference",
    "count_params",
    "init_variables",
    "layer_names",
    "make_cnn",
    "max_pool_2x2",
]
