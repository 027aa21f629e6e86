"""FedAvg and pFedLA rounds written as idiomatic PyTorch FL code.

This is the baseline a PyTorch user would write, not a translation of pfedla_jax's stacked
(vmapped) engine: one `nn.Module` is reused for every client, clients are trained one after
another with a fresh `torch.optim.SGD` per round, the server stores every client's model as
a state_dict and aggregates in Python loops over layers and clients, and the pFedLA
hypernetwork step is `torch.autograd.grad` through the aggregation (not a closed form).

Semantics (the same as pfedla_jax; see pfedla_jax/algorithms/{pfedla,fedavg}.py):

  pFedLA round, for each participant i:
      alpha_i  = HN_i()                                  [L, N], rows sum to 1
      theta_bar_i[l] = sum_j alpha_i[l, j] * theta_j[l]  for every aggregation unit l
      client i trains from theta_bar_i (with its own BN running statistics)
      delta_i  = trained_i - theta_bar_i
      psi_i   += hn_lr * (d theta_bar_i / d psi_i)^T delta_i    ('descent'; 'flbench': -=)
      store theta_i <- trained_i, BN statistics <- the trained ones
    'synchronous': every participant aggregates from one snapshot taken at the start of the
    round and the stored models are replaced at the end; 'sequential': one client after
    another, each aggregating from the models already updated earlier in the round.
    HeurpFedLA (heur_k = k > 0): the k units with the largest self-weight alpha_i[l, i] are
    taken from client i's own stored model (not aggregated; no HN gradient through them).
  FedAvg round: participants train from the global model (each with its own BN
    statistics); the global model becomes their average weighted by training-set size;
    BN running statistics stay with the clients.

Masking/partial batches: a batch is a LongTensor of example indices; the loss is the mean
cross-entropy over it, so a partial last batch is simply a shorter tensor, and an empty
tensor (a padding step of a client smaller than the cohort's largest) is skipped.

Devices: every server takes `device=` ('auto', 'cpu', 'cuda', a torch.device; default:
the model's device) and runs the same code there: the model, the data tensors, the clients'
state_dicts and the hypernetworks are moved to it; batches are CPU index tensors, moved per
step. Returned tensors (alpha, state_dicts) live on that device. See device.py (and its
`no_tf32()` for comparisons with JAX on a GPU).

Typical use (synthetic data, N clients, S local steps):

    data = synthetic_client_data(num_clients=N, examples_per_client=200)
    order = shuffled_batches(data, batch_size=32, local_steps=S)
    server = PFedLAServer(CNNTarget(1, 10), data, order, LocalConfig(lr=0.05), device="auto")
    info = server.round(0, range(N))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.torch_baseline.device import resolve_device
from experiments.torch_baseline.hypernetwork import LayerWeightHypernetwork

# (client_id, round_idx) -> that client's minibatches this round, each a LongTensor of
# indices into ClientData.images/labels; an empty tensor is a padding step (skipped).
BatchOrder = Callable[[int, int], Iterable[torch.Tensor]]

GRANULARITIES = ("layer", "tensor")
SEMANTICS = ("synchronous", "sequential")
HN_SIGNS = ("descent", "flbench")


# ---------------------------------------------------------------------------- data
@dataclasses.dataclass
class ClientData:
    """All clients' training data.

    Attributes:
      images: float32 [M, C, H, W], normalised.
      labels: int64 [M].
      train_indices: per client, a LongTensor of indices into images/labels (kept on the
        CPU: batch orders are made there).
    """

    images: torch.Tensor
    labels: torch.Tensor
    train_indices: list[torch.Tensor]

    @property
    def num_clients(self) -> int:
        return len(self.train_indices)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> ClientData:
        """This data with images and labels on `device` (the same object if already there)."""
        device = torch.device(device)
        if self.images.device == device and self.labels.device == device:
            return self
        return ClientData(images=self.images.to(device), labels=self.labels.to(device),
                          train_indices=self.train_indices)

    def train_count(self, client_id: int) -> int:
        return int(self.train_indices[client_id].numel())

    @classmethod
    def from_arrays(cls, images_nhwc: np.ndarray, labels: np.ndarray,
                    train_indices: Sequence[np.ndarray], mean=None, std=None) -> ClientData:
        """From numpy: uint8 (or float) NHWC images, normalised as (x / 255 - mean) / std.

        (pfedla_jax's ClientStore gives images, labels, train_idx[i, :train_count[i]],
        mean and std in exactly these forms.)
        """
        x = np.asarray(images_nhwc)
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        if mean is not None:
            x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        return cls(images=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                   labels=torch.from_numpy(np.array(labels, np.int64)),
                   train_indices=[torch.from_numpy(np.array(t, np.int64)) for t in train_indices])


def synthetic_client_data(num_clients: int, examples_per_client: int,
                          image_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
                          seed: int = 0) -> ClientData:
    """Learnable synthetic data: per-class random templates plus noise, random labels."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn((num_classes,) + tuple(image_shape), generator=g)
    m = num_clients * examples_per_client
    labels = torch.randint(0, num_classes, (m,), generator=g)
    images = templates[labels] + 0.5 * torch.randn((m,) + tuple(image_shape), generator=g)
    indices = list(torch.arange(m).split(examples_per_client))
    return ClientData(images=images, labels=labels, train_indices=indices)


