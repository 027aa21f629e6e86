r"""Run several configurations on one partition and print one comparison table.

Each --run is `NAME:field=value,field=value` over ExperimentConfig fields (nested ones
with a dot: `train.local_epochs=5`; the algorithm's options prefixed with its name:
`pfedla.hn_lr=0.1`, `pfedla.hn.normalization=softmax`; `algorithm=NAME` switches to that
algorithm, whose options then come from the flags). Base settings come from the other
flags: every flag of experiments.run (`--import=MODULE` included), options of any
algorithm allowed; `training.config.apply_overrides` does the rest.

With --seeds=0,1,2 every run is repeated per seed and a mean ± std table (final round and
best round, labelled) is printed; with --sweep_dir every run gets its own resumable workdir.

Example (the pFedLA hypernetwork sweep in BUILD_NOTES.md):

  python -m experiments.sweep --dataset=fmnist --samples_per_client=200 --rounds=60 \
    --local_epochs=5 --lr=0.005 --out=runs/sweep.json \
    --run=local:algorithm=local --run=fedavg:algorithm=fedavg \
    --run=pfedla:algorithm=pfedla --run=pfedla_lr1:algorithm=pfedla,pfedla.hn_lr=1.0
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys

from absl import flags

from experiments.cli import fail, start
from pfedla_jax.errors import RunInterrupted, UserInputError
from pfedla_jax.training.command_line import (algorithm_config_from_flags, config_from_argv,
                                              help_text, wants_help)
from pfedla_jax.training.config import apply_overrides
from pfedla_jax.training.loop import run_experiment
from pfedla_jax.training.workdir import WorkdirBusy, describe_holder
from pfedla_jax.training.tables import format_seed_table, seed_table


def define_flags(values: flags.FlagValues) -> None:
    """The sweep's own flags (beside experiments.run's)."""
    flags.DEFINE_multi_string("run", [], "NAME:field=value,... (repeatable).", flag_values=values)
    flags.DEFINE_string("out", None, "Write all summaries to this JSON file.", flag_values=values)
    flags.DEFINE_string("seeds", None, "Comma-separated seeds: run every --run once per seed "
                        "and print a mean ± std table (overrides --seed).", flag_values=values)
    flags.DEFINE_string("sweep_dir", None, "Give every run a workdir SWEEP_DIR/NAME/seed_S "
                        "(checkpoints, metrics; a re-run resumes); with --seeds also write "
                        "SWEEP_DIR/seeds.{json,md}.", flag_values=values)


def _seeds(text):
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds must be comma-separated integers, got {text!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        fail(f"--seeds must list distinct integers, got {text!r}")
    return seeds


def main(argv):
    if wants_help(argv):
        print(help_text("experiments.sweep", argv, __doc__.split("\n\n")[0], extra=define_flags))
        return
    try:
        command = config_from_argv(argv, strict=False, extra=define_flags)
    except UserInputError as e:
        fail(str(e))
    start(argv[:1], command.options.host_devices)
    values = command.flag_values
    base, options = command.config, command.options
    runs, out, root = values["run"].value, values["out"].value, values["sweep_dir"].value
    seeds = _seeds(values["seeds"].value)
    if not runs:
        fail("give at least one --run=NAME:field=value,...")
    names = [spec.partition(":")[0] for spec in runs]
    if len(set(names)) != len(names) or not all(names):
        fail(f"--run names must be distinct and non-empty, got {names}")
    from_flags = lambda name: algorithm_config_from_flags(name, values)
    results, elsewhere = [], []
    for seed in seeds or [base.seed]:
        for spec in runs:
            name, _, body = spec.partition(":")
            items = [tuple(p.strip() for p in item.partition("=")[::2])
                     for item in filter(None, body.split(","))]
            if seeds and any(k == "seed" for k, _ in items):
                fail(f"--run {name!r} sets seed while --seeds is given")
            try:
                config = apply_overrides(dataclasses.replace(base, seed=seed), items, from_flags)
            except UserInputError as e:
                fail(f"{name}: {e}")
            if not config.evaluate_test:
                fail(f"{name}: a sweep compares test accuracy; --evaluate_test=false is for "
                     "tuning (python -m experiments.tune)")
            workdir = (os.path.join(root, name, f"seed_{config.seed}") if root else None)
            try:
                summary = run_experiment(config, workdir, log=lambda s: None, options=options)
            except RunInterrupted as stop:  # (the run checkpointed its round when it could)
                kept = (f"its checkpoint is in {workdir}; re-run the same command to resume"
                        if workdir else "nothing was saved (no --sweep_dir)")
                print(f"stopped by {signal.Signals(stop.signum).name} in run {name} seed {config.seed} "
                      f"after round {stop.round_done} of {stop.rounds}; {kept}", file=sys.stderr, flush=True)
                sys.exit(128 + stop.signum)
            except WorkdirBusy as e:  # another command runs it: not a failure of this sweep
                elsewhere.append(f"{name} seed {config.seed}: running elsewhere "
                                 f"({describe_holder(e.holder)})")
                print(f"{name:>24} seed {config.seed:<3d} running elsewhere "
                      f"({describe_holder(e.holder)}): not in this sweep", flush=True)
                continue
            except UserInputError as e:
                fail(f"{name}: {e}")
            final = summary["final"]
            row = {"name": name, "seed": config.seed, "test_acc": final["test_acc"],
                   "best_test_acc": summary["best_test_acc"],
                   "best_round": summary["best_round"], "local_test_acc": final.get("local_test_acc"),
                   "alpha_self_mean": final.get("alpha_self_mean"),
                   "median_round_seconds": summary["median_round_seconds"],
                   "alpha_self": {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("alpha_self/")},
                   "spec": spec}
            results.append(row)
            fmt = lambda v: "   -  " if v is None else f"{v:.4f}"
            print(f"{name:>24} seed {config.seed:<3d} final {row['test_acc']:.4f}  best "
                  f"{row['best_test_acc']:.4f}@{row['best_round']:<4d} local-view "
                  f"{fmt(row['local_test_acc'])}  self {fmt(row['alpha_self_mean'])}  "
                  f"{row['median_round_seconds']:.2f}s/round", flush=True)
            if out:
                os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
                with open(out, "w") as f:
                    json.dump({"base": base.to_dict(), "results": results}, f, indent=2)
    if seeds and results:
        table = seed_table(results)
        text = format_seed_table(table)
        print(f"\nmean ± std over seeds {seeds} (accuracy %):\n{text}", flush=True)
        if root:
            with open(os.path.join(root, "seeds.json"), "w") as f:
                json.dump({"base": base.to_dict(), "seeds": seeds, "table": table,
                           "results": results}, f, indent=2)
            with open(os.path.join(root, "seeds.md"), "w") as f:
                f.write(text + "\n")
    if elsewhere:
        fail(f"{len(elsewhere)} run(s) left out, running elsewhere: {'; '.join(elsewhere)}; re-run "
             "the sweep when they have ended")


if __name__ == "__main__":
    main(sys.argv)
