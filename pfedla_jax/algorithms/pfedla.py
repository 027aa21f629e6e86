"""pFedLA and HeurpFedLA (Ma et al., CVPR 2022, Algorithms 1 and 2).

Server state: the latest locally trained params theta_j of every client (stacked [N, ...]),
their BN running statistics (local, never aggregated), and one hypernetwork per client
(stacked) with its optimizer state.

One round (Algorithm 1), for the participating clients i:
    alpha_i   = HN_i(v_i; psi_i)                          # [L, N], rows sum to 1   (Eq. 4)
    theta_bar = sum_j alpha_i[l, j] theta_j[l]  per layer  # one einsum per leaf      (Eq. 6)
    theta_i'  = E epochs of local SGD starting from theta_bar_i
    delta_i   = theta_i' - theta_bar_i
    store       theta_i <- theta_bar_i + delta_i
    (dv_i, dpsi_i) = VJP of HN_i with cotangent G_i[l, j] = <theta_j[l], delta_i[l]>  (Eqs. 10-11)
    (v_i, psi_i) <- (v_i, psi_i) + eta_hn (dv_i, dpsi_i)   # descent on L_i (digest §3.4)

Round semantics:
  synchronous  all participants aggregate from one snapshot of the stored params and are
               trained in one stacked call (the paper's "for each client in parallel").
  sequential   one client after another; each aggregates from the params already
               updated earlier in the round (as the public PyTorch code does).

HeurpFedLA (`heur_k` = k > 0, Algorithm 2, Eq. 12): per round and client, the k layers with
the largest self-weight alpha_i[l, i] are kept local: the client starts them from its own
stored copy (not aggregated, not sent down) and their heads get no gradient that round
(the public code's choice: their alpha was not used). The uplink stays the full delta.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pfedla_jax.algorithms.base import Algorithm, FLContext
from pfedla_jax.core.aggregation import aggregate, alpha_cotangent
from pfedla_jax.core.layers import LayerMap, make_layer_map
from pfedla_jax.core.stacking import put_clients, take_clients
from pfedla_jax.errors import UserInputError
from pfedla_jax.models.hypernetwork import (HNConfig, LayerWeightHypernetwork,
                                            init_hypernetworks, stacked_alpha)

SEMANTICS = ("synchronous", "sequential")
HN_SIGNS = ("descent", "flbench")
HN_OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class PFedLAConfig:
    hn: HNConfig = HNConfig()
    hn_lr: float = 0.5                 # swept on FMNIST (BUILD_NOTES.md); the public code uses 5e-3
    hn_optimizer: str = "sgd"
    hn_momentum: float = 0.0
    granularity: str = "layer"         # 'layer' | 'tensor'
    semantics: str = "synchronous"      # 'synchronous' | 'sequential'
    hn_sign: str = "descent"            # 'descent' (+delta psi) | 'flbench' (-delta psi)
    heur_k: int = 0

    def validate(self, num_layers: int) -> None:
        self.hn.validate()
        if self.semantics not in SEMANTICS:
            raise UserInputError(f"unknown --round_semantics {self.semantics!r}; expected one of {', '.join(SEMANTICS)}")
        if self.hn_sign not in HN_SIGNS:
            raise UserInputError(f"unknown --hn_sign {self.hn_sign!r}; expected one of {', '.join(HN_SIGNS)}")
        if self.hn_optimizer not in HN_OPTIMIZERS:
            raise UserInputError(f"unknown --hn_optimizer {self.hn_optimizer!r}; expected one of {', '.join(HN_OPTIMIZERS)}")
        if not self.hn_lr >= 0 or not np.isfinite(self.hn_lr):
            raise UserInputError(f"--hn_lr must be >= 0, got {self.hn_lr}")
        if not 0 <= self.hn_momentum < 1:
            raise UserInputError(f"--hn_momentum must be in [0, 1), got {self.hn_momentum}")
        if not 0 <= self.heur_k < num_layers:
            raise UserInputError(
                f"--heur_k must be in [0, {num_layers - 1}] (the model has {num_layers} aggregation "
                f"layers), got {self.heur_k}")


def make_hn_optimizer(cfg: PFedLAConfig) -> optax.GradientTransformation:
    if cfg.hn_optimizer == "adam":
        return optax.adam(cfg.hn_lr)
    return optax.sgd(cfg.hn_lr, momentum=cfg.hn_momentum or None)


def retained_layers(alpha: jax.Array, client_ids: jax.Array, k: int) -> jax.Array:
    """HeurpFedLA's top-k layers by self-weight (Eq. 12): bool [S, L]."""
    num_layers = alpha.shape[1]
    if k == 0:
        return jnp.zeros(alpha.shape[:2], bool)
    self_w = jnp.take_along_axis(alpha, client_ids[:, None, None], axis=2)[:, :, 0]  # [S, L]
    _, top = jax.lax.top_k(self_w, k)
    return jnp.any(jax.nn.one_hot(top, num_layers, dtype=jnp.int32) > 0, axis=1)


