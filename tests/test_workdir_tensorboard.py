"""training/workdir/tensorboard.py: event files as TensorBoard reads them, and their rewrite
on resume."""

import pytest

from pfedla_jax.training.workdir import tensorboard as tb

pytest.importorskip("tensorboardX")


def test_event_files_are_tensorboards_format(tmp_path):
    """EventFile writes the records tensorboardX's SummaryWriter writes (byte for byte), and
    read_scalar_events reads both, stopping at a record cut by an interruption."""
    from tensorboardX import SummaryWriter

    scalars = [("round/train_loss", 2.25, 1, 1000.5), ("eval/test_acc", 0.125, 2, 1001.25),
               ("eval/alpha_self/FC1", 0.5, 2, 1002.0)]
    ref = SummaryWriter(str(tmp_path / "ref"))
    for tag, value, step, wall in scalars:
        ref.add_scalar(tag, value, step, walltime=wall)
    ref.close()
    (ours_dir := tmp_path / "ours").mkdir()
    ours = tb.EventFile(str(ours_dir / "events.out.tfevents.0000000001.host"))
    for tag, value, step, wall in scalars:
        ours.scalar(tag, value, step, wall)
    ours.close()
    expected = [(tag, step, value, wall) for tag, value, step, wall in scalars]
    assert tb.read_scalar_events(str(tmp_path / "ref")) == expected
    assert tb.read_scalar_events(str(ours_dir)) == expected
    ref_bytes = (tmp_path / "ref" / tb.event_files(str(tmp_path / "ref"))[0]).read_bytes()
    our_bytes = (ours_dir / tb.event_files(str(ours_dir))[0]).read_bytes()
    first = lambda b: 16 + int.from_bytes(b[:8], "little")  # after the file_version record
    assert our_bytes[first(our_bytes):] == ref_bytes[first(ref_bytes):]
    # a record cut short: it and what follows are not read; the file's other events are
    path = ours_dir / tb.event_files(str(ours_dir))[0]
    path.write_bytes(our_bytes[:-3])
    assert tb.read_scalar_events(str(ours_dir)) == expected[:2]


def test_tags_are_stored_as_summary_writer_stores_them(tmp_path):
    """A name with characters TensorBoard does not allow is stored as SummaryWriter stores it."""
    from tensorboardX import SummaryWriter

    names = ["eval/odd key(x)", "/round/a:b", "eval/ok-1.2_x/Y"]
    ref = SummaryWriter(str(tmp_path / "ref"))
    for i, name in enumerate(names):
        ref.add_scalar(name, 1.0, i, walltime=5.0)
    ref.close()
    stored = [tag for tag, _, _, _ in tb.read_scalar_events(str(tmp_path / "ref"))]
    assert stored == [tb.stored_tag(n) for n in names] == ["eval/odd_key_x_", "round/a_b", "eval/ok-1.2_x/Y"]


def test_event_log_rewrites_events_on_resume(tmp_path):
    """Resuming after round 2 keeps per-round events up to 2 with their wall times, and writes
    evaluation events from the kept rows only (wall time kept where the event existed), in
    one file ordered by (step, wall time)."""
    d = tmp_path / "tb"
    first = tb.EventLog(str(d), write=True)
    for r in (1, 2, 3):
        first.add(tb.ROUND_PREFIX, {"train_loss": 1.0 / r}, r)
        first.add(tb.EVAL_PREFIX, {"test_acc": r / 10}, r)
    first.close()
    walls = {(tag, step): wall for tag, step, _, wall in tb.read_scalar_events(str(d))}
    tb.EventLog(str(d), write=False, resume_round=2, evaluations=[(2, {"test_acc": 0.25})]).close()
    got = tb.read_scalar_events(str(d))
    assert [(tag, step, value) for tag, step, value, _ in got] == [
        ("round/train_loss", 1, 1.0), ("round/train_loss", 2, 0.5), ("eval/test_acc", 2, 0.25)]
    assert all(wall == walls[(tag, step)] for tag, step, _, wall in got)
    assert len(tb.event_files(str(d))) == 1 and sorted(p.name for p in d.iterdir()) == tb.event_files(str(d))
    # a fresh run removes an earlier attempt's events; the event file appears at its first event
    fresh = tb.EventLog(str(d), write=True)
    assert not d.exists()
    fresh.add(tb.ROUND_PREFIX, {"train_loss": 2.0}, 1)
    fresh.sync()
    assert [e[:3] for e in tb.read_scalar_events(str(d))] == [("round/train_loss", 1, 2.0)]
    fresh.close()
