r"""The server state of every algorithm, by component, as a function of the number of clients.

Example (the FMNIST CNN, N = 10, 100, 1,000; BUILD_NOTES' state-size table):

  python -m experiments.bench.state_size --clients=10,100,1000 --out=runs/state_size.json

For every registered algorithm (in the comparison table's order; each with the config
variants it lists in `state_size_variants`, e.g. pFedLA's Adam hypernetwork optimizer and
--hn_delta_reference=first; its other table rows, e.g. HeurpFedLA, are checked to keep the
same state; an algorithm whose table row needs BatchNorm, FedBN, only where the model has
BatchNorm, as experiments.table) and every N, the algorithm is built on a synthetic client
store of the right shapes (no dataset is read) and the bytes of
`jax.eval_shape(algorithm.init_state)` are counted per state entry, grouped into components:

  client params     per-client models (client_params; pFedMe's theta; FedFomo's start_params)
  BN statistics     running BatchNorm statistics (batch_stats; FedFomo's start_stats)
  hypernetworks     hn_params (pFedLA: one per client, split into heads / embedding + MLP;
                    pFedHN: one for all, split into embedding table / trunk / heads)
  optimizer states  hn_opt_state (no algorithm keeps a client optimizer state between
                    rounds: local SGD starts fresh every round)
  server model      global_params
  other             FedFomo's affinity [N, N], uploaded [N] and validation split tables,
                    pFedLA's delta_ref [N, L]

Beside each measured number the script evaluates the algorithm's closed-form formula (its
`Algorithm.state_size_terms`, the same parts; tests/test_state_size.py checks that both
agree), and from the formulas the largest N whose state alone fits one device of each
capacity (--capacity_gib) when the per-client entries are split over D devices (--devices;
sharding over the mesh axis `clients` divides every per-client entry by D, rows padded to a
multiple of D, while the entries the algorithm lists in `server_state_keys` stay whole on
every device). An algorithm without a formula gets its measured row alone (formula columns
'–', no largest-N row); its entries are grouped by their conventional names
(`CONVENTIONAL_GROUPS`), any other entry under 'other'.

Prints markdown tables (measured bytes by component; formulas; largest N per device) and
writes them with every part to --out (JSON). Bad input prints one line `error: ...` and
exits with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.cli import fail, parse_flags, start
from pfedla_jax.algorithms import FLContext, algorithm_class, algorithm_names, config_fields
from pfedla_jax.algorithms.base import Algorithm
from pfedla_jax.algorithms.registry import replace_path
from pfedla_jax.core.local_training import ClientTrainer, LocalTrainConfig
from pfedla_jax.core.state_size import STATE_GROUPS, ModelDims, StateTerm
from pfedla_jax.data.store import ClientStore
from pfedla_jax.errors import UserInputError
from pfedla_jax.models import init_variables, layer_names, make_cnn

# (input shape, classes) of the datasets the presets use; the CNN is built from them alone
DATASETS = {
    "fmnist": ((28, 28, 1), 10),
    "tfds:emnist/digits": ((28, 28, 1), 10),
    "tfds:cifar10": ((32, 32, 3), 10),
    "tfds:cifar100": ((32, 32, 3), 100),
}
ALIASES = {"emnist": "tfds:emnist/digits", "cifar10": "tfds:cifar10", "cifar100": "tfds:cifar100",
           "tfds:fashion_mnist": "fmnist"}
GROUPS = STATE_GROUPS
# the components of the state entries named as the engine and most algorithms name them
# (what an algorithm without a formula is grouped by; with one, its terms say)
CONVENTIONAL_GROUPS = {"client_params": "client params", "batch_stats": "BN statistics",
                       "global_params": "server model", "hn_params": "hypernetworks",
                       "hn_opt_state": "optimizer states"}
GIB = 2**30


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
                        "labels (" + ", ".join(variant_labels()) + ").")
    flags.DEFINE_string("capacity_gib", "24,80,141", "Device memories in GiB for the largest-N "
                        "table (this CPU host: 24; GPUs: 80, 141).")
    flags.DEFINE_string("devices", "1,2,4,8", "Device counts D the per-client state is split over.")
    flags.DEFINE_string("out", None, "Write everything as JSON to this path.")


class StateSizeError(Exception):
    """Bad input (one `error:` line, exit 2)."""


# ----------------------------------------------------------------------------- the rows


def ordered_algorithms() -> list[str]:
    """The registered algorithms in the comparison table's order (their first table row's
    `order`, then name)."""
    return sorted(algorithm_names(), key=lambda name: (algorithm_class(name).rows()[0].order, name))


def variant_labels() -> list[str]:
    """'<algorithm>+<suffix>' of every algorithm's `state_size_variants`, in table order."""
    return [f"{name}+{suffix}" for name in ordered_algorithms()
            for suffix, _ in algorithm_class(name).state_size_variants]


