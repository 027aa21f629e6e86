r"""Plots of finished runs: accuracy curves, pFedLA's alpha (paper Figs. 5-7), label histogram.

Example:

  python -m experiments.plots --workdir=runs/pfedla --compare=runs/fedavg --compare=runs/local

writes into WORKDIR/plots (or --out):

* ``accuracy.png``: test_acc per evaluated round of WORKDIR and every --compare run (label:
  algorithm and workdir name); the second view (``local_test_acc``, the models after
  local training) dashed, where the run has it.
* ``alpha_heatmap_<layer>.png`` (pFedLA runs): alpha of one layer (--layer, default FC1 or
  the first layer) at the last evaluated round, N x N, row = target client, column =
  source client (paper Fig. 6).
* ``self_weight_per_layer.png`` (pFedLA): each client's self-weight alpha_i[l, i] per layer at
  the last evaluated round, bars = mean over clients, dots = clients (paper Fig. 7).
* ``self_weight_over_training.png`` (pFedLA): the mean self-weight of each layer over the
  evaluated rounds (the trend of paper Fig. 5).
* ``group_weights.png`` (pFedLA): the weight a target client (--target, default 0) puts on
  itself, on the clients holding the same classes, on those sharing all but one class, and
  on all the others together, per layer over the evaluated rounds (paper Fig. 5; the
  ``fig5`` partition makes exactly these groups). Groups come from the label histogram.
* ``label_histogram.png``: examples of each class per client (train + test), stacked bars.
  Taken from summary.json's ``label_histogram`` when the run wrote one, otherwise rebuilt
  from the config in summary.json (same dataset, partition and seed).

Only WORKDIR's alpha and labels are plotted; --compare runs only add accuracy curves.
--plots picks a subset (default: every plot the run's files allow). Bad input (missing
workdir or metrics.jsonl, an unknown --layer, alpha plots asked of a run without
alpha.npz, ...) prints one line `error: ...` and exits with status 2.

The plotting functions take arrays and a path, so they can be used from notebooks too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from experiments.cli import fail, parse_flags, start
from pfedla_jax.data import label_histogram, load_dataset, make_partition, scheme_parameters
from pfedla_jax.errors import UserInputError

PLOTS = ("accuracy", "alpha_heatmap", "self_weight_per_layer", "self_weight_over_training",
         "group_weights", "label_histogram")
ALPHA_PLOTS = ("alpha_heatmap", "self_weight_per_layer", "self_weight_over_training", "group_weights")
DEFAULT_LAYER = "FC1"

def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The tool's flags, defined when it runs as a program (importing this module, as
    experiments.table does, defines none)."""
    flags.DEFINE_string("workdir", None, "The run's workdir (its metrics, summary and exports).",
                        flag_values=flag_values)
    flags.DEFINE_multi_string("compare", [], "Another run's workdir to overlay on accuracy.png "
                              "(repeatable).", flag_values=flag_values)
    flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/plots).", flag_values=flag_values)
    flags.DEFINE_string("layer", None, f"Layer of alpha_heatmap_<layer>.png (default {DEFAULT_LAYER}, "
                        "else the first layer).", flag_values=flag_values)
    flags.DEFINE_integer("target", 0, "group_weights.png: the target client (fig5 partition: 0).",
                         flag_values=flag_values)
    flags.DEFINE_list("plots", [], f"Plots to make, among {', '.join(PLOTS)} (default: all the "
                      "run's files allow).", flag_values=flag_values)


# ----------------------------------------------------------------------------- reading runs