def shuffled_batches(data: ClientData, batch_size: int = 32, local_epochs: int = 1,
                     local_steps: int = 0, seed: int = 0) -> BatchOrder:
    """A DataLoader-style order: reshuffled every epoch, last batch partial (no drop_last).

    With local_steps > 0, exactly that many batches (epochs repeat as needed); otherwise
    local_epochs full passes. The shuffle is seeded by (seed, round, client).
    """

    def order(client_id: int, round_idx: int) -> Iterable[torch.Tensor]:
        state = np.random.SeedSequence([seed, round_idx, client_id]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(state))
        loader = torch.utils.data.DataLoader(data.train_indices[client_id], batch_size=batch_size,
                                             shuffle=True, generator=g)
        step, epoch = 0, 0
        while (step < local_steps) if local_steps > 0 else (epoch < local_epochs):
            for batch in loader:
                if local_steps > 0 and step >= local_steps:
                    break
                yield batch
                step += 1
            epoch += 1

    return order


# ---------------------------------------------------------------------------- clients
@dataclasses.dataclass(frozen=True)
class LocalConfig:
    """Client optimisation: torch.optim.SGD, rebuilt every round."""

    lr: float = 0.005
    momentum: float = 0.0
    weight_decay: float = 0.0


def train_client(model: nn.Module, data: ClientData, batches: Iterable[torch.Tensor],
                 config: LocalConfig) -> tuple[float, int]:
    """Local SGD on `model` in place; returns (sum of per-example losses, examples seen).

    `model` and `data` on the same device; each batch (a LongTensor of indices, usually on
    the CPU) is moved there. The loss sum is accumulated on the device and read once at the
    end (no host synchronisation per step on a GPU).
    """
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    device = data.images.device
    loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0
    for idx in batches:
        if len(idx) == 0:  # padding step: nothing to train on
            continue
        idx = idx.to(device, non_blocking=True)
        x, y = data.images[idx], data.labels[idx]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * len(idx)
        seen += len(idx)
    return float(loss_sum.item()), seen


def init_client_states(model: nn.Module, num_clients: int, init: str = "common") -> list[dict]:
    """Every client's initial state_dict: one common model (the model's current weights),
    or one fresh init each ('independent' re-initialises `model` in place)."""
    states = []
    for _ in range(num_clients):
        if init == "independent":
            for m in model.modules():
                if m is not model and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        elif init != "common":
            raise ValueError(f"init must be 'common' or 'independent', got {init!r}")
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def clone_state(state: dict, device: torch.device | None = None) -> dict:
    """A detached copy of a state_dict (on `device`, default: where each tensor is)."""
    if device is None:
        return {k: v.detach().clone() for k, v in state.items()}
    return {k: v.detach().to(device, copy=True) for k, v in state.items()}


class _Server:
    """What both servers share: one model object, the data, the batch order, the clients.

    Args (of both servers):
      model: the client model (one object, reused for every client).
      data: the clients' data.
      batch_order: which minibatches each client trains on per round.
      local: client optimisation.
      client_states: initial state_dicts (default: from `init`), on any device.
      init: 'common' or 'independent' (when client_states is None).
      device: where everything runs: 'auto', 'cpu', 'cuda[:K]' or a torch.device (None: the
        model's device). The model is moved there (in place), the data and client states
        copied there. Raises UserInputError (device.resolve_device) for a CUDA device
        without CUDA.

    Attributes: model, data (on `device`), batch_order, local, num_clients, param_names,
    client_states (list of state_dicts on `device`), device.
    """

    def __init__(self, model: nn.Module, data: ClientData, batch_order: BatchOrder,
                 local: LocalConfig, client_states: list[dict] | None, init: str,
                 device: str | torch.device | None = None):
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.data = data.to(self.device)
        self.batch_order = batch_order
        self.local = local
        self.num_clients = data.num_clients
        self.param_names = [name for name, _ in model.named_parameters()]
        states = client_states or init_client_states(model, self.num_clients, init)
        if len(states) != self.num_clients:
            raise ValueError(f"{len(states)} client states for {self.num_clients} clients")
        self.client_states = [clone_state(s, self.device) for s in states]

    def client_update(self, client_id: int, start_params: dict, round_idx: int):
        """Trains client `client_id` from `start_params` (+ its own BN statistics).

        Returns (trained state_dict, loss_sum, examples seen).
        """
        state = dict(self.client_states[client_id])  # buffers: its own BN running stats
        state.update({k: v.detach() for k, v in start_params.items()})
        self.model.load_state_dict(state)
        loss_sum, seen = train_client(self.model, self.data,
                                      self.batch_order(client_id, round_idx), self.local)
        return clone_state(self.model.state_dict()), loss_sum, seen