def effective_alpha(alpha: jax.Array, client_ids: jax.Array, retained: jax.Array) -> jax.Array:
    """Alpha with retained layers replaced by one-hot(self): theta_bar = own copy there."""
    one_hot = jax.nn.one_hot(client_ids, alpha.shape[-1], dtype=alpha.dtype)[:, None, :]
    return jnp.where(retained[:, :, None], one_hot, alpha)


class PFedLA(Algorithm):
    name = "pfedla"

    def __init__(self, ctx: FLContext, config: PFedLAConfig = PFedLAConfig()):
        super().__init__(ctx)
        probe = jax.eval_shape(lambda: ctx.init_client_variables(jax.random.key(0)))[0]
        self.layer_map: LayerMap = make_layer_map(
            jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), probe), ctx.layer_order,
            config.granularity)
        config.validate(self.layer_map.num_layers)
        self.config = config
        self.hn = LayerWeightHypernetwork(ctx.num_clients, self.layer_map.num_layers, config.hn)
        self.hn_tx = make_hn_optimizer(config)
        if config.heur_k:
            self.name = "heurpfedla"

    # ------------------------------------------------------------------ state
    def init(self, key):
        # The client models come from `key` itself, as for Local and FedAvg, so one seed gives
        # every method the same initial models.
        params, stats = self.ctx.init_client_variables(key)
        k_hn = jax.random.fold_in(key, 1)
        hn_params = init_hypernetworks(self.hn, k_hn, self.ctx.num_clients)
        hn_opt = jax.vmap(self.hn_tx.init)(hn_params)
        return {"client_params": params, "batch_stats": stats,
                "hn_params": hn_params, "hn_opt_state": hn_opt}

    # ------------------------------------------------------------------ server steps
    @partial(jax.jit, static_argnums=0)
    def personalize(self, hn_params, client_params, client_ids):
        """alpha (as output by HN), the retained mask, and theta_bar for `client_ids`.

        Args:
          hn_params: stacked hypernetwork params of these clients, leaves [S, ...].
          client_params: the stored params of all N clients, leaves [N, ...].
          client_ids: int32 [S].
        Returns:
          (alpha [S, L, N], retained bool [S, L], theta_bar leaves [S, ...]).
        """
        alpha = stacked_alpha(self.hn, hn_params, client_ids)
        retained = retained_layers(alpha, client_ids, self.config.heur_k)
        theta_bar = aggregate(effective_alpha(alpha, client_ids, retained), client_params,
                              self.layer_map)
        return alpha, retained, theta_bar

    @partial(jax.jit, static_argnums=0)
    def hn_update(self, hn_params, hn_opt_state, client_params, client_ids, retained, delta):
        """Eqs. 10-11 through the closed-form cotangent; returns new (hn_params, opt_state).

        `client_params` must be the stored params that built theta_bar (leaves [N, ...]).
        """
        delta_psi = hn_delta_psi(self.hn, self.layer_map, hn_params, client_params, client_ids,
                                 retained, delta)
        # optax minimises: passing -delta_psi steps psi <- psi + lr * delta_psi (descent on
        # L_i, digest §3.4); the public PyTorch code's sign passes +delta_psi.
        sign = -1.0 if self.config.hn_sign == "descent" else 1.0
        grads = jax.tree.map(lambda g: sign * g, delta_psi)
        updates, new_opt = jax.vmap(self.hn_tx.update)(grads, hn_opt_state, hn_params)
        return optax.apply_updates(hn_params, updates), new_opt

    def _round_block(self, state, ids, round_key):
        """Aggregate -> train -> store -> HN update for clients `ids`, from one snapshot."""
        hn_params = take_clients(state["hn_params"], ids)
        alpha, retained, theta_bar = self.personalize(hn_params, state["client_params"], ids)
        trained, stats, metrics = self.ctx.trainer.train(
            theta_bar, take_clients(state["batch_stats"], ids), ids, round_key)
        delta = jax.tree.map(jnp.subtract, trained, theta_bar)
        new_hn, new_opt = self.hn_update(hn_params, take_clients(state["hn_opt_state"], ids),
                                         state["client_params"], ids, retained, delta)
        # theta_i <- theta_bar_i + delta_i (= the trained params)
        new_state = {
            "client_params": put_clients(state["client_params"], ids, trained),
            "batch_stats": put_clients(state["batch_stats"], ids, stats),
            "hn_params": put_clients(state["hn_params"], ids, new_hn),
            "hn_opt_state": put_clients(state["hn_opt_state"], ids, new_opt),
        }
        return new_state, metrics, retained

    def round(self, state, round_idx, participants, round_key):
        ids = jnp.asarray(participants, jnp.int32)
        if self.config.semantics == "synchronous":
            state, metrics, retained = self._round_block(state, ids, round_key)
        else:
            parts = []
            for s in range(ids.shape[0]):
                state, m, r = self._round_block(state, ids[s:s + 1], round_key)
                parts.append((m, r))
            metrics = jax.tree.map(lambda *a: jnp.concatenate(a), *[p[0] for p in parts])
            retained = jnp.concatenate([p[1] for p in parts])
        bytes_up, bytes_down = self.communication_bytes(np.asarray(retained))
        return state, {**metrics, "bytes_up": bytes_up, "bytes_down": bytes_down}

    # ------------------------------------------------------------------ accounting
    def communication_bytes(self, retained: np.ndarray) -> tuple[int, int]:
        """(uplink, downlink) bytes of one round: full delta up; non-retained layers down."""
        return communication_bytes(self.layer_map.num_params, retained, bytes_per_param=4)

    # ------------------------------------------------------------------ evaluation
    def all_alpha(self, state):
        ids = jnp.arange(self.ctx.num_clients, dtype=jnp.int32)
        return self.personalize(state["hn_params"], state["client_params"], ids)

    def eval_models(self, state):
        return self.evaluation(state)[0]

    def extra_exports(self, state):
        return self.evaluation(state)[1]

    def evaluation(self, state):
        # alpha and theta_bar of all N clients from one personalize() call (it costs
        # O(N^2 |theta|): not to be done twice per evaluation)
        alpha, retained, theta_bar = self.all_alpha(state)
        views = {"": (theta_bar, state["batch_stats"]),
                 "local": (state["client_params"], state["batch_stats"])}
        return views, {"alpha": np.asarray(alpha), "retained": np.asarray(retained)}


