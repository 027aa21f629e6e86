r"""The server state of every algorithm, by component, as a function of the number of clients.

Example (the FMNIST CNN, N = 10, 100, 1,000; BUILD_NOTES' state-size table):

  python -m experiments.state_size --clients=10,100,1000 --out=runs/state_size.json

For every registered algorithm (pFedLA also with its Adam hypernetwork optimizer and with
--hn_delta_reference=first, the variants that add state; HeurpFedLA is checked to keep the
same state as pFedLA; FedBN only where the model has BatchNorm, as experiments.table) and
every N, the algorithm is built on a synthetic client store of the right shapes (no dataset
is read) and the bytes of `jax.eval_shape(algorithm.init_state)` are counted per state
entry, grouped into components:

  client params     per-client models (client_params; pFedMe's theta; FedFomo's start_params)
  BN statistics     running BatchNorm statistics (batch_stats; FedFomo's start_stats)
  hypernetworks     hn_params (pFedLA: one per client, split into heads / embedding + MLP;
                    pFedHN: one for all, split into embedding table / trunk / heads)
  optimizer states  hn_opt_state (no algorithm keeps a client optimizer state between
                    rounds: local SGD starts fresh every round)
  server model      global_params
  other             FedFomo's affinity [N, N], uploaded [N] and validation split tables,
                    pFedLA's delta_ref [N, L]

Beside each measured number the script evaluates a closed-form formula (`formula`, the same
parts; tests/test_state_size.py checks that both agree), and from the formulas the largest N
whose state alone fits one device of each capacity (--capacity_gib) when the per-client
entries are split over D devices (--devices; sharding over the mesh axis `clients` divides
every per-client entry by D, rows padded to a multiple of D, while the entries the
algorithm lists in `server_state_keys` stay whole on every device).

Prints markdown tables (measured bytes by component; formulas; largest N per device) and
writes them with every part to --out (JSON). Bad input prints one line `error: ...` and
exits with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from absl import app, flags, logging

from experiments.cli import fail, parse_flags

# (input shape, classes) of the datasets the presets use; the CNN is built from them alone
DATASETS = {
    "fmnist": ((28, 28, 1), 10),
    "tfds:emnist/digits": ((28, 28, 1), 10),
    "tfds:cifar10": ((32, 32, 3), 10),
    "tfds:cifar100": ((32, 32, 3), 100),
}
ALIASES = {"emnist": "tfds:emnist/digits", "cifar10": "tfds:cifar10", "cifar100": "tfds:cifar100",
           "tfds:fashion_mnist": "fmnist"}
GROUPS = ("client params", "BN statistics", "hypernetworks", "optimizer states", "server model",
          "other")
GROUP_OF_KEY = {"client_params": "client params", "theta": "client params",
                "start_params": "client params", "batch_stats": "BN statistics",
                "start_stats": "BN statistics", "hn_params": "hypernetworks",
                "hn_opt_state": "optimizer states", "global_params": "server model"}
# (row label, algorithm, config overrides {dotted path: value}): variants that change the state
VARIANTS = (
    ("pfedla+adam", "pfedla", {"hn_optimizer": "adam"}),
    ("pfedla+first", "pfedla", {"hn_delta_reference": "first"}),
)
GIB = 2**30
PAPER_ORDER = ("local", "fedavg", "perfedavg", "pfedme", "pfedhn", "fedbn", "fedrep", "fedfomo", "pfedla")



def define_flags() -> None:
    """The tool's flags, defined only when it runs as a program: importing this module (the
    tests do, beside experiments.run, which has its own --dataset) defines none."""
    flags.DEFINE_string("clients", "10,100,1000", "Comma-separated numbers of clients N (>= 2).")
    flags.DEFINE_string("dataset", "fmnist", "Whose CNN: " + " | ".join(
        [*DATASETS, *ALIASES]) + " (shapes only: nothing is read).")
    flags.DEFINE_integer(
        "train_per_client", 50, "Training examples per client (only FedFomo's validation split "
        "tables depend on it; 50 = 70 examples per client as noniid1 with 5 classes splits them).")
    flags.DEFINE_string("algorithms", "all", "all | comma-separated algorithm names or variant "
                        "labels (" + ", ".join(v[0] for v in VARIANTS) + ").")
    flags.DEFINE_string("capacity_gib", "24,80,141", "Device memories in GiB for the largest-N "
                        "table (this CPU host: 24; GPUs: 80, 141).")
    flags.DEFINE_string("devices", "1,2,4,8", "Device counts D the per-client state is split over.")
    flags.DEFINE_string("out", None, "Write everything as JSON to this path.")


class StateSizeError(Exception):
    """Bad input (one `error:` line, exit 2)."""


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Dims:
    """What the formulas need about the model, the data and the algorithms' configs.

    Attributes:
      dataset: the dataset whose CNN this is.
      P: trainable scalars of one client model.
      B: BN running-statistic scalars of one client (0 without BN).
      L: pFedLA aggregation layers (alpha rows per client).
      T: pFedLA per-client hypernetwork scalars outside the heads (embedding + MLP).
      F: pFedLA head fan-in (the last hidden width; the embedding size without hidden layers).
      hhn: pFedHN trunk width H; khn: its hidden blocks; heads: its generated tensors.
      train: training examples per client; val: FedFomo's validation examples per client.
      has_bn: whether the model has BatchNorm (FedBN is measured only then).
    """

    dataset: str
    P: int
    B: int
    L: int
    T: int
    F: int
    hhn: int
    khn: int
    train: int
    val: int
    has_bn: bool


def resolve_dataset(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        raise StateSizeError(f"unknown --dataset {name!r}; expected one of "
                             f"{', '.join([*DATASETS, *ALIASES])}")
    return name


def synthetic_context(dataset: str, num_clients: int, train_per_client: int = 50):
    """An FLContext whose store has the shapes of `num_clients` clients with
    `train_per_client` training examples each (one blank image: no dataset is read)."""
    import jax.numpy as jnp

    from pfedla_jax.algorithms import FLContext
    from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
    from pfedla_jax.data.store import ClientStore
    from pfedla_jax.models import layer_names, make_cnn

    shape, classes = DATASETS[dataset]
    n = num_clients
    store = ClientStore(
        images=jnp.zeros((1,) + shape, jnp.uint8), labels=jnp.zeros((1,), jnp.int32),
        train_idx=jnp.zeros((n, train_per_client), jnp.int32),
        train_count=jnp.full((n,), train_per_client, jnp.int32),
        test_idx=jnp.zeros((n, 1), jnp.int32), test_count=jnp.ones((n,), jnp.int32),
        mean=jnp.zeros((shape[2],), jnp.float32), std=jnp.ones((shape[2],), jnp.float32),
        num_clients=n, num_classes=classes, max_train=train_per_client, max_test=1)
    model = make_cnn(shape, classes)
    trainer = ClientTrainer(model, store, LocalTrainConfig(), "loop")
    return FLContext(model=model, layer_order=layer_names(model), store=store, trainer=trainer,
                     num_clients=n, input_shape=shape)


def make_algorithm(label: str, ctx):
    """The algorithm of row `label` (a registered name or a VARIANTS label) on `ctx`."""
    from pfedla_jax.algorithms import algorithm_class
    from pfedla_jax.algorithms.registry import replace_path

    name, overrides = label, {}
    for var_label, var_name, var_overrides in VARIANTS:
        if label == var_label:
            name, overrides = var_name, var_overrides
    cls = algorithm_class(name)
    config = cls.config_class()
    for path, value in overrides.items():
        config = replace_path(config, path, value)
    return cls(ctx, config)


def model_dims(dataset: str, train_per_client: int = 50) -> Dims:
    """The Dims of `dataset`'s CNN and the default configs (from the code, not hard-coded)."""
    import jax

    from pfedla_jax.algorithms import PFedHNConfig, PFedLAConfig
    from pfedla_jax.algorithms.fedfomo import FedFomoConfig
    from pfedla_jax.models import init_variables

    ctx = synthetic_context(dataset, 2, train_per_client)
    variables = jax.eval_shape(lambda: init_variables(ctx.model, jax.random.key(0), ctx.input_shape))
    count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))
    pfedla = make_algorithm("pfedla", ctx)
    hn = PFedLAConfig().hn
    fan_in, trunk = hn.embed_dim, hn.embed_dim
    for _ in range(hn.num_hidden):
        trunk += fan_in * hn.hidden_dim + hn.hidden_dim
        fan_in = hn.hidden_dim
    pfedhn = PFedHNConfig()
    val = int(math.floor(train_per_client * FedFomoConfig().val_fraction + 0.5))
    return Dims(dataset=dataset, P=count(variables["params"]), B=count(variables.get("batch_stats", {})),
                L=pfedla.layer_map.num_layers, T=trunk, F=fan_in, hhn=pfedhn.hidden_dim,
                khn=pfedhn.n_hidden, train=train_per_client, val=val,
                has_bn=bool(variables.get("batch_stats")))


