"""APFL (Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning", arXiv
2003.13461, 2020, Algorithm 1 and Eq. 10): each client learns a personal model v_i and a
mixing weight alpha_i; its personalised model is the mixture of parameters

    vbar_i = alpha_i v_i + (1 - alpha_i) w.

Server state: the global model w. Per client: v_i, alpha_i (a scalar), the client's copy of
w after its latest local training (the 'local' view) and two sets of BN running
statistics (those of w's forward passes, as every method here, and those of vbar's).

One round (Algorithm 1; every local step on the minibatch xi uses the values from before the
step on every right-hand side):

    server sends w^t to the participants S
    for each participant i (in parallel): w_i = w^t
        for each local minibatch xi (the trainer's epochs or --local_steps):
            vbar   = alpha v + (1 - alpha) w_i
            g_w    = grad f_i(w_i; xi)
            g_bar  = grad f_i(vbar; xi)
            w_i   <- w_i - eta g_w                                      (local SGD on w)
            v     <- v - eta alpha g_bar             (= v - eta grad_v f_i(vbar; xi))
            alpha <- clip_[0,1](alpha - eta_alpha <v - w_i, g_bar>)      (Eq. 10: grad_alpha)
        upload w_i; keep v and alpha
    server: w^{t+1} = sum_{i in S} n_i w_i / sum_{i in S} n_i        (train-set sizes)

eta = --lr; eta_alpha = --apfl_alpha_lr (0: the same as --lr, as in the official code
FedTorch, whose alpha step uses the model's learning rate); alpha_i starts at --apfl_alpha
(0.5: FedTorch's `fed_personal_alpha` default and the middle of the paper's {0.25, 0.5,
0.75}); --apfl_adaptive=false keeps alpha fixed (the paper's fixed-alpha runs). v_i starts as
the client's initial model. Plain SGD (the paper's update): --momentum and --weight_decay
are refused.

Choices and deviations from the public codes (all of which deviate from the paper's alpha
step):
  * Parameter mixing, as in the paper (FedTorch, FL-bench and FL4Health mix logits,
    alpha f(x; v) + (1 - alpha) f(x; w), which equals it only for a linear model).
  * The alpha gradient is Eq. 10's <v - w, grad f(vbar)> alone: no +0.02 alpha term
    (FedTorch's and FL-bench's "momentum for alpha", the gradient of 0.01 alpha^2), and it
    is taken at every local step (FedTorch updates alpha only at the round's first step and
    only with `fed_adaptive_alpha`, off by default; FL-bench every step of epoch 0).
  * w_i is stepped once per minibatch (FL-bench steps it twice: a missing zero_grad), v is
    trained through the mixture (PFLlib trains v as a plain local model and overwrites it
    with the mixture), and the mixture is built from the current w_i at every step (Ditto's
    APFL baseline uses the previous round's local w at the first step).
  * alpha is clipped to [0, 1] after each step (the paper's alpha is a convex weight; every
    reference clips).
  * BN (a choice of this project; the paper's models have no BN): a forward pass of vbar in
    train mode updates the client's `personal_stats`, a forward pass of w_i its
    `batch_stats`; neither is averaged. vbar is evaluated with `personal_stats`.

The round's reported train loss is f_i(vbar; xi) of each step (the personalised model's).

Evaluation (BN in eval mode):
  ''        alpha_i v_i + (1 - alpha_i) w, the latest GLOBAL w, with personal_stats; defined
            for every client (FL-bench's `before` and Ditto's APFL evaluation point).
  'local'   alpha_i v_i + (1 - alpha_i) w_i with the client's w_i after its latest local
            training (the paper's and FedTorch's evaluation point; the initial model for a
            client that never trained), with personal_stats.
  'global'  w with each client's batch_stats.
The mixing weights are exported at evaluations (WORKDIR/apfl_alpha.npz: alpha [E, N]).

Communication per participant and round: the model down (w^t) and up (w_i); v_i and alpha_i
never leave the client.

Shapes: 'global_params' one unstacked model; 'client_params' (w_i), 'personal_params'
(v_i), 'batch_stats', 'personal_stats' leaves [N_pad, ...]; 'alpha' float32 [N_pad].
Errors: `APFLConfig.validate` / `validate_training` raise UserInputError (one line, naming
the flag) before any data is loaded.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pfedla_jax.algorithms.base import Algorithm, AlgorithmConfig, Evaluation, FLContext, TableRow
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import CLIENT_LR, Choice, Uniform
from pfedla_jax.core.aggregation import weighted_average
from pfedla_jax.core.client_update import Batch, ClientUpdate, masked_cross_entropy, mean_batch_loss
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.core.multihost import host_array
from pfedla_jax.core.state_size import StateTerm, client_models_terms, per_client_term, server_model_term
from pfedla_jax.errors import UserInputError


def _help(text: str) -> dict:
    return {"help": f"APFL: {text}"}


@dataclasses.dataclass(frozen=True)
class APFLConfig(AlgorithmConfig):
    """APFL's options (CLI --apfl_<field>; the defaults: the module docstring)."""

    alpha: float = dataclasses.field(default=0.5, metadata=_help(
        "the initial mixing weight alpha_i of every client's personal model v_i, in [0, 1] "
        "(FedTorch's default 0.5; the paper runs 0.25, 0.5, 0.75)."))
    adaptive: bool = dataclasses.field(default=True, metadata=_help(
        "learn alpha_i by its gradient (Alg. 1, Eq. 10); false keeps it at --apfl_alpha."))
    alpha_lr: float = dataclasses.field(default=0.0, metadata=_help(
        "eta_alpha, the step size of alpha_i; 0 (default): the client lr --lr, as in "
        "FedTorch."))

    def validate(self) -> None:
        """Raises UserInputError (one line, naming the flag) on a bad option."""
        if not 0.0 <= self.alpha <= 1.0:
            raise UserInputError(f"--apfl_alpha must be in [0, 1], got {self.alpha}")
        if not (self.alpha_lr >= 0 and math.isfinite(self.alpha_lr)):
            raise UserInputError(f"--apfl_alpha_lr must be a finite number >= 0 (0: --lr), "
                                 f"got {self.alpha_lr}")

    def validate_training(self, train: LocalTrainConfig) -> None:
        """The local steps are the paper's plain updates: no momentum, no weight decay."""
        if train.momentum > 0 or train.weight_decay > 0:
            raise UserInputError("APFL's local steps are plain SGD updates of w, v and alpha "
                                 "(Alg. 1): --momentum and --weight_decay must be 0")

    def step_size(self, lr: float) -> float:
        """eta_alpha for client lr `lr` (0 when alpha is fixed)."""
        if not self.adaptive:
            return 0.0
        return self.alpha_lr if self.alpha_lr > 0 else lr


