"""FedALA (Zhang, Hua, Wang, Song, Xue, Ma, Guan, AAAI 2023) written as PyTorch FL code.

The PyTorch reference of `pfedla_jax/algorithms/fedala.py`, written the way a PyTorch user
would (the official TsingZ0/FedALA `utils/ALA.py` structure, not a translation of the
stacked JAX engine): one `nn.Module` reused for every client, clients trained one after
another, the ALA weights a list of tensors per client updated in place under
`torch.no_grad()` from the `.grad` of the temporarily mixed parameters, the lower
parameters frozen with `requires_grad_(False)`, the server holding state_dicts and averaging
them in Python loops.

Semantics (paper Eqs. 1-2; official `ALA.adaptive_local_aggregation`, `clientALA`,
`serverALA`):

  server state: the global params Theta; client state: its model theta_i (its last
  trained state_dict, BN running statistics included), its ALA weights W_i (the top p
  layers' parameters, ones at first), `trained` (it has trained once) and `start_phase`
  round, for each participant i (one after another):
      if i never trained: thetahat = Theta (the official first-round skip)
      else: ALA on the client's sample batches (given: `ala_order`):
          thetahat = Theta on the lower layers, theta_i + (Theta - theta_i) * W_i on the top
          per epoch, per batch: loss(thetahat) backward;
              W_i = clamp(W_i - eta * thetahat.grad * (Theta - theta_i), 0, 1);
              thetahat(top) = theta_i + (Theta - theta_i) * W_i
          the epoch's loss = its last batch's (taken before that batch's step)
          start phase: until len(losses) > num_pre_loss and
              np.std(losses[-num_pre_loss:]) < threshold, at most max_start_epochs epochs;
          afterwards one epoch; start_phase = False after the first ALA
          (train-mode forwards; their BN running-statistic updates are discarded)
      local SGD from thetahat with the client's own BN statistics; theta_i <- trained
  server: Theta = sum_i n_i theta_i / sum_i n_i over the participants

Layers are the model's modules that hold parameters, in registration (= forward) order
(CNNTarget: conv1, bn1, conv2, bn2, fc1, fc2, fc3; the BN ones only with use_bn); the top p
are mixed, the others take Theta.

Differences from the official code: the ALA sample is given (`ala_order`, so that a parity
test can feed the JAX sample) instead of a contiguous random window; only participants run
ALA; the first round is a per-client flag (the official `sum(Theta[0] - theta[0]) == 0`
test fails under independent initialisation); the start phase is capped; the ALA batches
keep a partial last batch (drop_last=False). Evaluation ('' the trained theta_i; 'ala'
`mixed(i)`: Eq. 1 with the latest Theta and the stored W_i, without a W step) is the JAX
implementation's; the official code evaluates thetahat after that round's ALA step.

Typical use:

    data = synthetic_client_data(num_clients=N, examples_per_client=200)
    order = shuffled_batches(data, batch_size=32, local_epochs=E)
    ala = shuffled_batches(data, batch_size=32, local_epochs=1)   # any sample batches
    server = FedALAServer(CNNTarget(1, 10), data, order, LocalConfig(lr=0.05), ala_order=ala)
    info = server.round(0, range(N))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.torch_baseline.fl import (
    BatchOrder,
    ClientData,
    LocalConfig,
    _Server,
    clone_state,
    train_client,
)


def parameter_layers(model: nn.Module) -> list[list[str]]:
    """The parameter names of each module that holds parameters, in registration order."""
    layers = []
    for prefix, module in model.named_modules():
        names = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
        if names:
            layers.append(names)
    return layers


def adaptive_local_aggregation(model: nn.Module, data: ClientData, batches: Sequence[torch.Tensor],
                               global_params: dict, local_params: dict, weights: list[torch.Tensor],
                               top_names: Sequence[str], *, eta: float, start_phase: bool,
                               threshold: float, num_pre_loss: int, max_epochs: int) -> int:
    """The ALA module on `model`, in place: on return `model` holds thetahat.

    `model` must hold the client's BN buffers; its parameters are overwritten (lower: Theta,
    top: the mix). `weights` (one tensor per name of `top_names`) are updated in place.
    Returns the number of epochs run.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(global_params[name])
        for name, w in zip(top_names, weights):
            params[name].copy_(local_params[name] + (global_params[name] - local_params[name]) * w)
    for name, p in params.items():
        p.requires_grad_(name in top_names)
    model.train()
    device = data.images.device
    batches = [b for b in batches if len(b)]
    losses, epochs = [], 0
    try:
        while True:
            for idx in batches:
                idx = idx.to(device)
                model.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
                loss.backward()
                with torch.no_grad():
                    for name, w in zip(top_names, weights):
                        diff = global_params[name] - local_params[name]
                        w.copy_(torch.clamp(w - eta * (params[name].grad * diff), 0, 1))
                        params[name].copy_(local_params[name] + diff * w)
            losses.append(loss.item())
            epochs += 1
            if not start_phase:
                break
            if len(losses) > num_pre_loss and np.std(losses[-num_pre_loss:]) < threshold:
                break
            if epochs >= max_epochs:
                break
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
    return epochs


