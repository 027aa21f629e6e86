"""Multi-seed result tables: mean ± sample std over seeds, final round and best round.

"final" is the accuracy at the last round; "best" is the best evaluated round of each seed
(an optimistic number: it selects on the test set, as many FL papers do). Both are shown,
labelled, so a reader can tell them apart.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

COLUMNS = (("test_acc", "final test_acc"), ("best_test_acc", "best-round test_acc"),
           ("local_test_acc", "final, after local training"))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregates per-seed rows {'name', 'seed', 'test_acc', 'best_test_acc', ...} by name.

    Returns one dict per name (in first-seen order) with 'seeds' and, per column present
    in every seed's row, '<column>_mean', '<column>_std' and '<column>_per_seed'.
    """
    names = list(dict.fromkeys(r["name"] for r in rows))
    out = []
    for name in names:
        mine = [r for r in rows if r["name"] == name]
        entry: dict[str, Any] = {"name": name, "seeds": [r["seed"] for r in mine]}
        for key, _ in COLUMNS:
            vals = [r.get(key) for r in mine]
            if vals and all(v is not None for v in vals):
                entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std(vals)
                entry[f"{key}_per_seed"] = vals
        out.append(entry)
    return out


def format_seed_table(table: Sequence[dict[str, Any]], percent: bool = True) -> str:
    """A Markdown table: one row per configuration, mean ± std per column."""
    scale = 100.0 if percent else 1.0
    cols = [(k, label) for k, label in COLUMNS if any(f"{k}_mean" in e for e in table)]
    lines = ["| run | seeds | " + " | ".join(label for _, label in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for e in table:
        cells = []
        for k, _ in cols:
            cells.append(f"{scale * e[k + '_mean']:.2f} ± {scale * e[k + '_std']:.2f}"
                         if f"{k}_mean" in e else "–")
        lines.append(f"| {e['name']} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
