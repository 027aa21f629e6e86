"""training/workdir/exports.py: WORKDIR/<export_name>.npz, the arrays exported at evaluations."""

import os

import numpy as np

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
    assert sorted(os.listdir(tmp_path)) == ["alpha.npz"]  # no temporary file left
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
