"""FedRoD (Chen & Chao, "On Bridging Generic and Personalized Federated Learning for Image
Classification", ICLR 2022, Sec. 4): a shared body with two heads, a generic head trained
for the balanced (class-prior-free) risk and averaged with the body, and a personal head per
client; the personalised prediction is the sum of both heads' logits.

Model: body f_theta (every layer but the last; z = the last layer's input, FC2's ReLU output
in the CNN, R^84), generic head h_G(z; psi) = the model's last layer (FC3), personal head
h_P(z; phi_i) = z phi_i.kernel + phi_i.bias, linear, FC3's shape.

Per round:

  server sends (theta, psi) to the participants S
  client i, each minibatch (x, y) of its E local epochs, ONE forward pass:
      z = f_theta(x), g = h_G(z)
      L_BR = BSM(g, y; n_i) = -log softmax(g + gamma log n_i)_y     (balanced softmax, the
             paper's balanced risk; n_i = the class counts of i's training split)
      L_ER = CE(sg(g) + h_P(sg(z); phi_i), y)                      (empirical risk of the
             personalised prediction; sg = stop-gradient: it trains phi_i only)
      one SGD step on L_BR + L_ER over (theta, psi, phi_i): theta, psi get grad L_BR and
      phi_i gets grad L_ER (the stop-gradients separate them), the same lr
  client sends (theta_i, psi_i), keeps phi_i
  server: (theta, psi) <- sum_i n_i / sum n (theta_i, psi_i)

One step on the sum equals PFLlib's (clientrod.py) and fluke's two optimisers stepping on the
same forward pass (body first, then the head on the pre-step z and g): SGD (with momentum and
L2 decay per parameter) is separable. The paper's "hyper" variant (phi_i generated from the
class distribution) is not implemented.

Balanced softmax: a class with n_c = 0 gets the logit -inf (weight n_c^gamma = 0):
probability 0 and zero gradient. A training label always has n_y > 0, so the loss is finite;
a single-class client has loss 0 and zero gradients for the body and generic head (it
teaches the generic model nothing), with no NaN (integer-label cross-entropy; a one-hot CE
would compute 0 * -inf). Padding examples of a partial batch are given a label the client
has, so no infinity is ever formed. The counts come from the whole training split (PFLlib
counts one pass of a shuffled drop_last loader: random counts, and a class lost in the
dropped tail would get n = 0 and an infinite loss). gamma = `--fedrod_gamma` (1, PFLlib's,
fluke's and FL-bench's; FLGO uses 0.1; the paper's value is not stated in what we read);
gamma = 0 is plain cross-entropy for the generic head.

Personal head initialisation (`--fedrod_personal_init`): 'copy' (default; PFLlib, fluke and
FL-bench copy the initial generic head, so the first personalised logits are 2g) or 'zeros'
(the personalised model starts as the generic one).

What persists per client: phi_i (`personal_head`) and its BN running statistics. The
server keeps (theta, psi).

Evaluation: '' = the latest (theta, psi) with each client's phi_i, logits summed; for a
linear head this is the model whose last layer is (psi + phi_i) on kernel and bias, so the
standard evaluator runs it (what PFLlib evaluates, after the broadcast). 'generic' = the
generic model (theta, psi) on every client (the paper's G-FL model; the paper measures it on
a balanced global test set, here on each client's own test split).

Communication per participant and round: the whole model, up and down (85,822 floats on the
E/FMNIST CNN); phi_i is never sent.

Deviations of other implementations avoided: FL-bench uses the personal logits alone, not
summed and not detached (its personal loss trains the body); FLGO minimises the probability
of the true class (a sign error) and does not detach either.

The train loss reported per round is L_BR + L_ER (the objective the step minimises).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pfedla_jax.algorithms.base import Algorithm, AlgorithmConfig, Evaluation, FLContext, TableRow
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import CLIENT_LR, LogUniform
from pfedla_jax.core.aggregation import weighted_average
from pfedla_jax.core.client_update import Batch, ClientUpdate
from pfedla_jax.core.evaluation import View
from pfedla_jax.core.local_training import make_optimizer
from pfedla_jax.core.state_size import per_client_term, server_model_term
from pfedla_jax.errors import UserInputError, check_choice
from pfedla_jax.models import count_params

PERSONAL_INITS = ("copy", "zeros")


@dataclasses.dataclass(frozen=True)
class FedRoDConfig(AlgorithmConfig):
    """FedRoD's options (the defaults: the module docstring)."""

    gamma: float = dataclasses.field(default=1.0, metadata={
        "help": "FedRoD: gamma of the balanced softmax, logits + gamma log n_c (1: PFLlib, "
                "fluke, FL-bench; FLGO 0.1; 0 = plain cross-entropy)."})
    personal_init: str = dataclasses.field(default="copy", metadata={
        "help": "FedRoD: the personal heads' initial value: copy (of the initial generic "
                "head: PFLlib, fluke, FL-bench) | zeros."})

    def validate(self) -> None:
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise UserInputError(f"--fedrod_gamma must be a finite number >= 0, got {self.gamma}")
        check_choice("fedrod_personal_init", self.personal_init, PERSONAL_INITS)