# ----------------------------------------------------------------------------- measured


def _part(key: str, path: tuple[str, ...], algorithm: str) -> tuple[str, str]:
    """(group, part) of the leaf at `path` of state entry `key`."""
    group = GROUP_OF_KEY.get(key, "other")
    if key == "hn_params" and algorithm.startswith("pfedla"):
        return group, "heads" if path and path[0].startswith("heads") else "embedding + MLP"
    if key == "hn_params":  # pFedHN
        head = path[0] if path else ""
        return group, {"embedding": "embedding table", "heads": "heads"}.get(head, "trunk")
    if key == "hn_opt_state":
        return group, "hypernetwork optimizer"
    return group, key


def measure(label: str, num_clients: int, dataset: str = "fmnist", train_per_client: int = 50) -> dict:
    """Bytes of `jax.eval_shape(init_state)` of row `label` at N = num_clients.

    Returns:
      {'parts': {(group, part): bytes}, 'sharded': {(group, part): bool} (False: the entry is
       in server_state_keys, replicated on every device), 'keys': {state key: bytes}}.
    """
    import jax

    ctx = synthetic_context(dataset, num_clients, train_per_client)
    algo = make_algorithm(label, ctx)
    state = jax.eval_shape(algo.init_state, jax.random.key(0))
    parts: dict[tuple[str, str], int] = {}
    sharded: dict[tuple[str, str], bool] = {}
    keys: dict[str, int] = {}
    for key, tree in state.items():
        keys[key] = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
            size = math.prod(leaf.shape) * leaf.dtype.itemsize
            part = _part(key, names, label)
            parts[part] = parts.get(part, 0) + size
            sharded[part] = key not in algo.server_state_keys
            keys[key] += size
    return {"parts": parts, "sharded": sharded, "keys": keys}


