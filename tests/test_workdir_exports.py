"""training/workdir/exports.py: WORKDIR/<export_name>.npz, the arrays exported at evaluations."""

import os

import numpy as np
import pytest

from pfedla_jax.training.workdir.exports import ExportLog


def test_export_log_stacks_rows_and_writes_only_when_rows_change(tmp_path):
    log = ExportLog(str(tmp_path), "alpha", {"layers": np.array(["FC1", "FC2"])})
    log.save()
    assert not (tmp_path / "alpha.npz").exists()  # no row: no file
    for r in (2, 4):
        log.append(r, {"alpha": np.full((3, 2, 3), float(r)), "retained": np.ones((3, 2)) * r})
    log.save()
    with np.load(tmp_path / "alpha.npz") as z:
        assert sorted(z.files) == ["alpha", "layers", "retained", "round"]
        assert z["round"].tolist() == [2, 4] and z["alpha"].shape == (2, 3, 2, 3)
        assert z["layers"].tolist() == ["FC1", "FC2"] and z["retained"][1, 0, 0] == 4.0
    before = os.stat(tmp_path / "alpha.npz").st_mtime_ns
    os.utime(tmp_path / "alpha.npz", ns=(0, 0))
    log.save()  # no new row: the file is not rewritten
    assert os.stat(tmp_path / "alpha.npz").st_mtime_ns == 0 != before
    assert sorted(os.listdir(tmp_path)) == [".alpha.rows", "alpha.npz"]  # no temporary file left
    # a resume keeps the rows the predicate keeps and rewrites the file at once
    resumed = ExportLog(str(tmp_path), "alpha", {"layers": np.array(["FC1", "FC2"])}, keep=lambda r: r <= 2)
    assert resumed.rounds == [2]
    with np.load(tmp_path / "alpha.npz") as z:
        assert z["round"].tolist() == [2] and z["alpha"].shape == (1, 3, 2, 3)


def test_an_algorithm_without_exports_writes_nothing(tmp_path):
    log = ExportLog(str(tmp_path), None, {}, keep=lambda r: True)
    log.append(1, {"alpha": np.ones(2)})
    log.save()
    assert os.listdir(tmp_path) == [] and log.rounds == []


def test_the_file_equals_np_savez_and_rows_stay_on_disk(tmp_path):
    """The .npz written a row at a time holds what np.savez of the stacked rows holds (the
    same members, dtypes, shapes and values), and no row is kept in memory; a resume streams
    the kept rows back; close removes the scratch rows."""
    rng = np.random.default_rng(0)
    rows = [(r, {"alpha": rng.random((4, 3, 4), np.float32), "retained": rng.random((4, 3)) > 0.5})
            for r in (1, 2, 3)]
    meta = {"layers": np.array(["a", "b", "c"])}
    log = ExportLog(str(tmp_path), "alpha", meta)
    for r, arrays in rows:
        log.append(r, arrays)
    assert not hasattr(log, "arrays")   # rows live in WORKDIR/.alpha.rows, not in memory
    log.save()
    np.savez(tmp_path / "expected.npz", round=np.array([1, 2, 3]),
             alpha=np.stack([a["alpha"] for _, a in rows]),
             retained=np.stack([a["retained"] for _, a in rows]), **meta)
    with np.load(tmp_path / "alpha.npz") as got, np.load(tmp_path / "expected.npz") as want:
        assert got.files == want.files
        for k in want.files:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    log.close()
    assert not (tmp_path / ".alpha.rows").exists()
    resumed = ExportLog(str(tmp_path), "alpha", meta, keep=lambda r: r != 2)
    resumed.append(4, rows[0][1])
    resumed.save()
    with np.load(tmp_path / "alpha.npz") as z:
        assert z["round"].tolist() == [1, 3, 4]
        np.testing.assert_array_equal(z["alpha"][1], rows[2][1]["alpha"])
        np.testing.assert_array_equal(z["alpha"][2], rows[0][1]["alpha"])
    with pytest.raises(ValueError, match="a row of shape"):
        resumed.append(5, {"alpha": np.ones((2, 2), np.float32), "retained": rows[0][1]["retained"]})
    resumed.close()
