"""FedALA (Zhang, Hua, Wang, Song, Xue, Ma, Guan, "FedALA: Adaptive Local Aggregation for
Personalized Federated Learning", AAAI 2023, Eqs. 1-2; official code
TsingZ0/FedALA `system/utils/ALA.py`, `clientALA.py`, `serverALA.py`).

Before local training, each participant mixes the global model Theta it receives into its
own model theta_i with element-wise weights W_i in [0, 1] that it learns (the ALA module):

    thetahat_i = theta_i + (Theta - theta_i) (.) [1 ; W_i]                        (Eq. 1)

The lower layers take Theta (weight 1, never learned); the top p layers (`--fedala_layers`,
counted over the model's layers in forward order, BN layers included: p = 1 is FC3) mix
element by element. W_i is learned on a random s% of the client's training data
(`--fedala_rand_percent`), by clipped gradient steps on the training cross-entropy, one per
minibatch (Eq. 2; the chain rule through Eq. 1):

    W_i <- clip_[0,1](W_i - eta grad_thetahat L(thetahat_i; batch) (.) (Theta - theta_i))
    thetahat_i recomputed from the new W_i

Per round, for each participant i (in parallel, from one snapshot):
  1. ALA: skipped in the client's first participation (it takes Theta: theta_i is its
     initial model); in its second, the start phase: W_i trains epoch after epoch over the
     sample until the population std of the last `--fedala_num_pre_loss` (10) epoch losses
     (each epoch's last-batch loss, taken before that batch's step) is below
     `--fedala_threshold`, i.e. at least 11 epochs, and at most `--fedala_max_start_epochs`;
     afterwards one epoch per round. W_i starts at 1 (the first mix is Theta exactly) and
     persists from round to round, never sent.
  2. Local training from thetahat_i (the experiment's SGD trainer, every layer); the trained
     model is the new theta_i.
  3. Server: Theta = sum_i n_i theta_i / sum_i n_i over the participants (FedAvg).

The sample: a random subset of int(s/100 n_i) (at least 1) of the client's n_i training
examples in a random order, redrawn every round (`fold_in(round key, stream)`, then the client
id), in minibatches of --batch_size without reshuffling between epochs, the last one partial.
The official code takes a contiguous window at a random offset of its (pre-shuffled) data list,
the same distribution of subsets up to the window's overlap between rounds; a random subset
does not depend on how this project's store orders a client's examples.

BN: the ALA forward passes run in train mode (batch statistics) and their running-statistic
updates are discarded (the official temporary model's are); the BN scale/bias of lower
layers take Theta like every lower parameter. Running statistics stay with each client.

Defaults and sources: s = 80, p = 1 (the paper's settings and ablations; the code's
`layer_idx = 2` counts tensors: FC3's kernel and bias), eta = 1.0 (official code), the loss
window 10 (`num_pre_loss`), threshold 0.1 (the code's `ALA.__init__` default, which
`clientALA` never overrides; the README mentions 0.01). The start phase has no cap in the
official code (its README warns that a small threshold gets runs stuck); here it is a
bounded `lax.while_loop` of at most --fedala_max_start_epochs (50, this project's choice)
epochs, so that a round's cost is bounded.

Deviations from the official code, and reference bugs avoided:
  * Only the participants run ALA (the official server sends Theta to all N clients and
    every client runs ALA each round, so non-participants drift through ALA; with full
    participation, the paper's main setting, the two agree).
  * The first round is detected by a per-client flag (`trained`), not by the official
    `sum(Theta[0] - theta_i[0]) == 0` test, which breaks under independent initialisation.
  * W_i, the flags and theta_i are per client (FL-bench keeps W and the start-phase flag on
    its worker objects, so in serial mode one W is shared by every client and only the
    first client ever gets a start phase).

Evaluation (BN in eval mode, each client's running statistics):
  ''        theta_i, each client's model after its latest local training (the initial model
            for a client that never trained).
  'ala'     thetahat_i = the mix of Eq. 1 with the latest Theta and the stored W_i (Theta for
            a client that never trained): the official evaluation point (it evaluates
            thetahat before training, after that round's ALA step) without the W step.
  'global'  Theta.

Communication per participant and round: the full model down (Theta) and up (theta_i),
FedAvg's; W_i never leaves the client. The round's metrics add 'ala_epochs' [S], the ALA
epochs each participant ran (0 in its first participation).

Shapes: 'global_params' one unstacked model; 'client_params', 'batch_stats' leaves
[N_pad, ...]; 'ala_weights' {top layer: {leaf: [N_pad, ...]}}; 'trained', 'started' bool
[N_pad] (the client has trained once; its start phase is done).
Errors: `FedALAConfig.validate` raises UserInputError (one line, naming the flag) before
any data is loaded; the constructor when --fedala_layers exceeds the model's layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pfedla_jax.algorithms.base import Algorithm, AlgorithmConfig, Evaluation, FLContext, TableRow
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import CLIENT_LR, Choice, LogUniform
from pfedla_jax.core.aggregation import weighted_average
from pfedla_jax.core.client_parallel import for_each_client
from pfedla_jax.core.client_update import Batch, masked_cross_entropy, mean_batch_loss
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.state_size import StateTerm, client_models_terms, per_client_term, server_model_term
from pfedla_jax.data.store import ClientStore, normalize_images
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import count_params

# fold_in stream of the round key for the ALA samples (above any client id)
_SAMPLE_STREAM = 0xA1A00001


def _help(text: str) -> dict:
    return {"help": f"FedALA: {text}"}


@dataclasses.dataclass(frozen=True)
class FedALAConfig(AlgorithmConfig):
    """FedALA's options (CLI --fedala_<field>; the defaults and their sources: the module
    docstring)."""

    rand_percent: float = dataclasses.field(default=80.0, metadata=_help(
        "s, the percent of a client's training examples the ALA weights are learned on, in "
        "(0, 100] (paper and official code: 80)."))
    layers: int = dataclasses.field(default=1, metadata=_help(
        "p, the top layers mixed element-wise by the learned weights (the lower ones take the "
        "global model); counted over the model's layers, BN included (paper: 1)."))
    eta: float = dataclasses.field(default=1.0, metadata=_help(
        "eta, the step size of the ALA weights (official code: 1.0)."))
    threshold: float = dataclasses.field(default=0.1, metadata=_help(
        "the start phase stops when the std of the last --fedala_num_pre_loss epoch losses "
        "is below this (official code: 0.1; its README: 0.01)."))
    num_pre_loss: int = dataclasses.field(default=10, metadata=_help(
        "the epoch losses the start phase's std is taken over (official code: 10)."))
    max_start_epochs: int = dataclasses.field(default=50, metadata=_help(
        "cap on the start phase's epochs (the official code has none; this project: 50)."))

    def validate(self) -> None:
        """Raises UserInputError (one line, naming the flag) on a bad option."""
        if not (0 < self.rand_percent <= 100):
            raise UserInputError(f"--fedala_rand_percent must be in (0, 100], got {self.rand_percent}")
        if self.layers < 1:
            raise UserInputError(f"--fedala_layers must be >= 1, got {self.layers}")
        if not (self.eta > 0 and math.isfinite(self.eta)):
            raise UserInputError(f"--fedala_eta must be a positive number, got {self.eta}")
        if not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise UserInputError(f"--fedala_threshold must be a finite number >= 0, got {self.threshold}")
        if self.num_pre_loss < 1:
            raise UserInputError(f"--fedala_num_pre_loss must be >= 1, got {self.num_pre_loss}")
        if self.max_start_epochs <= self.num_pre_loss:
            raise UserInputError(
                f"--fedala_max_start_epochs={self.max_start_epochs} must exceed "
                f"--fedala_num_pre_loss={self.num_pre_loss} (the start phase's stop test needs "
                "more epochs than its loss window)")

    def sample_sizes(self, train_counts) -> np.ndarray:
        """int32 [N]: the ALA sample of each client, int(s/100 n_i), at least 1."""
        counts = np.asarray(train_counts, np.int64)
        return np.maximum(1, (self.rand_percent / 100 * counts).astype(np.int64)).astype(np.int32)


# ---------------------------------------------------------------------------- the ALA module
def mix_top(local: Any, global_: Any, weights: Any) -> Any:
    """Eq. 1: theta + (Theta - theta) (.) W on the layers of `weights` (the top layers), Theta
    on every other layer. One client's params (unstacked)."""
    out = dict(global_)
    for layer, w in weights.items():
        out[layer] = jax.tree.map(lambda t, g, wi: t + (g - t) * wi, local[layer], global_[layer], w)
    return out