class FedALAServer(_Server):
    """FedALA: ALA before local training, FedAvg on the server.

    Args: those of `fl._Server` (model, data, batch_order, local, client_states, init,
      device), and
      ala_order: (client_id, round_idx) -> the client's ALA sample as minibatches.
      layers: p, the top layers mixed by W.
      eta, threshold, num_pre_loss, max_start_epochs: the ALA module's options.
      global_params: the initial Theta (default: the clients' params averaged with
        train-set weights).
    """

    def __init__(self, model: nn.Module, data: ClientData, batch_order: BatchOrder,
                 local: LocalConfig = LocalConfig(), *, ala_order: BatchOrder, layers: int = 1,
                 eta: float = 1.0, threshold: float = 0.1, num_pre_loss: int = 10,
                 max_start_epochs: int = 50, client_states: list[dict] | None = None,
                 global_params: dict | None = None, init: str = "common",
                 device: str | torch.device | None = None):
        super().__init__(model, data, batch_order, local, client_states, init, device)
        groups = parameter_layers(model)
        if not 1 <= layers <= len(groups):
            raise ValueError(f"layers must be in [1, {len(groups)}], got {layers}")
        self.top_names = [n for group in groups[-layers:] for n in group]
        self.ala_order = ala_order
        self.eta, self.threshold = eta, threshold
        self.num_pre_loss, self.max_start_epochs = num_pre_loss, max_start_epochs
        if global_params is None:
            global_params = self.average(list(range(self.num_clients)), self.client_states)
        self.global_params = {k: global_params[k].detach().to(self.device, copy=True)
                              for k in self.param_names}
        self.weights = [[torch.ones_like(self.client_states[i][n]) for n in self.top_names]
                        for i in range(self.num_clients)]
        self.trained = [False] * self.num_clients
        self.start_phase = [True] * self.num_clients

    def average(self, client_ids: Sequence[int], states: Sequence[dict]) -> dict:
        """sum_s w_s theta_s with w_s = n_s / sum n (trainable params only)."""
        counts = [float(self.data.train_count(i)) for i in client_ids]
        total = sum(counts)
        out = {}
        for key in self.param_names:
            acc = torch.zeros_like(states[0][key])
            for n, state in zip(counts, states):
                acc = acc + (n / total) * state[key]
            out[key] = acc
        return out

    def mixed(self, client_id: int) -> dict:
        """Eq. 1 with the current Theta and the stored W (Theta if the client never
        trained), with the client's BN statistics: the 'ala' view."""
        state = clone_state(self.client_states[client_id])
        state.update(clone_state(self.global_params))
        if self.trained[client_id]:
            for name, w in zip(self.top_names, self.weights[client_id]):
                local = self.client_states[client_id][name]
                state[name] = local + (self.global_params[name] - local) * w
        return state

    def client_update(self, client_id: int, round_idx: int):
        """ALA, then local training. Returns (trained state_dict, loss_sum, seen, ALA epochs)."""
        own = self.client_states[client_id]
        self.model.load_state_dict(own)   # its BN buffers (and params, overwritten below)
        epochs = 0
        if not self.trained[client_id]:
            self.model.load_state_dict({**own, **self.global_params})
        else:
            local = {k: own[k] for k in self.param_names}
            epochs = adaptive_local_aggregation(
                self.model, self.data, list(self.ala_order(client_id, round_idx)),
                self.global_params, local, self.weights[client_id], self.top_names, eta=self.eta,
                start_phase=self.start_phase[client_id], threshold=self.threshold,
                num_pre_loss=self.num_pre_loss, max_epochs=self.max_start_epochs)
            self.start_phase[client_id] = False
            start = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                     if k in self.param_names}
            # the ALA forwards' BN updates are discarded: thetahat + the client's own buffers
            self.model.load_state_dict({**own, **start})
        loss_sum, seen = train_client(self.model, self.data, self.batch_order(client_id, round_idx),
                                      self.local)
        self.trained[client_id] = True
        return clone_state(self.model.state_dict()), loss_sum, seen, epochs

    def round(self, round_idx: int, participants: Iterable[int]) -> dict:
        """One round; returns {'loss_sum', 'num_examples', 'ala_epochs'}, per participant."""
        participants = [int(i) for i in participants]
        info = {"loss_sum": [], "num_examples": [], "ala_epochs": []}
        trained = []
        for i in participants:
            state, loss_sum, seen, epochs = self.client_update(i, round_idx)
            self.client_states[i] = state
            trained.append(state)
            for key, value in (("loss_sum", loss_sum), ("num_examples", seen), ("ala_epochs", epochs)):
                info[key].append(value)
        self.global_params = self.average(participants, trained)
        return info
