"""training/workdir/metrics.py (with exports.py and tensorboard.py as a resume drives them):
on resume, every file keeps exactly the rows of the resumed run, at once."""

import collections
import json
import os

import numpy as np
import pytest

from pfedla_jax.training import workdir as wd
from pfedla_jax.training.workdir import tensorboard as tb
from pfedla_jax.training.workdir.exports import ExportLog
from pfedla_jax.training.workdir.metrics import MetricsWriter


def _write_attempt(workdir, rounds, eval_every, start=0, keep=None, resume_round=None,
                   tensorboard=True):
    """What the loop writes for rounds start+1..rounds (no training): returns the writer."""
    writer = MetricsWriter(str(workdir), keep, resume_round, tensorboard)
    exports = ExportLog(str(workdir), "alpha", {"layers": np.array(["a"])}, keep)
    for t in range(start + 1, rounds + 1):
        writer.round_scalars(t, {"train_loss": 1.0 / t})
        if t % eval_every == 0 or t == rounds:
            writer.evaluation({"round": t, "test_acc": t / 10, "test_acc_per_client": [t / 10]})
            exports.append(t, {"alpha": np.full((2,), float(t))})
    exports.save()
    writer.close()
    return writer


def _steps(workdir):
    """{tag: [steps]} of the workdir's TensorBoard events (every occurrence)."""
    out = collections.defaultdict(list)
    for tag, step, _, _ in tb.read_scalar_events(os.path.join(workdir, "tb")):
        out[tag].append(step)
    return {k: sorted(v) for k, v in out.items()}


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["round"] for line in f]


def test_resume_rewrites_events_exports_and_rows_at_once(tmp_path):
    """Extending a finished run drops its final row everywhere as soon as the run resumes
    (TensorBoard, metrics, CSV, alpha), before any new round; an interrupted attempt's
    events past the checkpoint go too, also when TensorBoard is off for the resumed run."""
    pytest.importorskip("tensorboardX")
    w = str(tmp_path)
    _write_attempt(w, rounds=5, eval_every=2)  # a finished 5-round run: evaluations 2, 4, 5
    assert _steps(w)["eval/test_acc"] == [2, 4, 5]
    keep = lambda r: wd.kept_round(r, resume_round=5, eval_every=2, rounds=8)
    # --rounds=8 resumes after round 5; it is interrupted before writing anything
    writer = MetricsWriter(w, keep, 5, tensorboard=True)
    ExportLog(w, "alpha", {"layers": np.array(["a"])}, keep)
    writer.close()
    assert _rows(w) == [2, 4]
    assert [int(r.split(",")[0]) for r in (tmp_path / "metrics.csv").read_text().split()[1:]] == [2, 4]
    assert np.load(tmp_path / "alpha.npz")["round"].tolist() == [2, 4]
    assert _steps(w) == {"eval/test_acc": [2, 4], "round/train_loss": [1, 2, 3, 4, 5]}
    assert len(tb.event_files(os.path.join(w, "tb"))) == 1  # a run found again adds no file
    # the extension runs rounds 6..8 but is killed after round 8's evaluation, before its
    # checkpoint (the last is round 6): the resume drops round 7 and 8's events
    _write_attempt(w, rounds=8, eval_every=2, start=5, keep=keep, resume_round=5)
    assert _steps(w)["eval/test_acc"] == [2, 4, 6, 8]
    keep6 = lambda r: wd.kept_round(r, resume_round=6, eval_every=2, rounds=8)
    MetricsWriter(w, keep6, 6, tensorboard=False).close()
    ExportLog(w, "alpha", {"layers": np.array(["a"])}, keep6)
    assert _steps(w) == {"eval/test_acc": [2, 4, 6], "round/train_loss": [1, 2, 3, 4, 5, 6]}
    assert _rows(w) == [2, 4, 6]
    assert np.load(tmp_path / "alpha.npz")["round"].tolist() == [2, 4, 6]
    # an extension of a 1-round run keeps no alpha row: the file goes
    w1 = str(tmp_path / "one")
    os.makedirs(w1)
    _write_attempt(w1, rounds=1, eval_every=2)
    ExportLog(w1, "alpha", {}, lambda r: wd.kept_round(r, resume_round=1, eval_every=2, rounds=3))
    assert not os.path.exists(os.path.join(w1, "alpha.npz"))


