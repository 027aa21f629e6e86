"""FedAMP (Huang, Chu, Zhou, Wang, Liu, Pei, Zhang, "Personalized Cross-Silo Federated
Learning on Non-IID Data", AAAI 2021, §3 and Algorithm 1): attentive message passing.

Objective G(W) = sum_i F_i(w_i) + lam sum_{i<j} A(||w_i - w_j||^2), A(x) = 1 - exp(-x / sigma)
(the paper's negative exponential attention function). Each client keeps its own model w_i;
the server keeps a copy of every w_j (here: the stored client models themselves). Round k,
for each participant i (all from one snapshot of the stored models):

    D_ij   = ||w_i - w_j||^2 over the trainable params (BN running statistics excluded)
    xi_ij  = alpha_k A'(D_ij) = (alpha_k / sigma) exp(-D_ij / sigma)        j != i
    xi_ii  = 1 - sum_{j != i} xi_ij            (rows sum to 1; no softmax, no clipping)
    u_i    = sum_j xi_ij w_j                   the personalised cloud model, sent to i
    client i, from its own w_i: local SGD on F_i(w) + lam / (2 alpha_k) ||w - u_i||^2
      (per minibatch w <- w - eta (grad F_i(w; batch) + (lam / alpha_k)(w - u_i))),
      then uploads w_i

u_i is one gradient step of size alpha_k on the attention term at w_i (the factor 2 of
dA/dw is absorbed into alpha_k, as the paper writes it). The pool j runs over all N stored
models, the paper's cross-silo setting (a client that has not trained yet contributes its
initial model); PFLlib uses the previous round's uploaders, fluke this round's participants.
Local training starts from the client's own w_i, as in PFLlib and fluke (the paper solves
the proximal problem, whose minimiser does not depend on the start).

The kernel at CNN scale (numerics). Distances between CNN models are large (hundreds after
a few rounds of local training at P ~ 10^5), so exp(-D/sigma) underflows for D/sigma >~ 100:
float32 has no number below ~1e-45, the attention vanishes, Xi = I and FedAMP is proximal
Local training. That value is right to float32 precision (such a weight could not change
u_i), so it is kept, and what can go wrong around it is avoided:
  * D from the differences (sum of (w_i - w_j)^2 per leaf), not ||w_i||^2 + ||w_j||^2 -
    2<w_i, w_j>, which cancels catastrophically in float32 when models are close (the error
    ~1e-7 ||w||^2 can exceed D itself, and a D clipped to 0 would turn into a spurious full
    attention alpha/sigma);
  * the kernel as one exp of log(alpha_k / sigma) - D / sigma, never the product of a large
    alpha/sigma and an underflowed exp (which loses the subnormal range, or gives 0 * inf);
  * the contraction u_i = sum_j xi_ij w_j at float32's highest precision, so Xi = I returns
    u_i = w_i bit for bit;
  * each participant's self-weight xi_ii is kept (`self_weight`) and its mean over clients
    reported at every evaluation (`fedamp_self_weight`): 1.0 means the attention has
    vanished (sigma too small for the distances: raise --fedamp_sigma), a negative value
    that u_i extrapolates (alpha_k (N - 1) / sigma > 1 with close models: lower
    --fedamp_alpha).

Per client: w_i (`client_params`), its BN running statistics, u_i as last received
(`cloud_params`, initially w_i) and xi_ii (`self_weight`, initially 1). The server keeps no
model of its own (the stored w_j are its copies); Xi is recomputed each round.

Evaluation: '' = w_i after its latest local training (the paper's personalised models);
'cloud' = the u_i it last received (fluke's evaluated model), both with the client's BN
statistics. Scalars: 'fedamp_self_weight' and 'fedamp_min_self_weight' over the clients.

Defaults: the paper's values are not known to us and there is no official code; PFLlib's
main.py has alpha_k = 1, lam = 1, sigma = 1 (its help text says alpha_k should decay as
lambda/sqrt(iteration); its code, and this one, keep it constant). We keep its sigma = 1 and
its prox weight lam / alpha_k = 1, with alpha_k = lam = 0.1: alpha_k (N - 1) / sigma <= 1 for
N = 10 keeps the self-weights >= 0, which PFLlib's alpha_k = 1 does not (on FMNIST, N = 10,
lr 0.05, 5 epochs: xi_ii = -8 in round 1 and between -4 and 0.6 in the next five; with 0.1:
0.1 in round 1, then 0.55 rising to 0.94 by round 6, squared distances ~1-3, measured).
PFLlib's earlier scripts used alpha_k 0.002, lam 1, sigma 0.01 (prox weight 500: lr * 500 >= 2
diverges at our learning rates). The describe() line warns when alpha_k (N - 1) / sigma > 1.
Search ranges (derived): sigma [0.1, 100] around the measured distances; alpha_k [0.01, 1]
(up to PFLlib's 1); lam [0.001, 0.06], so that the prox weight lam / alpha_k lies in
[0.001, 6] (FedProx's mu grid and more) and lr * lam / alpha_k < 2 for every client lr of the
search (at most 0.3).

Deviation: HeurFedAMP (the paper's cosine-similarity variant with a fixed xi_ii) is not
implemented. Known reference bugs avoided: PFLlib's current client builds its prox term from
`.data` tensors (no gradient: Local training), and its old HeurFedAMP never updated u.

Communication per participant and round: its u_i down (S distinct messages, not a
broadcast) and its w_i up, one model each.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pfedla_jax.algorithms.base import Algorithm, AlgorithmConfig, Evaluation, FLContext, TableRow
from pfedla_jax.algorithms.fedprox import check_prox_step, prox_update
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import CLIENT_LR, LogUniform
from pfedla_jax.core.client_parallel import over_row_blocks, rows_mesh
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig, make_optimizer
from pfedla_jax.core.multihost import host_array
from pfedla_jax.core.state_size import client_models_terms, per_client_term
from pfedla_jax.errors import UserInputError


def _help(text: str) -> dict:
    return {"help": f"FedAMP: {text}"}


@dataclasses.dataclass(frozen=True)
class FedAMPConfig(AlgorithmConfig):
    """FedAMP's options (CLI --fedamp_<field>; the defaults: the module docstring)."""

    alpha: float = dataclasses.field(default=0.1, metadata=_help(
        "alpha_k, the server's attention step: xi_ij = alpha_k/sigma exp(-||w_i - w_j||^2/sigma) "
        "(PFLlib: 1; 0.1 keeps alpha_k (N-1)/sigma <= 1 at N = 10)."))
    lam: float = dataclasses.field(default=0.1, metadata=_help(
        "lambda, the attention term's weight; the client's prox term is lam/(2 alpha_k) "
        "||w - u_i||^2 (PFLlib: 1; 0.1 keeps its lam/alpha_k = 1)."))
    sigma: float = dataclasses.field(default=1.0, metadata=_help(
        "sigma, the kernel width of A(x) = 1 - exp(-x/sigma), in squared-distance units "
        "(PFLlib: 1; choose it on the scale of the models' squared distances)."))

    def validate(self) -> None:
        """Raises UserInputError (one line, naming the flag) on a bad option."""
        for name in ("alpha", "sigma"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UserInputError(f"--fedamp_{name} must be a positive number, got {value}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise UserInputError(f"--fedamp_lam must be a finite number >= 0, got {self.lam}")

    @property
    def prox_weight(self) -> float:
        """lam / alpha_k, the weight rho of the client's proximal gradient rho (w - u_i)."""
        return self.lam / self.alpha

    def validate_training(self, train: LocalTrainConfig) -> None:
        check_prox_step(train.lr, self.prox_weight, "--lr * --fedamp_lam / --fedamp_alpha")


# ---------------------------------------------------------------------------- the server step
def squared_distances(stacked, rows, mesh=None) -> jax.Array:
    """D[s, n] = ||rows[s] - stacked[n]||^2 summed over every leaf, from the differences.

    Args:
      stacked: pytree with leaves [N, ...] (the stored models).
      rows: pytree with leaves [S, ...] (the participants' models).
      mesh: optional mesh splitting the N rows over its `clients` axis (`rows_mesh`).
    Returns:
      float32 [S, N].
    """
    def local(block, w, r):
        def one(model):   # one participant against the block's rows: [N_block]
            parts = [jnp.sum(jnp.square(a - b[None]), axis=tuple(range(1, a.ndim)))
                     for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(model))]
            return sum(parts)

        return jax.lax.map(one, r)

    return over_row_blocks(local, mesh, in_axes=(0, None), out_axes=1)(stacked, rows)


def attention_weights(dist: jax.Array, client_ids: jax.Array, num_clients: int, alpha: float,
                      sigma: float) -> jax.Array:
    """Xi [S, N_pad] from the squared distances [S, N_pad] (module docstring).

    xi[s, j] = exp(log(alpha / sigma) - dist[s, j] / sigma) for the pool's other clients j
    (rows j < num_clients, j != client_ids[s]), 0 for mesh-padding rows, and the self-weight
    1 - sum_{j != i} xi[s, j] at column client_ids[s]: each row sums to 1.
    """
    cols = jnp.arange(dist.shape[1])[None, :]
    others = (cols < num_clients) & (cols != client_ids[:, None])
    log_scale = math.log(alpha) - math.log(sigma)   # in float64, then one float32 exp
    off = jnp.where(others, jnp.exp(log_scale - dist / sigma), 0.0)
    self_weight = 1.0 - jnp.sum(off, axis=1)
    return off + (cols == client_ids[:, None]) * self_weight[:, None]


def cloud_models(xi: jax.Array, stacked, mesh=None):
    """u[s] = sum_n xi[s, n] stacked[n] (leaves [S, ...]), at float32's highest precision
    (a one-hot row returns that model bit for bit); with `mesh`, partial sums per device."""
    def local(block, weights, w):
        mix = lambda a: jnp.einsum("sn,n...->s...", weights.astype(a.dtype), a,
                                   precision=jax.lax.Precision.HIGHEST)
        return block.total(jax.tree.map(mix, w))

    return over_row_blocks(local, mesh, in_axes=(1, 0), out_axes=None)(xi, stacked)


# ---------------------------------------------------------------------------- the algorithm
@register("fedamp", FedAMPConfig)
class FedAMP(Algorithm):
    """FedAMP on the stacked engine (module docstring)."""

    display_name = "FedAMP"
    table_rows = (TableRow("fedamp", "FedAMP", order=23),)
    search_space = (
        CLIENT_LR,
        LogUniform("sigma", 0.1, 100.0, source="derived: FMNIST CNN squared distances ~1-3 (PFLlib: 1)"),
        LogUniform("alpha", 0.01, 1.0, source="derived: up to PFLlib's 1"),
        LogUniform("lam", 1e-3, 0.06, source="derived: lam/alpha_k in [0.001, 6], so that lr * "
                                             "lam/alpha_k < 2 over the client lr's range"),
    )

    @classmethod
    def state_size_terms(cls, config, dims):
        """w_i and BN statistics of every client, the u_i each last received, xi_ii."""
        return [*client_models_terms(dims),
                per_client_term("client params", "cloud_params", dims.P, "P"),
                per_client_term("other", "self_weight", 1, "1")]

    def __init__(self, ctx: FLContext, config: FedAMPConfig | None = None):
        super().__init__(ctx, config)
        self.trainer: ClientTrainer = ctx.trainer.with_update(
            prox_update(ctx.model, make_optimizer(ctx.train), self.config.prox_weight))

    def describe(self) -> str:
        cfg = self.config
        text = f"alpha_k {cfg.alpha:g}, lam {cfg.lam:g}, sigma {cfg.sigma:g}, prox weight {cfg.prox_weight:g}"
        reach = cfg.alpha * (self.ctx.num_clients - 1) / cfg.sigma
        if reach > 1:
            text += (f"; alpha_k (N-1)/sigma = {reach:g} > 1: self-weights are negative while "
                     "the models are close")
        return text

    def init_state(self, key):
        params, stats = self.ctx.init_client_variables(key)
        copy = lambda t: jax.tree.map(jnp.array, t)
        return {"client_params": params, "batch_stats": stats, "cloud_params": copy(params),
                "self_weight": jnp.ones((self.ctx.num_clients,), jnp.float32)}

    def personalize(self, client_params, own, client_ids):
        """(Xi [S, N_pad], u [S, ...]) of participants `client_ids` (their models `own`,
        leaves [S, ...]) from the stored models `client_params` (leaves [N_pad, ...]; rows
        past N are mesh padding: weight 0)."""
        cfg, mesh = self.config, rows_mesh(client_params, self.ctx.mesh)
        xi = attention_weights(squared_distances(client_params, own, mesh), client_ids,
                               self.ctx.num_clients, cfg.alpha, cfg.sigma)
        return xi, cloud_models(xi, client_params, mesh)

    def round_step(self, state, round_idx, client_ids, key, data):
        mine = self.take({"params": state["client_params"], "batch_stats": state["batch_stats"]},
                         client_ids)
        xi, cloud = self.personalize(state["client_params"], mine["params"], client_ids)
        out, metrics = self.trainer.run(None, {**mine, "anchor": cloud}, client_ids, key, data)
        self_weight = jnp.take_along_axis(xi, client_ids[:, None], axis=1)[:, 0]
        new_state = {
            "client_params": self.put(state["client_params"], client_ids, out["params"]),
            "batch_stats": self.put(state["batch_stats"], client_ids, out["batch_stats"]),
            "cloud_params": self.put(state["cloud_params"], client_ids, cloud),
            "self_weight": self.put(state["self_weight"], client_ids, self_weight),
        }
        model = jnp.full(client_ids.shape, self.ctx.model_bytes, jnp.int32)
        return new_state, {**metrics, "bytes_up": model, "bytes_down": model}

    def evaluate(self, state, round_idx, key):
        self_weight = host_array(state["self_weight"])[:self.ctx.num_clients]
        return Evaluation({"": View(state["client_params"], state["batch_stats"]),
                           "cloud": View(state["cloud_params"], state["batch_stats"])},
                          scalars={"fedamp_self_weight": float(np.mean(self_weight)),
                                   "fedamp_min_self_weight": float(np.min(self_weight))})