def hn_delta_psi(hn, layer_map: LayerMap, hn_params, client_params, client_ids, retained, delta):
    """(Delta v_i, Delta psi_i) = (d theta_bar_i / d psi_i)^T delta_i (paper Eqs. 10-11).

    Computed without differentiating through parameter-sized tensors: the cotangent of
    alpha is G[s, l, j] = <theta_j[l], delta_s[l]> (closed form, `alpha_cotangent`), pulled
    back through the small hypernetwork MLP only (`jax.vjp`). Layers retained by
    HeurpFedLA did not use alpha, so their cotangent is zero.

    Args:
      hn: the hypernetwork module.
      layer_map: aggregation units.
      hn_params: stacked hypernetwork params of the participants, leaves [S, ...].
      client_params: the stored params that built theta_bar, leaves [N, ...].
      client_ids: int32 [S].
      retained: bool [S, L].
      delta: theta_trained - theta_bar, leaves [S, ...].
    Returns:
      pytree like hn_params.
    """
    cot = alpha_cotangent(client_params, delta, layer_map)               # [S, L, N]
    cot = jnp.where(retained[:, :, None], 0.0, cot)
    _, vjp = jax.vjp(lambda p: stacked_alpha(hn, p, client_ids), hn_params)
    (delta_psi,) = vjp(cot)
    return delta_psi


def communication_bytes(layer_sizes, retained: np.ndarray, bytes_per_param: int = 4) -> tuple[int, int]:
    """Bytes up and down for participants with retained-layer masks `retained` [S, L].

    Uplink: the full model per participant. Downlink: the model minus its retained layers
    (digest §8.3: this reproduces the paper's Table 3 exactly).
    """
    sizes = np.asarray(layer_sizes, np.int64)
    retained = np.asarray(retained, bool)
    up = int(retained.shape[0] * sizes.sum() * bytes_per_param)
    down = int(((~retained) * sizes[None, :]).sum() * bytes_per_param)
    return up, down