# ---------------------------------------------------------------------------- FedAvg
class FedAvgServer(_Server):
    """FedAvg: clients train from the global model; weighted average by train counts.

    Args: those of `_Server`, and
      global_params: initial global params (default: the weighted average of the clients').
    """

    def __init__(self, model: nn.Module, data: ClientData, batch_order: BatchOrder,
                 local: LocalConfig = LocalConfig(), *, client_states: list[dict] | None = None,
                 global_params: dict | None = None, init: str = "common",
                 device: str | torch.device | None = None):
        super().__init__(model, data, batch_order, local, client_states, init, device)
        if global_params is None:
            global_params = self.average(list(range(self.num_clients)), self.client_states)
        self.global_params = {k: global_params[k].detach().to(self.device, copy=True)
                              for k in self.param_names}

    def average(self, client_ids: Sequence[int], states: Sequence[dict]) -> dict:
        """sum_s w_s theta_s with w_s = n_s / sum n (trainable params only)."""
        counts = torch.tensor([self.data.train_count(i) for i in client_ids], dtype=torch.float32,
                              device=self.device)
        weights = counts / counts.sum()
        return {k: sum(w * s[k] for w, s in zip(weights, states)) for k in self.param_names}

    def round(self, round_idx: int, participants: Iterable[int]) -> dict:
        """One round; returns {'loss_sum': [...], 'num_examples': [...]} per participant."""
        participants = [int(i) for i in participants]
        trained, losses, seens = [], [], []
        for i in participants:
            state, loss_sum, seen = self.client_update(i, self.global_params, round_idx)
            self.client_states[i] = state
            trained.append(state)
            losses.append(loss_sum)
            seens.append(seen)
        self.global_params = self.average(participants, trained)
        return {"loss_sum": losses, "num_examples": seens}


