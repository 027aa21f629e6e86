"""An idiomatic PyTorch reference of pFedLA, FedAvg and some baselines (optional extra `torch`).

  model.py         CNNTarget (nn.Module) + weight converters to/from pfedla_jax's layout
  hypernetwork.py  LayerWeightHypernetwork (nn.Module) + converters
  fl.py            ClientData, batch orders, train_client, FedAvgServer, PFedLAServer
  pfedhn.py        pFedHN: CNNHyper (nn.Module), PFedHNServer + hypernetwork converters
  fedrep.py        FedRep: FedRepServer (head epochs, then body epochs; body averaged)
  ditto.py         Ditto: DittoServer (personal models pulled toward the round's global
                   model, interleaved with FedAvg's local steps)
  fedala.py        FedALA: FedALAServer (ALA before local SGD; FedAvg on the server),
                   adaptive_local_aggregation
  device.py        --torch_device (auto | cpu | cuda), TF32 off for comparisons, synchronize
  parity.py        one pFedLA round of JAX and of this reference from the same start, compared
                   (used by experiments.bench.gpu_check on the GPU)

Every server takes `device=` and runs the same code on the CPU or a CUDA device.

The parity tests (tests/test_torch_parity*.py) check one or two rounds of each against the JAX
implementation from identical weights and the identical batch order.
"""

from experiments.torch_baseline.device import (
    DEVICE_CHOICES,
    no_tf32,
    resolve_device,
    synchronize,
)
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
from experiments.torch_baseline.fedrep import FedRepServer, train_phase
from experiments.torch_baseline.model import CNNTarget, params_from_jax, params_to_jax
from experiments.torch_baseline.pfedhn import (
    CNNHyper,
    PFedHNServer,
    pfedhn_from_jax,
    pfedhn_to_jax,
)

__all__ = [
    "BatchOrder", "CNNTarget", "ClientData", "FedAvgServer", "LayerWeightHypernetwork",
    "LocalConfig", "PFedLAServer", "aggregation_units", "hn_from_jax", "hn_to_jax",
    "init_client_states", "params_from_jax", "params_to_jax", "shuffled_batches",
    "synthetic_client_data", "train_client",
]
__all__ += ["DEVICE_CHOICES", "no_tf32", "resolve_device", "synchronize"]
__all__ += ["CNNHyper", "FedRepServer", "PFedHNServer", "pfedhn_from_jax", "pfedhn_to_jax",
            "train_phase"]
