"""The per-client pFedLA hypernetwork HN_i(v_i; psi_i) -> alpha_i in PyTorch.

As in the public PyTorch code: a trainable embedding v_i, an MLP of `num_hidden` x
(Linear, ReLU), one Linear(hidden -> N) head per aggregation layer; each head's N scores
become a distribution over the clients by ReLU-then-divide-by-the-sum (one-hot(self) when a
head's ReLU output is all zero) or by softmax. Same architecture and defaults as
`pfedla_jax.models.hypernetwork.LayerWeightHypernetwork`; `hn_from_jax` / `hn_to_jax`
convert one client's weights (numpy arrays in, numpy arrays out; no JAX import).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NORMALIZATIONS = ("relu", "softmax")


class LayerWeightHypernetwork(nn.Module):
    """HN_i: v_i -> MLP -> one head per layer -> alpha_i [L, N] (rows sum to 1).

    Args:
      num_clients: N, the number of stored client models (scores per head).
      num_layers: L, the aggregation units of the client model.
      client_id: i, this hypernetwork's client (the one-hot fallback keeps its own layer).
      embed_dim, hidden_dim, num_hidden: the MLP (public code: 100, 100, 3).
      normalization: 'relu' (ReLU, divide by the sum) or 'softmax'.
      head_init: 'uniform' (U(0, 1) weights, zero bias: the public code) or 'torch'.
    """

    def __init__(self, num_clients: int, num_layers: int, client_id: int, embed_dim: int = 100,
                 hidden_dim: int = 100, num_hidden: int = 3, normalization: str = "relu",
                 head_init: str = "uniform"):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.client_id = client_id
        self.normalization = normalization
        self.embedding = nn.Parameter(torch.randn(embed_dim))
        layers: list[nn.Module] = []
        fan_in = embed_dim
        for _ in range(num_hidden):
            layers += [nn.Linear(fan_in, hidden_dim), nn.ReLU()]
            fan_in = hidden_dim
        self.mlp = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(fan_in, num_clients) for _ in range(num_layers))
        if head_init == "uniform":
            for head in self.heads:
                nn.init.uniform_(head.weight, 0.0, 1.0)
                nn.init.zeros_(head.bias)
        elif head_init != "torch":
            raise ValueError(f"head_init must be 'uniform' or 'torch', got {head_init!r}")

    def scores(self) -> torch.Tensor:
        """The heads' raw outputs [L, N]."""
        h = self.mlp(self.embedding)
        return torch.stack([head(h) for head in self.heads])

    def forward(self) -> torch.Tensor:
        """alpha_i [L, N]: alpha[l, j] = weight of client j's layer l in client i's model."""
        scores = self.scores()
        if self.normalization == "softmax":
            return F.softmax(scores, dim=-1)
        a = F.relu(scores)
        total = a.sum(dim=-1, keepdim=True)
        one_hot = F.one_hot(torch.tensor(self.client_id, device=scores.device),
                            scores.shape[-1]).to(a.dtype)
        # (divide by 1 where the sum is 0, so the unused branch has a finite gradient)
        return torch.where(total > 0, a / torch.where(total > 0, total, torch.ones_like(total)),
                           one_hot)


def hn_from_jax(params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """state_dict of `LayerWeightHypernetwork` from ONE client's flax HN params.

    Args:
      params: {'embedding' [E], 'hidden{k}': {'kernel' [in, out], 'bias'},
        'heads_kernel' [L, H, N], 'heads_bias' [L, N]} (one row of the stacked params).
    """
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable, contiguous copy
    out = {"embedding": t(params["embedding"])}
    num_hidden = sum(1 for k in params if k.startswith("hidden"))
    for k in range(num_hidden):
        out[f"mlp.{2 * k}.weight"] = t(np.asarray(params[f"hidden{k}"]["kernel"]).T)
        out[f"mlp.{2 * k}.bias"] = t(params[f"hidden{k}"]["bias"])
    kernel = np.asarray(params["heads_kernel"])
    bias = np.asarray(params["heads_bias"])
    for layer in range(kernel.shape[0]):
        out[f"heads.{layer}.weight"] = t(kernel[layer].T)
        out[f"heads.{layer}.bias"] = t(bias[layer])
    return out


def hn_to_jax(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """ONE client's flax HN params (numpy) from a `LayerWeightHypernetwork` state_dict."""
    n = lambda key: state_dict[key].detach().cpu().numpy().astype(np.float32)
    out: dict[str, Any] = {"embedding": n("embedding")}
    k = 0
    while f"mlp.{2 * k}.weight" in state_dict:
        out[f"hidden{k}"] = {"kernel": np.ascontiguousarray(n(f"mlp.{2 * k}.weight").T),
                             "bias": n(f"mlp.{2 * k}.bias")}
        k += 1
    num_layers = sum(1 for key in state_dict if key.startswith("heads.") and key.endswith(".weight"))
    out["heads_kernel"] = np.stack([n(f"heads.{i}.weight").T for i in range(num_layers)])
    out["heads_bias"] = np.stack([n(f"heads.{i}.bias") for i in range(num_layers)])
    return out
