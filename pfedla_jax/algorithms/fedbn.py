"""FedBN (Li, Jiang, Zhang, Kamp, Dou, "FedBN: Federated Learning on Non-IID Features via
Local Batch Normalization", ICLR 2021, Algorithm 1; official code med-air/FedBN
`communication`).

FedAvg in which every BatchNorm tensor stays with its client: the BN scale and bias (and
the running statistics, which no algorithm here aggregates) are never averaged or sent;
every other tensor is averaged over the participants as in FedAvg. BN layers are found by
module type (`models.batchnorm_layers`), not by name.

  each participant i:  theta_i <- (global non-BN params, its own BN params); E epochs of SGD
  server:              global non-BN params <- sum_i w_i theta_i' (non-BN leaves)
                       BN params of i <- its trained ones (non-participants keep theirs)

Evaluation: '' = the global non-BN params with each client's own BN params and running
statistics (the official code's and FL-bench's test model); 'local' = each client's model
after its latest local training. On a model without BN (the E/FMNIST CNN) FedBN is FedAvg,
bit for bit (the paper's tables print '–' there), and the run's first log line says so.

Aggregation weights: `--fedbn_weighting=train_size` (default, FedAvg's and FL-bench's) or
`uniform` (the official code's 1/N); the same with the paper's equal-size clients.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from pfedla_jax.algorithms.fedavg import FedAvg
from pfedla_jax.algorithms.base import AlgorithmConfig, TableRow
from pfedla_jax.algorithms.registry import register
from pfedla_jax.errors import check_choice
from pfedla_jax.models import batchnorm_layers

WEIGHTINGS = ("train_size", "uniform")


@dataclasses.dataclass(frozen=True)
class FedBNConfig(AlgorithmConfig):
    """FedBN's options."""

    weighting: str = dataclasses.field(default="train_size", metadata={
        "help": "FedBN: the participants' weights in the average of the non-BN params: "
                "train_size (FedAvg's, FL-bench's) | uniform (the official code's 1/N)."})

    def validate(self) -> None:
        check_choice("fedbn_weighting", self.weighting, WEIGHTINGS)


@register("fedbn", FedBNConfig)
class FedBN(FedAvg):
    display_name = "FedBN"
    table_rows = (TableRow("fedbn", "FedBN", order=5, needs_batchnorm=True),)

    @functools.cached_property
    def bn_layers(self) -> tuple[str, ...]:
        """The model's BatchNorm layers (by module type)."""
        return batchnorm_layers(self.ctx.model, self.ctx.input_shape)

    def local_layers(self) -> tuple[str, ...]:
        return self.bn_layers

    def aggregation_weights(self, data, client_ids):
        if self.config.weighting == "uniform":
            return jnp.ones(client_ids.shape, jnp.float32)
        return super().aggregation_weights(data, client_ids)

    def describe(self) -> str:
        if not self.local_layers():
            return "the model has no BatchNorm layer, so FedBN is FedAvg here"
        return f"BN layers kept by each client: {', '.join(self.local_layers())}"
