"""LG-FedAvg (Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, "Think
Locally, Act Globally: Federated Learning with Local and Global Representations", arXiv
2001.01523, 2020, Algorithm 1; official code pliang279/LG-FedAvg `main_lg.py`): each client
keeps its own lower layers (a local representation); only the top layers are federated.

Per round (FedAvg with a split model, the mirror image of FedPer):

  each participant m: starts from (its own local layers theta_m^l, the global top layers
                      theta^g); E local epochs of SGD on ALL its parameters jointly
                      (cross-entropy; the paper's auxiliary local objectives are not used)
                      sends its trained theta^g_m; keeps theta_m^l
  server:             theta^g <- sum_m w_m theta^g_m  (w ∝ train-set size; --lgfedavg_weighting)

What persists per client: its local layers (and its BN running statistics). The server
keeps the global layers.

Which layers are global (`--lgfedavg_global_layers=K`, the top K weight layers, BN layers
not counted; BN layers below them are local): default 2 = FC2 and FC3, local Conv1 ... FC1
(+ BN), the paper's concept (local representation learners, a global classifier on top) and
the FedRep repository's LG baseline on CIFAR. The sources disagree: PFLlib shares FC3 only
(K = 1); the official MNIST MLP shares its last 3 of 5 layers; the official CIFAR code
shares the two CONVS (its `weight_keys` list runs fc1, fc2, fc3, conv2, conv1 and the last
two are taken) and keeps fc1-fc3 local, the opposite of the paper's split: that model is
`--algorithm=fedper --fedper_head_layers=3`. FL-bench shares the FIRST layer only. We keep
the paper's direction and REP's split (the top two layers: what is global is the
classifier, not part of the representation).

Weights: train-set sizes (PFLlib, FL-bench; FedAvg's) by default; the official code's mean
is uniform (`--lgfedavg_weighting=uniform`).

Evaluation: '' = each client's own local layers with the latest global layers (what PFLlib
evaluates, after the server's broadcast); 'local' = each client's model after its latest
local training. The official code's reported accuracy keeps each user's best model by TEST
accuracy and reports the best round (test-set selection): not done here. No FedAvg warm
start (the official code loads a FedAvg checkpoint chosen by test accuracy; PFLlib, FL-bench
and REP start from scratch).

Communication per participant and round: the global layers, up and down (FC2 + FC3 =
11,014 floats on the E/FMNIST and CIFAR-10 CNNs, 18,664 on CIFAR-100). The official code
also copies theta^g into the non-participants; here a client picks up the latest theta^g
when it next trains or is evaluated, which is the same model, and only participants' bytes
are counted.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from pfedla_jax.algorithms.base import AlgorithmConfig, TableRow
from pfedla_jax.algorithms.fedavg import FedAvg
from pfedla_jax.algorithms.fedper import WEIGHTINGS, top_weight_layers
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import CLIENT_LR, IntRange
from pfedla_jax.errors import UserInputError, check_choice
from pfedla_jax.models import batchnorm_layers


@dataclasses.dataclass(frozen=True)
class LGFedAvgConfig(AlgorithmConfig):
    """LG-FedAvg's options (the defaults: the module docstring)."""

    global_layers: int = dataclasses.field(default=2, metadata={
        "help": "LG-FedAvg: K, the top weight layers that are averaged (global; 2 = FC2 and "
                "FC3, 1 = FC3; BN layers not counted); each client keeps the layers below."})
    weighting: str = dataclasses.field(default="train_size", metadata={
        "help": "LG-FedAvg: the participants' weights in the average of the global layers: "
                "train_size (PFLlib's, FL-bench's) | uniform (the official code's)."})

    def validate(self) -> None:
        if self.global_layers < 1:
            raise UserInputError(f"--lgfedavg_global_layers must be >= 1, got {self.global_layers}")
        check_choice("lgfedavg_weighting", self.weighting, WEIGHTINGS)


@register("lgfedavg", LGFedAvgConfig)
class LGFedAvg(FedAvg):
    display_name = "LG-FedAvg"
    table_rows = (TableRow("lgfedavg", "LG-FedAvg", order=25),)
    search_space = (CLIENT_LR,
                    IntRange("global_layers", 1, 3,
                             source="the references' splits: PFLlib 1, FedRep's LG baseline 2, "
                                    "the official MNIST MLP 3"))

    def __init__(self, ctx, config=None):
        super().__init__(ctx, config)
        self.local_layers()   # the split must fit the model: a one-line error now

    @functools.cached_property
    def global_layers(self) -> tuple[str, ...]:
        """The averaged (top) layers."""
        try:
            return top_weight_layers(tuple(self.ctx.layer_order),
                                     batchnorm_layers(self.ctx.model, self.ctx.input_shape),
                                     self.config.global_layers)
        except UserInputError as e:
            raise UserInputError(f"--lgfedavg_global_layers={self.config.global_layers}: {e}") from None

    def local_layers(self) -> tuple[str, ...]:
        return tuple(name for name in self.ctx.layer_order if name not in self.global_layers)

    def aggregation_weights(self, data, client_ids):
        if self.config.weighting == "uniform":
            return jnp.ones(client_ids.shape, jnp.float32)
        return super().aggregation_weights(data, client_ids)

    def describe(self) -> str:
        return (f"local layers {', '.join(self.local_layers())}; global layers "
                f"{', '.join(self.global_layers)} ({self.config.weighting} weights)")