def resolve_label(label: str) -> tuple[type[Algorithm], object]:
    """(algorithm class, config) of row `label`: a registered name, or a variant label."""
    name, _, suffix = label.partition("+")
    cls = algorithm_class(name)
    config = cls.config_class()
    if suffix:
        for path, value in dict(cls.state_size_variants)[suffix]:
            config = replace_path(config, path, value)
    return cls, config


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Dims:
    """The report's setting: `dataset`'s CNN and the training examples per client.

    Attributes:
      dataset: the dataset whose CNN this is.
      model: what the formulas get (`ModelDims`: the CNN's shapes, layers and W).
    """

    dataset: str
    model: ModelDims

    @property
    def P(self) -> int:
        """Trainable scalars of one client model."""
        return self.model.P

    @property
    def B(self) -> int:
        """BN running-statistic scalars of one client (0 without BN)."""
        return self.model.B

    @property
    def train(self) -> int:
        """Training examples per client."""
        return self.model.train

    @property
    def has_bn(self) -> bool:
        """Whether the model has BatchNorm (FedBN is measured only then)."""
        return bool(jax.tree.leaves(self.model.batch_stats))

    def symbols(self, label: str) -> dict[str, int]:
        """The values of the symbols of row `label`'s formulas besides N, P and B."""
        cls, config = resolve_label(label)
        return cls.state_size_symbols(config, self.model)


def resolve_dataset(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        raise StateSizeError(f"unknown --dataset {name!r}; expected one of "
                             f"{', '.join([*DATASETS, *ALIASES])}")
    return name


def synthetic_context(dataset: str, num_clients: int, train_per_client: int = 50) -> FLContext:
    """An FLContext whose store has the shapes of `num_clients` clients with
    `train_per_client` training examples each (one blank image: no dataset is read)."""
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


def make_algorithm(label: str, ctx: FLContext) -> Algorithm:
    """The algorithm of row `label` (a registered name or a variant label) on `ctx`."""
    cls, config = resolve_label(label)
    return cls(ctx, config)


def model_dims(dataset: str, train_per_client: int = 50) -> Dims:
    """The Dims of `dataset`'s CNN (its shapes from the code, not hard-coded)."""
    shape, classes = DATASETS[dataset]
    model = make_cnn(shape, classes)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), shape))
    return Dims(dataset, ModelDims(params=variables["params"],
                                   batch_stats=variables.get("batch_stats", {}),
                                   layer_order=layer_names(model), train=train_per_client))


# ----------------------------------------------------------------------------- measured


def _part(key: str, path: tuple[str, ...], terms: list[StateTerm] | None) -> tuple[str, str]:
    """(group, part) of the leaf at `path` of state entry `key`: the formula's term that
    counts it; ('other', key) if none does (a mismatch); without a formula, by the entry's
    conventional name."""
    if terms is None:
        return CONVENTIONAL_GROUPS.get(key, "other"), key
    for term in terms:
        if term.counts(key, path):
            return term.group, term.part
    return "other", key