# ---------------------------------------------------------------------------- the local step
def mix(alpha, v, w):
    """alpha v + (1 - alpha) w, leaf by leaf (alpha a scalar)."""
    return jax.tree.map(lambda a, b: alpha * a + (1.0 - alpha) * b, v, w)


def apfl_update(model, *, lr: float, alpha_lr: float, loss=masked_cross_entropy) -> ClientUpdate:
    """One client's APFL local training as a `ClientUpdate` (module docstring).

    Inputs: `shared` = the global model w^t (unstacked; every participant's w_i starts
    there); `client` = {'v': v_i, 'alpha': float32 scalar, 'batch_stats': w's BN statistics,
    'personal_stats': vbar's}. One minibatch per step. Output: {'params': w_i after the last
    batch, 'v', 'alpha', 'batch_stats', 'personal_stats'}. The step's reported loss is
    f(vbar; xi) before the step, summed over xi's real examples.

    Args:
      model: a Flax module called as model.apply(variables, x, train=True, mask=mask,
        mutable=['batch_stats']) -> (outputs, new_vars).
      lr: eta, the step size of w_i and v_i.
      alpha_lr: eta_alpha (0: alpha fixed).
      loss: (outputs, labels, mask [B]) -> (sum of the real examples' losses, their count);
        cross-entropy by default (tests pass a quadratic for closed forms).
    """
    grad = jax.grad(mean_batch_loss(model, loss), has_aux=True)

    def init(shared, client, client_id, key):
        return (shared, client["v"], jnp.asarray(client["alpha"]),
                client["batch_stats"], client["personal_stats"])

    def step(carry, batch: Batch):
        w, v, alpha, stats_w, stats_v = carry
        x, y, mask = batch.x[0], batch.y[0], batch.mask[0]
        vbar = mix(alpha, v, w)
        g_w, (_, _, stats_w) = grad(w, stats_w, x, y, mask)
        g_bar, (total, count, stats_v) = grad(vbar, stats_v, x, y, mask)
        # grad_alpha f(vbar) = <v - w, grad f(vbar)> (Eq. 10), from the pre-step v and w
        d_alpha = sum(jnp.vdot(vi - wi, gi) for vi, wi, gi in
                      zip(jax.tree.leaves(v), jax.tree.leaves(w), jax.tree.leaves(g_bar)))
        new_w = jax.tree.map(lambda a, g: a - lr * g, w, g_w)
        new_v = jax.tree.map(lambda a, g: a - lr * alpha * g, v, g_bar)
        new_alpha = jnp.clip(alpha - alpha_lr * d_alpha, 0.0, 1.0)
        return (new_w, new_v, new_alpha, stats_w, stats_v), (total, count)

    def finalize(carry, shared, client):
        w, v, alpha, stats_w, stats_v = carry
        return {"params": w, "v": v, "alpha": alpha, "batch_stats": stats_w,
                "personal_stats": stats_v}

    return ClientUpdate(init=init, step=step, finalize=finalize)