# ----------------------------------------------------------------------------- closed forms


@dataclasses.dataclass(frozen=True)
class Term:
    """One part of a state: `bytes(N)` and its formula; `sharded`: a per-client entry."""

    group: str
    part: str
    expr: str
    sharded: bool
    fn: Any  # N -> bytes

    def bytes(self, n: int) -> int:
        return int(self.fn(n))


def pfedhn_embed_dim(n: int) -> int:
    """pFedHN's default d_e = int(1 + N/4) (the official rule; PFedHNConfig.resolved_embed_dim)."""
    return int(1 + n / 4)


def formula(label: str, d: Dims) -> list[Term]:
    """The closed-form parts of row `label`'s state (float32 = 4 bytes, int32 = 4, bool = 1).

    N: clients; P: params per model; B: BN statistics per client; L: pFedLA layers;
    T: pFedLA embedding + MLP scalars per client; F: its head fan-in; H, K: pFedHN trunk
    width and hidden blocks; d_e = int(1 + N/4); W: training examples per client; V: FedFomo's
    validation examples per client.
    """
    P, B = d.P, d.B
    client = lambda k=1: Term("client params", "client_params", f"{4 * k}·N·P" if k > 1 else "4·N·P",
                              True, lambda n: 4 * k * n * P)
    stats = Term("BN statistics", "batch_stats", "4·N·B", True, lambda n: 4 * n * B)
    server = Term("server model", "global_params", "4·P", False, lambda n: 4 * P)
    name = label.split("+")[0]
    if name == "local":
        return [client(), stats]
    if name in ("fedavg", "fedbn", "fedrep"):
        return [client(), stats, server]
    if name == "perfedavg":
        return [stats, server]
    if name == "pfedme":
        return [Term("client params", "client_params", "4·N·P", True, lambda n: 4 * n * P),
                Term("client params", "theta", "4·N·P", True, lambda n: 4 * n * P), stats, server]
    if name == "fedfomo":
        return [client(), Term("client params", "start_params", "4·N·P", True, lambda n: 4 * n * P),
                stats, Term("BN statistics", "start_stats", "4·N·B", True, lambda n: 4 * n * B),
                Term("other", "affinity", "4·N²", False, lambda n: 4 * n * n),
                Term("other", "uploaded", "N", False, lambda n: n),
                Term("other", "split", "4·N·(W + V)", False, lambda n: 4 * n * (d.train + d.val))]
    if name == "pfedhn":
        H, K = d.hhn, d.khn
        trunk = lambda n: pfedhn_embed_dim(n) * H + H + K * (H * H + H)
        hn = lambda n: n * pfedhn_embed_dim(n) + trunk(n) + (H + 1) * P
        return [client(), stats,
                Term("hypernetworks", "embedding table", "4·N·d_e", False,
                     lambda n: 4 * n * pfedhn_embed_dim(n)),
                Term("hypernetworks", "trunk", "4·(d_e·H + H + K·(H² + H))", False,
                     lambda n: 4 * trunk(n)),
                Term("hypernetworks", "heads", "4·(H + 1)·P", False, lambda n: 4 * (H + 1) * P),
                Term("optimizer states", "hypernetwork optimizer",
                     "= hypernetworks (SGD momentum trace)", False, lambda n: 4 * hn(n))]
    if name == "pfedla":
        L, T, F = d.L, d.T, d.F
        terms = [client(), stats,
                 Term("hypernetworks", "heads", "4·L·(F + 1)·N²", True, lambda n: 4 * L * (F + 1) * n * n),
                 Term("hypernetworks", "embedding + MLP", "4·N·T", True, lambda n: 4 * n * T)]
        hn = lambda n: 4 * L * (F + 1) * n * n + 4 * n * T
        if label == "pfedla+adam":
            terms.append(Term("optimizer states", "hypernetwork optimizer",
                              "2 × hypernetworks + 4·N (Adam mu, nu, count)", True,
                              lambda n: 2 * hn(n) + 4 * n))
        else:  # plain SGD: no state (with --hn_momentum > 0: one trace = hypernetworks)
            terms.append(Term("optimizer states", "hypernetwork optimizer", "0 (SGD)", True, lambda n: 0))
        if label == "pfedla+first":
            terms.append(Term("other", "delta_ref", "4·N·L", True, lambda n: 4 * n * L))
        return terms
    raise StateSizeError(f"no formula for {label!r}: add one to experiments/state_size.py")