def adaptive_local_aggregation(model, local: Any, global_: Any, weights: Any, batch_stats: Any,
                               batches: Batch, num_batches, *, run, start_phase, eta: float,
                               threshold: float, window: int, max_epochs: int,
                               loss=masked_cross_entropy):
    """One client's ALA module (Eqs. 1-2; official `ALA.adaptive_local_aggregation`).

    Args:
      model: a Flax module called as model.apply(variables, x, train=True, mask=mask,
        mutable=['batch_stats']) -> (outputs, new_vars).
      local: theta_i, the client's params (unstacked).
      global_: Theta, the received global params.
      weights: W_i, {top layer: {leaf: array shaped like the leaf}} in [0, 1].
      batch_stats: the client's BN statistics (train-mode forwards; updates discarded).
      batches: the ALA sample as minibatches, x [A, B, ...], y [A, B], mask [A, B].
      num_batches: int scalar <= A, the client's own minibatches (the rest are skipped).
      run: bool scalar: False skips ALA (the client's first participation: Theta returned,
        W unchanged, 0 epochs).
      start_phase: bool scalar: train W until the std of the last `window` epoch losses is
        below `threshold` (at least window + 1 epochs, at most max_epochs); else one epoch.
      eta: the step size of W.
      loss: (outputs, labels, mask) -> (loss sum, count); cross-entropy by default.

    Returns:
      (thetahat_i: the mixed params (Theta on the lower layers), the new W_i, int32 epochs
      run).
    """
    f = mean_batch_loss(model, loss)
    top = {layer: local[layer] for layer in weights}
    diff = {layer: jax.tree.map(lambda g, t: g - t, global_[layer], local[layer]) for layer in weights}
    lower = {layer: p for layer, p in global_.items() if layer not in weights}

    def hat(w):
        return jax.tree.map(lambda t, d, wi: t + d * wi, top, diff, w)

    grad = jax.grad(lambda tp, x, y, m: f({**lower, **tp}, batch_stats, x, y, m), has_aux=True)

    def one_batch(a, carry):
        w, _ = carry
        g, (total, count, _) = grad(hat(w), batches.x[a], batches.y[a], batches.mask[a])
        w = jax.tree.map(lambda wi, gi, d: jnp.clip(wi - eta * gi * d, 0.0, 1.0), w, g, diff)
        return w, (total / jnp.maximum(count, 1.0)).astype(jnp.float32)

    def epoch(carry):
        w, e, buf, _ = carry
        w, last = jax.lax.fori_loop(0, num_batches, one_batch, (w, jnp.float32(0.0)))
        buf = buf.at[e % window].set(last)
        e = e + 1
        converged = (e > window) & (jnp.std(buf) < threshold)
        return w, e, buf, ~start_phase | converged

    def go_on(carry):
        _, e, _, done = carry
        return ~done & (e < max_epochs)

    init = (weights, jnp.int32(0), jnp.zeros((window,), jnp.float32), ~jnp.asarray(run))
    w, epochs, _, _ = jax.lax.while_loop(go_on, epoch, init)
    mixed = {**lower, **hat(w)}
    start = jax.tree.map(lambda m, g: jnp.where(run, m, g), mixed, dict(global_))
    return start, w, epochs


