"""FedPer (Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization
Layers", arXiv 1912.00818, 2019, Algorithms 1-2): the top layers of the model (the
personalisation layers) stay with each client; the lower layers (the base) are federated.

Per round (FedAvg with a split model):

  each participant j: starts from (global base W_B, its own personalisation layers W_P,j);
                      E local epochs of SGD on ALL its parameters jointly (cross-entropy)
                      sends the trained base W_B,j'; keeps W_P,j'
  server:             W_B <- sum_j n_j / sum n  W_B,j'  (train-set sizes; --fedper_weighting)
  non-participants keep their W_P.

What persists per client: its personalisation layers (and its BN running statistics, which
no algorithm here aggregates). The server keeps the base. This is `FedAvg.local_layers()`
= the top K_P weight layers: FedRep's split trained without FedRep's phases (FedRep trains
the head with the body frozen, then the body with the head frozen; FedPer trains both at
once). Note that FedRep with 0 head epochs is NOT FedPer: its head is frozen throughout.

Personalisation layers: `--fedper_head_layers=K_P`, the top K_P weight layers (BN layers
are not counted; a BN layer above the lowest personal weight layer is personal too);
default 1 = FC3, the last layer, as PFLlib (`model.head`), FL-bench (`classifier`) and the
FedRep repository's FedPer baseline (fc3). The paper varies K_P over the top layers of
ResNet-34 / MobileNet-v1 (its Fig. 4); Flower's FedPer baseline defaults to 2 on CIFAR.
There is no official code. BN scale/bias of the base are averaged with it.

Evaluation: '' = the latest global base with each client's own personalisation layers
(what PFLlib evaluates, after the server's broadcast); 'local' = each client's model after
its latest local training (its own trained base, before averaging).

Communication per participant and round: the base, up and down (85,822 - 850 = 84,972
floats on the E/FMNIST CNN with K_P = 1; 74,808 with K_P = 2).

Reference pitfall avoided: PFLlib's first round sends the full model and relies on the base
parameters coming first in the parameter order; here every round sends the base only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from pfedla_jax.algorithms.base import AlgorithmConfig, TableRow
from pfedla_jax.algorithms.fedavg import FedAvg
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import CLIENT_LR, IntRange
from pfedla_jax.errors import UserInputError, check_choice
from pfedla_jax.models import batchnorm_layers

WEIGHTINGS = ("train_size", "uniform")


def top_weight_layers(layer_order: tuple[str, ...], bn_layers: tuple[str, ...], k: int
                      ) -> tuple[str, ...]:
    """The top `k` weight (non-BN) layers of `layer_order`, with the BN layers above the
    lowest of them, in forward order.

    E.g. CIFAR's (Conv1, BN1, Conv2, BN2, FC1, FC2, FC3): k = 1 -> (FC3,); k = 4 ->
    (Conv2, BN2, FC1, FC2, FC3).

    Raises:
      UserInputError: k < 1, or k covers every weight layer (nothing left below).
    """
    weights = [name for name in layer_order if name not in bn_layers]
    if k < 1 or k >= len(weights):
        raise UserInputError(f"{k} top layers of a model with {len(weights)} weight layers "
                             f"({', '.join(weights)}) leave no lower layer; expected 1 to "
                             f"{len(weights) - 1}")
    lowest = layer_order.index(weights[-k])
    return tuple(layer_order[lowest:])


@dataclasses.dataclass(frozen=True)
class FedPerConfig(AlgorithmConfig):
    """FedPer's options (the defaults: the module docstring)."""

    head_layers: int = dataclasses.field(default=1, metadata={
        "help": "FedPer: K_P, the top weight layers each client keeps (personalisation "
                "layers; 1 = FC3, 2 = FC2 and FC3; BN layers not counted); the lower "
                "layers are averaged."})
    weighting: str = dataclasses.field(default="train_size", metadata={
        "help": "FedPer: the participants' weights in the average of the base: train_size "
                "(PFLlib's, FL-bench's) | uniform."})

    def validate(self) -> None:
        if self.head_layers < 1:
            raise UserInputError(f"--fedper_head_layers must be >= 1, got {self.head_layers}")
        check_choice("fedper_weighting", self.weighting, WEIGHTINGS)


@register("fedper", FedPerConfig)
class FedPer(FedAvg):
    display_name = "FedPer"
    table_rows = (TableRow("fedper", "FedPer", order=24),)
    search_space = (CLIENT_LR,
                    IntRange("head_layers", 1, 3,
                             source="FedPer paper Fig. 4 (varies K_P); Flower's baseline "
                                    "{1, 2, 3} on ResNet"))

    def __init__(self, ctx, config=None):
        super().__init__(ctx, config)
        self.local_layers()   # the split must fit the model: a one-line error now

    @functools.cached_property
    def _head(self) -> tuple[str, ...]:
        try:
            return top_weight_layers(tuple(self.ctx.layer_order),
                                     batchnorm_layers(self.ctx.model, self.ctx.input_shape),
                                     self.config.head_layers)
        except UserInputError as e:
            raise UserInputError(f"--fedper_head_layers={self.config.head_layers}: {e}") from None

    def local_layers(self) -> tuple[str, ...]:
        return self._head

    def aggregation_weights(self, data, client_ids):
        if self.config.weighting == "uniform":
            return jnp.ones(client_ids.shape, jnp.float32)
        return super().aggregation_weights(data, client_ids)

    def describe(self) -> str:
        return (f"personalisation layers {', '.join(self.local_layers())}, trained jointly with "
                f"the shared base; {self.config.weighting} weights")
