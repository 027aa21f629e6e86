"""WORKDIR/<export_name>.npz: the arrays an algorithm exports at every evaluated round.

The file name is the algorithm's `export_name` (pFedLA: alpha.npz); an algorithm without one
writes no file. Keys: 'round' [E], each exported array stacked over the E evaluations
[E, ...], plus the algorithm's constant metadata (pFedLA: round [E], alpha [E, N, L, N],
retained [E, N, L], layers [L]).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from pfedla_jax.training.workdir import files


class ExportLog:
    """The rows of WORKDIR/<name>.npz, kept in memory and written whole.

    Rewritten atomically (np.savez to <name>.tmp.npz, then os.replace) at checkpoints and at
    the end when rows were added, and on resume when rows were dropped (a resume that keeps
    no row removes the file).

    Args:
      workdir: the run directory.
      name: the file's name without .npz; None = the algorithm exports nothing (no-op).
      metadata: constant arrays stored beside.
      keep: on resume, a predicate on the rounds of the existing file to keep (None: fresh).

    Raises:
      OSError: the file cannot be read or written.
    """

    def __init__(self, workdir: str, name: str | None, metadata: dict,
                 keep: Callable[[int], bool] | None = None):
        self.path = os.path.join(workdir, f"{name}.npz") if name else None
        self.metadata = metadata
        self.rounds: list[int] = []
        self.arrays: dict[str, list[np.ndarray]] = {}
        self._saved = 0  # rows in the file (rows are only appended: same count, same file)
        if self.path and keep is not None and os.path.exists(self.path):
            with np.load(self.path) as z:
                names = [k for k in z.files if k != "round" and k not in metadata]
                self._saved = len(z["round"])
                for i, r in enumerate(z["round"]):
                    if keep(int(r)):
                        self.append(int(r), {k: z[k][i] for k in names})
            self.save()  # rows dropped by the resume leave the file now, not at a checkpoint

    def append(self, round_done: int, arrays: dict[str, np.ndarray]) -> None:
        """Adds the row of `round_done` (in memory; save writes it)."""
        if self.path is None or not arrays:
            return
        self.rounds.append(round_done)
        for k, v in arrays.items():
            self.arrays.setdefault(k, []).append(np.asarray(v))

    def save(self) -> None:
        """Writes the rows to the file when their number changed since the last save."""
        if self.path is None or len(self.rounds) == self._saved:
            return
        if not self.rounds:  # a resume that kept no row
            os.remove(self.path)
        else:
            tmp = files.temporary_name(self.path)
            np.savez(tmp, round=np.array(self.rounds),
                     **{k: np.stack(v) for k, v in self.arrays.items()}, **self.metadata)
            os.replace(tmp, self.path)  # never a half-written file
        self._saved = len(self.rounds)
