"""pFedHN's CNNTarget in PyTorch, and weight converters to and from pfedla_jax's layout.

    conv1 5x5 Cin->16 [bn1] ReLU MaxPool2 | conv2 5x5 16->32 [bn2] ReLU MaxPool2 |
    flatten (c, h, w) | fc1 ->120 ReLU | fc2 120->84 ReLU | fc3 84->num_classes

The same network as `pfedla_jax.models.cnn.CNNTarget`, written the PyTorch way (NCHW,
`nn.Conv2d`/`nn.BatchNorm2d`/`nn.Linear`, default initialisation). The converters take and
return plain numpy arrays (anything `np.asarray` accepts, e.g. jax arrays), so this module
does not import JAX. Layout differences handled by them:

  * conv kernel: ours HWIO [kh, kw, Cin, Cout] <-> torch OIHW [Cout, Cin, kh, kw];
  * dense kernel: ours [in, out] <-> torch weight [out, in];
  * FC1's input: ours is the NHWC flatten, (h, w, c) order; torch's is (c, h, w);
  * BatchNorm: ours 'scale'/'bias' params and 'mean'/'var' batch_stats <-> torch
    weight/bias and running_mean/running_var (num_batches_tracked has no counterpart: with
    a fixed momentum it is unused; it is set to 0 when converting from JAX).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# torch module name <-> pfedla_jax layer name, in forward order (bn* only with use_bn).
LAYERS: tuple[tuple[str, str], ...] = (
    ("conv1", "Conv1"), ("bn1", "BN1"), ("conv2", "Conv2"), ("bn2", "BN2"),
    ("fc1", "FC1"), ("fc2", "FC2"), ("fc3", "FC3"))
CONV_CHANNELS = (16, 32)
FC_FEATURES = (120, 84)
KERNEL = 5


def feature_hw(height: int, width: int) -> tuple[int, int]:
    """Spatial size after the two (conv5 VALID, maxpool2) stages."""
    for _ in range(2):
        height, width = (height - KERNEL + 1) // 2, (width - KERNEL + 1) // 2
    return height, width


class CNNTarget(nn.Module):
    """pFedHN's CNNTarget (n_kernels = 16), NCHW.

    Args:
      in_channels: image channels (1 for MNIST-like data, 3 for CIFAR).
      num_classes: output logits.
      use_bn: BatchNorm2d (momentum 0.1) after each conv (the paper: CIFAR only).
      input_hw: (H, W) of one image (28x28 or 32x32 for the paper's datasets).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, use_bn: bool = False,
                 input_hw: tuple[int, int] = (28, 28)):
        super().__init__()
        c1, c2 = CONV_CHANNELS
        self.use_bn = use_bn
        self.feature_hw = feature_hw(*input_hw)
        # Registration order = forward order = the aggregation layer order.
        self.conv1 = nn.Conv2d(in_channels, c1, KERNEL)
        self.bn1 = nn.BatchNorm2d(c1, momentum=0.1) if use_bn else nn.Identity()
        self.conv2 = nn.Conv2d(c1, c2, KERNEL)
        self.bn2 = nn.BatchNorm2d(c2, momentum=0.1) if use_bn else nn.Identity()
        h, w = self.feature_hw
        self.fc1 = nn.Linear(c2 * h * w, FC_FEATURES[0])
        self.fc2 = nn.Linear(FC_FEATURES[0], FC_FEATURES[1])
        self.fc3 = nn.Linear(FC_FEATURES[1], num_classes)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] float32 (normalised) -> logits [B, num_classes]."""
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _fc1_hw(fc1_in: int, channels: int, hw: tuple[int, int] | None) -> tuple[int, int]:
    if hw is not None:
        return tuple(hw)
    side = math.isqrt(fc1_in // channels)
    if side * side * channels != fc1_in:
        raise ValueError(f"FC1 input size {fc1_in} is not {channels} x a square; pass feature_hw")
    return side, side


def params_from_jax(params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None = None,
                    feature_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """A CNNTarget state_dict from one client's pfedla_jax variables.

    Args:
      params: {'Conv1': {'kernel', 'bias'}, ['BN1': {'scale', 'bias'}], ...}, unstacked.
      batch_stats: {'BN1': {'mean', 'var'}, ...} ({} or None without BN).
      feature_hw: (h, w) entering FC1 (default: inferred, square).

    Returns:
      state_dict for `CNNTarget` (float32 tensors; num_batches_tracked = 0).
    """
    batch_stats = batch_stats or {}
    out: dict[str, torch.Tensor] = {}
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable, contiguous copy
    for tname, jname in LAYERS:
        if jname not in params:
            continue
        p = params[jname]
        if jname.startswith("Conv"):
            out[f"{tname}.weight"] = t(np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1)))
            out[f"{tname}.bias"] = t(p["bias"])
        elif jname.startswith("BN"):
            out[f"{tname}.weight"] = t(p["scale"])
            out[f"{tname}.bias"] = t(p["bias"])
            out[f"{tname}.running_mean"] = t(batch_stats[jname]["mean"])
            out[f"{tname}.running_var"] = t(batch_stats[jname]["var"])
            out[f"{tname}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        else:
            k = np.asarray(p["kernel"])                                 # [in, out]
            if jname == "FC1":
                c = CONV_CHANNELS[-1]
                h, w = _fc1_hw(k.shape[0], c, feature_hw)
                # rows (h, w, c) -> columns (c, h, w)
                k = k.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)
            else:
                k = k.T
            out[f"{tname}.weight"] = t(k)
            out[f"{tname}.bias"] = t(p["bias"])
    return out


def params_to_jax(state_dict: Mapping[str, torch.Tensor],
                  feature_hw: tuple[int, int] | None = None) -> tuple[dict, dict]:
    """(params, batch_stats) in pfedla_jax's layout (numpy float32) from a CNNTarget state_dict."""
    n = lambda key: state_dict[key].detach().cpu().numpy().astype(np.float32)
    params: dict[str, dict[str, np.ndarray]] = {}
    stats: dict[str, dict[str, np.ndarray]] = {}
    for tname, jname in LAYERS:
        if f"{tname}.weight" not in state_dict:
            continue
        w = n(f"{tname}.weight")
        if jname.startswith("Conv"):
            params[jname] = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
                             "bias": n(f"{tname}.bias")}
        elif jname.startswith("BN"):
            params[jname] = {"scale": w, "bias": n(f"{tname}.bias")}
            if f"{tname}.running_mean" in state_dict:  # (absent from a params-only dict)
                stats[jname] = {"mean": n(f"{tname}.running_mean"),
                                "var": n(f"{tname}.running_var")}
        else:
            if jname == "FC1":
                c = CONV_CHANNELS[-1]
                h, w_ = _fc1_hw(w.shape[1], c, feature_hw)
                k = w.reshape(-1, c, h, w_).transpose(2, 3, 1, 0).reshape(h * w_ * c, -1)
            else:
                k = w.T
            params[jname] = {"kernel": np.ascontiguousarray(k), "bias": n(f"{tname}.bias")}
    return params, stats
