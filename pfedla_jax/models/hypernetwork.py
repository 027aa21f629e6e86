"""The per-client pFedLA hypernetwork HN_i(v_i; psi_i) -> alpha_i (paper Eqs. 3-4).

One hypernetwork per client lives on the server. Its input is a trainable embedding v_i;
an MLP maps it to a hidden vector; one linear head per aggregation layer emits N scores
(one per stored client); a normalisation turns each head's scores into a distribution over
clients, so every column of alpha_i (here: every row of the returned [L, N]) sums to 1.

The paper defers the architecture to its supplementary material, which is not public.
The shape follows the public (unofficial) code, KarhouTam/pFedLA and FL-bench
src/server/pfedla.py: v_i in R^100, 3 x (Linear 100, ReLU), heads Linear(100 -> N). Its
output rule, U(0, 1) heads with zero bias, ReLU then divide by the sum, one-hot(self) if the
sum is 0, is `--hn_normalization=relu` (`--hn_head_init=auto` then gives U(0, 1) heads); the
default is a softmax of zero-initialised heads (every alpha starts uniform, no row can die):
BUILD_NOTES (pFedLA: the hypernetwork step).

All clients' hypernetworks are stored stacked (leading client axis) and applied with vmap.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pfedla_jax.errors import UserInputError, check_choice
from pfedla_jax.models.cnn import torch_default_uniform

NORMALIZATIONS = ("relu", "softmax")
HEAD_INITS = ("auto", "uniform", "torch", "zeros")


def _flag(name: str, text: str) -> dict:
    return {"alias": name, "help": f"pFedLA: {text}"}


@dataclasses.dataclass(frozen=True)
class HNConfig:
    """The hypernetwork's shape (CLI flag names in the metadata)."""

    embed_dim: int = dataclasses.field(default=100, metadata=_flag("hn_embed_dim", "embedding size."))
    hidden_dim: int = dataclasses.field(default=100, metadata=_flag("hn_hidden_dim", "hidden width."))
    num_hidden: int = dataclasses.field(default=3, metadata=_flag("hn_num_hidden", "hidden layers."))
    normalization: str = dataclasses.field(default="softmax", metadata=_flag(
        "hn_normalization", "softmax (default: every weight stays > 0, no row can die) | "
        "relu (ReLU then divide by sum, public code)."))
    head_init: str = dataclasses.field(default="auto", metadata=_flag(
        "hn_head_init", "auto (zeros under softmax, uniform under relu) | uniform (U(0,1) "
        "heads, public code) | torch (PyTorch's default) | zeros (every alpha starts uniform; "
        "softmax only)."))

    @property
    def resolved_head_init(self) -> str:
        """The head initialisation 'auto' stands for under this normalisation."""
        if self.head_init != "auto":
            return self.head_init
        return "zeros" if self.normalization == "softmax" else "uniform"

    def validate(self) -> None:
        check_choice("hn_normalization", self.normalization, NORMALIZATIONS)
        check_choice("hn_head_init", self.head_init, HEAD_INITS)
        if self.resolved_head_init == "zeros" and self.normalization == "relu":
            raise UserInputError(
                "--hn_head_init=zeros needs --hn_normalization=softmax: ReLU of all-zero scores "
                "leaves only the keep-own-layer fallback, so every alpha row would start one-hot "
                "and get no gradient")
        for name in ("embed_dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--hn_{name} must be >= 1, got {getattr(self, name)}")
        if self.num_hidden < 0:
            raise UserInputError(f"--hn_num_hidden must be >= 0, got {self.num_hidden}")


def normalize_scores(scores: jax.Array, self_index: jax.Array, normalization: str) -> jax.Array:
    """Scores [L, N] -> alpha [L, N], each row a distribution over the N clients."""
    if normalization == "softmax":
        return jax.nn.softmax(scores, axis=-1)
    a = jax.nn.relu(scores)
    total = jnp.sum(a, axis=-1, keepdims=True)
    one_hot = jax.nn.one_hot(self_index, scores.shape[-1], dtype=scores.dtype)
    # all-zero head output: fall back to keeping the client's own layer. Non-finite scores
    # (a diverged hypernetwork) must stay non-finite so the run stops instead of silently
    # turning into local training.
    fallback = jnp.where(jnp.isfinite(total), one_hot, jnp.nan)
    return jnp.where(total > 0, a / jnp.where(total > 0, total, 1.0), fallback)


class LayerWeightHypernetwork(nn.Module):
    """HN_i: embedding v_i -> MLP -> one head per layer -> alpha_i [L, N]."""

    num_clients: int
    num_layers: int
    config: HNConfig = HNConfig()

    @nn.compact
    def __call__(self, self_index: jax.Array, return_scores: bool = False) -> jax.Array:
        """alpha_i [L, N] for client `self_index` (used by the one-hot fallback).

        With return_scores=True, the head outputs before normalisation instead.
        """
        cfg = self.config
        v = self.param("embedding", nn.initializers.normal(1.0), (cfg.embed_dim,))
        h = v
        fan_in = cfg.embed_dim
        for i in range(cfg.num_hidden):
            h = nn.Dense(cfg.hidden_dim, name=f"hidden{i}",
                         kernel_init=torch_default_uniform(fan_in),
                         bias_init=torch_default_uniform(fan_in))(h)
            h = nn.relu(h)
            fan_in = cfg.hidden_dim
        head_init = cfg.resolved_head_init
        if head_init == "uniform":
            kernel_init = nn.initializers.uniform(1.0)  # U(0, 1)
            bias_init = nn.initializers.zeros
        elif head_init == "zeros":  # alpha starts exactly uniform (softmax)
            kernel_init = bias_init = nn.initializers.zeros
        else:
            kernel_init = torch_default_uniform(fan_in)
            bias_init = torch_default_uniform(fan_in)
        heads_kernel = self.param("heads_kernel", lambda k, s: jax.vmap(
            lambda kk: kernel_init(kk, s[1:]))(jax.random.split(k, s[0])),
            (self.num_layers, fan_in, self.num_clients))
        heads_bias = self.param("heads_bias", lambda k, s: jax.vmap(
            lambda kk: bias_init(kk, s[1:]))(jax.random.split(k, s[0])),
            (self.num_layers, self.num_clients))
        scores = jnp.einsum("h,lhn->ln", h, heads_kernel,
                            precision=jax.lax.Precision.HIGHEST) + heads_bias
        if return_scores:
            return scores
        return normalize_scores(scores, self_index, cfg.normalization)


def init_hypernetworks(hn: LayerWeightHypernetwork, key: jax.Array, num: int) -> Any:
    """Stacked params of `num` independent hypernetworks, leaves [num, ...]."""
    keys = jax.random.split(key, num)
    return jax.vmap(lambda k: hn.init(k, jnp.int32(0))["params"])(keys)


def stacked_alpha(hn: LayerWeightHypernetwork, hn_params: Any, client_ids: jax.Array) -> jax.Array:
    """alpha [S, L, N] of clients `client_ids` from their stacked hypernetwork params [S, ...]."""
    return jax.vmap(lambda p, i: hn.apply({"params": p}, i))(hn_params, client_ids)
