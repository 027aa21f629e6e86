"""WORKDIR/<export_name>.npz: the arrays an algorithm exports at every evaluated round.

The file name is the algorithm's `export_name` (pFedLA: alpha.npz); an algorithm without one
writes no file. Keys: 'round' [E], each exported array stacked over the E evaluations
[E, ...], plus the algorithm's constant metadata (pFedLA: round [E], alpha [E, N, L, N],
retained [E, N, L], layers [L]).

The rows are not kept in memory (pFedLA's α at N = 1,000 is 40 MB per evaluation): each
evaluation's arrays are appended to one raw file per key in WORKDIR/.<export_name>.rows/, and
the .npz is written from those files a row at a time (the same members and .npy format as
`np.savez`). The rows folder is scratch: rebuilt from the .npz when a run starts, removed when
it closes.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Callable, Iterator

import numpy as np

from pfedla_jax.training.workdir import files

_CHUNK = 1 << 24  # bytes copied at a time


def rows_folder_name(name: str) -> str:
    """The scratch folder of export `name`'s rows (relative to the workdir)."""
    return f".{name}.rows"


def _npz_members(path: str) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]


def _iter_rows(path: str, key: str) -> Iterator[np.ndarray]:
    """The rows of array `key` of the .npz `path`, one at a time (never the whole array)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if fortran or not shape:
            raise ValueError(f"{path}: {key} is not a C-ordered stack of rows")
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        for _ in range(shape[0]):
            yield np.frombuffer(f.read(row_bytes), dtype=dtype).reshape(row_shape)


def _write_header(f, header: dict) -> None:
    """The .npy header np.save writes: format 1.0, or 2.0 when 1.0 cannot hold it."""
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:
        np.lib.format.write_array_header_2_0(f, header)


class ExportLog:
    """The rows of WORKDIR/<name>.npz, appended to scratch files on disk and written whole.

    Rewritten atomically (to <name>.tmp.npz, then os.replace) at checkpoints and at the end
    when rows were added, and on resume when rows were dropped (a resume that keeps no row
    removes the file). Memory: one row at a time.

    Args:
      workdir: the run directory.
      name: the file's name without .npz; None = the algorithm exports nothing (no-op).
      metadata: constant arrays stored beside.
      keep: on resume, a predicate on the rounds of the existing file to keep (None: fresh).

    Raises:
      OSError: the file or the rows folder cannot be read or written.
    """

    def __init__(self, workdir: str, name: str | None, metadata: dict,
                 keep: Callable[[int], bool] | None = None):
        self.path = os.path.join(workdir, f"{name}.npz") if name else None
        self.rows_dir = os.path.join(workdir, rows_folder_name(name)) if name else None
        self.metadata = metadata
        self.rounds: list[int] = []
        self.rows: dict[str, tuple[tuple[int, ...], np.dtype]] = {}  # key -> (row shape, dtype)
        self._saved = 0  # rows in the file (rows are only appended: same count, same file)
        if self.path is None:
            return
        shutil.rmtree(self.rows_dir, ignore_errors=True)
        os.makedirs(self.rows_dir)
        if keep is not None and os.path.exists(self.path):
            with np.load(self.path) as z:
                stored_rounds = [int(r) for r in z["round"]]
            keys = [k for k in _npz_members(self.path) if k != "round" and k not in metadata]
            self._saved = len(stored_rounds)
            kept = [keep(r) for r in stored_rounds]
            for k in keys:
                for row, ok in zip(_iter_rows(self.path, k), kept):
                    if ok:
                        self._append_row(k, row)
            self.rounds = [r for r, ok in zip(stored_rounds, kept) if ok]
            self.save()  # rows dropped by the resume leave the file now, not at a checkpoint

    def _append_row(self, key: str, row: np.ndarray) -> None:
        row = np.ascontiguousarray(row)
        shape_dtype = self.rows.setdefault(key, (row.shape, row.dtype))
        if shape_dtype != (row.shape, row.dtype):
            raise ValueError(f"export {key!r}: a row of shape {row.shape} {row.dtype} after rows of "
                             f"{shape_dtype[0]} {shape_dtype[1]}")
        with open(os.path.join(self.rows_dir, f"{key}.bin"), "ab") as f:
            f.write(row.tobytes())

    def append(self, round_done: int, arrays: dict[str, np.ndarray]) -> None:
        """Adds the row of `round_done` (to the scratch files; save writes the .npz)."""
        if self.path is None or not arrays:
            return
        for k, v in arrays.items():
            self._append_row(k, np.asarray(v))
        self.rounds.append(round_done)

    def _write_npz(self, path: str) -> None:
        """The .npz of the rows so far, written a row at a time (np.savez's layout)."""
        count = len(self.rounds)
        with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("round.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.array(self.rounds), allow_pickle=False)
            for key, (shape, dtype) in self.rows.items():
                full = (count, *shape)
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                          "shape": full}
                with zf.open(f"{key}.npy", "w", force_zip64=True) as f, \
                        open(os.path.join(self.rows_dir, f"{key}.bin"), "rb") as rows:
                    _write_header(f, header)
                    left = count * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    while left:
                        chunk = rows.read(min(_CHUNK, left))
                        if not chunk:
                            raise OSError(f"{self.rows_dir}/{key}.bin ends before its {count} rows")
                        f.write(chunk)
                        left -= len(chunk)
            for key, value in self.metadata.items():
                with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)

    def save(self) -> None:
        """Writes the rows to the file when their number changed since the last save."""
        if self.path is None or len(self.rounds) == self._saved:
            return
        if not self.rounds:  # a resume that kept no row
            os.remove(self.path)
        else:
            tmp = files.temporary_name(self.path)
            try:
                self._write_npz(tmp)
                os.replace(tmp, self.path)  # never a half-written file
            except OSError:
                files.remove_if_present(tmp)  # (on a full disk, the space it took)
                raise
        self._saved = len(self.rounds)

    def close(self) -> None:
        """Removes the scratch rows (the .npz holds every saved row)."""
        if self.rows_dir is not None:
            shutil.rmtree(self.rows_dir, ignore_errors=True)
