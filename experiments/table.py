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
`--methods=paper` takes the paper's rows alone (`TableRow.in_paper`); with `all`, table.md
lists the other rows below a rule, "beyond the paper".

Budgets: `paper` runs the preset as it is (the paper's rounds and local epochs); `cpu` adds
the flags of the preset's line `# CPU budget (experiments.table --budget=cpu): --rounds=...`
(fewer rounds / local epochs; a preset without that line has no CPU budget).

Tuned values (`--params=TUNE_DIR/best.json`, written by `experiments.tune` for the same
preset and budget): every method best.json holds runs its final seeds with the values
chosen on validation data, its `params` ({'train.lr': 0.05, 'pfedla.hn_lr': 0.1}) passed as
experiments.run flags (`search_space.override_flags`: --lr=0.05 --pfedla_hn_lr=0.1) after
the row's own flags and before --run_flags; on the full training split (no validation
split: the data of an untuned run) and evaluated on the test split. A method asked for
(--methods) that best.json lacks runs at its defaults and is marked "untuned". The table
shows, per method, the chosen values and their validation accuracy (from best.json) beside
the test accuracy. Default TABLE_DIR: runs/table/<preset>_<budget>_tuned.

  python -m experiments.tune --preset=table1_fmnist_n10_small --budget=cpu --trials=12 \
      --tune_dir=runs/tune/t1s_cpu
  python -m experiments.table --preset=table1_fmnist_n10_small --budget=cpu --seeds=0,1,2 \
      --params=runs/tune/t1s_cpu/best.json

Before anything runs, best.json is checked: readable JSON of format 1, tuned on this preset
and budget, every method in it a row of a registered algorithm (or of an --import module)
of the algorithm it names, and its params accepted by the config (`apply_overrides` on the
run's config, which must equal the config the run's flags give); --run_flags may not set a
tuned value. A table folder holding runs of other values is not mixed into the table: a
run's command (with its tuned flags) differs, so it is not "finished", and experiments.run
refuses a workdir holding another configuration: that run is reported failed (exit 1, the
old run left as it was); use another --table_dir (or delete the old runs).

Writes into TABLE_DIR:
  table.md, table.csv, table.json  per method (with --params: its tuned values and their
      validation accuracy, or "untuned"), mean ± sample std over seeds of (a) the final
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
lacks, run flags the tool sets itself or that change the data a table reports on
(--validation_fraction, --evaluate_test), a best.json refused as above) prints one line
`error: ...` and exits with status 2.
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
from absl import flags