# ---------------------------------------------------------------------------- the algorithm
@register("apfl", APFLConfig)
class APFL(Algorithm):
    """APFL on the stacked engine (module docstring)."""

    display_name = "APFL"
    table_rows = (TableRow("apfl", "APFL", order=22),)
    server_state_keys = ("global_params",)
    export_name = "apfl_alpha"
    search_space = (
        CLIENT_LR,
        Uniform("alpha", 0.25, 0.75, source="APFL paper Sec. 6 (alpha in {0.25, 0.5, 0.75})"),
        Choice("adaptive", (True, False), source="APFL paper Sec. 6 (adaptive and fixed alpha)"),
    )

    @classmethod
    def state_size_terms(cls, config, dims):
        """w_i (client_params) and v_i of every client, both BN statistics, alpha_i, the
        global w."""
        client, stats = client_models_terms(dims)
        return [client, per_client_term("client params", "personal_params", dims.P, "P"), stats,
                per_client_term("BN statistics", "personal_stats", dims.B, "B"),
                StateTerm("other", "alpha", "4·N", True, lambda n: 4 * n),
                server_model_term(dims)]

    def __init__(self, ctx: FLContext, config: APFLConfig | None = None):
        super().__init__(ctx, config)
        self.alpha_lr = self.config.step_size(ctx.train.lr)
        self.trainer: ClientTrainer = ctx.trainer.with_update(
            apfl_update(ctx.model, lr=ctx.train.lr, alpha_lr=self.alpha_lr))

    def describe(self) -> str:
        cfg = self.config
        rule = f"learned, step {self.alpha_lr:g}" if cfg.adaptive else "fixed"
        return f"alpha starts at {cfg.alpha:g} ({rule}); parameter mixing"

    def init_state(self, key):
        params, stats = self.ctx.init_client_variables(key)
        weights = self.ctx.store.train_count.astype(jnp.float32)
        copy = lambda t: jax.tree.map(jnp.array, t)
        return {"global_params": weighted_average(params, weights), "client_params": params,
                "personal_params": copy(params), "batch_stats": stats,
                "personal_stats": copy(stats),
                "alpha": jnp.full((self.ctx.num_clients,), self.config.alpha, jnp.float32)}

    def round_step(self, state, round_idx, client_ids, key, data):
        client = {"v": self.take(state["personal_params"], client_ids),
                  "alpha": self.take(state["alpha"], client_ids),
                  "batch_stats": self.take(state["batch_stats"], client_ids),
                  "personal_stats": self.take(state["personal_stats"], client_ids)}
        out, metrics = self.trainer.run(state["global_params"], client, client_ids, key, data)
        weights = jnp.take(data.train_count, client_ids).astype(jnp.float32)
        new_state = {
            "global_params": weighted_average(out["params"], weights),
            "client_params": self.put(state["client_params"], client_ids, out["params"]),
            "personal_params": self.put(state["personal_params"], client_ids, out["v"]),
            "batch_stats": self.put(state["batch_stats"], client_ids, out["batch_stats"]),
            "personal_stats": self.put(state["personal_stats"], client_ids, out["personal_stats"]),
            "alpha": self.put(state["alpha"], client_ids, out["alpha"]),
        }
        model = jnp.full(client_ids.shape, self.ctx.model_bytes, jnp.int32)
        return new_state, {**metrics, "bytes_up": model, "bytes_down": model}

    def evaluate(self, state, round_idx, key):
        alpha, v = state["alpha"], state["personal_params"]
        per_row = lambda a, x: a.reshape(a.shape + (1,) * (x.ndim - 1))
        mixed = lambda w: jax.tree.map(lambda vi, wi: per_row(alpha, vi) * vi + (1.0 - per_row(alpha, vi)) * wi,
                                       v, w)
        personal = mixed(jax.tree.map(lambda g, vi: jnp.broadcast_to(g, vi.shape),
                                      state["global_params"], v))
        return Evaluation(
            views={"": View(personal, state["personal_stats"]),
                   "local": View(mixed(state["client_params"]), state["personal_stats"]),
                   "global": View(state["global_params"], state["batch_stats"], shared=True)},
            arrays={"alpha": host_array(state["alpha"])[:self.ctx.num_clients]})
