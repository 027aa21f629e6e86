"""FedRep (Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for
Personalized Federated Learning", ICML 2021, Algorithm 1; official code lgcollins/FedRep,
models/Update.py `LocalUpdate.train`).

The model is a body (shared representation) followed by a head (here FC3, the last
layer; `--fedrep_head` names the head layers). The body is global; each client keeps its
own head. Per round, for each participant i:

  start from (global body, own head h_i)
  head phase: E - body_epochs local epochs of SGD on the head, the body frozen
  body phase: body_epochs local epochs of SGD on the body, the new head frozen
  send the trained body; keep the trained head
server: global body <- sum_i w_i body_i (w_i ∝ train-set size); heads never leave a client

Frozen means no update and no optimizer-state change (`PhaseMasks` in the trainer: one
compiled trainer, the phase taken from each step's local epoch, so clients of different
sizes switch at their own step). BN scale/bias are body parameters (averaged); BN running
statistics stay with each client and, as in PyTorch's train mode, every training forward
pass updates them, in both phases.

Split default: (E - 1) head epochs + 1 body epoch, FL-bench's convention: the total number
of passes equals every other method's E (the official scripts train 10 head + 1 or 5 body
epochs, i.e. 11 or 15 passes: --local_epochs=11 --fedrep_body_epochs=1; PFLlib trains 1
head epoch then E body epochs).

Evaluation: '' = the latest global body with each client's own head (the official code's
and FL-bench's test model); 'local' = each client's model after its latest local training
(its own trained body, before averaging).
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from pfedla_jax.algorithms.fedavg import FedAvg
from pfedla_jax.algorithms.base import AlgorithmConfig, TableRow
from pfedla_jax.algorithms.registry import register
from pfedla_jax.algorithms.search_space import CLIENT_LR, ConfigBound, IntRange
from pfedla_jax.core.client_update import PhaseMasks, sgd_update
from pfedla_jax.core.local_training import make_optimizer
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import LAYER_ORDER


@dataclasses.dataclass(frozen=True)
class FedRepConfig(AlgorithmConfig):
    """FedRep's options (the defaults: the module docstring)."""

    head: str = dataclasses.field(default="FC3", metadata={
        "help": "FedRep: the head layers, kept by each client (comma-separated, of "
                + ", ".join(LAYER_ORDER) + "); the other layers are the shared body."})
    body_epochs: int = dataclasses.field(default=1, metadata={
        "help": "FedRep: local epochs of the body phase (head frozen), after --local_epochs "
                "minus these of the head phase (body frozen); FL-bench's (E-1)+1 by default."})

    @property
    def head_layers(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.head.split(",") if name.strip())

    def validate(self) -> None:
        if not self.head_layers:
            raise UserInputError("--fedrep_head names no layer; expected some of " + ", ".join(LAYER_ORDER))
        unknown = [name for name in self.head_layers if name not in LAYER_ORDER]
        if unknown:
            raise UserInputError(f"--fedrep_head: unknown layer {unknown[0]!r}; expected some of "
                                 + ", ".join(LAYER_ORDER))
        if self.body_epochs < 1:
            raise UserInputError(f"--fedrep_body_epochs must be >= 1, got {self.body_epochs}")

    def validate_training(self, train) -> None:
        """The split must fit the local training (a LocalTrainConfig)."""
        if train.local_steps > 0:
            raise UserInputError("FedRep splits the local epochs into head and body epochs: set "
                                 "--local_epochs (not --local_steps)")
        if self.body_epochs > train.local_epochs:
            raise UserInputError(f"--fedrep_body_epochs={self.body_epochs} does not fit in "
                                 f"--local_epochs={train.local_epochs} (head epochs = local "
                                 f"epochs - body epochs must be >= 0)")


@register("fedrep", FedRepConfig)
class FedRep(FedAvg):
    display_name = "FedRep"
    table_rows = (TableRow("fedrep", "FedRep", order=6),)
    # the head/body split of the local epochs E: body_epochs 1..E - 1, so head epochs
    # E - body_epochs from E - 1 (FL-bench: E - 1 head + 1 body) down to 1 (PFLlib: 1 head
    # epoch); the official scripts train 10 head + 1 or 5 body epochs. E = 1: body 1, head 0.
    search_space = (CLIENT_LR,
                    IntRange("body_epochs", 1,
                             ConfigBound("local_epochs - 1", lambda c: max(1, c.train.local_epochs - 1)),
                             source="FedRep official scripts: 1 or 5 body epochs after 10 head "
                             "epochs; FL-bench: 1; PFLlib: 1 head epoch"))

    def __init__(self, ctx, config=None):
        super().__init__(ctx, config)
        missing = [name for name in self.config.head_layers if name not in ctx.layer_order]
        if missing:
            raise UserInputError(f"--fedrep_head: the model has no layer {missing[0]!r} "
                                 f"(its layers: {', '.join(ctx.layer_order)})")
        if set(ctx.layer_order) <= set(self.config.head_layers):
            raise UserInputError("--fedrep_head covers every layer: no body left to share")
        self.trainer  # built now (it places nothing new: the data is the experiment trainer's)

    def local_layers(self) -> tuple[str, ...]:
        return self.config.head_layers

    @functools.cached_property
    def phases(self) -> PhaseMasks:
        """(head epochs: head trains, body frozen), (body epochs: body trains, head frozen)."""
        is_head = self.is_local
        is_body = jax.tree.map(lambda local: not local, is_head)
        body = self.config.body_epochs
        return PhaseMasks((is_head, is_body), epochs=(self.ctx.train.local_epochs - body, body))

    @functools.cached_property
    def trainer(self):
        train = self.ctx.train
        return self.ctx.trainer.with_update(
            sgd_update(self.ctx.model, make_optimizer(train), trainable=self.phases))

    def describe(self) -> str:
        head, body = self.phases.epochs
        return (f"head {', '.join(self.config.head_layers)}: {head} head epochs, then {body} "
                f"body epoch{'s' if body != 1 else ''}")
