"""pFedHN (Shamsian et al., ICML 2021) written as PyTorch FL code, and weight converters.

The hypernetwork is the official `CNNHyper` (AvivSham/pFedHN experiments/pfedhn/models.py),
generalised the way FL-bench does it (src/server/pfedhn.py): one `nn.Linear` head per
`named_parameters()` tensor of the target model (BN weight/bias included), each viewed to
the tensor's (torch) shape. The server is the official training step (trainer.py `train`)
run over a round's participants:

    weights = hnet(i); net.load_state_dict(weights)          (+ client i's BN buffers)
    local SGD on client i                                   (fl.train_client)
    delta   = weights - trained                              (inner_state - final_state)
    grads   = torch.autograd.grad(weights, hnet.parameters(), grad_outputs=delta)
    p.grad  = g; clip_grad_norm_(hnet.parameters(), clip); optimizer.step()
    with torch.optim.SGD([{non-embedding params}, {embeddings, lr: embed_lr}], lr,
                         momentum, weight_decay)

'sequential': one client per step, as the official code (one random client per step) and
FL-bench (a loop over the round's clients). 'synchronous' (pfedla_jax's default): every
participant's weights are generated from one snapshot of the hypernetwork; the gradients
of all of them (one autograd.grad over every generated tensor, which sums them) make one
step at the end of the round. BN running statistics stay with the clients.

Layouts: this hypernetwork emits torch tensors (conv OIHW, linear [out, in], FC1 columns in
(c, h, w) order); pfedla_jax's heads emit its own layout (HWIO, [in, out], (h, w, c) rows).
Both are the same function up to a fixed permutation of each head's outputs, so the
converters `pfedhn_from_jax` / `pfedhn_to_jax` permute the rows of every head's weight and
bias (exact: no arithmetic). Numpy in, numpy out; no JAX import.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from experiments.torch_baseline.fl import BatchOrder, ClientData, LocalConfig, _Server
from experiments.torch_baseline.model import LAYERS, params_to_jax

SEMANTICS = ("synchronous", "sequential")


def _head_key(param_name: str) -> str:
    return param_name.replace(".", "_")  # nn.ModuleDict keys cannot contain '.'


class CNNHyper(nn.Module):
    """h(v_i; phi): client index -> an OrderedDict of every parameter of `target`.

    Args:
      target: the client model (its `named_parameters()` give the heads and their shapes).
      n_nodes: N, rows of the embedding table.
      embedding_dim: d_e (official: int(1 + N/4)).
      hidden_dim: H (official 100).
      n_hidden: [ReLU, Linear(H, H)] blocks after Linear(d_e, H) (official --n-hidden 3).
    """

    def __init__(self, target: nn.Module, n_nodes: int, embedding_dim: int, hidden_dim: int = 100,
                 n_hidden: int = 3):
        super().__init__()
        self.embeddings = nn.Embedding(num_embeddings=n_nodes, embedding_dim=embedding_dim)
        layers: list[nn.Module] = [nn.Linear(embedding_dim, hidden_dim)]
        for _ in range(n_hidden):
            layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, hidden_dim)]
        self.mlp = nn.Sequential(*layers)
        self.shapes = OrderedDict((name, tuple(p.shape)) for name, p in target.named_parameters())
        self.heads = nn.ModuleDict({_head_key(name): nn.Linear(hidden_dim, int(np.prod(shape)))
                                    for name, shape in self.shapes.items()})

    def forward(self, idx) -> OrderedDict:
        """{param name: tensor of the target's shape} for client `idx` (an int or a 0-d tensor)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.embeddings.weight.device)
        features = self.mlp(self.embeddings(idx))
        return OrderedDict((name, self.heads[_head_key(name)](features).view(shape))
                           for name, shape in self.shapes.items())


# ---------------------------------------------------------------------------- converters
def _jax_path(param_name: str) -> tuple[str, str]:
    """torch parameter name -> (pfedla_jax layer, leaf), e.g. 'bn1.weight' -> ('BN1', 'scale')."""
    module, leaf = param_name.split(".")
    layer = dict(LAYERS)[module]
    if leaf == "weight":
        return layer, "scale" if layer.startswith("BN") else "kernel"
    return layer, "bias"


def head_layouts(target: nn.Module) -> dict[str, tuple[tuple[str, str], np.ndarray]]:
    """Per torch parameter: (its pfedla_jax path, index int64 [size]) where index[j] is the
    torch flat position of element j of the pfedla_jax leaf (flattened C-order)."""
    numbered = {}
    for name, value in target.state_dict().items():
        if value.is_floating_point():
            # float32 holds every integer below 2^24 exactly (the largest head: 96,000)
            numbered[name] = torch.arange(value.numel(), dtype=torch.float32).view(value.shape)
        else:
            numbered[name] = value
    hw = getattr(target, "feature_hw", None)
    ours, _ = params_to_jax(numbered, feature_hw=hw)
    out = {}
    for name, _ in target.named_parameters():
        layer, leaf = _jax_path(name)
        out[name] = ((layer, leaf), np.asarray(ours[layer][leaf]).reshape(-1).astype(np.int64))
    return out


def pfedhn_from_jax(hn_params: Mapping[str, Any], target: nn.Module) -> dict[str, torch.Tensor]:
    """A `CNNHyper(target, ...)` state_dict from pfedla_jax's pFedHN hypernetwork params.

    Args:
      hn_params: {'embedding' [N, d_e], 'trunk{k}': {'kernel' [in, H], 'bias' [H]},
        'heads': {layer: {leaf: {'kernel' [H, size], 'bias' [size]}}}} (numpy or jax arrays).
      target: the torch client model (for the heads' layouts).
    """
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable, contiguous copy
    out = {"embeddings.weight": t(hn_params["embedding"])}
    k = 0
    while f"trunk{k}" in hn_params:
        out[f"mlp.{2 * k}.weight"] = t(np.asarray(hn_params[f"trunk{k}"]["kernel"]).T)
        out[f"mlp.{2 * k}.bias"] = t(hn_params[f"trunk{k}"]["bias"])
        k += 1
    for name, ((layer, leaf), index) in head_layouts(target).items():
        head = hn_params["heads"][layer][leaf]
        kernel, bias = np.asarray(head["kernel"]), np.asarray(head["bias"])
        weight = np.empty((kernel.shape[1], kernel.shape[0]), np.float32)
        weight[index] = kernel.T
        torch_bias = np.empty(bias.shape, np.float32)
        torch_bias[index] = bias
        out[f"heads.{_head_key(name)}.weight"] = t(weight)
        out[f"heads.{_head_key(name)}.bias"] = t(torch_bias)
    return out


def pfedhn_to_jax(state_dict: Mapping[str, torch.Tensor], target: nn.Module) -> dict[str, Any]:
    """pfedla_jax's pFedHN hypernetwork params (numpy float32) from a `CNNHyper` state_dict."""
    n = lambda key: state_dict[key].detach().cpu().numpy().astype(np.float32)
    out: dict[str, Any] = {"embedding": n("embeddings.weight"), "heads": {}}
    k = 0
    while f"mlp.{2 * k}.weight" in state_dict:
        out[f"trunk{k}"] = {"kernel": np.ascontiguousarray(n(f"mlp.{2 * k}.weight").T),
                            "bias": n(f"mlp.{2 * k}.bias")}
        k += 1
    for name, ((layer, leaf), index) in head_layouts(target).items():
        weight, bias = n(f"heads.{_head_key(name)}.weight"), n(f"heads.{_head_key(name)}.bias")
        out["heads"].setdefault(layer, {})[leaf] = {
            "kernel": np.ascontiguousarray(weight[index].T), "bias": bias[index]}
    return out


# ---------------------------------------------------------------------------- server
class PFedHNServer(_Server):
    """pFedHN: a hypernetwork generates each participant's model; clients train it locally;
    the hypernetwork steps along (d weights / d phi)^T (weights - trained).

    Args: those of `fl._Server` (the client states hold each client's BN running
    statistics and its latest trained model), and
      hnet: the `CNNHyper`.
      hn_lr, embed_lr (None: hn_lr), hn_momentum, hn_weight_decay: torch.optim.SGD.
      hn_clip: clip_grad_norm_ of all hypernetwork parameters before each step (0 = off).
      semantics: 'synchronous' or 'sequential'.
      device: see `fl._Server` (the hypernetwork is moved there too, before its optimizer
        is built).
    """

    def __init__(self, model: nn.Module, data: ClientData, batch_order: BatchOrder,
                 local: LocalConfig = LocalConfig(), *, hnet: CNNHyper,
                 client_states: list[dict] | None = None, hn_lr: float = 1e-2,
                 embed_lr: float | None = None, hn_momentum: float = 0.9,
                 hn_weight_decay: float = 1e-3, hn_clip: float = 50.0,
                 semantics: str = "synchronous", init: str = "common",
                 device: str | torch.device | None = None):
        super().__init__(model, data, batch_order, local, client_states, init, device)
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        self.hnet, self.hn_clip, self.semantics = hnet.to(self.device), hn_clip, semantics
        self.grad_norms: list[float] = []   # of every step's gradient, before clipping
        embed_lr = embed_lr if embed_lr is not None else hn_lr
        self.optimizer = torch.optim.SGD(
            [{"params": [p for n, p in hnet.named_parameters() if "embed" not in n]},
             {"params": [p for n, p in hnet.named_parameters() if "embed" in n], "lr": embed_lr}],
            lr=hn_lr, momentum=hn_momentum, weight_decay=hn_weight_decay)

    def hn_step(self, generated: list[OrderedDict], trained: list[dict]) -> None:
        """One optimizer step with the gradients of all (generated, trained) pairs summed."""
        outputs, cotangents = [], []
        for weights, state in zip(generated, trained):
            for name, tensor in weights.items():
                outputs.append(tensor)
                cotangents.append(tensor.detach() - state[name])    # inner_state - final_state
        params = list(self.hnet.parameters())
        grads = torch.autograd.grad(outputs, params, grad_outputs=cotangents)
        self.optimizer.zero_grad()
        for p, g in zip(params, grads):
            p.grad = g
        if self.hn_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.hn_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self.grad_norms.append(float(norm))   # before clipping
        self.optimizer.step()

    def round(self, round_idx: int, participants: Iterable[int]) -> dict:
        """One round. Returns {'loss_sum': [...], 'num_examples': [...]} per participant."""
        participants = [int(i) for i in participants]
        info = {"loss_sum": [], "num_examples": []}
        generated, trained = [], []
        for i in participants:
            weights = self.hnet(i)    # synchronous: the hypernetwork has not moved yet
            state, loss_sum, seen = self.client_update(i, weights, round_idx)
            self.client_states[i] = state
            info["loss_sum"].append(loss_sum)
            info["num_examples"].append(seen)
            if self.semantics == "sequential":
                self.hn_step([weights], [state])
            else:
                generated.append(weights)
                trained.append(state)
        if generated:
            self.hn_step(generated, trained)
        return info

    @torch.no_grad()
    def generated_models(self) -> list[OrderedDict]:
        """h(v_i; phi) of every client now (the models pFedHN evaluates)."""
        return [OrderedDict((k, v.clone()) for k, v in self.hnet(i).items())
                for i in range(self.num_clients)]
