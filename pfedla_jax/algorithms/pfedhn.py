"""pFedHN (Shamsian, Navon, Fetaya, Chechik, "Personalized Federated Learning using
Hypernetworks", ICML 2021, Algorithm 1): one server-side hypernetwork generates every
client's whole model.

Server state: the hypernetwork phi = {embedding table V [N, d_e] (one trainable row v_i
per client), an MLP trunk, one linear head per trainable tensor of the client model} and
its optimizer state. Per client: the model after its latest local training (the 'local'
evaluation view) and its BN running statistics (local, never generated: as FL-bench,
whose src/server/pfedhn.py refuses global buffers for pFedHN).

One client visit (Algorithm 1, as the official code AvivSham/pFedHN
experiments/pfedhn/trainer.py `train` runs it):
    theta_i  = h(v_i; phi)                     every trainable tensor, BN scale/bias included
    theta~_i = local training from theta_i     (with client i's own BN running statistics)
    delta_i  = theta_i - theta~_i              (the official `inner_state - final_state`)
    g        = (d theta_i / d phi)^T delta_i   one VJP; v_i is a row of V, so g covers V
    phi     <- SGD(clip_global_norm(g, 50))    momentum 0.9 and weight decay 1e-3 on ALL of
                                               phi, every row of V included (PyTorch SGD on
                                               the dense embedding gradient)
This is descent on L_i(h(v_i; phi)): delta_i ~ lr * sum_k grad L_i (the sign of both public
codes, the official one and FL-bench's).

Round semantics:
  synchronous  (default) all S participants are generated from ONE snapshot of phi and
               trained in one stacked call; the hypernetwork gradient is one batched VJP
               over the S generated models, i.e. the SUM of the per-client gradients, then
               one clip + optimizer step. To first order in the hypernetwork lr this is the
               displacement of the reference's S sequential steps (with momentum too, in
               steady state); the differences: the S gradients are all taken at phi_t, the
               clip bounds the sum (not each term) and weight decay is applied once per
               round instead of S times (a documented deviation: BUILD_NOTES (pFedHN)).
  sequential   a `lax.scan` over the participants: each is generated from the phi already
               updated by the previous ones, trains alone and takes its own clip + step (the
               official code, one client per step, and FL-bench's server loop).

Evaluation: '' = the generated model h(v_i; phi) with no local steps (the official
`evaluate`; FL-bench's "before" with finetune_epoch 0), with the client's BN statistics;
'local' = the model after the client's latest local training (its generated model until
it first trains).

Hypernetwork (official `CNNHyper`, n_hidden = 3 in trainer.py; FL-bench generates every
`named_parameters()` tensor, BN gamma/beta included): embedding -> Linear(d_e, H) ->
n_hidden x [ReLU, Linear(H, H)] (no ReLU after the last) -> per tensor Linear(H, size),
reshaped. PyTorch initialisation: nn.Embedding N(0, 1), nn.Linear U(+-1/sqrt(fan_in)) for
weights and biases. Each head emits its tensor in OUR layout (conv HWIO, dense [in, out],
FC1 rows in NHWC-flatten order): flattened C-order, reshaped to the leaf's shape. A
PyTorch hypernetwork emitting the torch layout is the same function up to a fixed
permutation of each head's output rows (experiments/torch_baseline/pfedhn.py converts).

`--init` does not apply: the hypernetwork generates every model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pfedla_jax.algorithms.base import Algorithm, AlgorithmConfig, Evaluation, FLContext, TableRow
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import CLIENT_LR, LogUniform
from pfedla_jax.core.client_parallel import on_every_device
from pfedla_jax.core.client_update import sgd_update
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.local_training import make_optimizer
from pfedla_jax.core.stacking import broadcast_clients
from pfedla_jax.core.state_size import StateTerm, client_models_terms
from pfedla_jax.errors import UserInputError, check_choice
from pfedla_jax.models.cnn import init_variables, torch_default_uniform

SEMANTICS = ("synchronous", "sequential")
_HIGHEST = jax.lax.Precision.HIGHEST


def _help(text: str) -> dict:
    return {"help": f"pFedHN: {text}"}


@dataclasses.dataclass(frozen=True)
class PFedHNConfig(AlgorithmConfig):
    """pFedHN's options (CLI --pfedhn_<field>). Defaults: the official code's
    (AvivSham/pFedHN trainer.py; the same in FL-bench's src/server/pfedhn.py)."""

    embed_dim: int = dataclasses.field(default=0, metadata=_help(
        "client embedding size d_e; 0 = the official rule int(1 + N/4) (FL-bench's differs: "
        "int((1 + N)/4))."))
    hidden_dim: int = dataclasses.field(default=100, metadata=_help("hypernetwork trunk width."))
    n_hidden: int = dataclasses.field(default=3, metadata=_help(
        "hidden [ReLU, Linear(H, H)] blocks after the first Linear(d_e, H) (official --n-hidden 3)."))
    hn_lr: float = dataclasses.field(default=1e-2, metadata=_help("hypernetwork SGD learning rate."))
    embed_lr: float = dataclasses.field(default=0.0, metadata=_help(
        "learning rate of the client embeddings; 0 = --pfedhn_hn_lr (official embed_lr=None)."))
    hn_momentum: float = dataclasses.field(default=0.9, metadata=_help("hypernetwork SGD momentum."))
    hn_weight_decay: float = dataclasses.field(default=1e-3, metadata=_help(
        "hypernetwork SGD weight decay (PyTorch's coupled L2, on every parameter including "
        "every embedding row, at every step)."))
    hn_clip: float = dataclasses.field(default=50.0, metadata=_help(
        "clip of the global norm of the whole hypernetwork gradient (embeddings included) "
        "before each step; 0 = off."))
    client_clip: float = dataclasses.field(default=50.0, metadata=_help(
        "clip of the global norm of the client's gradient at every local step, before the "
        "client optimizer (the official code's clip_grad_norm_(net.parameters(), 50); FL-bench "
        "has none); 0 = off."))
    semantics: str = dataclasses.field(default="synchronous", metadata=_help(
        "synchronous (all participants generated from one snapshot, their gradients summed, "
        "one step per round) | sequential (one client per step, as the official code)."))

    def validate(self) -> None:
        """Raises UserInputError (one line, naming the flag) on a bad option."""
        check_choice("pfedhn_semantics", self.semantics, SEMANTICS)
        if self.embed_dim < 0:
            raise UserInputError(f"--pfedhn_embed_dim must be >= 1 (or 0 = int(1 + N/4)), "
                                 f"got {self.embed_dim}")
        if self.hidden_dim < 1:
            raise UserInputError(f"--pfedhn_hidden_dim must be >= 1, got {self.hidden_dim}")
        if self.n_hidden < 0:
            raise UserInputError(f"--pfedhn_n_hidden must be >= 0, got {self.n_hidden}")
        for name in ("hn_lr", "embed_lr", "hn_weight_decay", "hn_clip", "client_clip"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UserInputError(f"--pfedhn_{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.hn_momentum < 1:
            raise UserInputError(f"--pfedhn_hn_momentum must be in [0, 1), got {self.hn_momentum}")

    def resolved_embed_dim(self, num_clients: int) -> int:
        """d_e: embed_dim, or the official int(1 + N/4) when it is 0."""
        return self.embed_dim or int(1 + num_clients / 4)

    @property
    def resolved_embed_lr(self) -> float:
        return self.embed_lr or self.hn_lr


# ---------------------------------------------------------------------------- hypernetwork
Targets = tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]


def target_shapes(params: Any) -> Targets:
    """((path, shape), ...) of every leaf of one (unstacked) client params pytree of nested
    dicts, e.g. ((('Conv1', 'bias'), (16,)), (('Conv1', 'kernel'), (5, 5, 1, 16)), ...)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return tuple((tuple(str(k.key) for k in path), tuple(int(d) for d in leaf.shape))
                 for path, leaf in leaves)


def _nested(items) -> dict:
    """{path tuple: value} -> nested dicts."""
    out: dict = {}
    for path, value in items:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


class _Linear(nn.Module):
    """PyTorch's nn.Linear (U(+-1/sqrt(fan_in)) weight and bias), kernel [in, out]."""

    features: int

    @nn.compact
    def __call__(self, x):
        init = torch_default_uniform(x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        return jnp.dot(x, kernel, precision=_HIGHEST) + bias


class ModelHypernetwork(nn.Module):
    """h(v_i; phi): client ids -> their generated client models (official `CNNHyper`).

    Params: {'embedding': V [N, d_e] ~ N(0, 1), 'trunk0'..'trunk{n_hidden}': {'kernel'
    [in, H], 'bias' [H]}, 'heads': {<target path>: {'kernel' [H, size], 'bias' [size]}}};
    every Linear U(+-1/sqrt(fan_in)) (PyTorch). `init_params(key)` draws them with two
    random calls (what the algorithm uses; `init` draws the same distributions, slower to
    compile); the forward pass is `apply`.

    Attributes:
      num_clients: N (rows of the embedding table).
      embed_dim: d_e.
      hidden_dim: H.
      n_hidden: [ReLU, Linear(H, H)] blocks after Linear(d_e, H).
      targets: `target_shapes` of the client model's params: one head per entry.
    """

    num_clients: int
    embed_dim: int
    hidden_dim: int
    n_hidden: int
    targets: Targets

    @nn.compact
    def __call__(self, client_ids: jax.Array) -> Any:
        """Generated models: int [S] -> client params pytree with leaves [S, *shape]
        (any shape of ids works: leaves [*ids.shape, *shape])."""
        table = self.param("embedding", nn.initializers.normal(1.0),
                           (self.num_clients, self.embed_dim))
        h = _Linear(self.hidden_dim, name="trunk0")(jnp.take(table, client_ids, axis=0))
        for i in range(self.n_hidden):
            h = _Linear(self.hidden_dim, name=f"trunk{i + 1}")(nn.relu(h))
        heads = self.param("heads", self._init_heads)
        out = []
        for path, shape in self.targets:
            head = _get(heads, path)
            y = jnp.dot(h, head["kernel"], precision=_HIGHEST) + head["bias"]
            out.append((path, y.reshape(client_ids.shape + shape)))
        return _nested(out)

    def _init_heads(self, key: jax.Array) -> dict:
        init = torch_default_uniform(self.hidden_dim)
        keys = jax.random.split(key, 2 * len(self.targets))
        return _nested(
            (path, {"kernel": init(keys[2 * j], (self.hidden_dim, math.prod(shape))),
                    "bias": init(keys[2 * j + 1], (math.prod(shape),))})
            for j, (path, shape) in enumerate(self.targets))

    def init_params(self, key: jax.Array) -> dict:
        """Params distributed as `init` draws them (PyTorch's init), from TWO random draws:
        N(0, 1) for the embedding table, one U(-1, 1) vector sliced and scaled by each
        Linear's 1/sqrt(fan_in) for the rest (on CPU every draw costs ~0.2-0.5 s of
        compilation: `init` makes 2 per Linear). Plain dicts, float32."""
        specs = []
        fan_in = self.embed_dim
        for i in range(self.n_hidden + 1):
            for leaf, shape in (("kernel", (fan_in, self.hidden_dim)), ("bias", (self.hidden_dim,))):
                specs.append(((f"trunk{i}", leaf), shape, 1.0 / math.sqrt(fan_in)))
            fan_in = self.hidden_dim
        for path, shape in self.targets:
            size = math.prod(shape)
            for leaf, head_shape in (("kernel", (self.hidden_dim, size)), ("bias", (size,))):
                specs.append((("heads",) + path + (leaf,), head_shape, 1.0 / math.sqrt(self.hidden_dim)))
        k_embed, k_uniform = jax.random.split(key)
        u = jax.random.uniform(k_uniform, (sum(math.prod(s) for _, s, _ in specs),),
                               minval=-1.0, maxval=1.0)
        out, offset = [], 0
        for path, shape, bound in specs:
            size = math.prod(shape)
            out.append((path, bound * u[offset:offset + size].reshape(shape)))
            offset += size
        out.append((("embedding",), jax.random.normal(k_embed, (self.num_clients, self.embed_dim))))
        return _nested(out)


def generate(hn: ModelHypernetwork, hn_params: Any, client_ids: jax.Array) -> Any:
    """theta = h(v_ids; phi): leaves [S, ...] (pure)."""
    return hn.apply({"params": hn_params}, client_ids)


def hn_gradient(hn: ModelHypernetwork, hn_params: Any, client_ids: jax.Array, delta: Any) -> Any:
    """sum_s (d theta_s / d phi)^T delta_s: one VJP of the batched generator (pure).

    Args:
      hn: the hypernetwork.
      hn_params: phi (embeddings included).
      client_ids: int [S].
      delta: theta_generated - theta_trained, leaves [S, ...] (client params layout).
    Returns:
      a pytree like hn_params: the gradient the official code sets as `p.grad` (before
      clipping), summed over the S clients; the embedding rows of non-participants are 0.
    """
    _, vjp = jax.vjp(lambda p: generate(hn, p, client_ids), hn_params)
    return vjp(delta)[0]


def make_hn_optimizer(config: PFedHNConfig) -> optax.GradientTransformation:
    """PyTorch's `SGD([{phi \\ V}, {V, lr: embed_lr}], lr, momentum, weight_decay)` after
    `clip_grad_norm_(hnet.parameters(), clip)`: clip the global norm of the whole gradient,
    add wd * p to every parameter (all rows of V), then momentum SGD per group."""
    parts = []
    if config.hn_clip > 0:
        parts.append(optax.clip_by_global_norm(config.hn_clip))
    if config.hn_weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.hn_weight_decay))
    momentum = config.hn_momentum or None
    parts.append(optax.multi_transform(
        {"hn": optax.sgd(config.hn_lr, momentum=momentum),
         "embed": optax.sgd(config.resolved_embed_lr, momentum=momentum)},
        lambda params: {k: jax.tree.map(lambda _: "embed" if k == "embedding" else "hn", v)
                        for k, v in params.items()}))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------- algorithm
@register("pfedhn", PFedHNConfig)
class PFedHN(Algorithm):
    """pFedHN on the stacked engine (module docstring)."""

    display_name = "pFedHN"
    table_rows = (TableRow("pfedhn", "pFedHN", order=4),)
    # a decade around the official defaults (AvivSham/pFedHN trainer.py: lr 1e-2, embed_lr
    # None = lr; FL-bench's pfedhn.py the same)
    search_space = (CLIENT_LR,
                    LogUniform("hn_lr", 1e-3, 0.1, source="pFedHN official code: 1e-2"),
                    LogUniform("embed_lr", 1e-3, 0.1, source="pFedHN official code: embed_lr = lr = 1e-2"))
    server_state_keys = ("hn_params", "hn_opt_state")

    @classmethod
    def state_size_terms(cls, config, dims):
        """The client models and BN statistics, and the one hypernetwork (replicated):
        embedding table N x d_e, trunk, one head per client-model tensor, and its SGD
        momentum trace (one per parameter; none without momentum)."""
        h, k, p = config.hidden_dim, config.n_hidden, dims.P
        trunk = lambda n: config.resolved_embed_dim(n) * h + h + k * (h * h + h)
        table = lambda n: n * config.resolved_embed_dim(n)
        hn = lambda n: table(n) + trunk(n) + (h + 1) * p
        part = lambda name, expr, fn, match: StateTerm("hypernetworks", name, expr, False, fn,
                                                       "hn_params", match)
        if config.hn_momentum > 0:
            optimizer = StateTerm("optimizer states", "hypernetwork optimizer",
                                  "= hypernetworks (SGD momentum trace)", False,
                                  lambda n: 4 * hn(n), "hn_opt_state")
        else:
            optimizer = StateTerm("optimizer states", "hypernetwork optimizer", "0 (SGD)", False,
                                  lambda n: 0, "hn_opt_state")
        return [*client_models_terms(dims),
                part("embedding table", "4·N·d_e", lambda n: 4 * table(n),
                     lambda path: path[0] == "embedding"),
                part("trunk", "4·(d_e·H + H + K·(H² + H))", lambda n: 4 * trunk(n),
                     lambda path: path[0] not in ("embedding", "heads")),
                part("heads", "4·(H + 1)·P", lambda n: 4 * (h + 1) * p,
                     lambda path: path[0] == "heads"),
                optimizer]

    @classmethod
    def state_size_symbols(cls, config, dims):
        """H (trunk width) and K (hidden blocks); d_e = int(1 + N/4) unless set."""
        fixed = {"d_e": config.embed_dim} if config.embed_dim else {}
        return {"H": config.hidden_dim, "K": config.n_hidden, **fixed}

    def __init__(self, ctx: FLContext, config: PFedHNConfig | None = None):
        super().__init__(ctx, config)
        cfg = self.config
        self.hn = ModelHypernetwork(
            num_clients=ctx.num_clients, embed_dim=cfg.resolved_embed_dim(ctx.num_clients),
            hidden_dim=cfg.hidden_dim, n_hidden=cfg.n_hidden, targets=target_shapes(ctx.param_shapes))
        self.hn_tx = make_hn_optimizer(cfg)
        # jitted per instance (a class-level cache would keep the instance alive)
        self.generate = jax.jit(lambda phi, ids: generate(self.hn, phi, ids))
        self._init_server_jit = jax.jit(self._init_server)
        self.trainer  # built now, outside any trace

    # ------------------------------------------------------------------ state
    def init_hypernetwork(self, key: jax.Array) -> Any:
        """phi with PyTorch's initialisation (plain dicts; `ModelHypernetwork.init_params`)."""
        return self.hn.init_params(key)

    def _init_server(self, key):
        """(phi, its optimizer state, the generated models of all N clients)."""
        phi = self.init_hypernetwork(key)
        return phi, self.hn_tx.init(phi), generate(self.hn, phi, jnp.arange(self.ctx.num_clients,
                                                                          dtype=jnp.int32))

    def init_state(self, key):
        n = self.ctx.num_clients
        variables = init_variables(self.ctx.model, key, self.ctx.input_shape)
        stats = jax.tree.map(jnp.array, broadcast_clients(variables["batch_stats"], n))
        # one compiled program (eagerly, every op of the ~30 leaves would compile on its own)
        phi, opt, params = self._init_server_jit(jax.random.fold_in(key, 1))
        return {"hn_params": phi, "hn_opt_state": opt, "client_params": params, "batch_stats": stats}

    # ------------------------------------------------------------------ server steps
    def server_update(self, hn_params, hn_opt_state, client_ids, generated, trained):
        """The hypernetwork step of a visit by clients `client_ids` (pure).

        Args:
          hn_params, hn_opt_state: phi and its optimizer state.
          client_ids: int32 [S].
          generated: h(v_s; phi) as sent to the clients, leaves [S, ...].
          trained: the clients' models after local training, leaves [S, ...].
        Returns:
          (phi', opt state'): one clip + SGD step along sum_s (d theta_s / d phi)^T delta_s,
          delta_s = generated_s - trained_s (descent on the clients' losses).
        """
        delta = jax.tree.map(jnp.subtract, generated, trained)
        grads = hn_gradient(self.hn, hn_params, client_ids, delta)
        updates, hn_opt_state = self.hn_tx.update(grads, hn_opt_state, hn_params)
        return optax.apply_updates(hn_params, updates), hn_opt_state

    @functools.cached_property
    def trainer(self):
        """The experiment's client optimizer, after a clip of the gradient's global norm at
        --pfedhn_client_clip (the official code's client clip; 0 = the plain trainer)."""
        clip = self.config.client_clip
        if clip == 0:
            return self.ctx.trainer
        tx = optax.chain(optax.clip_by_global_norm(clip), make_optimizer(self.ctx.train))
        return self.ctx.trainer.with_update(sgd_update(self.ctx.model, tx))

    def _on_every_device(self, fn):
        # the hypernetwork is replicated server state: its (small) work is done whole on
        # every device instead of being partitioned by XLA next to the client-split state
        return on_every_device(fn, self.ctx.mesh)

    def _block(self, state, ids, key, data):
        """Generate -> train -> one hypernetwork step for clients `ids`, from one phi."""
        phi = state["hn_params"]
        theta = self._on_every_device(lambda p, i: generate(self.hn, p, i))(phi, ids)
        trained, stats, metrics = self.trainer.train(
            theta, self.take(state["batch_stats"], ids), ids, key, data)
        phi, opt = self._on_every_device(self.server_update)(phi, state["hn_opt_state"], ids,
                                                            theta, trained)
        new_state = {
            "hn_params": phi,
            "hn_opt_state": opt,
            "client_params": self.put(state["client_params"], ids, trained),
            "batch_stats": self.put(state["batch_stats"], ids, stats),
        }
        # down: the generated model; up: its delta (one model each way)
        model = jnp.full(ids.shape, self.ctx.model_bytes, jnp.int32)
        return new_state, {**metrics, "bytes_up": model, "bytes_down": model}

    def round_step(self, state, round_idx, client_ids, key, data):
        if self.config.semantics == "synchronous":
            return self._block(state, client_ids, key, data)
        return self.one_client_at_a_time(self._block, state, client_ids, key, data)

    # ------------------------------------------------------------------ evaluation
    def generated_params(self, state) -> Any:
        """h(v_i; phi) of every stored row, leaves [N_pad, ...] (the mesh-padding rows are
        copies of client 0's, as the rows of batch_stats past N are ignored)."""
        n = self.ctx.num_clients
        rows = jax.tree.leaves(state["client_params"])[0].shape[0]
        ids = np.where(np.arange(rows) < n, np.arange(rows), 0).astype(np.int32)
        return self.generate(state["hn_params"], jnp.asarray(ids))

    def evaluate(self, state, round_idx, key):
        return Evaluation({"": View(self.generated_params(state), state["batch_stats"]),
                           "local": View(state["client_params"], state["batch_stats"])})