@dataclasses.dataclass
class Run:
    """What a workdir holds. `summary` and `alpha` are None when the file is absent.

    alpha: the arrays of alpha.npz: round int [E], alpha float [E, N, L, N] (row = target
    client, column = source client), retained bool [E, N, L], layers str [L].
    """

    workdir: str
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    alpha: dict[str, np.ndarray] | None

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.workdir)) or self.workdir

    @property
    def label(self) -> str:
        algo = (self.summary or {}).get("algorithm") or (self.summary or {}).get("config", {}).get("algorithm")
        return f"{algo} ({self.name})" if algo else self.name


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (one JSON object per evaluated round)."""
    if not os.path.isfile(path):
        raise UserInputError(f"no metrics.jsonl in {os.path.dirname(path) or '.'} (not a run's workdir?)")
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserInputError(f"{path}: line {i} is not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "round" not in rec or "test_acc" not in rec:
                raise UserInputError(f"{path}: line {i} has no 'round' and 'test_acc'")
            records.append(rec)
    if not records:
        raise UserInputError(f"{path} has no evaluated rounds yet")
    return records


def read_alpha(path: str) -> dict[str, np.ndarray]:
    """alpha.npz as a dict, with its shapes checked."""
    try:
        with np.load(path) as z:
            out = {k: z[k] for k in ("round", "alpha", "retained", "layers")}
    except KeyError as e:
        raise UserInputError(f"{path} lacks the array {e}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserInputError(f"cannot read {path}: {e}") from None
    a = out["alpha"]
    if not np.all(np.isfinite(a)):
        raise UserInputError(f"{path}: alpha holds non-finite values (a diverged run?)")
    if a.ndim != 4 or a.shape[1] != a.shape[3] or a.shape[0] != out["round"].shape[0] \
            or a.shape[2] != out["layers"].shape[0] or a.shape[0] == 0:
        raise UserInputError(f"{path}: alpha has shape {a.shape}, expected [evals, N, layers, N] "
                             f"with {out['round'].shape[0]} evals and {out['layers'].shape[0]} layers")
    out["layers"] = np.array([str(x) for x in out["layers"]])
    return out


def load_run(workdir: str) -> Run:
    """Reads metrics.jsonl (required), summary.json and alpha.npz (optional) of a workdir."""
    if not workdir:
        raise UserInputError("--workdir is required")
    if not os.path.isdir(workdir):
        raise UserInputError(f"workdir {workdir!r} does not exist")
    metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    summary = None
    spath = os.path.join(workdir, "summary.json")
    if os.path.isfile(spath):
        try:
            with open(spath) as f:
                summary = json.load(f)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{spath} is not JSON ({e.msg})") from None
    apath = os.path.join(workdir, "alpha.npz")
    alpha = read_alpha(apath) if os.path.isfile(apath) else None
    return Run(workdir, metrics, summary, alpha)


def accuracy_curves(run: Run) -> dict[str, np.ndarray]:
    """{'round', 'test_acc'[, 'local_test_acc']} as arrays (rounds lacking a key dropped)."""
    out = {"round": np.array([r["round"] for r in run.metrics]),
           "test_acc": np.array([r["test_acc"] for r in run.metrics], dtype=float)}
    local = [r.get("local_test_acc") for r in run.metrics]
    if any(v is not None for v in local):
        out["local_test_acc"] = np.array([np.nan if v is None else v for v in local], dtype=float)
    return out


def self_weights(alpha: np.ndarray) -> np.ndarray:
    """alpha[..., N, L, N] -> self-weights alpha[..., i, l, i], shape [..., N, L]."""
    n = alpha.shape[-1]
    idx = np.arange(n)
    return np.moveaxis(alpha[..., idx, :, idx], 0, -2)


GROUPS = ("self", "same labels", "all but one class shared", "others (sum)")


def client_groups(hist: np.ndarray, target: int) -> np.ndarray:
    """Each client's group relative to `target` (index into GROUPS), from the classes it holds.

    Args:
      hist: int [N, C] examples per class per client.
      target: the target client.
    Returns:
      int [N]: 0 the target itself, 1 the same class set, 2 all of the target's classes but
      one shared, 3 the others.
    """
    held = hist > 0
    k = int(held[target].sum())
    shared = (held & held[target][None, :]).sum(1)
    same = (held == held[target][None, :]).all(1)
    groups = np.where(same, 1, np.where(shared == k - 1, 2, 3))
    groups[target] = 0
    return groups


def group_weights(alpha: np.ndarray, groups: np.ndarray, target: int) -> np.ndarray:
    """Summed weight the target puts on each group: float [E, 4 groups, L].

    Args:
      alpha: [E, N, L, N].
      groups: int [N] from `client_groups`.
      target: the target client.
    """
    a = alpha[:, target]                                        # [E, L, N]
    return np.stack([a[:, :, groups == g].sum(-1) for g in range(len(GROUPS))], axis=1)


def pick_layer(layers: Sequence[str], wanted: str | None) -> int:
    """Index of `wanted` (case-insensitive) in layers; default FC1, else the first."""
    names = [str(x) for x in layers]
    lower = [x.lower() for x in names]
    if wanted is None:
        return lower.index(DEFAULT_LAYER.lower()) if DEFAULT_LAYER.lower() in lower else 0
    if wanted.lower() not in lower:
        raise UserInputError(f"unknown --layer {wanted!r}; this run's layers: {', '.join(names)}")
    return lower.index(wanted.lower())


def label_histogram_of(run: Run) -> np.ndarray:
    """int [N, C] examples per class per client (train + test).

    summary.json's `label_histogram` when present; otherwise the partition is rebuilt
    from summary.json's config (dataset, partition flags, seed), exactly as
    `training.loop.build_experiment` makes it.
    """
    if run.summary is None:
        raise UserInputError(f"no summary.json in {run.workdir}: cannot get the label histogram")
    if "label_histogram" in run.summary:
        return np.asarray(run.summary["label_histogram"], dtype=np.int64)
    return rebuild_label_histogram(run.summary.get("config") or {})


def rebuild_label_histogram(config: dict[str, Any]) -> np.ndarray:
    """The partition's label histogram from a summary.json config (loads the dataset)."""
    try:
        ds = load_dataset(config["dataset"], config.get("data_dir"),
                          synthetic_per_class=config.get("synthetic_per_class", 600),
                          seed=config.get("seed", 0))
        scheme = config["partition"]
        params = {name: config[name] for name in scheme_parameters(scheme) if name in config}
        part = make_partition(ds.labels, ds.num_classes, config["num_clients"], scheme,
                              samples_per_client=config.get("samples_per_client") or None,
                              seed=config.get("seed", 0), **params)
    except KeyError as e:
        raise UserInputError(f"summary.json's config lacks {e}: cannot rebuild the partition") from None
    return label_histogram(part, ds)