def measure(label: str, num_clients: int, dataset: str = "fmnist", train_per_client: int = 50) -> dict:
    """Bytes of `jax.eval_shape(init_state)` of row `label` at N = num_clients.

    Returns:
      {'parts': {(group, part): bytes}, 'sharded': {(group, part): bool} (False: the entry is
       in server_state_keys, replicated on every device), 'keys': {state key: bytes}}.
    """
    ctx = synthetic_context(dataset, num_clients, train_per_client)
    algo = make_algorithm(label, ctx)
    terms = formula(label, model_dims(dataset, train_per_client))
    state = jax.eval_shape(algo.init_state, jax.random.key(0))
    parts: dict[tuple[str, str], int] = {}
    sharded: dict[tuple[str, str], bool] = {}
    keys: dict[str, int] = {}
    for key, tree in state.items():
        keys[key] = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
            size = math.prod(leaf.shape) * leaf.dtype.itemsize
            part = _part(key, names, terms)
            parts[part] = parts.get(part, 0) + size
            sharded[part] = key not in algo.server_state_keys
            keys[key] += size
    return {"parts": parts, "sharded": sharded, "keys": keys}


def same_state(label: str, options, n: int, d: Dims) -> bool:
    """Whether algorithm `label` with `options` ((field path, value), ...; e.g. HeurpFedLA's
    heur_k = 1) has exactly the default config's state entries, shapes and dtypes."""
    ctx = synthetic_context(d.dataset, n, d.train)
    cls, config = resolve_label(label)
    other = config
    for path, value in options:
        other = replace_path(other, path, value)
    shapes = [jax.eval_shape(cls(ctx, c).init_state, jax.random.key(0)) for c in (config, other)]
    return jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1]) and all(
        a.shape == b.shape and a.dtype == b.dtype
        for a, b in zip(jax.tree.leaves(shapes[0]), jax.tree.leaves(shapes[1])))


# ----------------------------------------------------------------------------- closed forms


def formula(label: str, d: Dims | ModelDims) -> list[StateTerm] | None:
    """The closed-form parts of row `label`'s state (`Algorithm.state_size_terms`: float32 =
    4 bytes, int32 = 4, bool = 1); None: the algorithm has no formula."""
    cls, config = resolve_label(label)
    return cls.state_size_terms(config, d.model if isinstance(d, Dims) else d)


def formula_parts(label: str, d: Dims, n: int) -> dict[tuple[str, str], int] | None:
    """{(group, part): bytes} of the formulas at N = n, zero-byte parts left out (as
    eval_shape has no leaf for them); None without a formula."""
    terms = formula(label, d)
    if terms is None:
        return None
    out: dict[tuple[str, str], int] = {}
    for t in terms:
        if t.bytes(n):
            out[(t.group, t.part)] = out.get((t.group, t.part), 0) + t.bytes(n)
    return out


