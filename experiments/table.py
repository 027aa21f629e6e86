r"""The paper's tables in one command: every method x seeds on one preset, our numbers beside
the paper's, with curves.

Example (Table 1, FMNIST, 10 clients of 200 examples, the CPU budget, three seeds):

  python -m experiments.table --preset=table1_fmnist_n10_small --seeds=0,1,2 --budget=cpu \
      --table_dir=runs/table1_fmnist_small_cpu

Every (method, seed) is one `python -m experiments.run` process with the preset's flags, the
budget's flags, the --import modules, the method's flags (`--algorithm` and the row's own
options, e.g. `--heur_k=1` for HeurpFedLA: every method runs with its documented defaults),
then --run_flags, `--seed` and `--workdir` (later flags override earlier ones). Runs are
resumable: each has its workdir TABLE_DIR/runs/<method>/seed_<s>; a re-run of the same
command skips finished runs and resumes unfinished ones from their last checkpoint
(experiments.run's own resume).

Methods: the rows every registered algorithm declares (`Algorithm.table_rows`: key, row
label, place, options), in their order: the paper's rows local, fedavg, perfedavg, pfedme,
pfedhn, fedbn, fedrep, fedfomo, pfedla, heurpfedla (= pfedla --heur_k=1), then the rows of
any other algorithm, e.g. one of a module given with `--import=my_package.my_algorithm`
(one row named after it unless it declares its own). `--methods=all` takes every row,
except those that need BatchNorm (FedBN) when the preset's model has none (the paper leaves
that cell empty; FedBN would be FedAvg there); naming fedbn explicitly runs it anyway.

Budgets: `paper` runs the preset as it is (the paper's rounds and local epochs); `cpu` adds
the flags of the preset's line `# CPU budget (experiments.table --budget=cpu): --rounds=...`
(fewer rounds / local epochs; a preset without that line has no CPU budget).

Writes into TABLE_DIR:
  table.md, table.csv, table.json  per method, mean ± sample std over seeds of (a) the final
      round's test accuracy and (b) the mean over the last 10% of evaluated rounds (at least
      one: ceil(0.1 x evaluations)); the best evaluated round as a labelled extra column (it
      selects on the test set); the paper's number and ours (final) minus the paper's; the
      method's other views (e.g. FedAvg's models after local training), final; seconds per
      round. table.json also holds every run's numbers and command.
  curves.png                       every method's test accuracy over rounds, mean over seeds
      with a ± one-std band.
  label_histogram_seed<S>.png      the first seed's partition (examples per class per client).
  logs/<method>_seed<S>.log        each run's output.

The paper's numbers come from the preset's header lines `# Paper (...): pFedLA 94.34±0.29,
...` and `# Paper, the baselines: ...`. Accuracies are in percent, as in the paper.

Bad input (unknown preset or method, a seed list that does not parse, a budget the preset
lacks, run flags the tool sets itself) prints one line `error: ...` and exits with status 2.
A run that fails is reported (its last output line) and the table is written from the
runs that finished; the exit status is then 1. So is a run whose workdir another command
holds (WORKDIR/run.lock): reported as "running elsewhere" (its pid and host), not run.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from experiments.cli import fail, parse_flags
from experiments.plots import plot_label_histogram, pyplot, save_figure
from pfedla_jax.algorithms import algorithm_class, algorithm_names, config_fields
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.command_line import config_from_argv, import_plugin
from pfedla_jax.training.workdir import describe_holder, lock_holder

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
BUDGETS = ("paper", "cpu")
CPU_BUDGET_MARK = "CPU budget (experiments.table --budget=cpu):"
# Flags the tool sets for every run; --run_flags may not give them (nor a row's options).
OWN_FLAGS = ("algorithm", "seed", "workdir", "flagfile", "overwrite", "quiet", "import")
# Datasets whose images have one channel: the model has no BatchNorm unless --use_bn=true.
GRAY = ("fmnist", "synthetic", "tfds:fashion_mnist", "tfds:mnist")


@dataclasses.dataclass(frozen=True)
class Method:
    """A row of the table: a registered algorithm with some of its options.

    Attributes:
      key: the name in --methods.
      display: the row label (the paper's numbers in a preset's header are matched by it).
      algorithm: the registered algorithm.
      flags: the experiments.run flags of the row (--algorithm and the row's options).
      needs_batchnorm: left out of --methods=all on a model without BatchNorm.
    """

    key: str
    display: str
    algorithm: str
    flags: tuple[str, ...]
    needs_batchnorm: bool = False


def methods() -> dict[str, Method]:
    """Every row of every registered algorithm (`Algorithm.rows()`), in table order (the
    rows' `order`, then key). A row's options become flags under the field's historical
    name where it has one (`--heur_k=1`), else `--<algorithm>_<field>`."""
    out = []
    for name in algorithm_names():
        fields = {f.path: f for f in config_fields(name)}
        for row in algorithm_class(name).rows():
            row_flags = [f"--algorithm={name}"]
            for path, value in row.options:
                field = fields[path]
                text = str(value).lower() if isinstance(value, bool) else str(value)
                row_flags.append(f"--{field.alias or field.flag}={text}")
            out.append((row.order, row.key, Method(row.key, row.display, name, tuple(row_flags),
                                                     row.needs_batchnorm)))
    keys = [key for _, key, _ in out]
    duplicate = next((k for k in keys if keys.count(k) > 1), None)
    if duplicate is not None:
        raise TableError(f"two algorithms declare the table row {duplicate!r}")
    return {m.key: m for _, _, m in sorted(out, key=lambda t: (t[0], t[1]))}


def method_flag_names() -> set[str]:
    """The names of every flag a row sets (and their other names)."""
    names = set()
    for m in methods().values():
        for flag in m.flags[1:]:
            names.add(flag[2:].split("=", 1)[0])
    for name in algorithm_names():
        for f in config_fields(name):
            if f.flag in names or f.alias in names:
                names |= {f.flag, f.alias} - {""}
    return names


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The tool's flags, defined when it runs as a program (importing the module defines none)."""
    flags.DEFINE_string("preset", None, "A preset name (experiments/presets/NAME.flags) or a .flags "
                        "path.", flag_values=flag_values)
    flags.DEFINE_string("seeds", "0", "Comma-separated seeds, e.g. 0,1,2.", flag_values=flag_values)
    flags.DEFINE_string("methods", "all", "all | comma-separated among the rows of the registered "
                        "algorithms: " + ",".join(methods()) + " (and those of --import modules).",
                        flag_values=flag_values)
    flags.DEFINE_string("budget", "paper", "paper (the preset's rounds and epochs) | cpu (the "
                        "preset's CPU budget line).", flag_values=flag_values)
    flags.DEFINE_string("table_dir", None, "Output folder (default runs/table/<preset>_<budget>).",
                        flag_values=flag_values)
    flags.DEFINE_string("run_flags", "", "Extra experiments.run flags for every run, e.g. "
                        "'--host_devices=1 --client_parallelism=loop' (with --jobs=2 on a 2-core "
                        "CPU) or '--data_dir=...'.", flag_values=flag_values)
    flags.DEFINE_integer("jobs", 1, "Runs at a time (separate processes).", flag_values=flag_values)
    flags.DEFINE_multi_string("import", [], "A module (my_package.my_algorithm, or path/to/file.py) "
                              "that registers algorithms: their rows join the table, and every run "
                              "imports it too. Repeatable.", flag_values=flag_values)


class TableError(Exception):
    """Bad input to the table tool (printed as one `error: ...` line, exit 2)."""


# ----------------------------------------------------------------------------- the preset


@dataclasses.dataclass(frozen=True)
class Preset:
    """A parsed preset file.

    Attributes:
      name: the file name without .flags.
      path: absolute path.
      flags: the flag lines (`--name=value`), in order.
      paper: {method key: (mean %, std %)} for every row the header gives a number for.
      cpu_budget: the flags of the CPU budget line, or None.
    """

    name: str
    path: str
    flags: tuple[str, ...]
    paper: dict[str, tuple[float, float]]
    cpu_budget: tuple[str, ...] | None
    sha256: str = ""


def available_presets() -> list[str]:
    return sorted(os.path.basename(p)[: -len(".flags")] for p in glob.glob(os.path.join(PRESET_DIR, "*.flags")))


def resolve_preset(name: str | None) -> str:
    """The path of preset `name` (a name under experiments/presets or a path to a .flags file).

    Raises:
      TableError: no name, or no such preset.
    """
    if not name:
        raise TableError("--preset is required (a name under experiments/presets, e.g. table1_fmnist_n10_small)")
    if os.path.isfile(name):
        return os.path.abspath(name)
    path = os.path.join(PRESET_DIR, f"{name}.flags")
    if os.path.isfile(path):
        return path
    raise TableError(f"unknown --preset {name!r}; presets: {', '.join(available_presets())}")


def paper_numbers(header: str) -> dict[str, tuple[float, float]]:
    """{method: (mean, std)} from a preset header's `Paper (...): ...` and `Paper, the baselines: ...`
    sentences (a sentence ends at a period followed by white space; '#' line starts removed).

    A row the paper leaves empty (FedBN on a model without BN: 'FedBN –') is absent.
    """
    text = " ".join(line.lstrip("#").strip() for line in header.splitlines())
    sentences = re.findall(r"Paper\b.*?(?:\.\s|\.$|$)", text)
    out: dict[str, tuple[float, float]] = {}
    for sentence in sentences:
        for key, method in methods().items():
            display = method.display
            m = re.search(r"(?<![\w-])" + re.escape(display) + r"\s+(\d+(?:\.\d+)?)\s*±\s*(\d+(?:\.\d+)?)",
                          sentence)
            if m and key not in out:
                out[key] = (float(m.group(1)), float(m.group(2)))
    return out


def read_preset(path: str) -> Preset:
    """Parses a preset: flag lines, the paper's numbers, the CPU budget line.

    Raises:
      TableError: unreadable file, or a CPU budget line without flags.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        lines = raw.decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TableError(f"cannot read preset {path}: {getattr(e, 'strerror', None) or e}") from None
    comments = [ln for ln in lines if ln.lstrip().startswith("#")]
    body = tuple(ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#"))
    budget = None
    for ln in comments:
        text = ln.lstrip("#").strip()
        if text.startswith(CPU_BUDGET_MARK):
            budget = tuple(shlex.split(text[len(CPU_BUDGET_MARK):]))
            if not budget or not all(b.startswith("--") for b in budget):
                raise TableError(f"{path}: the CPU budget line must list --flags, got {text!r}")
    name = os.path.basename(path)
    name = name[: -len(".flags")] if name.endswith(".flags") else name
    if not body or not all(re.fullmatch(r"--[a-z_]+=\S*", b) for b in body):
        raise TableError(f"{path} is not a preset: its non-comment lines must be --name=value flags")
    return Preset(name, path, body, paper_numbers("\n".join(comments)), budget,
                  hashlib.sha256(raw).hexdigest())


def flag_value(flag_list: Sequence[str], name: str, default: str | None = None) -> str | None:
    """The last `--name=value` of a flag list (as experiments.run would see it)."""
    value = default
    for item in flag_list:
        if item.startswith(f"--{name}="):
            value = item.split("=", 1)[1]
    return value


def model_has_bn(flag_list: Sequence[str]) -> bool:
    """Whether experiments.run builds a BatchNorm model from these flags (auto: BN iff the
    images have 3 channels; config.use_bn)."""
    use_bn = flag_value(flag_list, "use_bn", "auto")
    if use_bn in ("true", "false"):
        return use_bn == "true"
    dataset = flag_value(flag_list, "dataset", "fmnist")
    return not (dataset in GRAY or dataset.startswith("tfds:emnist"))


# ----------------------------------------------------------------------------- the plan


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise TableError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise TableError(f"--seeds must list distinct non-negative integers, got {text!r}")
    return seeds


def parse_methods(text: str, has_bn: bool) -> list[str]:
    """The methods to run, in table order (`methods()`): `all` leaves out the rows that need
    BatchNorm on a model without it (FedBN would be FedAvg there); naming one runs it anyway."""
    rows = methods()
    if text.strip() == "all":
        return [k for k, m in rows.items() if has_bn or not m.needs_batchnorm]
    wanted = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in rows]
    if unknown or not wanted:
        raise TableError(f"unknown --methods {', '.join(unknown) or repr(text)}; expected all or "
                         f"a comma-separated list among {', '.join(rows)}")
    return [k for k in rows if k in wanted]


def parse_run_flags(text: str) -> list[str]:
    try:
        items = shlex.split(text)
    except ValueError as e:
        raise TableError(f"--run_flags does not parse: {e}") from None
    for item in items:
        if not item.startswith("--"):
            raise TableError(f"--run_flags takes --name=value flags, got {item!r}")
        name = item[2:].split("=", 1)[0]
        own = set(OWN_FLAGS) | method_flag_names()
        if name in own or name.removeprefix("no") in own:
            raise TableError(f"--run_flags may not set --{name}: the table tool sets it for each run"
                             + (" (use the table's --import)" if name == "import" else ""))
    return items


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One (method, seed) run: its workdir, log and the exact experiments.run argv."""

    method: str
    seed: int
    workdir: str
    log: str
    argv: tuple[str, ...]
    preset_sha256: str = ""

    @property
    def record(self) -> dict[str, Any]:
        """What `finished` compares: the exact argv and the preset file's content."""
        return {"argv": list(self.argv), "preset_sha256": self.preset_sha256}


def plan_runs(preset: Preset, seeds: Sequence[int], methods_: Sequence[str], budget: str,
              run_flags: Sequence[str], table_dir: str, imports: Sequence[str] = ()) -> list[RunSpec]:
    """Every (method, seed) run, methods in the paper's order, seeds inner.

    Raises:
      TableError: the budget is unknown or the preset has none of that kind.
    """
    if budget not in BUDGETS:
        raise TableError(f"unknown --budget {budget!r}; expected {' or '.join(BUDGETS)}")
    budget_flags: tuple[str, ...] = ()
    if budget == "cpu":
        if preset.cpu_budget is None:
            with_budget = [n for n in available_presets()
                           if read_preset(os.path.join(PRESET_DIR, f"{n}.flags")).cpu_budget]
            raise TableError(f"preset {preset.name} defines no CPU budget (a '# {CPU_BUDGET_MARK} "
                             f"--rounds=...' line); presets with one: {', '.join(with_budget) or 'none'}")
        budget_flags = preset.cpu_budget
    table_dir = os.path.abspath(table_dir)
    rows = methods()
    plugin_flags = tuple(f"--import={p}" for p in imports)
    specs = []
    for method in methods_:
        for seed in seeds:
            workdir = os.path.join(table_dir, "runs", method, f"seed_{seed}")
            argv = ("-m", "experiments.run", f"--flagfile={preset.path}", *budget_flags,
                    *plugin_flags, *rows[method].flags, *run_flags, f"--seed={seed}",
                    f"--workdir={workdir}", "--quiet")
            specs.append(RunSpec(method, seed, workdir, os.path.join(table_dir, "logs", f"{method}_seed{seed}.log"),
                                 argv, preset.sha256))
    return specs


# ----------------------------------------------------------------------------- running


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _command_file(spec: RunSpec) -> str:
    return spec.log[: -len(".log")] + ".command.json"


def finished(spec: RunSpec) -> bool:
    """A finished run of exactly this command: summary.json written, the same argv and the same
    preset content recorded (an edited preset re-runs: experiments.run then resumes, extends or
    refuses the changed configuration)."""
    return (os.path.isfile(os.path.join(spec.workdir, "summary.json"))
            and _read_json(_command_file(spec)) == spec.record)


_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()


def _stop_children(signum, frame):  # pylint: disable=unused-argument
    """SIGTERM/SIGHUP: stop the running experiments.run children too (their workdirs resume)."""
    with _CHILDREN_LOCK:
        for proc in list(_CHILDREN):
            proc.terminate()
    print(f"error: stopped by signal {signum}; the same command resumes", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def checkpoint_round(workdir: str) -> int | None:
    """The latest checkpoint's round in `workdir` (orbax step folders), or None."""
    try:
        steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
    except OSError:
        return None
    return max(steps) if steps else None


def execute(spec: RunSpec) -> tuple[str, str | None]:
    """Runs (or resumes) one run; ('skipped' | 'done', None), ('elsewhere', who holds its
    workdir) or ('failed', last output line)."""
    if finished(spec):
        return "skipped", None
    holder = lock_holder(spec.workdir)
    if holder is not None:
        return "elsewhere", describe_holder(holder)
    os.makedirs(os.path.dirname(spec.log), exist_ok=True)
    with open(_command_file(spec), "w", encoding="utf-8") as f:
        json.dump(spec.record, f)
    # appended: the log keeps every attempt (an interrupted one's output too)
    with open(spec.log, "a", encoding="utf-8") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join([sys.executable, *spec.argv])}\n")
        log.flush()
        start = log.tell()
        proc = subprocess.Popen([sys.executable, *spec.argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        with _CHILDREN_LOCK:
            _CHILDREN.add(proc)
        code = proc.wait()
        with _CHILDREN_LOCK:
            _CHILDREN.discard(proc)
    if code == 0 and os.path.isfile(os.path.join(spec.workdir, "summary.json")):
        return "done", None
    with open(spec.log, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        lines = [ln.strip() for ln in f if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    holder = lock_holder(spec.workdir)
    if holder is not None and any("is in use by another run" in ln for ln in errors):
        return "elsewhere", describe_holder(holder)  # (taken between the check and the run)
    return "failed", (errors or lines or [f"exit status {code}, no output"])[-1]


# ----------------------------------------------------------------------------- numbers


def last_fraction(values: Sequence[float], fraction: float = 0.1) -> float:
    """Mean of the last ceil(fraction x len) values (at least one)."""
    k = max(1, math.ceil(fraction * len(values)))
    return statistics.fmean(values[-k:])


def run_result(spec: RunSpec) -> dict[str, Any] | None:
    """One finished run's numbers (fractions), from its summary.json and metrics.jsonl."""
    summary = _read_json(os.path.join(spec.workdir, "summary.json"))
    if summary is None:
        return None
    records = []
    try:
        with open(os.path.join(spec.workdir, "metrics.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    if not records or any("test_acc" not in r or "round" not in r for r in records):
        return None
    acc = [float(r["test_acc"]) for r in records]
    best = max(range(len(acc)), key=lambda i: acc[i])
    views = sorted({k[: -len("_test_acc")] for r in records for k in r
                    if k.endswith("_test_acc") and k != "test_acc"})
    return {
        "method": spec.method, "seed": spec.seed, "workdir": spec.workdir,
        "command": [sys.executable, *spec.argv],
        "final": acc[-1], "last10": last_fraction(acc), "best": acc[best],
        "best_round": int(records[best]["round"]),
        "views": {v: float(records[-1][f"{v}_test_acc"]) for v in views
                  if records[-1].get(f"{v}_test_acc") is not None},
        "rounds": [int(r["round"]) for r in records], "curve": acc,
        "median_round_seconds": float(summary.get("median_round_seconds", float("nan"))),
        "label_histogram": summary.get("label_histogram"),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std; 0 for one value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: Sequence[dict[str, Any]], methods: Sequence[str],
              paper: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    """Per method (in `methods` order): mean ± std in percent over the seeds that finished."""
    display = {k: m.display for k, m in globals()["methods"]().items()}
    rows = []
    for method in methods:
        mine = [r for r in results if r["method"] == method]
        row: dict[str, Any] = {"method": method, "name": display[method], "seeds": [r["seed"] for r in mine],
                               "paper": paper.get(method)}
        if mine:
            for key in ("final", "last10", "best"):
                row[key] = tuple(100 * x for x in mean_std([r[key] for r in mine]))
            views = sorted(set.intersection(*(set(r["views"]) for r in mine)))
            row["views"] = {v: tuple(100 * x for x in mean_std([r["views"][v] for r in mine])) for v in views}
            row["median_round_seconds"] = statistics.median(r["median_round_seconds"] for r in mine)
            if row["paper"] is not None:
                row["diff_final"] = row["final"][0] - row["paper"][0]
        rows.append(row)
    return rows


def order_differences(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per pair of methods whose order (final accuracy) differs from the paper's."""
    have = [r for r in rows if "final" in r and r["paper"] is not None]
    out = []
    for i, a in enumerate(have):
        for b in have[i + 1:]:
            paper = a["paper"][0] - b["paper"][0]
            ours = a["final"][0] - b["final"][0]
            if paper * ours < 0:
                hi, lo = (a, b) if paper > 0 else (b, a)
                out.append(f"paper: {hi['name']} > {lo['name']} ({hi['paper'][0]:.2f} vs {lo['paper'][0]:.2f}); "
                           f"here: {lo['name']} > {hi['name']} ({lo['final'][0]:.2f} vs {hi['final'][0]:.2f})")
    return out


# ----------------------------------------------------------------------------- outputs


def _pm(cell: tuple[float, float] | None, n: int = 2) -> str:
    """'mean ± std'; the mean alone for one seed (no spread to show)."""
    if cell is None:
        return "–"
    return f"{cell[0]:.2f}" if n < 2 else f"{cell[0]:.2f} ± {cell[1]:.2f}"


def format_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# {meta['preset']}, budget {meta['budget']}, seeds {','.join(map(str, meta['seeds']))}", "",
             f"Command: `{meta['command']}`", "",
             "Test accuracy (%), mean ± sample std over the seeds that finished (the mean alone for one "
             "seed). final: the last round; "
             "last 10%: the mean over the last 10% of evaluated rounds (at least one); best round: the best "
             "evaluated round (selected on the test set, optimistic); Δ: ours (final) minus the paper's.", "",
             "| method | seeds | final | last 10% | paper | Δ final − paper | best round (extra) "
             "| other views, final | s/round |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = len(r["seeds"])
        views = "; ".join(f"{v}: {_pm(c, n)}" for v, c in r.get("views", {}).items()) or "–"
        diff = f"{r['diff_final']:+.2f}" if "diff_final" in r else "–"
        secs = f"{r['median_round_seconds']:.2f}" if "median_round_seconds" in r else "–"
        lines.append(f"| {r['name']} | {','.join(map(str, r['seeds'])) or 'none'} | {_pm(r.get('final'), n)} | "
                     f"{_pm(r.get('last10'), n)} | {_pm(r['paper'])} | {diff} | {_pm(r.get('best'), n)} | "
                     f"{views} | {secs} |")
    diffs = order_differences(rows)
    if diffs:
        lines += ["", "Order of methods different from the paper's (final accuracy):", ""]
        lines += [f"- {d}" for d in diffs]
    return "\n".join(lines) + "\n"


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "name", "seeds", "final_mean", "final_std", "last10_mean", "last10_std",
                    "paper_mean", "paper_std", "diff_final", "best_mean", "best_std", "median_round_seconds"])
        for r in rows:
            def cell(key, i):
                return "" if r.get(key) is None else f"{r[key][i]:.4f}"
            w.writerow([r["method"], r["name"], " ".join(map(str, r["seeds"])),
                        cell("final", 0), cell("final", 1), cell("last10", 0), cell("last10", 1),
                        cell("paper", 0), cell("paper", 1),
                        f"{r['diff_final']:.4f}" if "diff_final" in r else "",
                        cell("best", 0), cell("best", 1),
                        f"{r['median_round_seconds']:.4f}" if "median_round_seconds" in r else ""])


def plot_curves(results: Sequence[dict[str, Any]], methods: Sequence[str], path: str) -> str | None:
    """Mean test accuracy (%) over rounds per method, with a ± one-std band over seeds (seeds
    whose evaluated rounds differ from the method's first seed's are left out)."""
    display = {k: m.display for k, m in globals()["methods"]().items()}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    drawn = 0
    for i, method in enumerate(methods):
        mine = [r for r in results if r["method"] == method]
        if not mine:
            continue
        rounds = mine[0]["rounds"]
        curves = np.array([r["curve"] for r in mine if r["rounds"] == rounds]) * 100
        mean = curves.mean(0)
        color = f"C{i % 10}"
        ax.plot(rounds, mean, color=color, label=f"{display[method]} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        if len(curves) > 1:
            std = curves.std(0, ddof=1)
            ax.fill_between(rounds, mean - std, mean + std, color=color, alpha=0.15, lw=0)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Mean test accuracy over clients; band: ± one std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def write_outputs(table_dir: str, results: list[dict[str, Any]], rows: list[dict[str, Any]],
                  meta: dict[str, Any], methods: Sequence[str]) -> None:
    """table.md / .csv / .json, curves.png and the first seed's label histogram."""
    os.makedirs(table_dir, exist_ok=True)
    with open(os.path.join(table_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(format_markdown(rows, meta))
    write_csv(os.path.join(table_dir, "table.csv"), rows)
    runs = [{k: v for k, v in r.items() if k != "label_histogram"} for r in results]
    with open(os.path.join(table_dir, "table.json"), "w", encoding="utf-8") as f:
        json.dump({**meta, "rows": rows, "runs": runs,
                   "order_differences": order_differences(rows)}, f, indent=1)
    plot_curves(results, methods, os.path.join(table_dir, "curves.png"))
    first = [r for r in results if r["seed"] == meta["seeds"][0] and r.get("label_histogram")]
    if first:
        plot_label_histogram(np.asarray(first[0]["label_histogram"]),
                             os.path.join(table_dir, f"label_histogram_seed{meta['seeds'][0]}.png"))


# ----------------------------------------------------------------------------- the app


def check_run_configs(specs: Sequence[RunSpec]) -> None:
    """Parses each method's run flags as `experiments.run` does (`config_from_argv`) and
    validates the config, before anything runs (a bad --run_flags is one error, not one
    failed run per method and seed).

    Raises:
      TableError: a flag experiments.run does not know, or a config it refuses.
    """
    seen = set()
    for spec in specs:
        argv = tuple(a for a in spec.argv[2:] if not a.startswith(("--workdir=", "--seed=")) and a != "--quiet")
        if argv in seen:
            continue
        seen.add(argv)
        try:
            config_from_argv(["experiments.run", *argv])
        except UserInputError as e:
            raise TableError(f"{spec.method}: {e}") from None


def import_plugins(imports: Sequence[str]) -> list[str]:
    """Imports the --import modules (their algorithms' rows join the table); returns them as
    every run will import them (paths of .py files made absolute).

    Raises:
      UserInputError: a module that cannot be imported.
    """
    out = []
    for spec in imports:
        import_plugin(spec)
        out.append(os.path.abspath(spec) if spec.endswith(".py") or os.sep in spec else spec)
    return out


def make_table(preset_name: str, seeds_text: str, methods_text: str, budget: str, table_dir: str | None,
               run_flags_text: str = "", jobs: int = 1, log=print, imports: Sequence[str] = ()) -> int:
    """Plans, runs (or resumes) and tabulates; returns the exit status (0, or 1 if a run failed).

    Raises:
      TableError, UserInputError: bad input (nothing is run).
    """
    imports = import_plugins(imports)
    preset = read_preset(resolve_preset(preset_name))
    seeds = parse_seeds(seeds_text)
    run_flags = parse_run_flags(run_flags_text)
    if jobs < 1:
        raise TableError(f"--jobs must be >= 1, got {jobs}")
    if budget not in BUDGETS:
        raise TableError(f"unknown --budget {budget!r}; expected {' or '.join(BUDGETS)}")
    budget_flags = preset.cpu_budget or () if budget == "cpu" else ()
    methods = parse_methods(methods_text, model_has_bn([*preset.flags, *budget_flags, *run_flags]))
    table_dir = table_dir or os.path.join("runs", "table", f"{preset.name}_{budget}")
    if os.path.exists(table_dir) and not os.path.isdir(table_dir):
        raise TableError(f"--table_dir {table_dir!r} is a file, not a folder")
    specs = plan_runs(preset, seeds, methods, budget, run_flags, table_dir, imports)
    check_run_configs(specs)
    try:
        os.makedirs(os.path.join(table_dir, "logs"), exist_ok=True)
    except OSError as e:
        raise TableError(f"cannot create --table_dir {table_dir!r}: {e.strerror}") from None
    command = " ".join(["python -m experiments.table", f"--preset={preset_name}", f"--seeds={seeds_text}",
                        f"--methods={methods_text}", f"--budget={budget}", f"--table_dir={table_dir}"]
                       + ([f"--run_flags={shlex.quote(run_flags_text)}"] if run_flags_text else [])
                       + ([f"--jobs={jobs}"] if jobs > 1 else [])
                       + [f"--import={p}" for p in imports])
    log(f"{preset.name}, budget {budget}: {len(methods)} methods x {len(seeds)} seeds = {len(specs)} runs "
        f"-> {os.path.abspath(table_dir)}")
    lock = threading.Lock()
    counter = iter(range(1, len(specs) + 1))
    failures: list[str] = []

    def one(spec: RunSpec):
        start = time.perf_counter()
        was_finished = os.path.isfile(os.path.join(spec.workdir, "summary.json"))
        from_round = checkpoint_round(spec.workdir)
        if not finished(spec):
            with lock:
                log(f"[{spec.method} seed {spec.seed}] started (log: {spec.log})")
        try:
            status, why = execute(spec)
        except OSError as e:  # e.g. the log or workdir cannot be written
            status, why = "failed", f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - start
        result = run_result(spec) if status not in ("failed", "elsewhere") else None
        with lock:
            k = next(counter)
            what = f"[{k}/{len(specs)}] {spec.method} seed {spec.seed}:"
            if status == "failed":
                failures.append(f"{spec.method} seed {spec.seed}: {why} (log: {spec.log})")
                log(f"{what} FAILED after {seconds:.0f} s: {why}")
            elif status == "elsewhere":
                failures.append(f"{spec.method} seed {spec.seed}: running elsewhere ({why}); "
                                f"re-run the table when it has ended")
                log(f"{what} running elsewhere ({why}): not in this table")
            elif result is None:
                failures.append(f"{spec.method} seed {spec.seed}: no readable metrics in {spec.workdir}")
                log(f"{what} no readable metrics in {spec.workdir}")
            else:
                now_round = checkpoint_round(spec.workdir)
                note = ("finished earlier, skipped" if status == "skipped" else
                        f"{seconds:.0f} s" + (", a finished run found again" if was_finished and now_round == from_round
                                              else f", resumed after round {from_round}" if from_round else ""))
                log(f"{what} final test_acc {result['final']:.4f}, last 10% {result['last10']:.4f} ({note})")
        return result

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_children)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        results = [r for r in pool.map(one, specs) if r is not None]
    if not results:
        for line in failures:
            print(f"error: {line}", file=sys.stderr, flush=True)
        print("error: no run finished: no table written", file=sys.stderr, flush=True)
        return 1
    rows = aggregate(results, methods, preset.paper)
    meta = {"preset": preset.name, "preset_path": preset.path, "budget": budget,
            "budget_flags": list(budget_flags), "run_flags": run_flags, "seeds": seeds,
            "methods": list(methods), "command": command}
    write_outputs(table_dir, results, rows, meta, methods)
    log(format_markdown(rows, meta))
    log(f"table: {os.path.join(os.path.abspath(table_dir), 'table.md')}")
    if failures:
        for line in failures:
            print(f"error: {line}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    try:
        code = make_table(f.preset, f.seeds, f.methods, f.budget, f.table_dir, f.run_flags, f.jobs,
                          imports=f["import"].value)
    except (TableError, UserInputError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{type(e).__name__}: {e}")
    sys.exit(code)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
