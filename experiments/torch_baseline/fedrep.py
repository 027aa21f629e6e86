"""FedRep (Collins, Hassani, Mokhtari, Shakkottai, ICML 2021) written as PyTorch FL code.

The PyTorch reference of `pfedla_jax/algorithms/fedrep.py`, written the way a PyTorch user
would (not a translation of the stacked JAX engine): one `nn.Module` reused for every
client, clients trained one after another, the frozen part switched off with
`requires_grad_(False)` and a fresh `torch.optim.SGD` per phase (frozen parameters get no
gradient and are skipped), the server holding state_dicts and averaging them in Python loops.

Semantics (paper Alg. 1; official code lgcollins/FedRep `main_fedrep.py`,
`models/Update.py`; FL-bench `src/{client,server}/fedrep.py`):

  model = head (default: fc3, the last linear layer) o body (every other layer, BN
  weight/bias included)
  server state: the global body phi; client state: its own head h_i, its own BN running
  statistics, and its last trained model
  round, for each participant i (one after another):
      load (phi, h_i, BN stats of i)
      head phase: the first (local_epochs - body_epochs) local epochs, SGD on the head,
          the body frozen (requires_grad False: no update)
      body phase: the last body_epochs local epochs, SGD on the body, the (new) head frozen
      keep the whole trained model (its head is the new h_i; its BN statistics are i's)
  server: phi <- sum_i w_i body_i, w_i = n_i / sum_S n (train-set sizes)
  evaluation '': (latest phi, h_i, BN stats of i) for every client; 'local': each
  client's model after its latest local training (`client_states`)

BN running statistics are updated by every training forward pass, in both phases (train
mode throughout, as in the official code and FL-bench). The phase of a batch is its local
epoch, counted in the client's own batches: epoch e holds its batches
e*b_i .. (e+1)*b_i - 1 with b_i = ceil(n_i / batch_size); batches past the last epoch stay
in the body phase; empty batches (padding steps of a small client) are skipped.

Differences from the official code:
  * Plain SGD by default (`LocalConfig`: lr 0.005, no momentum, no weight decay); the
    official client uses SGD lr 0.01, momentum 0.5, weight decay 1e-4 on weights only
    (not biases), local batch 10, at most 500 train samples per user.
  * A fresh optimizer per phase over the trainable parameters only. The official code
    builds one optimizer over all parameters and freezes with requires_grad; under
    PyTorch 1.x `zero_grad()` left zero grads on frozen parameters, so momentum and
    weight decay kept moving them (head drift during the body epochs). Here (and in
    PyTorch >= 2 generally) frozen parameters do not move. With plain SGD the two agree.
  * Default split (E - 1) head epochs + 1 body epoch (FL-bench's), so the total pass
    count equals the other methods' E; the official scripts train 10 head epochs + 1 or
    5 body epochs (local_epochs=11, body_epochs=1 here).
  * Only the body is averaged and sent (the official code and FL-bench average every
    key and then load only the non-head keys into the clients: the same models).
  * Aggregation weights are train-set sizes (the official `lens` are all ones for CIFAR:
    uniform; identical with pFedLA's equal client sizes).
  * No final head-only fine-tuning round (the official code's `last` round).

Typical use:

    data = synthetic_client_data(num_clients=N, examples_per_client=200)
    order = shuffled_batches(data, batch_size=32, local_epochs=E)
    server = FedRepServer(CNNTarget(1, 10), data, order, LocalConfig(lr=0.05),
                          batch_size=32, local_epochs=E, body_epochs=1)
    info = server.round(0, range(N))
    model_i = server.personalized(i)      # state_dict: global body + head i + BN stats i
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from experiments.torch_baseline.fl import (
    BatchOrder,
    ClientData,
    LocalConfig,
    _Server,
    clone_state,
    train_client,
)


def train_phase(model: nn.Module, data: ClientData, batches: Iterable[torch.Tensor],
                trainable: Sequence[str], config: LocalConfig) -> tuple[float, int]:
    """Local SGD on the parameters named `trainable` only, the others frozen; in place.

    `train_client` (a fresh torch.optim.SGD, BN statistics updating in train mode) with
    `requires_grad_(False)` on the frozen parameters: they get no gradient, so SGD skips them
    (no update, no momentum buffer, no weight decay; PyTorch >= 2). Returns (sum of
    per-example losses, examples seen); empty batches are skipped.
    """
    trainable = set(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    try:
        return train_client(model, data, batches, config)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


class FedRepServer(_Server):
    """FedRep: a global body, a head per client; head epochs, then body epochs.

    Args: those of `fl._Server` (model, data, batch_order, local, client_states, init), and
      batch_size: the local batch size of `batch_order` (sets the epoch boundaries).
      local_epochs: the local epochs `batch_order` yields per client and round.
      body_epochs: the last epochs, trained on the body; the first
        local_epochs - body_epochs train the head.
      head: module names of the head (default: the last linear layer, 'fc3').
      global_body: the initial global body (default: the clients' initial bodies averaged
        with train-set weights).
      device: see `fl._Server`.
    """

    def __init__(self, model: nn.Module, data: ClientData, batch_order: BatchOrder,
                 local: LocalConfig = LocalConfig(), *, batch_size: int, local_epochs: int,
                 body_epochs: int = 1, head: Sequence[str] = ("fc3",),
                 client_states: list[dict] | None = None, global_body: dict | None = None,
                 init: str = "common", device: str | torch.device | None = None):
        super().__init__(model, data, batch_order, local, client_states, init, device)
        if not 1 <= body_epochs <= local_epochs:
            raise ValueError(f"body_epochs must be in [1, local_epochs={local_epochs}], "
                             f"got {body_epochs}")
        modules = dict(model.named_modules())
        unknown = [h for h in head if h not in modules or h == ""]
        if unknown:
            raise ValueError(f"head: the model has no module {unknown[0]!r}")
        self.batch_size = batch_size
        self.head_epochs = local_epochs - body_epochs
        self.body_epochs = body_epochs
        self.head_names = [n for n in self.param_names
                           if any(n.startswith(h + ".") for h in head)]
        self.body_names = [n for n in self.param_names if n not in self.head_names]
        if not self.head_names or not self.body_names:
            raise ValueError(f"head {tuple(head)} leaves no head or no body parameters")
        if global_body is None:
            global_body = self.average_body(list(range(self.num_clients)), self.client_states)
        self.global_body = {k: global_body[k].detach().to(self.device, copy=True)
                            for k in self.body_names}

    # ------------------------------------------------------------------ client side
    def head(self, client_id: int) -> dict:
        """Client `client_id`'s own head (references into its stored state)."""
        return {k: self.client_states[client_id][k] for k in self.head_names}

    def personalized(self, client_id: int) -> dict:
        """The evaluated model of a client: global body + its head + its BN statistics."""
        state = clone_state(self.client_states[client_id])
        state.update(clone_state(self.global_body))
        return state

    def phase_batches(self, client_id: int, round_idx: int) -> tuple[list, list]:
        """(head-phase batches, body-phase batches) of a client this round.

        The first head_epochs * ceil(n_i / batch_size) batches of the order (the client's
        own epochs), then the rest.
        """
        per_epoch = -(-self.data.train_count(client_id) // self.batch_size)
        batches = list(self.batch_order(client_id, round_idx))
        cut = self.head_epochs * per_epoch
        return batches[:cut], batches[cut:]

    def client_update(self, client_id: int, round_idx: int):
        """Trains client `client_id` from (global body, its head, its BN statistics).

        Returns (trained state_dict, loss_sum, examples seen).
        """
        state = dict(self.client_states[client_id])  # its head and BN running statistics
        state.update(self.global_body)
        self.model.load_state_dict(state)
        head_batches, body_batches = self.phase_batches(client_id, round_idx)
        loss_h, seen_h = train_phase(self.model, self.data, head_batches, self.head_names,
                                     self.local)
        loss_b, seen_b = train_phase(self.model, self.data, body_batches, self.body_names,
                                     self.local)
        return clone_state(self.model.state_dict()), loss_h + loss_b, seen_h + seen_b

    # ------------------------------------------------------------------ server side
    def average_body(self, client_ids: Sequence[int], states: Sequence[dict]) -> dict:
        """sum_s w_s body_s with w_s = n_s / sum n, key by key."""
        counts = [float(self.data.train_count(i)) for i in client_ids]
        total = sum(counts)
        body = {}
        for key in self.body_names:
            acc = torch.zeros_like(states[0][key])
            for n, state in zip(counts, states):
                acc = acc + (n / total) * state[key]
            body[key] = acc
        return body

    def round(self, round_idx: int, participants: Iterable[int]) -> dict:
        """One round; returns {'loss_sum': [...], 'num_examples': [...]} per participant."""
        participants = [int(i) for i in participants]
        trained, losses, seens = [], [], []
        for i in participants:
            state, loss_sum, seen = self.client_update(i, round_idx)
            self.client_states[i] = state  # its new head, BN statistics and trained body
            trained.append(state)
            losses.append(loss_sum)
            seens.append(seen)
        self.global_body = self.average_body(participants, trained)
        return {"loss_sum": losses, "num_examples": seens}