def formula_parts(label: str, d: Dims, n: int) -> dict[tuple[str, str], int]:
    """{(group, part): bytes} of the formulas at N = n, zero-byte parts left out (as
    eval_shape has no leaf for them)."""
    out = {}
    for t in formula(label, d):
        if t.bytes(n):
            out[(t.group, t.part)] = out.get((t.group, t.part), 0) + t.bytes(n)
    return out


def bytes_per_device(terms: list[Term], n: int, devices: int) -> int:
    """The state's bytes on each of `devices` devices: per-client parts split by rows (N padded
    to a multiple of D), the others whole on every device."""
    rows = -(-n // devices)
    total = 0
    for t in terms:
        b = t.bytes(n)
        total += (b // n) * rows if t.sharded else b
    return total


UNBOUNDED_N = 2**50   # a state that still fits at this N does not grow with N (no limit)


def largest_n(terms: list[Term], capacity: int, devices: int) -> int | None:
    """The largest N (>= 2) whose state fits `capacity` bytes per device; None: not even
    N = 2; UNBOUNDED_N: no limit (nothing in the state grows with N)."""
    fits = lambda n: bytes_per_device(terms, n, devices) <= capacity
    if not fits(2):
        return None
    if fits(UNBOUNDED_N):
        return UNBOUNDED_N
    lo, hi = 2, 4
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ----------------------------------------------------------------------------- the tool


def parse_ints(text: str, flag: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StateSizeError(f"--{flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise StateSizeError(f"--{flag} must list integers >= {minimum}, got {text!r}")
    return values


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StateSizeError(f"--{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise StateSizeError(f"--{flag} must list positive numbers, got {text!r}")
    return values


def row_labels(text: str, d: Dims) -> list[str]:
    """The rows: every registered algorithm (FedBN only with BN), then the variants."""
    from pfedla_jax.algorithms import algorithm_names

    names = algorithm_names()
    # the paper's row order (experiments.table), then any other registered algorithm
    known = [*(m for m in PAPER_ORDER if m in names), *(m for m in names if m not in PAPER_ORDER),
             *(v[0] for v in VARIANTS)]
    if text.strip() == "all":
        return [n for n in known if n != "fedbn" or d.has_bn]
    labels = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in labels if t not in known]
    if bad or not labels:
        raise StateSizeError(f"unknown --algorithms entry {bad[0] if bad else text!r}; expected all or "
                             f"some of {', '.join(known)}")
    return labels


def human(b: int) -> str:
    """Bytes as B / KiB / MiB / GiB (3 significant digits)."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b} B"


def build_report(labels: list[str], clients: list[int], d: Dims, capacities: list[float],
                 devices: list[int]) -> dict:
    rows, mismatches = [], []
    for label in labels:
        for n in clients:
            m = measure(label, n, d.dataset, d.train)
            groups = {g: 0 for g in GROUPS}
            for (g, _), b in m["parts"].items():
                groups[g] += b
            expected = formula_parts(label, d, n)
            if expected != m["parts"]:
                mismatches.append(f"{label} N={n}: formula {expected} != measured {m['parts']}")
            total = sum(m["parts"].values())
            per_client = sum(b for p, b in m["parts"].items() if m["sharded"][p])
            rows.append({"algorithm": label, "num_clients": n, "groups": groups, "total": total,
                         "per_client_entries": per_client, "replicated_entries": total - per_client,
                         "keys": m["keys"],
                         "parts": [{"group": g, "part": p, "bytes": b, "sharded": m["sharded"][(g, p)]}
                                   for (g, p), b in sorted(m["parts"].items())]})
    formulas = {label: [{"group": t.group, "part": t.part, "formula": t.expr, "sharded": t.sharded}
                        for t in formula(label, d)] for label in labels}
    limits = []
    for label in labels:
        terms = formula(label, d)
        for cap in capacities:
            for dev in devices:
                n_max = largest_n(terms, int(cap * GIB), dev)
                limits.append({"algorithm": label, "capacity_gib": cap, "devices": dev,
                               "largest_n": None if n_max == UNBOUNDED_N else n_max,
                               "unbounded": n_max == UNBOUNDED_N})
    notes = []
    if "pfedla" in labels:
        n = max(2, min(clients))
        if heur_same_state(n, d):
            notes.append("HeurpFedLA (--heur_k=1) keeps exactly pFedLA's state (same entries and "
                         "shapes): not listed separately.")
        else:
            notes.append("HeurpFedLA (--heur_k=1) has a state that differs from pFedLA's.")
    return {"dataset": d.dataset, "dims": dataclasses.asdict(d), "clients": clients,
            "rows": rows, "formulas": formulas, "limits": limits, "notes": notes,
            "mismatches": mismatches}


def heur_same_state(n: int, d: Dims) -> bool:
    """Whether HeurpFedLA (heur_k=1) has exactly pFedLA's state entries, shapes and dtypes."""
    import jax

    from pfedla_jax.algorithms import PFedLA, PFedLAConfig

    ctx = synthetic_context(d.dataset, n, d.train)
    shapes = [jax.eval_shape(PFedLA(ctx, PFedLAConfig(heur_k=k)).init_state, jax.random.key(0))
              for k in (0, 1)]
    return jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1]) and all(
        a.shape == b.shape and a.dtype == b.dtype
        for a, b in zip(jax.tree.leaves(shapes[0]), jax.tree.leaves(shapes[1])))


def markdown(report: dict) -> str:
    d = report["dims"]
    lines = [f"State by component ({report['dataset']} CNN: P = {d['P']:,} params, B = {d['B']} BN "
             f"statistics, pFedLA L = {d['L']}, T = {d['T']:,}, F = {d['F']}; measured with "
             "jax.eval_shape(init_state), float32)", "",
             "| algorithm | N | " + " | ".join(GROUPS) + " | total | of which per-client |",
             "|---|---:|" + "---:|" * (len(GROUPS) + 2)]
    for r in report["rows"]:
        cells = [human(r["groups"][g]) if r["groups"][g] else "–" for g in GROUPS]
        lines.append(f"| {r['algorithm']} | {r['num_clients']:,} | " + " | ".join(cells)
                     + f" | {human(r['total'])} | {human(r['per_client_entries'])} |")
    lines += ["", "Formulas (bytes; N clients, P params per model, B BN statistics per client; "
              "per-client parts are split over the devices, the others replicated):", "",
              "| algorithm | component | part | formula | per-client |", "|---|---|---|---|---|"]
    for label, terms in report["formulas"].items():
        for t in terms:
            lines.append(f"| {label} | {t['group']} | {t['part']} | {t['formula']} | "
                         f"{'yes' if t['sharded'] else 'no (replicated)'} |")
    caps = sorted({lim["capacity_gib"] for lim in report["limits"]})
    devs = sorted({lim["devices"] for lim in report["limits"]})
    lines += ["", "Largest N whose state alone fits each device (per-client entries split over D devices):",
              "", "| algorithm | " + " | ".join(f"{c:g} GiB × {v}" for c in caps for v in devs) + " |",
              "|---|" + "---:|" * (len(caps) * len(devs))]
    table: dict[str, dict] = {}
    for lim in report["limits"]:
        table.setdefault(lim["algorithm"], {})[(lim["capacity_gib"], lim["devices"])] = (
            "no limit" if lim["unbounded"] else "–" if lim["largest_n"] is None else f"{lim['largest_n']:,}")
    for label, cells in table.items():
        fmt = str
        lines.append(f"| {label} | " + " | ".join(fmt(cells[(c, v)]) for c in caps for v in devs) + " |")
    if report["notes"]:
        lines += [""] + [f"Note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend-probe INFO lines off stderr
    f = flags.FLAGS
    try:
        dataset = resolve_dataset(f.dataset)
        clients = parse_ints(f.clients, "clients", 2)
        devices = parse_ints(f.devices, "devices", 1)
        capacities = parse_floats(f.capacity_gib, "capacity_gib")
        if f.train_per_client < 2:
            raise StateSizeError(f"--train_per_client must be >= 2, got {f.train_per_client}")
        out = f.out
        if out is not None and (not out or os.path.isdir(out)):
            raise StateSizeError(f"--out must be a file path, got {out!r}")
        from pfedla_jax.errors import UserInputError

        try:
            d = model_dims(dataset, f.train_per_client)
            labels = row_labels(f.algorithms, d)
            report = build_report(labels, clients, d, capacities, devices)
        except UserInputError as e:
            raise StateSizeError(str(e)) from None
    except StateSizeError as e:
        fail(str(e))
    print(markdown(report), flush=True)
    if report["mismatches"]:
        print("formula and measurement differ:\n" + "\n".join(report["mismatches"]), flush=True)
    if out:
        parent = os.path.dirname(os.path.abspath(out))
        try:
            os.makedirs(parent, exist_ok=True)
            with open(out, "w") as fh:
                json.dump(report, fh, indent=1)
        except OSError as e:
            fail(f"cannot write --out {out}: {e.strerror or e}")
        print(f"written: {out}", flush=True)
    if report["mismatches"]:
        raise SystemExit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
