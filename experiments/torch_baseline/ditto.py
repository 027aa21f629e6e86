"""Ditto (Li, Hu, Beirami, Smith, ICML 2021, Algorithm 1) written as PyTorch FL code.

The PyTorch reference of `pfedla_jax/algorithms/ditto.py`, written the way a PyTorch user
would (not a translation of the stacked JAX engine): two `nn.Module`s reused for every
client (the global model's local copy and the personal model), clients trained one after
another, a fresh `torch.optim.SGD` per model and round, the proximal gradient added to the
personal model's `.grad` before its optimizer step, and the server holding state_dicts and
averaging them in Python loops.

Semantics (the official code litian96/ditto, flearn/trainers_MTL/ditto.py):

  server state: the global model w; client state: its personal model v_k (params and BN
  running statistics) and the BN running statistics of the global model's training on it
  round, for each participant k (one after another), w^t the round's global model:
      load w^t (+ k's global-model BN statistics) into the global module, v_k into the
      personal module
      for each minibatch of k's local training:
          personal step: v <- v - lr (grad F_k(v; batch) + lam (v - w^t))
          global step:   w <- w - lr grad F_k(w; batch)
      keep v_k <- v (with its BN statistics) and the global module's BN statistics
  server: w <- sum_k n_k w_k / sum_k n_k over the participants (FedAvg)
  evaluation '': v_k with its own BN statistics; 'global': w with k's global-model BN
  statistics

Differences from the official code: PyTorch instead of TensorFlow 1; the server's weighted
mean of the uploads (the official code samples clients with probability ∝ n_k and takes the
simple mean of the updates); no --dynamic_lam, attacks or robust aggregation. The reported
train loss is the personal model's (the official code logs the global model's).

Typical use:

    data = synthetic_client_data(num_clients=N, examples_per_client=200)
    order = shuffled_batches(data, batch_size=32, local_epochs=E)
    server = DittoServer(CNNTarget(1, 10), data, order, LocalConfig(lr=0.05), lam=1.0)
    info = server.round(0, range(N))
    model_k = server.personal_states[k]       # state_dict: v_k and its BN statistics
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from experiments.torch_baseline.fl import (
    BatchOrder,
    ClientData,
    FedAvgServer,
    LocalConfig,
    clone_state,
)


class DittoServer(FedAvgServer):
    """Ditto: FedAvg for the global model, a personal model per client pulled toward it.

    Args: those of `fl.FedAvgServer` (model, data, batch_order, local, client_states,
      global_params, init, device), and
      lam: the weight of lam/2 ||v - w^t||^2.
      personal_states: each client's initial personal model, state_dicts (default: copies of
        `client_states`, i.e. each client's initial model).

    Attributes: those of FedAvgServer (`client_states` hold each client's global-model BN
    statistics and its latest trained copy of w), and `personal_states`, `personal_model`
    (the second nn.Module).
    """

    def __init__(self, model: nn.Module, data: ClientData, batch_order: BatchOrder,
                 local: LocalConfig = LocalConfig(), *, lam: float = 1.0,
                 client_states: list[dict] | None = None, global_params: dict | None = None,
                 personal_states: list[dict] | None = None, init: str = "common",
                 device: str | torch.device | None = None):
        super().__init__(model, data, batch_order, local, client_states=client_states,
                         global_params=global_params, init=init, device=device)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = lam
        self.personal_model = copy.deepcopy(self.model)
        states = personal_states or self.client_states
        if len(states) != self.num_clients:
            raise ValueError(f"{len(states)} personal states for {self.num_clients} clients")
        self.personal_states = [clone_state(s, self.device) for s in states]

    def _sgd(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.local.lr, momentum=self.local.momentum,
                               weight_decay=self.local.weight_decay)

    def ditto_update(self, client_id: int, round_idx: int):
        """Client `client_id`'s round: (trained global state_dict, personal state_dict,
        personal loss sum, examples seen)."""
        anchor = {k: v.detach().clone() for k, v in self.global_params.items()}
        state = dict(self.client_states[client_id])   # its global-model BN statistics
        state.update(anchor)
        self.model.load_state_dict(state)
        self.personal_model.load_state_dict(self.personal_states[client_id])
        self.model.train()
        self.personal_model.train()
        opt_w, opt_v = self._sgd(self.model), self._sgd(self.personal_model)
        device = self.data.images.device
        loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0
        for idx in self.batch_order(client_id, round_idx):
            if len(idx) == 0:   # padding step: nothing to train on
                continue
            idx = idx.to(device, non_blocking=True)
            x, y = self.data.images[idx], self.data.labels[idx]
            # personal step: the loss gradient plus lam (v - w^t), then SGD
            opt_v.zero_grad()
            loss = F.cross_entropy(self.personal_model(x), y)
            loss.backward()
            with torch.no_grad():
                for name, p in self.personal_model.named_parameters():
                    p.grad.add_(p - anchor[name], alpha=self.lam)
            opt_v.step()
            loss_sum += loss.detach().double() * len(idx)
            seen += len(idx)
            # global step: FedAvg's local SGD on the same minibatch
            opt_w.zero_grad()
            F.cross_entropy(self.model(x), y).backward()
            opt_w.step()
        return (clone_state(self.model.state_dict()), clone_state(self.personal_model.state_dict()),
                float(loss_sum.item()), seen)

    def round(self, round_idx: int, participants: Iterable[int]) -> dict:
        """One round; returns {'loss_sum': [...], 'num_examples': [...]} per participant."""
        participants = [int(i) for i in participants]
        trained, losses, seens = [], [], []
        for i in participants:
            state, personal, loss_sum, seen = self.ditto_update(i, round_idx)
            self.client_states[i] = state
            self.personal_states[i] = personal
            trained.append(state)
            losses.append(loss_sum)
            seens.append(seen)
        self.global_params = self.average(participants, trained)
        return {"loss_sum": losses, "num_examples": seens}

    def global_view(self, client_id: int) -> dict:
        """The evaluated 'global' model of a client: w with its global-model BN statistics."""
        state = clone_state(self.client_states[client_id])
        state.update(clone_state(self.global_params))
        return state