# ----------------------------------------------------------------------------- plotting


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display).

    Raises:
      UserInputError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise UserInputError("matplotlib is not installed (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _top(values: np.ndarray, n: int, room: float = 1.25) -> float:
    """y-axis top for weights: room above the largest value and the uniform 1/N line."""
    return float(max(room * float(np.max(values)), 2.0 / n))


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator
    return MaxNLocator(integer=True)


def save_figure(fig, path: str) -> str:
    """Writes `fig` to `path` (PNG, 100 dpi; folders created), closes it, returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return path


def plot_accuracy(curves: Sequence[tuple[str, dict[str, np.ndarray]]], path: str) -> str:
    """Test accuracy (%) vs round, one colour per run; `local_test_acc` dashed.

    Args:
      curves: (label, {'round', 'test_acc'[, 'local_test_acc']}) per run, as
        `accuracy_curves` returns; accuracies are fractions.
      path: the PNG to write.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, c) in enumerate(curves):
        color = f"C{i % 10}"
        marker = "o" if len(c["round"]) <= 30 else None
        ax.plot(c["round"], 100 * c["test_acc"], color=color, marker=marker, ms=3, label=label)
        if "local_test_acc" in c:
            ax.plot(c["round"], 100 * c["local_test_acc"], color=color, ls="--", marker=marker,
                    ms=3, alpha=0.8, label=f"{label}, after local training")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Mean test accuracy over clients (weighted by test size)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_alpha_heatmap(alpha: np.ndarray, path: str, layer: str, round_: int | None = None,
                       retained: np.ndarray | None = None) -> str:
    """N x N heatmap of one layer's alpha (row = target client i, column = source j).

    Args:
      alpha: float [N, N], alpha[i, j] = weight of client j's layer in client i's model.
      path: the PNG to write.
      layer: layer name (title).
      round_: the round (title).
      retained: optional bool [N]: clients that keep this layer local (HeurpFedLA); their
        row is the hypernetwork's alpha, not the one-hot the aggregation used.
    """
    plt = pyplot()
    n = alpha.shape[0]
    size = min(9.0, 3.0 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(alpha, cmap="viridis", vmin=0.0, vmax=max(float(np.max(alpha)), 1e-9))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="alpha")
    if n <= 12:
        hi = float(np.max(alpha))
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{alpha[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if alpha[i, j] > 0.6 * hi else "white")
    ticks = np.arange(n) if n <= 20 else np.arange(0, n, max(1, n // 10))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("source client j")
    ax.set_ylabel("target client i")
    title = f"alpha, layer {layer}" + (f", round {round_}" if round_ is not None else "")
    if retained is not None and np.any(retained):
        title += f"\n({int(np.sum(retained))} client(s) keep this layer local)"
    ax.set_title(title)
    return save_figure(fig, path)


def plot_self_weight_per_layer(self_w: np.ndarray, layers: Sequence[str], path: str,
                               round_: int | None = None) -> str:
    """Self-weight per layer: bars = mean over clients, dots = individual clients.

    Args:
      self_w: float [N, L], alpha_i[l, i].
      layers: L names.
      path: the PNG to write.
      round_: the round (title).
    """
    plt = pyplot()
    n, num_layers = self_w.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * num_layers), 4.0))
    x = np.arange(num_layers)
    ax.bar(x, self_w.mean(0), color="C0", alpha=0.6, label="mean over clients")
    jitter = np.random.default_rng(0).uniform(-0.2, 0.2, size=self_w.shape)
    ax.scatter((x[None, :] + jitter).ravel(), self_w.ravel(), s=10, color="C3", zorder=3,
               label="clients")
    ax.axhline(1.0 / n, color="gray", ls="--", lw=1, label=f"uniform 1/N = {1.0 / n:.2f}")
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=30 if num_layers > 8 else 0, ha="right" if num_layers > 8 else "center")
    ax.set_ylim(0, _top(self_w, n, room=1.5))  # room for the legend above the dots
    ax.set_ylabel("self-weight alpha_i[l, i]")
    ax.set_title("Self-weight per layer" + (f", round {round_}" if round_ is not None else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_self_weight_over_training(rounds: np.ndarray, self_w: np.ndarray, layers: Sequence[str],
                                   path: str) -> str:
    """Mean self-weight of every layer over the evaluated rounds (paper Fig. 5 trend).

    Args:
      rounds: int [E].
      self_w: float [E, N, L].
      layers: L names.
      path: the PNG to write.
    """
    plt = pyplot()
    n = self_w.shape[1]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    marker = "o" if len(rounds) <= 30 else None
    for l, name in enumerate(layers):
        ax.plot(rounds, self_w[:, :, l].mean(1), marker=marker, ms=3, label=str(name))
    ax.plot(rounds, self_w.mean((1, 2)), color="black", lw=2.2, label="all layers")
    ax.axhline(1.0 / n, color="gray", ls="--", lw=1, label=f"uniform 1/N = {1.0 / n:.2f}")
    ax.set_ylim(0, _top(self_w.mean(1), n))
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("round")
    ax.set_ylabel("mean self-weight over clients")
    ax.set_title("Self-weight over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, path)


def plot_group_weights(rounds: np.ndarray, weights: np.ndarray, layers: Sequence[str],
                       counts: Sequence[int], path: str, target: int = 0) -> str:
    """The target's summed weight on each client group, per layer, over training (Fig. 5).

    Args:
      rounds: int [E].
      weights: float [E, 4, L] from `group_weights`.
      layers: L names.
      counts: clients per group (legend).
      path: the PNG to write.
      target: the target client (title).
    """
    plt = pyplot()
    num_layers = len(layers)
    cols = min(4, num_layers)
    rows = -(-num_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False, sharey=True)
    marker = "o" if len(rounds) <= 30 else None
    for l, name in enumerate(layers):
        ax = axes[l // cols, l % cols]
        for g, label in enumerate(GROUPS):
            if counts[g]:
                ax.plot(rounds, weights[:, g, l], marker=marker, ms=2, color=f"C{g}",
                        label=f"{label} ({counts[g]})" if g else label)
        ax.set_title(str(name), fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(_integer_ticks())
    for l in range(num_layers, rows * cols):
        axes[l // cols, l % cols].axis("off")
    axes[0, 0].set_ylabel("summed weight")
    axes[-1, 0].set_xlabel("round")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Weights client {target} puts on each group of clients (paper Fig. 5)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_label_histogram(hist: np.ndarray, path: str) -> str:
    """Stacked bars: examples of each class (colour) per client (x).

    Args:
      hist: int [N, C].
      path: the PNG to write.
    """
    plt = pyplot()
    n, c = hist.shape
    fig, ax = plt.subplots(figsize=(min(12.0, max(5.0, 1.5 + 0.35 * n)), 4.0))
    cmap = plt.get_cmap("tab10" if c <= 10 else "tab20" if c <= 20 else "viridis")
    colors = [cmap(k) if c <= 20 else cmap(k / max(1, c - 1)) for k in range(c)]
    bottom = np.zeros(n)
    x = np.arange(n)
    for k in range(c):
        if hist[:, k].any():
            ax.bar(x, hist[:, k], bottom=bottom, color=colors[k], width=0.8,
                   label=str(k) if c <= 20 else None)
        bottom += hist[:, k]
    ax.set_xlabel("client")
    ax.set_ylabel("examples (train + test)")
    ax.set_title("Label histogram per client")
    if n <= 40:
        ax.set_xticks(x)
    if c <= 20:
        ax.legend(title="class", fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- the app


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "layer"


def make_plots(workdir: str, compare: Sequence[str] = (), out: str | None = None,
               layer: str | None = None, which: Sequence[str] = (),
               warn=lambda s: print(s, file=sys.stderr, flush=True), target: int = 0) -> list[str]:
    """Writes the plots of a run; returns the written paths.

    Args:
      workdir: the run whose alpha and labels are plotted (and its accuracy).
      compare: more workdirs for accuracy.png.
      out: output folder (default workdir/plots).
      layer: alpha_heatmap's layer (default FC1, else the first).
      target: group_weights' target client.
      which: subset of PLOTS; empty = all the run's files allow (alpha plots only with
        alpha.npz; label_histogram skipped with a warning if it cannot be obtained).

    Raises:
      UserInputError: bad input, or a requested plot the run's files cannot give.
    """
    unknown = [w for w in which if w not in PLOTS]
    if unknown:
        raise UserInputError(f"unknown --plots {', '.join(unknown)}; valid: {', '.join(PLOTS)}")
    run = load_run(workdir)
    others = [load_run(d) for d in compare]
    explicit = bool(which)
    which = list(which) if which else list(PLOTS)
    wants_alpha = [w for w in which if w in ALPHA_PLOTS]
    if run.alpha is None and (explicit and wants_alpha or layer is not None):
        raise UserInputError(
            f"{workdir} has no alpha.npz (only pFedLA runs write one): cannot plot "
            f"{', '.join(wants_alpha) or 'alpha_heatmap'}")
    # Resolve the layer before writing anything: a bad --layer leaves no partial output.
    layer_index = pick_layer(run.alpha["layers"], layer) if run.alpha is not None else None
    out = out or os.path.join(workdir, "plots")
    written = []
    if "accuracy" in which:
        curves = [(r.label, accuracy_curves(r)) for r in [run, *others]]
        written.append(plot_accuracy(curves, os.path.join(out, "accuracy.png")))
    if run.alpha is not None and wants_alpha:
        a = run.alpha
        layers = list(a["layers"])
        last = int(a["round"][-1])
        sw = self_weights(a["alpha"])  # [E, N, L]
        if "alpha_heatmap" in which:
            l = layer_index
            written.append(plot_alpha_heatmap(
                a["alpha"][-1, :, l, :], os.path.join(out, f"alpha_heatmap_{_slug(layers[l])}.png"),
                layers[l], last, a["retained"][-1, :, l]))
        if "self_weight_per_layer" in which:
            written.append(plot_self_weight_per_layer(
                sw[-1], layers, os.path.join(out, "self_weight_per_layer.png"), last))
        if "self_weight_over_training" in which:
            written.append(plot_self_weight_over_training(
                a["round"], sw, layers, os.path.join(out, "self_weight_over_training.png")))
        if "group_weights" in which:
            n = a["alpha"].shape[1]
            if not 0 <= target < n:
                raise UserInputError(f"--target must be a client in [0, {n - 1}], got {target}")
            try:
                groups = client_groups(label_histogram_of(run), target)
            except UserInputError as e:
                if explicit:
                    raise
                warn(f"warning: group_weights.png skipped: {e}")
            else:
                written.append(plot_group_weights(
                    a["round"], group_weights(a["alpha"], groups, target), layers,
                    np.bincount(groups, minlength=len(GROUPS)).tolist(),
                    os.path.join(out, "group_weights.png"), target))
    if "label_histogram" in which:
        try:
            hist = label_histogram_of(run)
        except UserInputError as e:
            if explicit:
                raise
            warn(f"warning: label_histogram.png skipped: {e}")
        else:
            written.append(plot_label_histogram(hist, os.path.join(out, "label_histogram.png")))
    return written


def main(argv):
    start(argv)
    f = flags.FLAGS
    try:
        paths = make_plots(f.workdir, f.compare, f.out, f.layer, f.plots, target=f.target)
    except UserInputError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write the plots: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    for p in paths:
        print(p, flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
