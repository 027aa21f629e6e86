"""Federated algorithms, one module each, behind one interface (base.Algorithm)."""

from pfedla_jax.algorithms.base import Algorithm, FLContext
from pfedla_jax.algorithms.fedavg import FedAvg
from pfedla_jax.algorithms.local import Local
from pfedla_jax.algorithms.pfedla import PFedLA, PFedLAConfig

ALGORITHMS = ("local", "fedavg", "pfedla")

__all__ = ["ALGORITHMS", "Algorithm", "FLContext", "FedAvg", "Local", "PFedLA", "PFedLAConfig"]