from experiments.cli import fail
from experiments.plots import plot_label_histogram, pyplot, save_figure
from pfedla_jax.algorithms import algorithm_class, algorithm_names, config_fields
from pfedla_jax.algorithms.search_space import override_flags
from pfedla_jax.errors import UserInputError
from pfedla_jax.training.command_line import HELP_FLAGS, config_from_argv, import_plugin
from pfedla_jax.training.config import apply_overrides
from pfedla_jax.training.workdir import config_differences, describe_holder, lock_holder

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
BUDGETS = ("paper", "cpu")
CPU_BUDGET_MARK = "CPU budget (experiments.table --budget=cpu):"
# Flags the tool sets for every run; --run_flags may not give them (nor a row's options).
OWN_FLAGS = ("algorithm", "seed", "workdir", "flagfile", "overwrite", "quiet", "import")
# Flags that change the data a table trains and reports on: every table trains on the full
# training split and reports test accuracy (tuning's validation split is experiments.tune's).
SPLIT_FLAGS = ("validation_fraction", "evaluate_test")
PARAMS_FORMAT = 1  # the format of experiments.tune's best.json that --params reads
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
      in_paper: one of the paper's rows (--methods=paper); the others are listed below a
        rule, "beyond the paper".
    """

    key: str
    display: str
    algorithm: str
    flags: tuple[str, ...]
    needs_batchnorm: bool = False
    in_paper: bool = False


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
                                                     row.needs_batchnorm, row.in_paper)))
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
    flags.DEFINE_string("methods", "all", "all | paper (the paper's rows) | comma-separated among the rows of the registered "
                        "algorithms: " + ",".join(methods()) + " (and those of --import modules).",
                        flag_values=flag_values)
    flags.DEFINE_string("budget", "paper", "paper (the preset's rounds and epochs) | cpu (the "
                        "preset's CPU budget line).", flag_values=flag_values)
    flags.DEFINE_string("table_dir", None, "Output folder (default runs/table/<preset>_<budget>, "
                        "with --params runs/table/<preset>_<budget>_tuned).", flag_values=flag_values)
    flags.DEFINE_string("params", None, "The best.json of experiments.tune (same preset and budget): "
                        "each method in it runs with its chosen values (on the full training split, "
                        "evaluated on the test split); the other methods run untuned.",
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
    if text.strip() in ("all", "paper"):
        return [k for k, m in rows.items() if (has_bn or not m.needs_batchnorm)
                and (m.in_paper or text.strip() == "all")]
    wanted = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in rows]
    if unknown or not wanted:
        raise TableError(f"unknown --methods {', '.join(unknown) or repr(text)}; expected all, paper or "
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
        if name in SPLIT_FLAGS or name.removeprefix("no") in SPLIT_FLAGS:
            raise TableError(f"--run_flags may not set --{name}: a table trains on the full training "
                             "split and reports test accuracy (validation is experiments.tune's)")
    return items


# ----------------------------------------------------------------------------- tuned values


@dataclasses.dataclass(frozen=True)
class TunedMethod:
    """One method of a best.json: the values experiments.tune chose and how.

    Attributes:
      key: the table row.
      algorithm: the row's registered algorithm.
      params: {`apply_overrides` key: value}, e.g. {'train.lr': 0.05, 'pfedla.hn_lr': 0.1}.
      val_acc: the objective at those values (a fraction: validation accuracy, mean over the
        last 10% of evaluated rounds), or None.
      trials, complete, pruned, failed, best_trial: the study's counts and the chosen trial
        (None where best.json leaves them out).
      search_space: the ranges searched, as `Hyperparameter.describe()` wrote them.
    """

    key: str
    algorithm: str
    params: dict[str, Any]
    val_acc: float | None = None
    trials: int | None = None
    complete: int | None = None
    pruned: int | None = None
    failed: int | None = None
    best_trial: int | None = None
    search_space: tuple[str, ...] = ()

    @property
    def flags(self) -> tuple[str, ...]:
        """The experiments.run flags of `params` (`search_space.override_flags`)."""
        return tuple(override_flags(self.params))


@dataclasses.dataclass(frozen=True)
class TunedParams:
    """A parsed best.json (written by experiments.tune; format 1).

    Attributes:
      path: absolute path of the file.
      preset, budget: the preset name and budget it was tuned at.
      methods: {row key: TunedMethod}, in the file's order.
      validation_fraction, seed, objective: how it was tuned (as recorded; None if absent).
      sha256: of the file's bytes.
      run_flags: the tune's --run_flags (None if not recorded).
      no_result: methods the file holds without a complete trial (params null): they run
        untuned.
    """

    path: str
    preset: str
    budget: str
    methods: dict[str, TunedMethod]
    validation_fraction: float | None = None
    seed: int | None = None
    objective: str | None = None
    sha256: str = ""
    run_flags: tuple[str, ...] | None = None
    no_result: tuple[str, ...] = ()


def _preset_name(text: str) -> str:
    name = os.path.basename(text)
    return name[: -len(".flags")] if name.endswith(".flags") else name


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_params(path: str) -> TunedParams:
    """Parses experiments.tune's best.json: {"format": 1, "preset": P, "budget": B,
    "methods": {row: {"algorithm": A, "params": {key: value}, "val_acc": x, "trials": n, ...}},
    ...}.

    Raises:
      TableError: an unreadable file, not JSON, another format, or a field of the wrong type.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data = json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise TableError(f"cannot read --params {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableError(f"--params {path} is not JSON: {e}") from None

    def bad(what: str) -> TableError:
        return TableError(f"--params {path} is not a best.json of experiments.tune: {what}")

    if not isinstance(data, dict):
        raise bad(f"expected a JSON object, got {type(data).__name__}")
    if type(data.get("format")) is not int or data["format"] != PARAMS_FORMAT:
        raise TableError(f"--params {path}: format {data.get('format')!r}, expected {PARAMS_FORMAT} "
                         "(written by another version of experiments.tune?)")
    for name in ("preset", "budget"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise bad(f"no {name!r}")
    if not isinstance(data.get("methods"), dict) or not data["methods"]:
        raise bad("no 'methods' (an object of at least one method)")
    tuned, no_result = {}, []
    for key, entry in data["methods"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("algorithm"), str):
            raise bad(f"method {key!r} has no 'algorithm'")
        params = entry.get("params")
        if params is None and entry.get("val_acc") is None:  # the study has no complete trial
            no_result.append(key)
            continue
        if not isinstance(params, dict) or not all(
                isinstance(k, str) and isinstance(v, (bool, int, float, str)) for k, v in params.items()):
            raise bad(f"method {key!r}: 'params' must be an object of key: number, bool or string")
        val_acc = entry.get("val_acc")
        if val_acc is not None and not _is_number(val_acc):
            raise bad(f"method {key!r}: 'val_acc' must be a number, got {val_acc!r}")
        counts = {}
        for name in ("trials", "complete", "pruned", "failed", "best_trial"):
            value = entry.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise bad(f"method {key!r}: {name!r} must be an integer, got {value!r}")
            counts[name] = value
        space = entry.get("search_space", [])
        if not isinstance(space, list) or not all(isinstance(x, str) for x in space):
            raise bad(f"method {key!r}: 'search_space' must be a list of strings")
        tuned[key] = TunedMethod(key, entry["algorithm"], dict(params),
                                 None if val_acc is None else float(val_acc), search_space=tuple(space),
                                 **counts)
    if not tuned:
        raise TableError(f"--params {path}: no method has a complete trial ({', '.join(no_result)}); "
                         "run experiments.tune further")
    fraction, seed = data.get("validation_fraction"), data.get("seed")
    run_flags = data.get("run_flags")
    if run_flags is not None and not (isinstance(run_flags, list)
                                      and all(isinstance(f, str) for f in run_flags)):
        raise bad("'run_flags' must be a list of strings")
    return TunedParams(os.path.abspath(path), data["preset"], data["budget"], tuned,
                       float(fraction) if _is_number(fraction) else None,
                       seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                       data.get("objective") if isinstance(data.get("objective"), str) else None,
                       hashlib.sha256(raw).hexdigest(),
                       None if run_flags is None else tuple(run_flags), tuple(no_result))


def check_params(tuned: TunedParams, preset: Preset, budget: str) -> None:
    """Checks a best.json against the table: its preset and budget, and every method in it a
    registered row (the --import modules' rows included) of the algorithm it names, whose
    params set no flag the tool sets itself and no option that defines the row (HeurpFedLA's
    heur_k).

    Raises:
      TableError: naming the first mismatch.
    """
    where = f"--params {tuned.path}"
    if _preset_name(tuned.preset) != preset.name:
        raise TableError(f"{where} was tuned on preset {tuned.preset!r}, not {preset.name!r}")
    if tuned.budget != budget:
        raise TableError(f"{where} was tuned at budget {tuned.budget!r}, not --budget={budget}")
    rows = methods()
    for key, method in tuned.methods.items():
        if key not in rows:
            raise TableError(f"{where} tunes method {key!r}, which is not a table row of a registered "
                             f"algorithm (rows: {', '.join(rows)}; a user's algorithm: give its "
                             "module with --import)")
        if rows[key].algorithm != method.algorithm:
            raise TableError(f"{where}: method {key!r} is algorithm {method.algorithm!r} there, but the "
                             f"row {key!r} runs {rows[key].algorithm!r}")
        fields = {f.flag: f for f in config_fields(method.algorithm)}
        row_options = {flag[2:].split("=", 1)[0] for flag in rows[key].flags[1:]}
        for flag in method.flags:
            name = flag[2:].split("=", 1)[0]
            if name in row_options or (name in fields and fields[name].alias in row_options):
                raise TableError(f"{where}: method {key!r} sets {flag}, an option that defines the row "
                                 f"{key!r} itself ({' '.join(rows[key].flags[1:])})")
            if name in OWN_FLAGS:
                raise TableError(f"{where}: method {key!r} sets {flag}, which the table tool sets itself")
            if name in SPLIT_FLAGS:
                raise TableError(f"{where}: method {key!r} sets {flag}: the final runs train on the full "
                                 "training split and report test accuracy")


def tuned_flag_names(tuned: TunedParams, methods_: Sequence[str]) -> dict[str, str]:
    """{flag name (and its other name): the method that tunes it} for the methods of `methods_`
    that `tuned` holds."""
    out: dict[str, str] = {}
    for key in methods_:
        method = tuned.methods.get(key)
        if method is None:
            continue
        fields = {f.flag: f for f in config_fields(method.algorithm)}
        for flag in method.flags:
            name = flag[2:].split("=", 1)[0]
            out.setdefault(name, key)
            if name in fields and fields[name].alias:
                out.setdefault(fields[name].alias, key)
    return out


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One (method, seed) run: its workdir, log and the exact experiments.run argv."""

    method: str
    seed: int
    workdir: str
    log: str
    argv: tuple[str, ...]
    preset_sha256: str = ""
    tuned_flags: tuple[str, ...] = ()  # the flags of the method's tuned values (in argv)

    @property
    def record(self) -> dict[str, Any]:
        """What `finished` compares: the exact argv and the preset file's content."""
        return {"argv": list(self.argv), "preset_sha256": self.preset_sha256}


def plan_runs(preset: Preset, seeds: Sequence[int], methods_: Sequence[str], budget: str,
              run_flags: Sequence[str], table_dir: str, imports: Sequence[str] = (),
              tuned: TunedParams | None = None) -> list[RunSpec]:
    """Every (method, seed) run, methods in the paper's order, seeds inner. The flags of a run:
    the preset's (--flagfile), the budget's, --import, the row's, the method's tuned values
    (`tuned`, where it holds the method), --run_flags, --seed, --workdir.

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
        tuned_flags = tuned.methods[method].flags if tuned and method in tuned.methods else ()
        for seed in seeds:
            workdir = os.path.join(table_dir, "runs", method, f"seed_{seed}")
            argv = ("-m", "experiments.run", f"--flagfile={preset.path}", *budget_flags,
                    *plugin_flags, *rows[method].flags, *tuned_flags, *run_flags, f"--seed={seed}",
                    f"--workdir={workdir}", "--quiet")
            specs.append(RunSpec(method, seed, workdir, os.path.join(table_dir, "logs", f"{method}_seed{seed}.log"),
                                 argv, preset.sha256, tuned_flags))
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


def add_tuned(rows: Sequence[dict[str, Any]], tuned: TunedParams) -> None:
    """Marks each row tuned or not and adds, for a tuned one, its chosen values (`params`), their
    validation accuracy from best.json (`val_acc`, in %) and the study's counts."""
    for row in rows:
        method = tuned.methods.get(row["method"])
        row["tuned"] = method is not None
        if method is None:
            continue
        row["algorithm"] = method.algorithm
        row["params"] = dict(method.params)
        row["val_acc"] = None if method.val_acc is None else 100 * method.val_acc
        for name in ("trials", "complete", "pruned", "failed", "best_trial"):
            row[name] = getattr(method, name)
        row["search_space"] = list(method.search_space)


def format_params(params: dict[str, Any], algorithm: str) -> str:
    """'lr=0.05, hn_lr=0.1' (keys without their 'train.' or '<algorithm>.' prefix, numbers to 4
    significant digits: table.json keeps the exact values)."""
    def text(value):
        if isinstance(value, bool):
            return str(value).lower()
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    return ", ".join(f"{k.removeprefix('train.').removeprefix(algorithm + '.')}={text(v)}"
                     for k, v in params.items()) or "–"


def _tuned_cells(r: dict[str, Any]) -> tuple[str, str]:
    """(tuned values, validation accuracy) of a row of a tuned table."""
    if not r.get("tuned"):
        return "untuned (defaults)", "–"
    val = "–" if r.get("val_acc") is None else f"{r['val_acc']:.2f}"
    if r.get("trials") is not None:
        val += f" ({r['trials']} trials" + (f", {r['pruned']} pruned" if r.get("pruned") else "") + ")"
    return format_params(r["params"], r["algorithm"]), val


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
             "evaluated round (selected on the test set, optimistic); Δ: ours (final) minus the paper's.", ""]
    tuned = meta.get("params") is not None
    if tuned:
        fraction = meta["params"].get("validation_fraction")
        lines += ["Tuned values: chosen by experiments.tune (the best.json of --params) on a validation split "
                  + (f"({100 * fraction:g}% of each client's training split) " if fraction else "")
                  + "of this preset and budget; val acc (tuning): their validation accuracy (%, "
                  + (meta["params"].get("objective") or "the tuning objective") + "). "
                  "The runs here train on the full training split and report test accuracy. "
                  "untuned: a method best.json does not hold, at its defaults.", ""]
    lines += ["| method | " + ("tuned values | val acc (tuning) | " if tuned else "") + "seeds | final | "
              "last 10% | paper | Δ final − paper | best round (extra) | other views, final | s/round |",
              "|---|" + ("---|---|" if tuned else "") + "---|---|---|---|---|---|---|---|"]
    registered = methods()
    ruled = False
    for r in rows:
        method = registered.get(r["method"])
        if not ruled and method is not None and not method.in_paper and any(
                registered.get(q["method"]) is not None and registered[q["method"]].in_paper for q in rows):
            ruled = True  # the paper's rows above, the others below
            lines.append("| **beyond the paper** |" + " |" * (len(lines[-1].split("|")) - 3))
        n = len(r["seeds"])
        views = "; ".join(f"{v}: {_pm(c, n)}" for v, c in r.get("views", {}).items()) or "–"
        diff = f"{r['diff_final']:+.2f}" if "diff_final" in r else "–"
        secs = f"{r['median_round_seconds']:.2f}" if "median_round_seconds" in r else "–"
        values = " | ".join(_tuned_cells(r)) + " | " if tuned else ""
        lines.append(f"| {r['name']} | {values}{','.join(map(str, r['seeds'])) or 'none'} | {_pm(r.get('final'), n)} | "
                     f"{_pm(r.get('last10'), n)} | {_pm(r['paper'])} | {diff} | {_pm(r.get('best'), n)} | "
                     f"{views} | {secs} |")
    diffs = order_differences(rows)
    if diffs:
        lines += ["", "Order of methods different from the paper's (final accuracy):", ""]
        lines += [f"- {d}" for d in diffs]
    return "\n".join(lines) + "\n"


def write_csv(path: str, rows: Sequence[dict[str, Any]], tuned: bool = False) -> None:
    """One row per method; a tuned table (`tuned`) adds the columns tuned (true/false), params
    (the chosen values, JSON) and val_acc (%, from best.json)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "name", "seeds", "final_mean", "final_std", "last10_mean", "last10_std",
                    "paper_mean", "paper_std", "diff_final", "best_mean", "best_std", "median_round_seconds"]
                   + (["tuned", "params", "val_acc"] if tuned else []))
        for r in rows:
            def cell(key, i):
                return "" if r.get(key) is None else f"{r[key][i]:.4f}"
            extra = []
            if tuned:
                extra = [str(bool(r.get("tuned"))).lower(),
                         json.dumps(r["params"]) if r.get("tuned") else "",
                         "" if r.get("val_acc") is None else f"{r['val_acc']:.4f}"]
            w.writerow([r["method"], r["name"], " ".join(map(str, r["seeds"])),
                        cell("final", 0), cell("final", 1), cell("last10", 0), cell("last10", 1),
                        cell("paper", 0), cell("paper", 1),
                        f"{r['diff_final']:.4f}" if "diff_final" in r else "",
                        cell("best", 0), cell("best", 1),
                        f"{r['median_round_seconds']:.4f}" if "median_round_seconds" in r else ""] + extra)


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
    write_csv(os.path.join(table_dir, "table.csv"), rows, tuned=meta.get("params") is not None)
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


def _config_argv(spec: RunSpec) -> tuple[str, ...]:
    """A run's experiments.run flags without those of its seed, workdir and output."""
    return tuple(a for a in spec.argv[2:] if not a.startswith(("--workdir=", "--seed=")) and a != "--quiet")


def check_run_configs(specs: Sequence[RunSpec]) -> None:
    """Parses each method's run flags as `experiments.run` does (`config_from_argv`) and
    validates the config, before anything runs (a bad --run_flags is one error, not one
    failed run per method and seed).

    Raises:
      TableError: a flag experiments.run does not know, or a config it refuses.
    """
    seen = set()
    for spec in specs:
        argv = _config_argv(spec)
        if argv in seen:
            continue
        seen.add(argv)
        try:
            config_from_argv(["experiments.run", *argv])
        except UserInputError as e:
            raise TableError(f"{spec.method}: {e}") from None


def _without(argv: Sequence[str], part: Sequence[str]) -> tuple[str, ...]:
    """`argv` without the first occurrence of the contiguous run `part`."""
    argv, part = tuple(argv), tuple(part)
    for i in range(len(argv) - len(part) + 1):
        if argv[i:i + len(part)] == part:
            return argv[:i] + argv[i + len(part):]
    return argv


def check_tuned_configs(specs: Sequence[RunSpec], tuned: TunedParams,
                        run_flags: Sequence[str] = ()) -> None:
    """For each tuned method, before anything runs: best.json's params applied to the config
    of its run without them (`training.config.apply_overrides`) give a valid config, and the
    same config as its run's flags (the flags carry exactly the chosen values); and, when
    best.json records the tune's --run_flags, the run computes what the trials computed
    (the same ExperimentConfig but its seed and the trials' validation split and test
    switch), so values tuned on another setting (e.g. fewer rounds) are not used silently.

    Raises:
      TableError: params the config refuses (a field the algorithm lacks, an option of
        another algorithm, a value its `validate()` refuses), flags that do not give them, or
        a run whose setting differs from the tuning's.
    """
    seen = set()
    for spec in specs:
        if not spec.tuned_flags or spec.method in seen:
            continue
        seen.add(spec.method)
        where = f"--params {tuned.path}: method {spec.method}"
        argv = _config_argv(spec)
        try:
            base = config_from_argv(["experiments.run", *_without(argv, spec.tuned_flags)]).config
        except UserInputError as e:
            raise TableError(f"{spec.method}: {e}") from None
        try:
            expected = apply_overrides(base, tuned.methods[spec.method].params)
            got = config_from_argv(["experiments.run", *argv]).config
        except UserInputError as e:
            raise TableError(f"{where}: {e}") from None
        if got != expected:
            raise TableError(f"{where}: the run flags {' '.join(spec.tuned_flags)} do not give the "
                             f"values {tuned.methods[spec.method].params} (a key without an "
                             "experiments.run flag?)")
        if tuned.run_flags is None:
            continue
        try:
            trial = config_from_argv(["experiments.run", *_without(argv, tuple(run_flags)),
                                      *tuned.run_flags]).config
        except UserInputError as e:
            raise TableError(f"{where}: the tune's --run_flags {' '.join(tuned.run_flags)}: {e}") from None
        same = lambda c: dataclasses.replace(c, seed=0, validation_fraction=0.0, evaluate_test=True)
        diffs = config_differences(same(trial).to_dict(), same(got).to_dict())
        if diffs:
            raise TableError(f"{where}: the values were tuned on another setting ({'; '.join(diffs[:3])}: "
                             "the tune's --run_flags against this table's); tune again, or give the "
                             "table the same --run_flags")


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


def default_table_dir(preset_name: str, budget: str, tuned: bool) -> str:
    """runs/table/<preset>_<budget>, and ..._tuned for a table of tuned values (--params)."""
    return os.path.join("runs", "table", f"{preset_name}_{budget}" + ("_tuned" if tuned else ""))


def make_table(preset_name: str, seeds_text: str, methods_text: str, budget: str, table_dir: str | None,
               run_flags_text: str = "", jobs: int = 1, log=print, imports: Sequence[str] = (),
               params: str | None = None) -> int:
    """Plans, runs (or resumes) and tabulates; returns the exit status (0, or 1 if a run failed).

    `params`: the path of experiments.tune's best.json (`read_params`), or None: the methods
    it holds run with their chosen values, the others untuned.

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
    tuned = None
    if params:
        tuned = read_params(params)
        check_params(tuned, preset, budget)
        tuned_names = tuned_flag_names(tuned, methods)
        for item in run_flags:
            name = item[2:].split("=", 1)[0]
            if name in tuned_names or name.removeprefix("no") in tuned_names:
                raise TableError(f"--run_flags may not set --{name}: --params gives it "
                                 f"({tuned_names.get(name) or tuned_names[name.removeprefix('no')]}'s "
                                 "tuned value)")
    table_dir = table_dir or default_table_dir(preset.name, budget, tuned is not None)
    if os.path.exists(table_dir) and not os.path.isdir(table_dir):
        raise TableError(f"--table_dir {table_dir!r} is a file, not a folder")
    specs = plan_runs(preset, seeds, methods, budget, run_flags, table_dir, imports, tuned)
    if tuned is not None:
        check_tuned_configs(specs, tuned, run_flags)
    check_run_configs(specs)
    try:
        os.makedirs(os.path.join(table_dir, "logs"), exist_ok=True)
    except OSError as e:
        raise TableError(f"cannot create --table_dir {table_dir!r}: {e.strerror}") from None
    command = " ".join(["python -m experiments.table", f"--preset={preset_name}", f"--seeds={seeds_text}",
                        f"--methods={methods_text}", f"--budget={budget}", f"--table_dir={table_dir}"]
                       + ([f"--run_flags={shlex.quote(run_flags_text)}"] if run_flags_text else [])
                       + ([f"--jobs={jobs}"] if jobs > 1 else [])
                       + [f"--import={p}" for p in imports]
                       + ([f"--params={params}"] if tuned is not None else []))
    log(f"{preset.name}, budget {budget}: {len(methods)} methods x {len(seeds)} seeds = {len(specs)} runs "
        f"-> {os.path.abspath(table_dir)}")
    if tuned is not None:
        left = [k for k in tuned.methods if k not in methods]
        log(f"tuned values from {params}: {', '.join(k for k in methods if k in tuned.methods) or 'none'}; "
            f"untuned: {', '.join(k for k in methods if k not in tuned.methods) or 'none'}"
            + (f"; in best.json but not in --methods (not run): {', '.join(left)}" if left else ""))
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
    if tuned is not None:
        add_tuned(rows, tuned)
        meta["params"] = {"path": params, "sha256": tuned.sha256, "preset": tuned.preset, "budget": tuned.budget,
                          "validation_fraction": tuned.validation_fraction, "seed": tuned.seed,
                          "objective": tuned.objective}
    write_outputs(table_dir, results, rows, meta, methods)
    log(format_markdown(rows, meta))
    log(f"table: {os.path.join(os.path.abspath(table_dir), 'table.md')}")
    if failures:
        for line in failures:
            print(f"error: {line}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv):
    """The program: `argv` is the whole command line (argv[0] the program), parsed into a
    FlagValues of its own (so that a test can call it in process). Bad input: one `error:`
    line, exit 2 (`experiments.cli.fail`)."""
    values = flags.FlagValues()
    define_flags(values)
    if any(a.split("=", 1)[0].lstrip("-") in HELP_FLAGS for a in argv[1:] if a.startswith("-")):
        print(f"usage: python -m experiments.table [flags]\n\n{__doc__.split(chr(10) * 2)[0].strip()}\n\n"
              f"{values.get_help()}")
        return
    try:
        rest = values(list(argv))
    except flags.Error as e:
        fail(str(e))
    if len(rest) > 1:
        fail(f"unexpected arguments: {' '.join(rest[1:])}")
    try:
        code = make_table(values.preset, values.seeds, values.methods, values.budget, values.table_dir,
                          values.run_flags, values.jobs, imports=values["import"].value,
                          params=values.params)
    except (TableError, UserInputError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{type(e).__name__}: {e}")
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv)