def test_metrics_files_format(tmp_path):
    """metrics.jsonl: json.dumps of each row, one a line; metrics.csv: the first row's int and
    float columns (bools, lists and None left out), '\\r\\n' line ends as csv writes them. A
    fresh writer discards an earlier attempt's rows, summary.json and export files."""
    for name in ("summary.json", "alpha.npz", "metrics.jsonl"):
        (tmp_path / name).write_text("old")
    w = MetricsWriter(str(tmp_path), tensorboard=False)
    assert [p.name for p in tmp_path.iterdir() if p.name in ("summary.json", "alpha.npz")] == []
    rows = [{"round": 1, "test_acc": 0.5, "ok": True, "per": [0.5], "none": None, "n": 3},
            {"round": 2, "test_acc": 0.75, "ok": False, "per": [0.75], "none": None, "n": 4, "new": 1.0}]
    for r in rows:
        w.evaluation(r)
    w.close()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in rows)
    assert (tmp_path / "metrics.csv").read_bytes() == b"round,test_acc,n\r\n1,0.5,3\r\n2,0.75,4\r\n"
    assert w.records == rows
    # a resume keeps the rows a predicate keeps, rewritten the same way; a cut line ends them
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "te')
    again = MetricsWriter(str(tmp_path), keep=lambda r: r <= 1, resume_round=1, tensorboard=False)
    assert again.records == rows[:1]
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(rows[0]) + "\n"
    assert (tmp_path / "metrics.csv").read_bytes() == b"round,test_acc,n\r\n1,0.5,3\r\n"
    with pytest.raises(ValueError, match="resume_round"):
        MetricsWriter(str(tmp_path), keep=lambda r: True)


def test_metrics_writer_without_tensorboardx(tmp_path, monkeypatch, capsys):
    """In-process: with tensorboardX missing, one warning line; a resumed run's events are left
    as they were (not truncated, nothing added); metrics.jsonl/csv are written as always."""
    pytest.importorskip("tensorboardX")   # to write the first run's events
    first = MetricsWriter(str(tmp_path), tensorboard=True)
    for r in (1, 2):
        first.round_scalars(r, {"train_loss": 1.0 / r})
        first.evaluation({"round": r, "test_acc": 0.5 + r / 10})
    first.close()
    events = {n: (tmp_path / "tb" / n).read_bytes() for n in tb.event_files(str(tmp_path / "tb"))}
    assert len(events) == 1
    capsys.readouterr()

    monkeypatch.setattr(tb, "tensorboardx_available", lambda: False)
    monkeypatch.setattr(tb, "_warned", set())
    resumed = MetricsWriter(str(tmp_path), keep=lambda r: r <= 1, resume_round=1, tensorboard=True)
    resumed.round_scalars(2, {"train_loss": 0.4})
    resumed.evaluation({"round": 2, "test_acc": 0.8})
    resumed.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [tb.TENSORBOARDX_MISSING + f"; the events already in {tmp_path / 'tb'} are left as they were"]
    assert {n: (tmp_path / "tb" / n).read_bytes() for n in tb.event_files(str(tmp_path / "tb"))} == events
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"round": 1, "test_acc": 0.6}, {"round": 2, "test_acc": 0.8}]
    # a fresh writer in the same process does not warn again
    (tmp_path / "other").mkdir()
    MetricsWriter(str(tmp_path / "other"), tensorboard=True).close()
    assert capsys.readouterr().err == ""