def ala_sample(key, count, size, own_idx, *, batch_size: int, num_batches: int):
    """One client's ALA sample: `size` of its `count` examples, a random subset in a random
    order (traceable).

    Args:
      key: the client's sample key of this round.
      count: int scalar, the client's training examples.
      size: int scalar in [1, count], the sample's size.
      own_idx: int [max_train], the client's row of ClientStore.train_idx.
      batch_size: B.
      num_batches: A (static), at least ceil(size / B).

    Returns:
      (idx int32 [A, B]: indices into the store's images, mask bool [A, B]: True for the
       sample's examples, in order, batch after batch; the last one partial).
    """
    max_train = own_idx.shape[0]
    slots = jnp.arange(max_train)
    order = jnp.argsort(jnp.where(slots < count, jax.random.uniform(key, (max_train,)), 2.0))
    pos = jnp.arange(num_batches * batch_size).reshape(num_batches, batch_size)
    return own_idx[order[jnp.minimum(pos, max_train - 1)]], pos < size


# ---------------------------------------------------------------------------- the algorithm
@register("fedala", FedALAConfig)
class FedALA(Algorithm):
    """FedALA on the stacked engine (module docstring)."""

    display_name = "FedALA"
    table_rows = (TableRow("fedala", "FedALA", order=27),)
    server_state_keys = ("global_params",)
    search_space = (
        CLIENT_LR,
        LogUniform("eta", 0.1, 10.0, source="official code (eta 1.0); FedALA issue #18 (eta 1)"),
        Choice("rand_percent", (5.0, 20.0, 80.0), source="FedALA paper, ablation of s (5..100)"),
    )

    @classmethod
    def top_layers(cls, config: FedALAConfig, layer_order) -> tuple[str, ...]:
        """The top p layers (the ones W mixes)."""
        return tuple(layer_order[-config.layers:])

    @classmethod
    def state_size_terms(cls, config, dims):
        """Every client's model and BN statistics, its ALA weights (the P_p scalars of the top
        p layers) and two flags, and the global model."""
        top = cls.top_layers(config, dims.layer_order)
        p_top = count_params({layer: dims.params[layer] for layer in top})
        client, stats = client_models_terms(dims)
        return [client, stats, per_client_term("other", "ala_weights", p_top, "P_p"),
                StateTerm("other", "trained", "N", True, lambda n: n),
                StateTerm("other", "started", "N", True, lambda n: n),
                server_model_term(dims)]

    @classmethod
    def state_size_symbols(cls, config, dims):
        """P_p: the scalars of the top p layers."""
        top = cls.top_layers(config, dims.layer_order)
        return {"P_p": count_params({layer: dims.params[layer] for layer in top})}

    def __init__(self, ctx: FLContext, config: FedALAConfig | None = None):
        super().__init__(ctx, config)
        cfg = self.config
        if cfg.layers > len(ctx.layer_order):
            raise UserInputError(f"--fedala_layers={cfg.layers} exceeds the model's "
                                 f"{len(ctx.layer_order)} layers ({', '.join(ctx.layer_order)})")
        self.top = self.top_layers(cfg, ctx.layer_order)
        counts = np.asarray(jax.device_get(ctx.store.train_count))
        self.sample_sizes = cfg.sample_sizes(counts)
        batch = ctx.train.batch_size
        self.num_ala_batches = int(-(-int(self.sample_sizes.max()) // batch))
        self.trainer = ctx.trainer
        self._ala_map = for_each_client(self._ala_client, self.trainer.strategy, self.trainer.mesh,
                                        negative_ids=False)
        self._jitted = {}

    def describe(self) -> str:
        cfg = self.config
        return (f"ALA on {', '.join(self.top)}: s {cfg.rand_percent:g}% "
                f"({int(self.sample_sizes.min())}-{int(self.sample_sizes.max())} examples), eta "
                f"{cfg.eta:g}; start phase: std of {cfg.num_pre_loss} losses < {cfg.threshold:g}, "
                f"at most {cfg.max_start_epochs} epochs")

    # ------------------------------------------------------------------ pieces
    def _sample(self, client_id, round_key, store: ClientStore):
        key = jax.random.fold_in(jax.random.fold_in(round_key, _SAMPLE_STREAM), client_id)
        return ala_sample(key, store.train_count[client_id], jnp.asarray(self.sample_sizes)[client_id],
                          store.train_idx[client_id], batch_size=self.ctx.train.batch_size,
                          num_batches=self.num_ala_batches)

    def ala_batches(self, client_id: int, round_key) -> tuple[np.ndarray, np.ndarray]:
        """The exact ALA sample of client `client_id` in the round of `round_key`:
        (idx int32 [A, B] into store.images, mask bool [A, B]); minibatch a is idx[a][mask[a]]
        (the client uses the rows with a real example)."""
        if "sample" not in self._jitted:
            self._jitted["sample"] = jax.jit(lambda c, k, s: self._sample(c, k, s))
        idx, mask = self._jitted["sample"](jnp.int32(client_id), round_key, self.ctx.data)
        return np.asarray(idx), np.asarray(mask)

    def _ala_client(self, shared, client, client_id, round_key):
        """One participant's ALA module. Traced once per program."""
        store, global_params = shared
        idx, mask = self._sample(client_id, round_key, store)
        batches = Batch(normalize_images(store.images[idx], store.mean, store.std),
                        store.labels[idx], mask.astype(jnp.float32))
        size = jnp.asarray(self.sample_sizes)[client_id]
        cfg = self.config
        start, w, epochs = adaptive_local_aggregation(
            self.ctx.model, client["params"], global_params, client["weights"], client["batch_stats"],
            batches, (size + self.ctx.train.batch_size - 1) // self.ctx.train.batch_size,
            run=client["trained"], start_phase=~client["started"], eta=cfg.eta,
            threshold=cfg.threshold, window=cfg.num_pre_loss, max_epochs=cfg.max_start_epochs)
        return {"start": start, "weights": w, "epochs": epochs}

    def mixed(self, state) -> Any:
        """thetahat of every client (Eq. 1 with the stored W; Theta if it never trained),
        leaves [N_pad, ...]."""
        trained = state["trained"]
        client = state["client_params"]
        rows = trained.shape[0]
        glob = jax.tree.map(lambda g: jnp.broadcast_to(g, (rows,) + g.shape), state["global_params"])
        out = dict(glob)
        for layer, w in state["ala_weights"].items():
            out[layer] = jax.tree.map(lambda t, g, wi: t + (g - t) * wi, client[layer], glob[layer], w)
        return jax.tree.map(
            lambda m, g: jnp.where(trained.reshape((rows,) + (1,) * (m.ndim - 1)), m, g), out, glob)

    # ------------------------------------------------------------------ the algorithm
    def init_state(self, key):
        params, stats = self.ctx.init_client_variables(key)
        n = self.ctx.num_clients
        weights = self.ctx.store.train_count.astype(jnp.float32)
        ones = {layer: jax.tree.map(jnp.ones_like, params[layer]) for layer in self.top}
        return {"global_params": weighted_average(params, weights), "client_params": params,
                "batch_stats": stats, "ala_weights": ones,
                "trained": jnp.zeros((n,), bool), "started": jnp.zeros((n,), bool)}

    def round_step(self, state, round_idx, client_ids, key, data):
        client = {"params": self.take(state["client_params"], client_ids),
                  "weights": self.take(state["ala_weights"], client_ids),
                  "batch_stats": self.take(state["batch_stats"], client_ids),
                  "trained": self.take(state["trained"], client_ids),
                  "started": self.take(state["started"], client_ids)}
        ala = self._ala_map((data, state["global_params"]), client, client_ids, key)
        params, stats, metrics = self.trainer.train(ala["start"], client["batch_stats"], client_ids,
                                                    key, data)
        weights = jnp.take(data.train_count, client_ids).astype(jnp.float32)
        new_state = {
            "global_params": weighted_average(params, weights),
            "client_params": self.put(state["client_params"], client_ids, params),
            "batch_stats": self.put(state["batch_stats"], client_ids, stats),
            "ala_weights": self.put(state["ala_weights"], client_ids, ala["weights"]),
            "trained": self.put(state["trained"], client_ids, jnp.ones(client_ids.shape, bool)),
            # the start phase ran in this round's ALA iff the client had trained before
            "started": self.put(state["started"], client_ids, client["started"] | client["trained"]),
        }
        model = jnp.full(client_ids.shape, self.ctx.model_bytes, jnp.int32)
        return new_state, {**metrics, "bytes_up": model, "bytes_down": model,
                           "ala_epochs": ala["epochs"]}

    def evaluate(self, state, round_idx, key):
        stats = state["batch_stats"]
        return Evaluation({"": View(state["client_params"], stats),
                           "ala": View(self.mixed(state), stats),
                           "global": View(state["global_params"], stats, shared=True)})