# ---------------------------------------------------------------------------- pFedLA
def aggregation_units(model: nn.Module, granularity: str = "layer") -> list[list[str]]:
    """The aggregation units (forward order): parameter names sharing one alpha.

    'layer': all parameters of one module (conv/linear weight+bias; a BatchNorm's
    weight+bias is a unit of its own); 'tensor': every parameter tensor alone.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    names = [name for name, _ in model.named_parameters()]
    if granularity == "tensor":
        return [[n] for n in names]
    units: dict[str, list[str]] = {}
    for n in names:
        units.setdefault(n.rsplit(".", 1)[0], []).append(n)
    return list(units.values())


class PFedLAServer(_Server):
    """pFedLA / HeurpFedLA with one hypernetwork (and one optimizer) per client.

    Args: those of `_Server`, and
      hypernetworks: one LayerWeightHypernetwork per client (default: fresh ones built
        with `hn_kwargs`).
      hn_lr, hn_optimizer ('sgd' | 'adam'), hn_momentum: the hypernetwork step.
      granularity: 'layer' or 'tensor' (one alpha per module / per parameter tensor).
      semantics: 'synchronous' or 'sequential'.
      hn_sign: 'descent' (psi += hn_lr * J^T delta) or 'flbench' (psi -= ...).
      heur_k: HeurpFedLA's number of retained units (0 = pFedLA).
      hn_kwargs: extra LayerWeightHypernetwork arguments (embed_dim, normalization, ...).
      device: see `_Server` (the hypernetworks are moved there too).
    """

    def __init__(self, model: nn.Module, data: ClientData, batch_order: BatchOrder,
                 local: LocalConfig = LocalConfig(), *, client_states: list[dict] | None = None,
                 hypernetworks: list[LayerWeightHypernetwork] | None = None, hn_lr: float = 0.5,
                 hn_optimizer: str = "sgd", hn_momentum: float = 0.0, granularity: str = "layer",
                 semantics: str = "synchronous", hn_sign: str = "descent", heur_k: int = 0,
                 init: str = "common", hn_kwargs: dict | None = None,
                 device: str | torch.device | None = None):
        super().__init__(model, data, batch_order, local, client_states, init, device)
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        if hn_sign not in HN_SIGNS:
            raise ValueError(f"hn_sign must be one of {HN_SIGNS}, got {hn_sign!r}")
        self.units = aggregation_units(model, granularity)
        if not 0 <= heur_k < len(self.units):
            raise ValueError(f"heur_k must be in [0, {len(self.units) - 1}], got {heur_k}")
        self.semantics, self.hn_sign, self.heur_k = semantics, hn_sign, heur_k
        n, num_units = self.num_clients, len(self.units)
        self.hypernetworks = [hn.to(self.device) for hn in hypernetworks or [
            LayerWeightHypernetwork(n, num_units, i, **(hn_kwargs or {})) for i in range(n)]]
        if hn_optimizer == "sgd":
            make = lambda p: torch.optim.SGD(p, lr=hn_lr, momentum=hn_momentum)
        elif hn_optimizer == "adam":
            make = lambda p: torch.optim.Adam(p, lr=hn_lr)
        else:
            raise ValueError(f"hn_optimizer must be 'sgd' or 'adam', got {hn_optimizer!r}")
        self.hn_optimizers = [make(hn.parameters()) for hn in self.hypernetworks]

    def stored_params(self) -> list[dict]:
        """The stored trainable params of every client (references, not copies)."""
        return [{k: s[k] for k in self.param_names} for s in self.client_states]

    def retained_units(self, client_id: int, alpha: torch.Tensor) -> list[bool]:
        """HeurpFedLA (Eq. 12): the heur_k units with the largest self-weight."""
        retained = [False] * len(self.units)
        if self.heur_k:
            for unit in torch.topk(alpha[:, client_id].detach(), self.heur_k).indices.tolist():
                retained[unit] = True
        return retained

    def personalize(self, client_id: int, stored: list[dict] | None = None):
        """(alpha [L, N] (with autograd), retained [L], theta_bar {name: tensor}) of a client.

        theta_bar is built with autograd through alpha, so the hypernetwork's gradient can
        be taken through the aggregation itself.
        """
        stored = self.stored_params() if stored is None else stored
        alpha = self.hypernetworks[client_id]()
        retained = self.retained_units(client_id, alpha)
        theta_bar = {}
        for unit, names in enumerate(self.units):
            for name in names:
                if retained[unit]:
                    theta_bar[name] = stored[client_id][name]
                else:
                    theta_bar[name] = sum(alpha[unit, j] * stored[j][name]
                                          for j in range(self.num_clients))
        return alpha, retained, theta_bar

    def update_hypernetwork(self, client_id: int, theta_bar: dict, delta: dict) -> None:
        """(v_i, psi_i) += hn_lr * (d theta_bar / d (v_i, psi_i))^T delta  (Eqs. 10-11)."""
        hn, optimizer = self.hypernetworks[client_id], self.hn_optimizers[client_id]
        names = [k for k in self.param_names if theta_bar[k].requires_grad]
        params = list(hn.parameters())
        grads = torch.autograd.grad([theta_bar[k] for k in names], params,
                                    grad_outputs=[delta[k] for k in names], allow_unused=True)
        # The optimizer minimises: grad = -J^T delta gives psi += lr * J^T delta (descent).
        sign = -1.0 if self.hn_sign == "descent" else 1.0
        optimizer.zero_grad()
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else sign * g
        optimizer.step()

    def round(self, round_idx: int, participants: Iterable[int]) -> dict:
        """One round. Returns per participant: alpha (as used), retained, loss_sum, num_examples."""
        participants = [int(i) for i in participants]
        snapshot = self.stored_params() if self.semantics == "synchronous" else None
        info = {"alpha": [], "retained": [], "loss_sum": [], "num_examples": []}
        new_states = []
        for i in participants:
            stored = snapshot if snapshot is not None else self.stored_params()
            alpha, retained, theta_bar = self.personalize(i, stored)
            trained, loss_sum, seen = self.client_update(i, theta_bar, round_idx)
            delta = {k: trained[k] - theta_bar[k].detach() for k in self.param_names}
            self.update_hypernetwork(i, theta_bar, delta)
            if snapshot is None:
                self.client_states[i] = trained  # seen by the next client of this round
            else:
                new_states.append((i, trained))
            for key, value in (("alpha", alpha.detach()), ("retained", retained),
                               ("loss_sum", loss_sum), ("num_examples", seen)):
                info[key].append(value)
        for i, trained in new_states:
            self.client_states[i] = trained
        return info

    @torch.no_grad()
    def all_alpha(self) -> torch.Tensor:
        """alpha of every client's hypernetwork now, [N, L, N]."""
        return torch.stack([hn() for hn in self.hypernetworks])