def bytes_per_device(terms: list[StateTerm], n: int, devices: int) -> int:
    """The state's bytes on each of `devices` devices: per-client parts split by rows (N padded
    to a multiple of D), the others whole on every device."""
    rows = -(-n // devices)
    total = 0
    for t in terms:
        b = t.bytes(n)
        total += (b // n) * rows if t.sharded else b
    return total


UNBOUNDED_N = 2**50   # a state that still fits at this N does not grow with N (no limit)


def largest_n(terms: list[StateTerm], capacity: int, devices: int) -> int | None:
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
    """The rows: every registered algorithm in table order (one whose table row needs
    BatchNorm only where the model has it), then the variants."""
    names = ordered_algorithms()
    known = [*names, *variant_labels()]
    if text.strip() == "all":
        skip = {name for name in names
                if algorithm_class(name).rows()[0].needs_batchnorm and not d.has_bn}
        return [label for label in known if label.partition("+")[0] not in skip]
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
            if expected is not None and expected != m["parts"]:
                mismatches.append(f"{label} N={n}: formula {expected} != measured {m['parts']}")
            total = sum(m["parts"].values())
            per_client = sum(b for p, b in m["parts"].items() if m["sharded"][p])
            rows.append({"algorithm": label, "num_clients": n, "groups": groups, "total": total,
                         "per_client_entries": per_client, "replicated_entries": total - per_client,
                         "keys": m["keys"],
                         "parts": [{"group": g, "part": p, "bytes": b, "sharded": m["sharded"][(g, p)]}
                                   for (g, p), b in sorted(m["parts"].items())]})
    terms = {label: formula(label, d) for label in labels}
    formulas = {label: None if ts is None else
                [{"group": t.group, "part": t.part, "formula": t.expr, "sharded": t.sharded}
                 for t in ts] for label, ts in terms.items()}
    limits = []
    for label in labels:
        if terms[label] is None:
            continue
        for cap in capacities:
            for dev in devices:
                n_max = largest_n(terms[label], int(cap * GIB), dev)
                limits.append({"algorithm": label, "capacity_gib": cap, "devices": dev,
                               "largest_n": None if n_max == UNBOUNDED_N else n_max,
                               "unbounded": n_max == UNBOUNDED_N})
    notes = [note for label in labels if "+" not in label
             for note in table_row_notes(label, max(2, min(clients)), d)]
    symbols = {label: d.symbols(label) for label in labels if "+" not in label}
    return {"dataset": d.dataset,
            "dims": {"dataset": d.dataset, "P": d.P, "B": d.B, "train": d.train, "has_bn": d.has_bn},
            "symbols": {label: values for label, values in symbols.items() if values},
            "clients": clients, "rows": rows, "formulas": formulas, "limits": limits,
            "notes": notes, "mismatches": mismatches}


def _flag(label: str, path: str) -> str:
    """The command-line name of algorithm `label`'s option `path` (its historical alias if
    it has one, e.g. pFedLA's --heur_k)."""
    for field in config_fields(label):
        if field.path == path:
            return field.alias or field.flag
    return path


def table_row_notes(label: str, n: int, d: Dims) -> list[str]:
    """For each of the algorithm's extra table rows (options set, e.g. HeurpFedLA =
    pFedLA with heur_k = 1): whether it keeps exactly the algorithm's state."""
    cls = algorithm_class(label)
    notes = []
    for row in cls.rows():
        if not row.options:
            continue
        who = (f"{row.display.split(' (')[0]} ("
               + ", ".join(f"--{_flag(label, path)}={value}" for path, value in row.options) + ")")
        base = cls.display_name or label
        if same_state(label, row.options, n, d):
            notes.append(f"{who} keeps exactly {base}'s state (same entries and shapes): not "
                         "listed separately.")
        else:
            notes.append(f"{who} has a state that differs from {base}'s.")
    return notes


def markdown(report: dict) -> str:
    d = report["dims"]
    symbols = "".join(
        f"; {algorithm_class(label).display_name or label} "
        + ", ".join(f"{name} = {value:,}" for name, value in values.items())
        for label, values in report["symbols"].items())
    lines = [f"State by component ({report['dataset']} CNN: P = {d['P']:,} params, B = {d['B']} BN "
             f"statistics{symbols}; measured with jax.eval_shape(init_state), float32)", "",
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
        if terms is None:
            lines.append(f"| {label} | – | – | – (no formula: measured only) | – |")
            continue
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
        lines.append(f"| {label} | " + " | ".join(cells[(c, v)] for c in caps for v in devs) + " |")
    if report["notes"]:
        lines += [""] + [f"Note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def settings(f) -> tuple[Dims, list[str], list[int], list[float], list[int], str | None]:
    """(dims, row labels, clients, capacities in GiB, device counts, --out) from the flag
    values `f` (absl's FLAGS, or any object with the same attributes).

    Raises:
      StateSizeError: a bad value (one line).
    """
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
        d = model_dims(dataset, f.train_per_client)
        return d, row_labels(f.algorithms, d), clients, capacities, devices, out
    except UserInputError as e:
        raise StateSizeError(str(e)) from None


def main(argv):
    start(argv)  # no stray arguments; JAX's backend-probe INFO lines kept off stderr
    try:
        d, labels, clients, capacities, devices, out = settings(flags.FLAGS)
        report = build_report(labels, clients, d, capacities, devices)
    except (StateSizeError, UserInputError) as e:
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
