"""FedFomo (Zhang, Sapra, Fidler, Yeung, Alvarez, "Personalized Federated Learning with
First Order Model Optimization", ICLR 2021, §3: the weights w_n and the update; official
code NVlabs/FedFomo; FL-bench's src/{server,client}/fedfomo.py is the reference followed where
the two disagree, PFLlib's clientfomo.py the third one).

Every client keeps its own full model; the server keeps the latest model of every client
(the candidate pool), an affinity matrix P [N, N] and the exploration schedule. Each
client's TRAINING split (the 70% of pFedLA's 70/30 split; the test split is untouched) is
split once more into a local training part D_i^trn and a validation part D_i^val
(`val_fraction` of it: round(fraction * n_i) examples, halves up, as NVlabs rounds its train
part; FL-bench's `int(n * ratio)` floors, the same count for the presets' 140-example
splits at 0.2; rounding lets a fraction leave a client no training example, which is then
refused, as is one that gives a client no validation example).

Round t, all participants from ONE snapshot of the state (synchronous), for participant i:

    eps_t  = max(0, epsilon - t * epsilon_decay)                          (NVlabs)
    C_i    = M candidates j != i: all N - 1 others (M = N - 1), or greedy by P[i]
             (highest first, random tie-break) with, per slot, probability eps_t of a
             random remaining client instead (NVlabs `get_federating_clients`); clients
             that have uploaded a model are preferred (the pool is `all_uploaded`: a slot
             holding a client that never trained counts for nothing). With include_self,
             client i's own stored model is candidate 0.
    base   = theta_i (the client's stored model, its latest trained one: FL-bench) or, with
             baseline=pre_training, its model after its last federated update, before
             local training (NVlabs `first_model`, PFLlib `old_model`)
    L_j    = mean cross-entropy of theta_j on D_i^val (BN in eval mode)      j in {base} + C_i
    w_j    = (L_base - L_j) / (||theta_j - base|| + denom_eps)     (paper Eq. for w_n, §3)
             (0 for a candidate that never uploaded; 0 when theta_j == base and denom_eps = 0)
    wbar_j = max(w_j, 0) / sum_k max(w_k, 0)            (all <= 0: wbar = 0, theta_i kept)
    theta_i <- theta_i + sum_j wbar_j (theta_j - theta_i)      (= sum_j wbar_j theta_j)
    P[i, j] += w_j                     (raw weights, negatives kept: FL-bench, PFLlib)
    theta_i <- local SGD from theta_i on D_i^trn; upload theta_i (it replaces pool row i)

Round 0: no client has uploaded, so every candidate counts for nothing and participants
only train (FL-bench sends only the client's own model at round 0; NVlabs skips it).

Defaults, where the references disagree:
  num_candidates 0 = all N - 1 others: the paper's update with no selection heuristic, valid
      for every N (FL-bench/PFLlib use M = 5, the paper studies 5 and 10 of 15 clients:
      --fedfomo_num_candidates=5 for their budget);
  epsilon 0.3, epsilon_decay 0.05/round (NVlabs; FL-bench/PFLlib: 0, set --fedfomo_epsilon=0);
      used only when M < N - 1; greedy ties are broken at random (NVlabs), not by index;
  val_fraction 0.2 (all three), fixed per client from the init key (NVlabs); val_redraw
      redraws it each round from the round key (FL-bench, which lets validation and
      training examples swap);
  norm l2 (paper text, FL-bench, PFLlib; NVlabs defaults to l1); denom_eps 1e-5
      (FL-bench/PFLlib);
  include_self false, baseline current (paper, FL-bench: a self candidate would get w = 0);
      include_self + baseline=pre_training is the NVlabs mode;
  candidate_stats own; P starts at 0 and accumulates the raw w (FL-bench/PFLlib; NVlabs
      adds w / |sum w|); the validation loss is the true mean (FL-bench's is ~1/B of it).

All candidate losses of the cohort are ONE batched evaluation: the participants through
`for_each_client` (the trainer's strategy and mesh), each participant's M + 1 models
(base, candidates) `vmap`ped over D_i^val, giving [S, M + 1]. Distances are computed
from the differences directly (not by |a|^2 + |b|^2 - 2<a, b>, which cancels
catastrophically when the models are close, as they are early on).

BN: running statistics stay with each client and are never mixed (FL-bench, PFLlib
aggregate `parameters()` only); local training updates them. A candidate is scored with
its OWN running statistics (`candidate_stats=own`, NVlabs/PFLlib load the whole module;
`client` = the scoring client's statistics, FL-bench's).

Evaluation: '' = each client's model after its latest local training (the project's
default; FL-bench/PFLlib's test model); 'federated' = its model after its latest
federated update, before local training (the NVlabs evaluation point; a client that never
participated shows its initial model). The affinity matrix is exported at evaluations
(WORKDIR/affinity.npz: affinity [E, N, N]).

Communication per participant: down = the candidate models actually sent (peers that have
uploaded), up = its trained model plus its M (+1) weights (float32).

Shapes: state['client_params'], ['batch_stats'], ['start_params'], ['start_stats']: per
client [N_pad, ...]; server: 'affinity' float32 [N, N], 'uploaded' bool [N], 'split'
{'train_idx' int32 [N, max_train], 'val_idx' int32 [N, max_val]} (the fixed split, drawn
at init from the experiment's init key; redrawn per round with val_redraw).

Errors (UserInputError, one line through the CLI): val_fraction not in (0, 1),
num_candidates < 0 or > N - 1, N < 2, a fraction that leaves a client no training or no
validation example, epsilon not in [0, 1], negative epsilon_decay or denom_eps, an unknown
norm / baseline / candidate_stats.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pfedla_jax.algorithms.base import Algorithm, AlgorithmConfig, Evaluation, TableRow
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import CLIENT_LR, ConfigBound, IntRange
from pfedla_jax.core.client_parallel import for_each_client
from pfedla_jax.core.client_update import masked_cross_entropy
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.local_training import ClientTrainer
from pfedla_jax.core.multihost import host_array
from pfedla_jax.core.state_size import StateTerm, client_models_terms, per_client_term
from pfedla_jax.data.store import ClientStore, normalize_images
from pfedla_jax.errors import UserInputError, check_choice

NORMS = ("l2", "l1")
BASELINES = ("current", "pre_training")
CANDIDATE_STATS = ("own", "client")
# fold_in streams of the round / init key, above any client id (the trainer folds in ids)
_SPLIT_STREAM = 0xF0F00001
_SELECT_STREAM = 0xF0F00002
_VAL_BATCH = 256   # validation examples per forward pass
_MODELS_AT_ONCE = 64


def _help(text: str) -> dict:
    return {"help": f"FedFomo: {text}"}


@dataclasses.dataclass(frozen=True)
class FedFomoConfig(AlgorithmConfig):
    """FedFomo's options (CLI --fedfomo_<field>); defaults and sources: module docstring."""

    num_candidates: int = dataclasses.field(default=0, metadata=_help(
        "M, candidate models each participant downloads; 0 = all N - 1 other clients (no "
        "selection). FL-bench/PFLlib use 5; must be <= N - 1."))
    val_fraction: float = dataclasses.field(default=0.2, metadata=_help(
        "fraction of each client's training split held out as its validation set "
        "(round(fraction * n) examples; NVlabs/FL-bench/PFLlib: 0.2); in (0, 1)."))
    val_redraw: bool = dataclasses.field(default=False, metadata=_help(
        "redraw the validation split every round (FL-bench) instead of once at init "
        "(NVlabs; no train/validation swap)."))
    epsilon: float = dataclasses.field(default=0.3, metadata=_help(
        "epsilon-greedy exploration probability at round 0 (NVlabs 0.3); only used when "
        "M < N - 1."))
    epsilon_decay: float = dataclasses.field(default=0.05, metadata=_help(
        "decrease of the exploration probability per round (NVlabs 0.05: off after 6 rounds)."))
    norm: str = dataclasses.field(default="l2", metadata=_help(
        "distance ||theta_j - theta_i|| in the weights: l2 (paper, FL-bench, PFLlib) | l1 "
        "(NVlabs default)."))
    denom_eps: float = dataclasses.field(default=1e-5, metadata=_help(
        "guard added to the distance in the weights' denominator (FL-bench/PFLlib 1e-5)."))
    include_self: bool = dataclasses.field(default=False, metadata=_help(
        "the client's own stored model is a candidate too (NVlabs; with baseline=current "
        "its weight is exactly 0)."))
    baseline: str = dataclasses.field(default="current", metadata=_help(
        "the model L_i(theta_i) and the distances are measured from: current (the client's "
        "latest trained model, FL-bench) | pre_training (its model after its last federated "
        "update, before training: NVlabs first_model, PFLlib old_model)."))
    candidate_stats: str = dataclasses.field(default="own", metadata=_help(
        "BN running statistics a candidate is scored with: own (the candidate's; "
        "NVlabs/PFLlib) | client (the scoring client's; FL-bench)."))

    def validation_examples(self, train_examples):
        """round(val_fraction * n) (halves up): the validation examples of a client with n
        training examples (int or numpy array)."""
        return np.floor(np.asarray(train_examples, np.float64) * self.val_fraction + 0.5).astype(np.int64)

    def validate(self) -> None:
        """Raises UserInputError (one line naming the flag) on a bad option."""
        if not (0 < self.val_fraction < 1):
            raise UserInputError(f"--fedfomo_val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.num_candidates < 0:
            raise UserInputError(f"--fedfomo_num_candidates must be >= 1 (or 0 = all N - 1 others), "
                                 f"got {self.num_candidates}")
        if not 0 <= self.epsilon <= 1:
            raise UserInputError(f"--fedfomo_epsilon must be in [0, 1], got {self.epsilon}")
        for name in ("epsilon_decay", "denom_eps"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UserInputError(f"--fedfomo_{name} must be a finite number >= 0, got {value}")
        check_choice("fedfomo_norm", self.norm, NORMS)
        check_choice("fedfomo_baseline", self.baseline, BASELINES)
        check_choice("fedfomo_candidate_stats", self.candidate_stats, CANDIDATE_STATS)


# ---------------------------------------------------------------------------- pure maths
def param_distance(a: Any, b: Any, norm: str = "l2") -> jax.Array:
    """||a - b|| over every leaf of two (unstacked) param pytrees: 'l2' (sqrt of the sum of
    squares) or 'l1' (sum of absolute values); float32 scalar."""
    diffs = [(x - y).astype(jnp.float32) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    if norm == "l1":
        return sum(jnp.sum(jnp.abs(d)) for d in diffs)
    return jnp.sqrt(sum(jnp.sum(d * d) for d in diffs))


def fomo_weights(loss_base, loss_cand, dist, valid=None, denom_eps: float = 1e-5):
    """FedFomo's weights (paper §3) and their normalised positive part.

    Args:
      loss_base: [...] validation loss of the baseline model theta_i.
      loss_cand: [..., M] validation losses of the candidates.
      dist: [..., M] ||theta_j - theta_i||.
      valid: optional bool [..., M]; False slots get w = 0.
      denom_eps: added to the distance (a zero denominator gives w = 0).

    Returns:
      (w [..., M] = (L_base - L_j) / (dist_j + denom_eps), the raw weights (P's increment),
       wbar [..., M] = max(w, 0) / sum max(w, 0), all zero when no w is positive).
    """
    loss_base = jnp.asarray(loss_base, jnp.float32)
    denom = jnp.asarray(dist, jnp.float32) + denom_eps
    ok = denom > 0
    w = jnp.where(ok, (loss_base[..., None] - loss_cand) / jnp.where(ok, denom, 1.0), 0.0)
    if valid is not None:
        w = jnp.where(valid, w, 0.0)
    pos = jnp.maximum(w, 0.0)
    z = jnp.sum(pos, axis=-1, keepdims=True)
    wbar = jnp.where(z > 0, pos / jnp.where(z > 0, z, 1.0), 0.0)
    return w, wbar


def fomo_update(theta: Any, candidates: Any, wbar: jax.Array) -> Any:
    """theta + sum_j wbar_j (theta_j - theta): `theta` leaves [...], `candidates` leaves
    [M, ...], wbar [M] (elementwise products, no matmul: exact float32 on every backend)."""
    def mix(t, c):
        w = wbar.reshape(wbar.shape + (1,) * t.ndim).astype(jnp.float32)
        return (t + jnp.sum(w * (c - t[None]), axis=0)).astype(t.dtype)
    return jax.tree.map(mix, theta, candidates)


def draw_split(key, train_idx, train_count, num_val, max_val: int):
    """Each client's training examples in a random order from fold_in(key, client), split
    into (validation = the first num_val, training = the rest). Traceable.

    Args:
      key: the split's key.
      train_idx: int32 [N, max_train] (ClientStore.train_idx).
      train_count: int32 [N].
      num_val: int32 [N], validation examples per client (< train_count).
      max_val: static width of the validation table (>= max num_val, >= 1).

    Returns:
      (train int32 [N, max_train]: the first train_count - num_val entries real, 0-padded,
       val int32 [N, max_val]: the first num_val entries real, 0-padded).
    """
    max_train = train_idx.shape[1]
    slots = jnp.arange(max_train)

    def one(c, row, n, nv):
        u = jax.random.uniform(jax.random.fold_in(key, c), (max_train,))
        perm = row[jnp.argsort(jnp.where(slots < n, u, 2.0))]
        vpos = jnp.arange(max_val)
        val = jnp.where(vpos < nv, perm[jnp.minimum(vpos, max_train - 1)], 0)
        train = jnp.where(slots < n - nv, perm[jnp.minimum(slots + nv, max_train - 1)], 0)
        return train.astype(jnp.int32), val.astype(jnp.int32)

    n = train_idx.shape[0]
    return jax.vmap(one)(jnp.arange(n), train_idx, train_count, num_val)


def select_candidates(affinity_rows, uploaded, client_ids, num: int, epsilon, key):
    """Epsilon-greedy top-`num` candidates per participant (NVlabs `get_federating_clients`).

    Per participant i and slot: the pool is the clients not yet chosen and != i, restricted
    to those that have uploaded while any is left; with probability `epsilon` a uniformly
    random pool member, else the pool member of highest P[i, j], ties broken by a random
    order drawn once per participant (NVlabs' lexsort with random values). Traceable.

    Args:
      affinity_rows: float32 [S, N], P[i] of each participant.
      uploaded: bool [N].
      client_ids: int32 [S].
      num: M (static, <= N - 1).
      epsilon: float scalar, this round's exploration probability.
      key: the selection key (participant i uses fold_in(key, i)).

    Returns:
      int32 [S, M], distinct per row, never the participant itself.
    """
    n = affinity_rows.shape[1]

    def one(row, cid):
        k_explore, k_rand, k_tie = jax.random.split(jax.random.fold_in(key, cid), 3)
        explore = jax.random.uniform(k_explore, (num,)) < epsilon
        rand = jax.random.uniform(k_rand, (num, n))
        tie = jax.random.uniform(k_tie, (n,))

        def slot(avail, s):
            pool = avail & uploaded
            pool = jnp.where(jnp.any(pool), pool, avail)
            best = jnp.max(jnp.where(pool, row, -jnp.inf))
            greedy = jnp.argmax(jnp.where(pool & (row == best), tie, -1.0))
            randomly = jnp.argmax(jnp.where(pool, rand[s], -1.0))
            pick = jnp.where(explore[s], randomly, greedy).astype(jnp.int32)
            return avail.at[pick].set(False), pick

        _, picks = jax.lax.scan(slot, jnp.arange(n) != cid, jnp.arange(num))
        return picks

    return jax.vmap(one)(affinity_rows, client_ids)


def all_others(client_ids, num_clients: int):
    """int32 [S, N - 1]: every client but the participant, in index order."""
    others = jnp.arange(num_clients - 1, dtype=jnp.int32)
    return others[None, :] + (others[None, :] >= client_ids[:, None]).astype(jnp.int32)


def _span(values) -> str:
    lo, hi = int(np.min(values)), int(np.max(values))
    return str(lo) if lo == hi else f"{lo}-{hi}"


# ---------------------------------------------------------------------------- the algorithm
@register("fedfomo", FedFomoConfig)
class FedFomo(Algorithm):
    display_name = "FedFomo"
    table_rows = (TableRow("fedfomo", "FedFomo", order=7),)
    # M from 1 to all N - 1 others, at most 9 (the presets' 10 clients; the paper's largest
    # M is 10)
    search_space = (CLIENT_LR,
                    IntRange("num_candidates", 1,
                             ConfigBound("min(9, num_clients - 1)", lambda c: max(1, min(9, c.num_clients - 1))),
                             source="FedFomo Sec. 4: 5 and 10 of 15 clients; FL-bench/PFLlib: 5"))
    server_state_keys = ("affinity", "uploaded", "split")
    export_name = "affinity"

    @classmethod
    def state_size_terms(cls, config, dims):
        """Two models and BN statistics per client (the latest trained, the federated
        start), and the server's affinity P [N, N], uploaded flags [N] and the validation
        split's index tables [N, W - V] and [N, V] (W training examples per client)."""
        client, stats = client_models_terms(dims)
        width = dims.train + int(config.validation_examples(dims.train))
        return [client, per_client_term("client params", "start_params", dims.P, "P"), stats,
                per_client_term("BN statistics", "start_stats", dims.B, "B"),
                StateTerm("other", "affinity", "4·N²", False, lambda n: 4 * n * n),
                StateTerm("other", "uploaded", "N", False, lambda n: n),
                StateTerm("other", "split", "4·N·(W + V)", False, lambda n: 4 * n * width)]

    @classmethod
    def state_size_symbols(cls, config, dims):
        """W training examples per client, V = round(val_fraction W) of them for validation."""
        return {"W": dims.train, "V": int(config.validation_examples(dims.train))}

    def __init__(self, ctx, config=None):
        super().__init__(ctx, config)
        cfg, n = self.config, ctx.num_clients
        if n < 2:
            raise UserInputError("FedFomo needs at least 2 clients (--num_clients)")
        self.num_candidates = cfg.num_candidates or n - 1
        if self.num_candidates > n - 1:
            raise UserInputError(f"--fedfomo_num_candidates={cfg.num_candidates} exceeds the "
                                 f"N - 1 = {n - 1} other clients")
        counts = np.asarray(jax.device_get(ctx.store.train_count)).astype(np.int64)
        num_val = cfg.validation_examples(counts)
        if np.any(num_val < 1):
            c = int(np.argmin(num_val))
            raise UserInputError(f"--fedfomo_val_fraction={cfg.val_fraction} gives client {c} "
                                 f"({counts[c]} training examples) no validation example")
        if np.any(counts - num_val < 1):
            c = int(np.argmin(counts - num_val))
            raise UserInputError(f"--fedfomo_val_fraction={cfg.val_fraction} leaves client {c} "
                                 f"({counts[c]} training examples) no training example")
        self.num_val = num_val.astype(np.int32)
        self.num_train = (counts - num_val).astype(np.int32)
        self.max_val = int(num_val.max())
        # the local trainer: the experiment's config, strategy and update, on D_i^trn (its
        # batch count comes from these counts; the index table is passed every round)
        base = ctx.trainer
        store = ctx.data.replace(train_count=jnp.asarray(self.num_train))
        self.trainer = ClientTrainer(ctx.model, store, ctx.train, base.strategy, update=base.update)
        # under vmap at most ~_MODELS_AT_ONCE models (participants x (M' + 1)) are scored at
        # once (N = 100 with all 99 candidates: one participant at a time)
        width = self.num_candidates + int(cfg.include_self) + 1
        self._score_map = for_each_client(self._score_client, self.trainer.strategy,
                                          self.trainer.mesh, negative_ids=False,
                                          batch_size=max(1, _MODELS_AT_ONCE // width))

    def describe(self) -> str:
        cfg, n = self.config, self.ctx.num_clients
        chosen = ("all" if self.num_candidates == n - 1 else
                  f"top {self.num_candidates} by affinity (epsilon {cfg.epsilon} - "
                  f"{cfg.epsilon_decay}/round) of")
        return (f"candidates: {chosen} {n - 1} others{' + self' if cfg.include_self else ''}; "
                f"validation {cfg.val_fraction:g} of each train split "
                f"({'redrawn every round' if cfg.val_redraw else 'fixed'}), local training on "
                f"{_span(self.num_train)} examples per client ({self.trainer.num_steps} steps at "
                f"most); {cfg.norm} distance; baseline {cfg.baseline}")

    # ------------------------------------------------------------------ pieces
    def split_tables(self, key) -> dict:
        """{'train_idx' [N, max_train], 'val_idx' [N, max_val]} drawn from `key`."""
        store = self.ctx.data
        train, val = draw_split(key, store.train_idx, store.train_count,
                                jnp.asarray(self.num_val), self.max_val)
        return {"train_idx": train, "val_idx": val}

    def train_store(self, data: ClientStore, split: dict) -> ClientStore:
        """`data` with its training part reduced to D_i^trn (what local training sees)."""
        return data.replace(train_idx=split["train_idx"], train_count=jnp.asarray(self.num_train))

    def epsilon_at(self, round_idx) -> jax.Array:
        cfg = self.config
        return jnp.maximum(0.0, cfg.epsilon - jnp.asarray(round_idx, jnp.float32) * cfg.epsilon_decay)

    def candidates(self, state, round_idx, client_ids, key) -> jax.Array:
        """int32 [S, M'] candidate ids per participant (M' = M, + 1 with include_self:
        the participant itself first)."""
        n = self.ctx.num_clients
        if self.num_candidates == n - 1:
            cand = all_others(client_ids, n)
        else:
            cand = select_candidates(jnp.take(state["affinity"], client_ids, axis=0), state["uploaded"],
                                     client_ids, self.num_candidates, self.epsilon_at(round_idx),
                                     jax.random.fold_in(key, _SELECT_STREAM))
        if self.config.include_self:
            cand = jnp.concatenate([client_ids[:, None], cand], axis=1)
        return cand.astype(jnp.int32)

    def val_loss(self, params, batch_stats, val_row, count, data: ClientStore) -> jax.Array:
        """Mean cross-entropy of one model on the examples val_row[:count] (BN eval mode)."""
        size = max(1, min(_VAL_BATCH, self.max_val))
        chunks = -(-self.max_val // size)

        def chunk(c):
            pos = c * size + jnp.arange(size)
            mask = (pos < count).astype(jnp.float32)
            idx = val_row[jnp.minimum(pos, self.max_val - 1)]
            x = normalize_images(data.images[idx], data.mean, data.std)
            logits = self.ctx.model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
            return masked_cross_entropy(logits, data.labels[idx], mask)

        loss_sum, seen = jax.lax.map(chunk, jnp.arange(chunks))
        return jnp.sum(loss_sum) / jnp.maximum(jnp.sum(seen), 1.0)

    def _score_client(self, shared, client, cid, key):
        """One participant: losses of base + candidates on its D_i^val, distances, weights,
        and its federated update. Traced once per program."""
        data, val_idx, models, stats, start_models, start_stats = shared
        cand, valid = client["cand"], client["valid"]
        row = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
        current, own_stats = row(models, cid), row(stats, cid)
        if self.config.baseline == "pre_training":
            base, base_stats = row(start_models, cid), row(start_stats, cid)
        else:
            base, base_stats = current, own_stats
        cand_models = row(models, cand)                                     # [M', ...]
        if self.config.candidate_stats == "own":
            cand_stats = row(stats, cand)
        else:
            cand_stats = jax.tree.map(lambda a: jnp.broadcast_to(a, cand.shape + a.shape), base_stats)
        stack = lambda b, c: jax.tree.map(lambda x, y: jnp.concatenate([x[None], y]), b, c)
        losses = jax.vmap(lambda p, s: self.val_loss(p, s, val_idx[cid], jnp.asarray(self.num_val)[cid], data))(
            stack(base, cand_models), stack(base_stats, cand_stats))       # [M' + 1]
        dist = jax.vmap(lambda p: param_distance(p, base, self.config.norm))(cand_models)
        w, wbar = fomo_weights(losses[0], losses[1:], dist, valid, self.config.denom_eps)
        return {"losses": losses, "dist": dist, "w": w, "wbar": wbar,
                "params": fomo_update(current, cand_models, wbar)}

    def score(self, state, round_idx, client_ids, key, data: ClientStore, split: dict | None = None) -> dict:
        """The federated update of the cohort (traceable; inside `round_step`).

        Returns:
          {'cand' int32 [S, M'], 'valid' bool [S, M'] (the candidate has uploaded, or is the
           participant itself), 'losses' [S, M' + 1] (column 0: the baseline model), 'dist'
           [S, M'], 'w' [S, M'], 'wbar' [S, M'], 'params' [S, ...] the updated models}.
        """
        split = state["split"] if split is None else split
        cand = self.candidates(state, round_idx, client_ids, key)
        valid = jnp.take(state["uploaded"], cand) | (cand == client_ids[:, None])
        shared = (data, split["val_idx"], state["client_params"], state["batch_stats"],
                  state["start_params"] if self.config.baseline == "pre_training" else None,
                  state["start_stats"] if self.config.baseline == "pre_training" else None)
        out = self._score_map(shared, {"cand": cand, "valid": valid}, client_ids, key)
        return {"cand": cand, "valid": valid, **out}

    # ------------------------------------------------------------------ the algorithm
    def init_state(self, key):
        params, stats = self.ctx.init_client_variables(key)
        n = self.ctx.num_clients
        copy = lambda t: jax.tree.map(jnp.array, t)
        return {"client_params": params, "batch_stats": stats,
                "start_params": copy(params), "start_stats": copy(stats),
                "affinity": jnp.zeros((n, n), jnp.float32),
                "uploaded": jnp.zeros((n,), bool),
                "split": self.split_tables(jax.random.fold_in(key, _SPLIT_STREAM))}

    def round_step(self, state, round_idx, client_ids, key, data):
        split = (self.split_tables(jax.random.fold_in(key, _SPLIT_STREAM)) if self.config.val_redraw
                 else state["split"])
        fed = self.score(state, round_idx, client_ids, key, data, split)
        stats = self.take(state["batch_stats"], client_ids)
        params, new_stats, metrics = self.trainer.train(fed["params"], stats, client_ids, key,
                                                        self.train_store(data, split))
        rows = client_ids[:, None]
        new_state = {
            "client_params": self.put(state["client_params"], client_ids, params),
            "batch_stats": self.put(state["batch_stats"], client_ids, new_stats),
            "start_params": self.put(state["start_params"], client_ids, fed["params"]),
            "start_stats": self.put(state["start_stats"], client_ids, stats),
            "affinity": state["affinity"].at[rows, fed["cand"]].add(fed["w"]),
            "uploaded": state["uploaded"].at[client_ids].set(True),
            "split": split,
        }
        model = self.ctx.model_bytes
        sent = jnp.sum(fed["valid"] & (fed["cand"] != rows), axis=1).astype(jnp.int32)
        weights = 4 * fed["cand"].shape[1]
        return new_state, {**metrics, "bytes_down": sent * model,
                           "bytes_up": jnp.full(client_ids.shape, model + weights, jnp.int32)}

    def evaluate(self, state, round_idx, key):
        return Evaluation(
            views={"": View(state["client_params"], state["batch_stats"]),
                   "federated": View(state["start_params"], state["start_stats"])},
            arrays={"affinity": host_array(state["affinity"])})
