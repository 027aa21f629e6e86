"""The files a run owns in its workdir, by name, and the atomic write the writers share.

Names (relative to the workdir):
  config.json      CONFIG_FILE      the configuration that created the workdir
  partition.json   PARTITION_FILE   the clients' examples (data/partition_file.py writes it)
  metrics.jsonl    METRICS_JSONL    one JSON object per evaluated round
  metrics.csv      METRICS_CSV      the same rows, scalar columns only
  summary.json     SUMMARY_FILE     written when the run ends
  <export>.npz                      arrays an algorithm exports (export_file_names)
  checkpoints/     CHECKPOINT_DIR   orbax checkpoints
  tb/              TB_DIR           TensorBoard event files
  plots/           PLOTS_DIR        experiments.plots' default output

A file written whole goes through a temporary file beside it (temporary_name) and
os.replace, so an interruption leaves the old file or the new one, never half of either.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO

from pfedla_jax.algorithms import algorithm_class, algorithm_names

CONFIG_FILE = "config.json"
PARTITION_FILE = "partition.json"  # the name data/partition_file.py gives it (FILE_NAME)
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
TB_DIR = "tb"
PLOTS_DIR = "plots"
# What --overwrite removes (with export_file_names and the temporary files of all of them).
OUTPUT_FILES = (METRICS_JSONL, METRICS_CSV, SUMMARY_FILE, CONFIG_FILE, PARTITION_FILE)
OUTPUT_DIRS = (CHECKPOINT_DIR, TB_DIR, PLOTS_DIR)


def export_file_names() -> list[str]:
    """'<export_name>.npz' of every registered algorithm that exports arrays, sorted: the
    files a fresh start or --overwrite removes whichever algorithm wrote them."""
    return sorted({f"{algorithm_class(n).export_name}.npz" for n in algorithm_names()
                   if algorithm_class(n).export_name})


def temporary_name(name: str) -> str:
    """The temporary file an atomic write of `name` goes through (x.npz: x.tmp.npz, as
    np.savez appends .npz to a name without it; anything else: name + '.tmp')."""
    return name[: -len(".npz")] + ".tmp.npz" if name.endswith(".npz") else name + ".tmp"


def replace_file(path: str, write: Callable[[IO[str]], None]) -> None:
    """Writes the text file `path` atomically: `write(f)` fills a temporary file (opened with
    newline='' so csv controls line ends) that then replaces `path`.

    Raises:
      OSError: the temporary file cannot be written or renamed (`path` is left as it was).
    """
    tmp = temporary_name(path)
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)


def remove_if_present(path: str) -> None:
    """Removes the file `path` if it exists."""
    if os.path.exists(path):
        os.remove(path)