# ---------------------------------------------------------------------------- the loss
def balanced_softmax_loss(logits: jax.Array, labels: jax.Array, counts: jax.Array,
                          gamma: float) -> jax.Array:
    """Per-example balanced-softmax loss -log softmax(logits + gamma log counts)_label.

    Args:
      logits: float [B, C].
      labels: int [B]; every label must have counts > 0 (else the loss is +inf).
      counts: float [C] class counts (>= 0) of the client's training split.
      gamma: the exponent (static); 0 gives plain cross-entropy.

    Returns:
      float32 [B]. Classes with counts 0 (gamma > 0) get the logit -inf: probability 0, zero
      gradient, no NaN.
    """
    logits = logits.astype(jnp.float32)
    if gamma > 0:
        shift = jnp.where(counts > 0, gamma * jnp.log(jnp.maximum(counts, 1.0)), -jnp.inf)
        logits = logits + shift
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def class_counts(labels: jax.Array, idx: jax.Array, count: jax.Array, num_classes: int) -> jax.Array:
    """float32 [S, C]: per client, its training examples of each class.

    Args:
      labels: int [M], the store's labels.
      idx: int [S, max_train], the clients' rows of the store's train_idx.
      count: int [S], their train counts (entries of idx past them are padding).
      num_classes: C.
    """
    valid = (jnp.arange(idx.shape[1])[None, :] < count[:, None]).astype(jnp.float32)
    return jax.vmap(lambda y, v: jnp.zeros((num_classes,), jnp.float32).at[y].add(v))(labels[idx], valid)


def fedrod_update(model, optimizer: optax.GradientTransformation, *, head: str,
                  gamma: float) -> ClientUpdate:
    """One client's FedRoD local training as a `ClientUpdate` (module docstring).

    Inputs: `shared` = the global params (theta, psi), one unstacked pytree; `client` =
    {'batch_stats', 'personal_head': {'kernel' [F, C], 'bias' [C]}, 'class_counts' [C]}.
    Output: {'params' (theta_i, psi_i), 'personal_head' phi_i, 'batch_stats'}. The step's
    loss is L_BR + L_ER summed over the real examples. One optimizer state for (params, phi)
    (created afresh each round).

    Args:
      model: a Flax module called as model.apply(variables, x, train=True, mask=mask,
        mutable=['batch_stats']) -> (logits, new_vars), whose top-level layer `head` is
        linear (its input z: the features; intercepted with `nn.intercept_methods`).
      optimizer: the client optimizer (over params and the personal head together).
      head: the name of the generic head layer (the last layer).
      gamma: the balanced softmax's exponent.
    """

    def forward(params, batch_stats, x, mask):
        """(generic logits g, head input z, new batch_stats): one train-mode pass."""
        feats = []

        def grab_head_input(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and context.module.path == (head,):
                feats.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(grab_head_input):
            g, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mask=mask, mutable=["batch_stats"])
        return g, feats[0], new_vars.get("batch_stats", batch_stats)

    def loss_fn(trainable, batch_stats, x, y, mask, counts):
        params, phi = trainable
        g, z, new_stats = forward(params, batch_stats, x, mask)
        # padding examples get a label the client has: no +inf is ever formed
        safe_y = jnp.where(mask > 0, y, jnp.argmax(counts))
        br = balanced_softmax_loss(g, safe_y, counts, gamma)
        personal = (jax.lax.stop_gradient(g).astype(jnp.float32)
                    + jax.lax.stop_gradient(z) @ phi["kernel"] + phi["bias"])
        er = optax.softmax_cross_entropy_with_integer_labels(personal, y)
        total, count = jnp.sum((br + er) * mask), jnp.sum(mask)
        return total / jnp.maximum(count, 1.0), (total, count, new_stats)

    grad = jax.grad(loss_fn, has_aux=True)

    def init(shared, client, client_id, key):
        trainable = (shared, client["personal_head"])
        return trainable, client["batch_stats"], optimizer.init(trainable), client["class_counts"]

    def step(carry, batch: Batch):
        trainable, batch_stats, opt_state, counts = carry
        grads, (total, count, new_stats) = grad(trainable, batch_stats, batch.x[0], batch.y[0],
                                                batch.mask[0], counts)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return (trainable, new_stats, opt_state, counts), (total, count)

    def finalize(carry, shared, client):
        (params, phi), batch_stats = carry[0], carry[1]
        return {"params": params, "personal_head": phi, "batch_stats": batch_stats}

    return ClientUpdate(init=init, step=step, finalize=finalize)


