"""pFedLA and HeurpFedLA (Ma, Zhang, Guo, Xu, "Layer-wised Model Aggregation for
Personalized Federated Learning", CVPR 2022, Algorithms 1 and 2, Eqs. 3-12; no official
code: the unofficial KarhouTam/pFedLA and FL-bench src/server/pfedla.py are the public
PyTorch codes cited below).

Server state: the latest locally trained params theta_j of every client (stacked [N, ...]),
their BN running statistics (local, never aggregated), and one hypernetwork per client
(stacked) with its optimizer state.

One round (Algorithm 1), for the participating clients i:
    alpha_i   = HN_i(v_i; psi_i)                          # [L, N], rows sum to 1 (Eqs. 3-4)
    theta_bar = sum_j alpha_i[l, j] theta_j[l]  per layer  # one einsum per leaf      (Eq. 6)
    theta_i'  = E epochs of local SGD starting from theta_bar_i
    delta_i   = theta_i' - theta_bar_i
    store       theta_i <- theta_bar_i + delta_i
    (dv_i, dpsi_i) = VJP of HN_i with cotangent G_i[l, j] = <theta_j[l], delta_i[l]>  (Eqs. 10-11)
    (v_i, psi_i) <- (v_i, psi_i) + eta_hn (dv_i, dpsi_i)   # descent on L_i (see below)

The paper writes neither the step size eta_hn nor its sign: local SGD makes delta_i ~
-lr sum_t grad L_i, so descent on L_i is the + step above (pFedHN's convention); the public
codes take the opposite sign (`--hn_sign=flbench`). `--hn_cotangent` chooses G (the raw
Eqs. 10-11, or a normalised form: `normalized_cotangent`): BUILD_NOTES (pFedLA: the
hypernetwork step).

Round semantics:
  synchronous  all participants aggregate from one snapshot of the stored params and are
               trained in one stacked call (the paper's "for each client in parallel").
  sequential   one client after another (a `lax.scan` inside the round's program); each
               aggregates from the params already updated earlier in the round (as the
               public PyTorch code does).

HeurpFedLA (`heur_k` = k > 0, Algorithm 2, Eq. 12): per round and client, the k layers with
the largest self-weight alpha_i[l, i] are kept local: the client starts them from its own
stored copy (not aggregated, not sent down) and their heads get no gradient that round
(the public code's choice: their alpha was not used). The uplink stays the full delta.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pfedla_jax.algorithms.base import Algorithm, AlgorithmConfig, Evaluation, FLContext, TableRow
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import CLIENT_LR, Choice, LogUniform
from pfedla_jax.core.aggregation import aggregate, alpha_cotangent
from pfedla_jax.core.client_parallel import RowBlock, on_every_device, over_row_blocks, rows_mesh
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.multihost import host_array
from pfedla_jax.core.layers import GRANULARITIES, LayerMap, make_layer_map
from pfedla_jax.core.state_size import ModelDims, StateTerm, client_models_terms, per_client_term
from pfedla_jax.errors import UserInputError, check_choice
from pfedla_jax.models.hypernetwork import (HNConfig, LayerWeightHypernetwork,
                                            init_hypernetworks, stacked_alpha)

SEMANTICS = ("synchronous", "sequential")
HN_SIGNS = ("descent", "flbench")
HN_OPTIMIZERS = ("sgd", "adam")
COTANGENTS = ("model", "layer", "raw")
DELTA_REFERENCES = ("current", "first")


def _flag(name: str, text: str) -> dict:
    return {"alias": name, "help": f"pFedLA: {text}"}


@dataclasses.dataclass(frozen=True)
class PFedLAConfig(AlgorithmConfig):
    """pFedLA's options (CLI names in the metadata's 'alias'; the defaults: BUILD_NOTES
    (pFedLA: semantics where the paper is silent; the hypernetwork step))."""

    hn: HNConfig = HNConfig()
    hn_lr: float = dataclasses.field(default=0.1, metadata=_flag(
        "hn_lr", "hypernetwork learning rate (default chosen for --hn_cotangent=model; the "
        "public code's rule is --hn_cotangent=raw --hn_normalization=relu "
        "--hn_head_init=uniform --hn_lr=0.005; BUILD_NOTES (pFedLA: the hypernetwork step))."))
    hn_optimizer: str = dataclasses.field(default="sgd", metadata=_flag("hn_optimizer", "sgd | adam."))
    hn_momentum: float = dataclasses.field(default=0.0, metadata=_flag(
        "hn_momentum", "hypernetwork SGD momentum."))
    granularity: str = dataclasses.field(default="layer", metadata=_flag(
        "alpha_granularity", "layer (BN layers separate) | tensor."))
    semantics: str = dataclasses.field(default="synchronous", metadata=_flag(
        "round_semantics", "synchronous | sequential."))
    hn_sign: str = dataclasses.field(default="descent", metadata=_flag(
        "hn_sign", "descent (derivation) | flbench (public code's sign)."))
    heur_k: int = dataclasses.field(default=0, metadata={
        "alias": "heur_k", "help": "HeurpFedLA: layers kept local per client (0 = pFedLA)."})
    hn_cotangent: str = dataclasses.field(default="model", metadata=_flag(
        "hn_cotangent", "model (default: <theta_j - mean, delta_i> / (|delta_i| * spread of "
        "the stored models), norms over the whole model: scale-free, layers keep their relative "
        "weight) | layer (the same with per-layer norms: every layer moves alike) | raw "
        "(G = <theta_j, delta_i>, Eqs. 10-11 as in the public code: scales with the client lr "
        "and budget). BUILD_NOTES (pFedLA: the hypernetwork step)."))

    hn_delta_reference: str = dataclasses.field(default="current", metadata=_flag(
        "hn_delta_reference", "the update size |delta_i| that --hn_cotangent=model|layer divides "
        "by: current (default: this round's, a step of one size whatever the client lr and "
        "budget) | first (the client's first update's: the step shrinks as the client's updates "
        "shrink, as the raw rule's does; at a large client lr the first update, from the "
        "random init, is so much larger than the later ones that alpha stays near uniform; "
        "BUILD_NOTES (pFedLA: the hypernetwork step))."))

    def validate(self) -> None:
        """Raises UserInputError on a bad option (heur_k's upper bound needs the model:
        checked when the algorithm is built)."""
        self.hn.validate()
        check_choice("round_semantics", self.semantics, SEMANTICS)
        check_choice("hn_sign", self.hn_sign, HN_SIGNS)
        check_choice("hn_optimizer", self.hn_optimizer, HN_OPTIMIZERS)
        check_choice("alpha_granularity", self.granularity, GRANULARITIES)
        check_choice("hn_cotangent", self.hn_cotangent, COTANGENTS)
        check_choice("hn_delta_reference", self.hn_delta_reference, DELTA_REFERENCES)
        if not self.hn_lr >= 0 or not np.isfinite(self.hn_lr):
            raise UserInputError(f"--hn_lr must be >= 0, got {self.hn_lr}")
        if not 0 <= self.hn_momentum < 1:
            raise UserInputError(f"--hn_momentum must be in [0, 1), got {self.hn_momentum}")
        if self.heur_k < 0:
            raise UserInputError(f"--heur_k must be >= 0, got {self.heur_k}")


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


def _pad_sources(alpha: jax.Array, rows: int) -> jax.Array:
    """alpha [S, L, N] -> [S, L, rows]: zero weight on the mesh-padding rows of the stack."""
    extra = rows - alpha.shape[-1]
    return alpha if extra == 0 else jnp.pad(alpha, ((0, 0), (0, 0), (0, extra)))


@register("pfedla", PFedLAConfig)
class PFedLA(Algorithm):
    display_name = "pFedLA"
    table_rows = (
        TableRow("pfedla", "pFedLA", order=8),
        TableRow("heurpfedla", "HeurpFedLA (k=1)", order=9, options=(("heur_k", 1),)),
    )
    # The paper gives no hypernetwork lr or optimizer: from the public code's 0.005 (raw
    # cotangent) past this project's 0.1 (model-normalised cotangent, BUILD_NOTES (pFedLA: the
    # hypernetwork step)); SGD (the default) or Adam
    search_space = (CLIENT_LR,
                    LogUniform("hn_lr", 1e-3, 1.0, source="KarhouTam/pFedLA, FL-bench: 0.005; "
                               "this project's default 0.1"),
                    Choice("hn_optimizer", ("sgd", "adam"), source="the optimizers --hn_optimizer offers"))

    export_name = "alpha"
    # the options that add state (HeurpFedLA keeps exactly pFedLA's)
    state_size_variants = (("adam", (("hn_optimizer", "adam"),)),
                           ("first", (("hn_delta_reference", "first"),)))

    @classmethod
    def state_size_terms(cls, config: PFedLAConfig, dims: ModelDims) -> list[StateTerm]:
        """The client models and BN statistics; one hypernetwork per client, its L heads
        (F + 1) x N each and its embedding + MLP (T scalars); the hypernetwork optimizer's
        state; with --hn_delta_reference=first the reference norms [N, L]."""
        sym = cls.state_size_symbols(config, dims)
        layers, trunk, fan_in = sym["L"], sym["T"], sym["F"]
        heads = lambda path: path[0].startswith("heads")
        hn = lambda n: 4 * layers * (fan_in + 1) * n * n + 4 * n * trunk
        terms = [*client_models_terms(dims),
                 StateTerm("hypernetworks", "heads", "4·L·(F + 1)·N²", True,
                           lambda n: 4 * layers * (fan_in + 1) * n * n, "hn_params", heads),
                 per_client_term("hypernetworks", "embedding + MLP", trunk, "T", "hn_params",
                                 lambda path: not heads(path))]
        if config.hn_optimizer == "adam":
            terms.append(StateTerm("optimizer states", "hypernetwork optimizer",
                                   "2 × hypernetworks + 4·N (Adam mu, nu, count)", True,
                                   lambda n: 2 * hn(n) + 4 * n, "hn_opt_state"))
        elif config.hn_momentum > 0:
            terms.append(StateTerm("optimizer states", "hypernetwork optimizer",
                                   "= hypernetworks (SGD momentum trace)", True, hn, "hn_opt_state"))
        else:
            terms.append(StateTerm("optimizer states", "hypernetwork optimizer", "0 (SGD)", True,
                                   lambda n: 0, "hn_opt_state"))
        if config.hn_delta_reference == "first":
            terms.append(per_client_term("other", "delta_ref", layers, "L"))
        return terms

    @classmethod
    def state_size_symbols(cls, config: PFedLAConfig, dims: ModelDims) -> dict[str, int]:
        """L aggregation layers; per client hypernetwork: T scalars of embedding + MLP, head
        fan-in F (the last hidden width)."""
        layers = make_layer_map(dims.params, dims.layer_order, config.granularity).num_layers
        hn = config.hn
        fan_in = trunk = hn.embed_dim
        for _ in range(hn.num_hidden):
            trunk += fan_in * hn.hidden_dim + hn.hidden_dim
            fan_in = hn.hidden_dim
        return {"L": layers, "T": trunk, "F": fan_in}

    def __init__(self, ctx: FLContext, config: PFedLAConfig | None = None):
        super().__init__(ctx, config)
        config = self.config
        self.layer_map: LayerMap = make_layer_map(ctx.param_shapes, ctx.layer_order,
                                                  config.granularity)
        if config.heur_k >= self.layer_map.num_layers:
            raise UserInputError(
                f"--heur_k must be in [0, {self.layer_map.num_layers - 1}] (the model has "
                f"{self.layer_map.num_layers} aggregation layers), got {config.heur_k}")
        self.hn = LayerWeightHypernetwork(ctx.num_clients, self.layer_map.num_layers, config.hn)
        self.hn_tx = make_hn_optimizer(config)
        if config.heur_k:
            self.name = "heurpfedla"
        # Server steps as jitted functions of this instance (not of the class: a class-level
        # jit cache would keep every instance, its data and its state alive).
        self.personalize = jax.jit(self._personalize)
        self.personalize_all = jax.jit(self._personalize_all)
        self.hn_update = jax.jit(self._hn_update)

    # ------------------------------------------------------------------ state
    def init_state(self, key):
        # The client models come from `key` itself, as for Local and FedAvg, so one seed gives
        # every method the same initial models.
        params, stats = self.ctx.init_client_variables(key)
        k_hn = jax.random.fold_in(key, 1)
        hn_params = init_hypernetworks(self.hn, k_hn, self.ctx.num_clients)
        hn_opt = jax.vmap(self.hn_tx.init)(hn_params)
        state = {"client_params": params, "batch_stats": stats,
                 "hn_params": hn_params, "hn_opt_state": hn_opt}
        if self.config.hn_delta_reference == "first":
            # per client and layer, |delta|^2 of its first update (0 = not yet participated)
            rows = jax.tree.leaves(params)[0].shape[0]
            state["delta_ref"] = jnp.zeros((rows, self.layer_map.num_layers), jnp.float32)
        return state

    # ------------------------------------------------------------------ server steps
    def _personalize(self, hn_params, client_params, client_ids):
        """alpha (as output by HN), the retained mask, and theta_bar for `client_ids`.

        Args:
          hn_params: stacked hypernetwork params of these clients, leaves [S, ...].
          client_params: the stored params of all clients, leaves [N_pad, ...] (rows past N
            are mesh padding and get zero weight).
          client_ids: int32 [S].
        Returns:
          (alpha [S, L, N], retained bool [S, L], theta_bar leaves [S, ...]).
        """
        alpha = stacked_alpha(self.hn, hn_params, client_ids)
        retained, theta_bar = self._aggregate(alpha, client_params, client_ids)
        return alpha, retained, theta_bar

    def _personalize_all(self, hn_params, client_params, client_ids):
        """`_personalize` of every stored row (the evaluation's): the hypernetworks applied
        `HN_CHUNK_BYTES` at a time (`_cohort_alpha`). One vmapped call over all N would make
        XLA copy every head (N^2 L H floats, as much as the heads themselves) to batch the
        head matmul."""
        chunk = self._chunks(hn_params, (), client_ids.shape[0])
        alpha = self._cohort_alpha(hn_params, (), client_ids, chunk)
        retained, theta_bar = self._aggregate(alpha, client_params, client_ids)
        return alpha, retained, theta_bar

    def _aggregate(self, alpha, client_params, client_ids):
        """(retained [S, L], theta_bar [S, ...]) from alpha [S, L, N] (Eqs. 6 and 12)."""
        retained = retained_layers(alpha, client_ids, self.config.heur_k)
        rows = jax.tree.leaves(client_params)[0].shape[0]
        mix = _pad_sources(effective_alpha(alpha, client_ids, retained), rows)
        return retained, aggregate(mix, client_params, self.layer_map, self._mesh_of(client_params))

    def _hn_update(self, hn_params, hn_opt_state, client_params, client_ids, retained, delta,
                   delta_ref=None):
        """Eqs. 10-11 through the closed-form cotangent; returns new (hn_params, opt_state).

        Args: the participants' hypernetworks and optimizer states (leaves [S, ...]), the
        stored params that built theta_bar (leaves [N_pad, ...]), client_ids [S], retained
        [S, L], delta [S, ...], and the participants' reference |delta|^2 [S, L]
        (`reference_delta_sq`; None: this round's).
        """
        cot = hn_cotangent(client_params, delta, self.layer_map, self.hn.num_clients, retained,
                           self.config.hn_cotangent, self._mesh_of(client_params), delta_ref)
        return self._step_hypernetworks(hn_params, hn_opt_state, client_ids, cot)

    def _delta_reference(self, state, ids, delta):
        """(|delta|^2 [S, L] the cotangent divides by, or None for this round's; the state
        entries to update). Only `--hn_delta_reference=first` keeps `delta_ref` [N_pad, L]:
        a client's first update sets its row."""
        if self.config.hn_delta_reference == "current":
            return None, {}
        delta_ref = state["delta_ref"]
        stored = self.take(delta_ref, ids)
        current = delta_sq_norms(delta, self.layer_map)
        ref = jnp.where(jnp.any(stored > 0, axis=1, keepdims=True), stored, current)
        return ref, {"delta_ref": self.put(delta_ref, ids, ref)}

    def _on_every_device(self, fn):
        return on_every_device(fn, self.ctx.mesh)

    def _mesh_of(self, client_params):
        """The state's mesh when `client_params` are the stored rows split over it, else None."""
        return rows_mesh(client_params, self.ctx.mesh)

    def _step_hypernetworks(self, hn_params, hn_opt_state, client_ids, cot):
        """psi_i <- psi_i + lr * (d alpha_i / d psi_i)^T cot_i for stacked rows [S, ...]."""
        delta_psi = hn_delta_psi(self.hn, hn_params, client_ids, cot)
        # optax minimises: passing -delta_psi steps psi <- psi + lr * delta_psi (descent on
        # L_i: module docstring); the public PyTorch codes' sign passes +delta_psi.
        sign = -1.0 if self.config.hn_sign == "descent" else 1.0
        grads = jax.tree.map(lambda g: sign * g, delta_psi)
        updates, new_opt = jax.vmap(self.hn_tx.update)(grads, hn_opt_state, hn_params)
        return optax.apply_updates(hn_params, updates), new_opt

    # The participants' hypernetworks are taken from the stacked state a chunk at a time, so
    # that at N = 1,000 (a client's heads are L x 100 x N floats, ~2 MB) the round never
    # holds copies of all S of them.
    HN_CHUNK_BYTES = 64 * 2**20

    def _chunks(self, hn_params, hn_opt_state, num: int) -> int:
        per_client = sum(a.size // a.shape[0] * a.dtype.itemsize
                         for a in jax.tree.leaves((hn_params, hn_opt_state)))
        return max(1, min(num, self.HN_CHUNK_BYTES // max(per_client, 1)))

    def _take_hypernetworks(self, hn_params, hn_opt_state, ids):
        """The rows `ids` of the hypernetworks and their optimizer states, on every device."""
        return self.take((hn_params, hn_opt_state), ids)

    def _cohort_alpha(self, hn_params, hn_opt_state, client_ids, chunk: int):
        """alpha [S, L, N] of the participants, their hypernetworks taken `chunk` at a time."""
        num = client_ids.shape[0]
        padded = jnp.pad(client_ids, (0, -num % chunk)).reshape(-1, chunk)   # pad: client 0, dropped
        forward = self._on_every_device(lambda p, i: stacked_alpha(self.hn, p, i))
        alpha = jax.lax.map(lambda ids: forward(self._take_hypernetworks(hn_params, hn_opt_state, ids)[0], ids),
                            padded)
        return alpha.reshape((-1,) + alpha.shape[2:])[:num]

    def _update_cohort(self, hn_params, hn_opt_state, client_ids, cot, chunk: int):
        """Every participant's hypernetwork step, written back in place, `chunk` at a time."""
        def step(hn_params, hn_opt_state, ids, cot, valid):
            rows = self._take_hypernetworks(hn_params, hn_opt_state, ids)
            new, opt = self._on_every_device(self._step_hypernetworks)(*rows, ids, cot)
            target = jnp.where(valid, ids, jnp.iinfo(jnp.int32).max)          # padding: dropped
            return self.put((hn_params, hn_opt_state), target, (new, opt))

        num = client_ids.shape[0]
        pad = -num % chunk
        ids = jnp.pad(client_ids, (0, pad)).reshape(-1, chunk)
        cots = jnp.pad(cot, ((0, pad), (0, 0), (0, 0))).reshape((-1, chunk) + cot.shape[1:])
        valid = (jnp.arange(num + pad) < num).reshape(-1, chunk)

        def body(carry, xs):
            return step(*carry, *xs), None

        (hn_params, hn_opt_state), _ = jax.lax.scan(body, (hn_params, hn_opt_state), (ids, cots, valid))
        return hn_params, hn_opt_state

    def _block(self, state, ids, key, data):
        """Aggregate -> train -> store -> HN update for clients `ids`, from one snapshot."""
        chunk = self._chunks(state["hn_params"], state["hn_opt_state"], ids.shape[0])
        whole = chunk >= ids.shape[0]   # all participants' hypernetworks taken at once
        if whole:
            hn_rows = self._take_hypernetworks(state["hn_params"], state["hn_opt_state"], ids)
            alpha = self._on_every_device(lambda p, i: stacked_alpha(self.hn, p, i))(hn_rows[0], ids)
        else:
            alpha = self._cohort_alpha(state["hn_params"], state["hn_opt_state"], ids, chunk)
        retained, theta_bar = self._aggregate(alpha, state["client_params"], ids)
        trained, stats, metrics = self.ctx.trainer.train(
            theta_bar, self.take(state["batch_stats"], ids), ids, key, data)
        delta = jax.tree.map(jnp.subtract, trained, theta_bar)
        delta_sq, reference = self._delta_reference(state, ids, delta)
        # the HN gradient uses the stored params that built theta_bar (before the write below)
        cot = hn_cotangent(state["client_params"], delta, self.layer_map, self.hn.num_clients,
                           retained, self.config.hn_cotangent, self._mesh_of(state["client_params"]),
                           delta_sq)
        if whole:
            new_hn, new_opt = self._on_every_device(self._step_hypernetworks)(*hn_rows, ids, cot)
            hn_params, hn_opt = self.put((state["hn_params"], state["hn_opt_state"]), ids, (new_hn, new_opt))
        else:
            hn_params, hn_opt = self._update_cohort(state["hn_params"], state["hn_opt_state"], ids, cot, chunk)
        # theta_i <- theta_bar_i + delta_i (= the trained params)
        new_state = {
            "client_params": self.put(state["client_params"], ids, trained),
            "batch_stats": self.put(state["batch_stats"], ids, stats),
            "hn_params": hn_params,
            "hn_opt_state": hn_opt,
            **reference,
        }
        up, down = communication(self.layer_map.num_params, retained)
        return new_state, {**metrics, "bytes_up": up, "bytes_down": down}

    def round_step(self, state, round_idx, client_ids, key, data):
        if self.config.semantics == "synchronous":
            return self._block(state, client_ids, key, data)
        return self.one_client_at_a_time(self._block, state, client_ids, key, data)

    # ------------------------------------------------------------------ evaluation
    def all_alpha(self, state):
        """(alpha [N, L, N], retained [N, L], theta_bar [N_pad, ...]) of every client.

        Every stored row goes through its own hypernetwork (the mesh-padding rows as copies
        of client 0, dropped from alpha; their theta_bar rows are meaningless), the
        hypernetworks taken `HN_CHUNK_BYTES` at a time (`personalize_all`): no copy of all
        N hypernetworks is made (one vmapped call would transpose every head: BUILD_NOTES
        (1,000 clients)).
        """
        n = self.ctx.num_clients
        rows = jax.tree.leaves(state["client_params"])[0].shape[0]
        ids = jnp.where(jnp.arange(rows) < n, jnp.arange(rows), 0).astype(jnp.int32)
        alpha, retained, theta_bar = self.personalize_all(state["hn_params"], state["client_params"], ids)
        return alpha[:n], retained[:n], theta_bar

    def evaluate(self, state, round_idx, key):
        # alpha and theta_bar of all N clients from one personalize_all() call (it costs
        # O(N^2 |theta|): not to be done twice per evaluation)
        alpha, retained, theta_bar = self.all_alpha(state)
        alpha, retained = host_array(alpha), host_array(retained)
        return Evaluation(
            views={"": View(theta_bar, state["batch_stats"]),
                   "local": View(state["client_params"], state["batch_stats"])},
            arrays={"alpha": alpha, "retained": retained},
            scalars=alpha_statistics(alpha, self.layer_map.names))

    def export_metadata(self):
        return {"layers": np.array(self.layer_map.names)}


def alpha_statistics(alpha: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    """Mean self-weight per layer (the paper's Fig. 7 reading), averaged over clients, and
    the share of (client, layer) rows that are exactly one-hot.

    Args:
      alpha: [N, L, N].
      names: the L layer names.
    Returns:
      {'alpha_self/<layer>': mean over clients of alpha[i, l, i], 'alpha_self_mean': ...,
       'alpha_one_hot_rows': fraction of rows alpha[i, l] with a weight of exactly 1}.
    """
    n = alpha.shape[0]
    self_w = alpha[np.arange(n), :, np.arange(n)]  # [N, L]
    out = {f"alpha_self/{name}": float(self_w[:, l].mean()) for l, name in enumerate(names)}
    out["alpha_self_mean"] = float(self_w.mean())
    out["alpha_one_hot_rows"] = float(np.mean(alpha.max(-1) == 1.0))
    return out


def hn_delta_psi(hn, hn_params, client_ids, cot) -> Any:
    """(Delta v_i, Delta psi_i) = (d alpha_i / d psi_i)^T G_i (paper Eqs. 10-11).

    With the raw cotangent G = `hn_cotangent(..., 'raw')` this is (d theta_bar_i /
    d psi_i)^T delta_i, computed without differentiating through parameter-sized tensors:
    G (the closed form of d<theta_bar_i, delta_i>/d alpha_i) pulled back through the small
    hypernetwork only (`jax.vjp`).

    Args:
      hn: the hypernetwork module (over N clients).
      hn_params: stacked hypernetwork params of the participants, leaves [S, ...].
      client_ids: int32 [S].
      cot: the cotangent of alpha, [S, L, N] (`hn_cotangent`).
    Returns:
      pytree like hn_params.
    """
    _, vjp = jax.vjp(lambda p: stacked_alpha(hn, p, client_ids), hn_params)
    (delta_psi,) = vjp(cot)
    return delta_psi


def hn_cotangent(client_params, delta, layer_map: LayerMap, num_clients: int, retained,
                 cotangent: str = "raw", mesh=None, delta_sq=None) -> jax.Array:
    """The cotangent of alpha [S, L, N] that Eqs. 10-11 pull back through the hypernetwork.

    'raw': G[s, l, j] = <theta_j[l], delta_s[l]> (`alpha_cotangent`, the closed form of
    d<theta_bar_s, delta_s>/d alpha[s, l, j]); 'model' / 'layer': `normalized_cotangent`
    with that scope. Layers retained by HeurpFedLA did not use alpha: their cotangent is
    zero. `mesh`: the mesh the stored params are split over (see core/aggregation.py; None:
    not split). `delta_sq` [S, L]: the squared update norms the normalised cotangents divide
    by (None: delta's own).
    """
    if cotangent in ("model", "layer"):
        cot = normalized_cotangent(client_params, delta, layer_map, num_clients, mesh,
                                   scope=cotangent, delta_sq=delta_sq)
    else:
        cot = alpha_cotangent(client_params, delta, layer_map, mesh)[:, :, :num_clients]
    return jnp.where(retained[:, :, None], 0.0, cot)


def delta_sq_norms(delta, layer_map: LayerMap) -> jax.Array:
    """|delta_s[l]|^2 per participant and aggregation layer: float32 [S, L]."""
    num_s = jax.tree.leaves(delta)[0].shape[0]
    out = jnp.zeros((num_s, layer_map.num_layers), jnp.float32)
    for unit, d in zip(jax.tree.leaves(layer_map.layer_of_leaf), jax.tree.leaves(delta)):
        out = out.at[:, unit].add(jnp.sum(jnp.square(d.reshape(num_s, -1).astype(jnp.float32)), axis=1))
    return out


def normalized_cotangent(client_params, delta, layer_map: LayerMap, num_clients: int,
                         mesh=None, scope: str = "model", delta_sq=None) -> jax.Array:
    """The alpha cotangent made independent of the size of the clients' updates and models.

    scope 'layer':
        Gn[s, l, j] = <theta_j[l] - mean_k theta_k[l], delta_s[l]> / (|delta_s[l]| * sigma_l),
        sigma_l^2  = mean_j |theta_j[l] - mean_k theta_k[l]|^2
    scope 'model': the same numerator over |delta_s| * sigma with the norms taken over the
    whole model (|delta_s|^2 = sum_l |delta_s[l]|^2, sigma^2 = sum_l sigma_l^2).

    i.e. how well client j's deviation from the mean model lines up with client s's local
    update, a correlation in units of the models' spread. Only differences across j reach a
    normalised alpha, so subtracting the mean leaves the direction of the raw update per
    (s, l) unchanged; dividing by |delta| sigma removes its scale, which grows with the
    client learning rate and local budget (the raw G is a product of two parameter
    differences). 'layer' gives every layer a cotangent of the same size, so all layers
    move alike; 'model' keeps the layers' relative sizes (a layer that the clients change
    little and that differs little across clients, like the first conv, gets a small
    cotangent and stays shared: the paper's Fig. 7). Both are invariant to scaling delta (and
    to scaling the spread of the models); zero when all stored models are equal. With
    `delta_sq` [S, L] (e.g. the squared norms of each client's first update,
    `--hn_delta_reference=first`), |delta_s[l]|^2 is taken from it instead: then scaling
    delta and delta_sq together (a larger client lr or budget) leaves the result unchanged,
    and a client whose updates shrink gets a smaller step. Sizes as `alpha_cotangent` (with `mesh`, each
    device works on its own rows), padding rows (j >= num_clients) excluded; returns
    [S, L, num_clients].
    """
    units = jax.tree.leaves(layer_map.layer_of_leaf)

    def local(block: RowBlock, params, delta):
        rows = jax.tree.leaves(params)[0].shape[0]
        first = block.first_row(rows)
        real = ((first + jnp.arange(rows)) < num_clients).astype(jnp.float32)
        total = block.total
        # differences to client 0's row first: equal models give exactly zero (no rounding
        # residue for the division by the spread to blow up), and less cancellation overall
        ref = jax.tree.map(lambda w: total(jnp.where(first == 0, w[0], jnp.zeros_like(w[0]))), params)
        diff = jax.tree.map(jnp.subtract, params, ref)
        mean = jax.tree.map(lambda d: total(jnp.einsum("n,n...->...", real.astype(d.dtype), d,
                                                       precision=jax.lax.Precision.HIGHEST)) / num_clients,
                            diff)
        centred = jax.tree.map(jnp.subtract, diff, mean)
        spread = jnp.zeros((layer_map.num_layers,), jnp.float32)
        for unit, c in zip(units, jax.tree.leaves(centred)):
            spread = spread.at[unit].add(jnp.sum(jnp.square(c.reshape(rows, -1)) * real[:, None]))
        # this device's columns of G (its own rows: no mesh here)
        return alpha_cotangent(centred, delta, layer_map), total(spread) / num_clients

    cot, spread_sq = over_row_blocks(local, mesh, in_axes=(0, None), out_axes=(2, None))(
        client_params, delta)
    if delta_sq is None:
        delta_sq = delta_sq_norms(delta, layer_map)
    if scope == "model":
        delta_sq = jnp.broadcast_to(jnp.sum(delta_sq, axis=1, keepdims=True), delta_sq.shape)
        spread_sq = jnp.broadcast_to(jnp.sum(spread_sq), spread_sq.shape)
    elif scope != "layer":
        raise ValueError(f"scope must be 'model' or 'layer', got {scope!r}")
    scale = jnp.sqrt(delta_sq) * jnp.sqrt(spread_sq)[None, :]                      # [S, L]
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.where(scale[:, :, None] > 0, cot[:, :, :num_clients] / safe[:, :, None], 0.0)


def communication(layer_sizes, retained: jax.Array, bytes_per_param: int = 4):
    """Bytes up and down per participant, for retained-layer masks `retained` [S, L].

    Uplink: the full model. Downlink: the model minus its retained layers (with the
    CNNTarget's layer sizes, the paper's Table 3 entries for k >= 1 follow exactly from its
    k = 0 entry: tests/test_pfedla_hypernetwork.py). Traceable; int32 [S] each.
    """
    sizes = jnp.asarray(np.asarray(layer_sizes, np.int32))
    up = jnp.full(retained.shape[:1], int(np.sum(layer_sizes)) * bytes_per_param, jnp.int32)
    down = jnp.sum(jnp.where(retained, 0, sizes[None, :]), axis=1) * bytes_per_param
    return up, down.astype(jnp.int32)

