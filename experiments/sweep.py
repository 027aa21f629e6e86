r"""Run several configurations on one partition and print one comparison table.

Each --run is `NAME:field=value,field=value` over ExperimentConfig fields (nested ones
with a dot: `pfedla.hn_lr=0.1`, `pfedla.hn.normalization=softmax`, `train.local_epochs=5`).
Base settings come from the other flags (same names as experiments.run).

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

from absl import app, flags

from experiments.run import fail, start

_RUNS = flags.DEFINE_multi_string("run", [], "NAME:field=value,... (repeatable).")
_OUT = flags.DEFINE_string("out", None, "Write all summaries to this JSON file.")


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text in ("true", "false"):
        return text == "true"
    return text


def _override(config, dotted: str, value):
    head, _, rest = dotted.partition(".")
    if not hasattr(config, head):
        fail(f"unknown config field {dotted!r}")
    if rest:
        return dataclasses.replace(config, **{head: _override(getattr(config, head), rest, value)})
    return dataclasses.replace(config, **{head: value})


def main(argv):
    start(argv)
    from experiments.run import _config
    from pfedla_jax.errors import UserInputError
    from pfedla_jax.training.loop import run_experiment

    base = _config()
    results = []
    for spec in _RUNS.value:
        name, _, body = spec.partition(":")
        config = base
        for item in filter(None, body.split(",")):
            key, _, val = item.partition("=")
            config = _override(config, key.strip(), _parse_value(val.strip()))
        try:
            summary = run_experiment(config, None, log=lambda s: None)
        except UserInputError as e:
            fail(f"{name}: {e}")
        final = summary["final"]
        row = {"name": name, "test_acc": final["test_acc"], "best_test_acc": summary["best_test_acc"],
               "best_round": summary["best_round"], "local_test_acc": final.get("local_test_acc"),
               "alpha_self_mean": final.get("alpha_self_mean"),
               "median_round_seconds": summary["median_round_seconds"],
               "alpha_self": {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("alpha_self/")},
               "spec": spec}
        results.append(row)
        fmt = lambda v: "   -  " if v is None else f"{v:.4f}"
        print(f"{name:>24}  final {row['test_acc']:.4f}  best {row['best_test_acc']:.4f}@{row['best_round']:<4d}"
              f" local-view {fmt(row['local_test_acc'])}  self {fmt(row['alpha_self_mean'])}  "
              f"{row['median_round_seconds']:.2f}s/round", flush=True)
        if _OUT.value:
            os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
            with open(_OUT.value, "w") as f:
                json.dump({"base": dataclasses.asdict(base), "results": results}, f, indent=2)


if __name__ == "__main__":
    from experiments.run import parse_flags
    app.run(main, flags_parser=parse_flags)