# ---------------------------------------------------------------------------- the algorithm
@register("fedrod", FedRoDConfig)
class FedRoD(Algorithm):
    """FedRoD on the stacked engine (module docstring)."""

    display_name = "FedRoD"
    table_rows = (TableRow("fedrod", "FedRoD", order=26),)
    server_state_keys = ("global_params",)
    search_space = (CLIENT_LR,
                    LogUniform("gamma", 0.1, 1.0,
                               source="FLGO's 0.1; PFLlib's, fluke's and FL-bench's 1"))

    @classmethod
    def state_size_terms(cls, config, dims):
        """Each client's personal head (H scalars: the last layer's) and BN statistics; the
        global model (body and generic head)."""
        heads = count_params(dims.params[dims.layer_order[-1]])
        return [per_client_term("client params", "personal_head", heads, "H"),
                per_client_term("BN statistics", "batch_stats", dims.B, "B"),
                server_model_term(dims)]

    @classmethod
    def state_size_symbols(cls, config, dims):
        """H: scalars of the last layer (the personal head)."""
        return {"H": count_params(dims.params[dims.layer_order[-1]])}

    def __init__(self, ctx: FLContext, config: FedRoDConfig | None = None):
        super().__init__(ctx, config)
        self.head = ctx.layer_order[-1]
        shapes = ctx.param_shapes.get(self.head, {})
        if (set(shapes) != {"kernel", "bias"} or len(shapes["kernel"].shape) != 2
                or shapes["bias"].shape != shapes["kernel"].shape[1:]):
            raise UserInputError(f"FedRoD needs a linear last layer (kernel [F, C], bias [C]); "
                                 f"the model's {self.head!r} is not one")
        self.num_outputs = int(shapes["bias"].shape[0])
        self.trainer = ctx.trainer.with_update(fedrod_update(
            ctx.model, make_optimizer(ctx.train), head=self.head, gamma=self.config.gamma))

    def describe(self) -> str:
        return (f"generic head {self.head} (balanced softmax, gamma {self.config.gamma:g}) plus a "
                f"personal head per client ({self.config.personal_init} init)")

    def init_state(self, key):
        params, stats = self.ctx.init_client_variables(key)
        weights = self.ctx.store.train_count.astype(jnp.float32)
        global_params = weighted_average(params, weights)
        head = global_params[self.head]
        if self.config.personal_init == "zeros":
            head = jax.tree.map(jnp.zeros_like, head)
        rows = self.ctx.num_clients
        personal = jax.tree.map(lambda a: jnp.array(jnp.broadcast_to(a, (rows,) + a.shape)), head)
        return {"global_params": global_params, "personal_head": personal, "batch_stats": stats}

    def round_step(self, state, round_idx, client_ids, key, data):
        mine = self.take({"stats": state["batch_stats"], "head": state["personal_head"]}, client_ids)
        counts = class_counts(data.labels, jnp.take(data.train_idx, client_ids, axis=0),
                              jnp.take(data.train_count, client_ids), self.num_outputs)
        out, metrics = self.trainer.run(
            state["global_params"],
            {"batch_stats": mine["stats"], "personal_head": mine["head"], "class_counts": counts},
            client_ids, key, data)
        weights = jnp.take(data.train_count, client_ids).astype(jnp.float32)
        new_state = {
            "global_params": weighted_average(out["params"], weights),
            "personal_head": self.put(state["personal_head"], client_ids, out["personal_head"]),
            "batch_stats": self.put(state["batch_stats"], client_ids, out["batch_stats"]),
        }
        model = jnp.full(client_ids.shape, self.ctx.model_bytes, jnp.int32)
        return new_state, {**metrics, "bytes_up": model, "bytes_down": model}

    def personalized(self, global_params, personal_head):
        """[K, ...] models: the global body and, as the last layer, the generic head plus
        each client's personal head (kernel and bias summed: the sum of the two heads'
        logits)."""
        rows = jax.tree.leaves(personal_head)[0].shape[0]
        return {layer: (jax.tree.map(lambda g, p: g + p, leaves, personal_head) if layer == self.head
                        else jax.tree.map(lambda g: jnp.broadcast_to(g, (rows,) + g.shape), leaves))
                for layer, leaves in global_params.items()}

    def evaluate(self, state, round_idx, key):
        stats = state["batch_stats"]
        return Evaluation({
            "": View(self.personalized(state["global_params"], state["personal_head"]), stats),
            "generic": View(state["global_params"], stats, shared=True)})
