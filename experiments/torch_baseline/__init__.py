"""An idiomatic PyTorch reference of pFedLA and FedAvg (optional extra `torch`).

  model.py         CNNTarget (nn.Module) + weight converters to/from pfedla_jax's layout
  hypernetwork.py  LayerWeightHypernetwork (nn.Module) + converters
  fl.py            ClientData, batch orders, train_client, FedAvgServer, PFedLAServer

The parity test (tests/test_torch_parity.py) checks one round of each against the JAX
implementation from identical weights and the identical batch order.
"""

from experiments.torch_baseline.fl import (
    BatchOrder,
    ClientData,
    FedAvgServer,
    LocalConfig,
    PFedLAServer,
    aggregation_units,
    init_client_states,
    shuffled_batches,
    synthetic_client_data,
    train_client,
)
from experiments.torch_baseline.hypernetwork import (
    LayerWeightHypernetwork,
    hn_from_jax,
    hn_to_jax,
)
from experiments.torch_baseline.model import CNNTarget, params_from_jax, params_to_jax

__all__ = [
    "BatchOrder", "CNNTarget", "ClientData", "FedAvgServer", "LayerWeightHypernetwork",
    "LocalConfig", "PFedLAServer", "aggregation_units", "hn_from_jax", "hn_to_jax",
    "init_client_states", "params_from_jax", "params_to_jax", "shuffled_batches",
    "synthetic_client_data", "train_client",
]
