"""Tests for pfedla_jax.data.partition: every scheme through make_partition /
max_samples_per_client (the registry itself: test_partition_registry.py)."""

import math
import re

import numpy as np
import pytest

from pfedla_jax.data import make_partition, max_samples_per_client
from pfedla_jax.errors import UserInputError


def _labels(per_class, num_classes=10, seed=0):
    """Shuffled labels with `per_class` examples of each class (an int or a list)."""
    counts = np.broadcast_to(per_class, (num_classes,))
    lab = np.repeat(np.arange(num_classes), counts)
    return lab[np.random.default_rng(seed).permutation(lab.size)].astype(np.int32)


LAB = _labels(700)  # A 1/10-size Fashion-MNIST: 10 classes x 700.


def _expected_train(n, frac=0.7):
    """The documented per-class rule, written independently of the implementation."""
    t = math.floor(frac * n + 0.5 + 1e-9)
    return min(max(t, 1), n - 1) if n >= 2 else t


def _expected_client_train(n, frac=0.7):
    """A client whose classes are all single examples is split as a whole (documented)."""
    return min(max(math.floor(frac * n + 0.5 + 1e-9), 1), n - 1)


def check_partition(p, labels, num_clients, num_classes=10, frac=0.7, both_per_class=False):
    """Checks every invariant all schemes share; returns per-client class counts [N, C].

    Every client has >= 1 train and >= 1 test example; with `both_per_class`, every
    class it holds is in both splits (the k-class schemes).
    """
    assert p.num_clients == num_clients
    assert len(p.test_indices) == len(p.client_classes) == num_clients
    all_idx = np.concatenate(p.train_indices + p.test_indices)
    assert all_idx.dtype == np.int64
    assert len(np.unique(all_idx)) == all_idx.size, "an example is shared"
    assert all_idx.min() >= 0 and all_idx.max() < labels.size
    hist = np.zeros((num_clients, num_classes), dtype=np.int64)
    for i in range(num_clients):
        tr, te = p.train_indices[i], p.test_indices[i]
        h_tr = np.bincount(labels[tr], minlength=num_classes)
        h_te = np.bincount(labels[te], minlength=num_classes)
        h = h_tr + h_te
        hist[i] = h
        assert np.array_equal(p.client_classes[i], np.flatnonzero(h))
        assert tr.size >= 1 and te.size >= 1, f"client {i}: {tr.size} train, {te.size} test"
        if both_per_class:
            assert np.array_equal(h_tr > 0, h > 0) and np.array_equal(h_te > 0, h > 0)
        if h.max() >= 2:
            # Stratified split: per class, the documented train count.
            assert np.array_equal(h_tr, [_expected_train(n, frac) for n in h])
        else:
            assert tr.size == _expected_client_train(h.sum(), frac)
        # Shuffled, not grouped by class (a sorted run would have few label changes).
        if tr.size > 50 and np.count_nonzero(h) > 1:
            assert np.count_nonzero(np.diff(labels[tr])) > 0.3 * tr.size
    return hist


# ----------------------------------------------------------------------------- noniid1


def test_noniid1_default_is_max_and_classes_equal():
    p = make_partition(LAB, 10, 10, "noniid1", classes_per_client=4, seed=1)
    hist = check_partition(p, LAB, 10)
    assert p.samples_per_client == 700
    assert max_samples_per_client(LAB, 10, 10, "noniid1", classes_per_client=4) == 700
    for h in hist:
        assert np.count_nonzero(h) == 4
        assert set(h[h > 0]) == {175}
    assert np.bincount(np.concatenate(p.client_classes), minlength=10).max() <= 4  # ceil(40/10)
    # 175 per class -> round(122.5) = 123 train, 52 test; identical for every client.
    assert {len(t) for t in p.train_indices} == {4 * 123}
    assert {len(t) for t in p.test_indices} == {4 * 52}
    with pytest.raises(UserInputError, match="largest feasible samples_per_client is 700"):
        make_partition(LAB, 10, 10, "noniid1", classes_per_client=4, samples_per_client=704)
    # Only advice that is then accepted: 704 exceeds the largest feasible size.
    with pytest.raises(UserInputError,
                       match="not a multiple of classes_per_client=4; use 700$"):
        make_partition(LAB, 10, 10, "noniid1", classes_per_client=4, samples_per_client=701)
    with pytest.raises(UserInputError,
                       match="not a multiple of classes_per_client=4; use 696 or 700$"):
        make_partition(LAB, 10, 10, "noniid1", classes_per_client=4, samples_per_client=698)


def test_noniid1_smaller_size_and_small_counts():
    p = make_partition(LAB, 10, 10, "noniid1", classes_per_client=4, samples_per_client=8)
    hist = check_partition(p, LAB, 10)  # 2 per class: one train, one test each.
    assert set(hist[hist > 0]) == {2}
    assert all(len(t) == 4 for t in p.train_indices)


@pytest.mark.parametrize("num_clients,expected", [(10, 7000), (100, 700)])
def test_noniid1_fmnist_default_sizes(num_clients, expected):
    labels = _labels(7000)
    got = max_samples_per_client(labels, 10, num_clients, "noniid1", classes_per_client=4)
    assert got == expected
    p = make_partition(labels, 10, num_clients, "noniid1", classes_per_client=4)
    assert p.samples_per_client == expected
    assert {len(a) + len(b) for a, b in zip(p.train_indices, p.test_indices)} == {expected}


def test_noniid1_cifar100_like_sizes():
    labels = _labels(600, 100)
    # 10 x 12 = 120 uses over 100 classes: 20 classes used twice -> 300 per class.
    assert max_samples_per_client(labels, 100, 10, "noniid1", classes_per_client=12) == 12 * 300
    assert max_samples_per_client(labels, 100, 100, "noniid1", classes_per_client=12) == 12 * 50


def test_noniid1_balanced_uses_and_plentiful_classes_get_extra():
    p = make_partition(LAB, 10, 7, "noniid1", classes_per_client=3, seed=5)
    uses = np.bincount(np.concatenate(p.client_classes), minlength=10)
    assert uses.sum() == 21 and uses.max() == 3 and uses.min() == 2  # floor/ceil(21/10)
    # Classes 5..9 have twice the data: the 5 extra uses of 15 over 10 classes go there.
    labels = _labels([100] * 5 + [200] * 5)
    for seed in range(3):
        p = make_partition(labels, 10, 3, "noniid1", classes_per_client=5, seed=seed)
        uses = np.bincount(np.concatenate(p.client_classes), minlength=10)
        assert np.array_equal(uses, [1] * 5 + [2] * 5)
        assert p.samples_per_client == 500
        check_partition(p, labels, 3)


# ----------------------------------------------------------------------------- noniid2


@pytest.mark.parametrize("num_clients,d,share", [(10, 2, 0.8), (7, 3, 0.6), (30, 1, 0.5)])
def test_noniid2_shares(num_clients, d, share):
    p = make_partition(LAB, 10, num_clients, "noniid2", dominant_classes=d,
                       dominant_share=share, seed=2)
    hist = check_partition(p, LAB, num_clients)
    s = p.samples_per_client
    assert s == max_samples_per_client(LAB, 10, num_clients, "noniid2", dominant_classes=d,
                                       dominant_share=share, seed=2)
    assert (hist.sum(1) == s).all()
    assert (hist > 0).all()  # Every client holds every class.
    for h in hist:
        top = np.sort(h)[::-1]
        dom = top[:d]
        assert dom.max() - dom.min() <= 1  # Equal up to one sample.
        assert len(set(top[d:])) == 1  # The other classes: exactly equal.
        assert share * s - 0.5 <= dom.sum() < share * s + 0.5 + (10 - d)
    # One more sample per client is infeasible.
    with pytest.raises(UserInputError, match=f"largest feasible samples_per_client is {s}"):
        make_partition(LAB, 10, num_clients, "noniid2", dominant_classes=d, dominant_share=share,
                       samples_per_client=s + 1, seed=2)


def test_noniid2_fmnist_sizes_match_noniid1():
    labels = _labels(7000)
    # (clients, size, dominant count, other count): at 700, R = 560 and 140 / 8 = 17.5,
    # so the other classes get 17 and the 4 left over go to the dominant pair.
    for n, s, dom, other in [(10, 7000, 2800, 175), (100, 700, 282, 17)]:
        p = make_partition(labels, 10, n, "noniid2")
        assert p.samples_per_client == s
        for i in (0, n - 1):
            h = np.sort(np.bincount(labels[p.client_indices(i)], minlength=10))
            assert np.array_equal(h, [other] * 8 + [dom] * 2)


def test_noniid2_too_small():
    with pytest.raises(UserInputError,
                       match="too small for all 10 classes.*smallest valid samples_per_client is"):
        make_partition(LAB, 10, 10, "noniid2", samples_per_client=20)


# ----------------------------------------------------------------------------- dirichlet / iid


def test_dirichlet_whole_pool_min_size_and_skew():
    labels = _labels([300, 500, 700, 100, 400, 600, 200, 800, 350, 450])
    p = make_partition(labels, 10, 20, "dirichlet", dirichlet_alpha=0.3, min_client_size=40, seed=4)
    hist = check_partition(p, labels, 20)
    assert p.samples_per_client is None
    assert hist.sum() == labels.size  # Whole pool used.
    assert hist.sum(1).min() >= 40
    assert np.array_equal(hist.sum(0), np.bincount(labels))
    skew = np.mean(hist.max(1) / hist.sum(1))
    q = make_partition(labels, 10, 20, "dirichlet", dirichlet_alpha=1000.0, seed=4)
    hist_q = check_partition(q, labels, 20)
    assert skew > 0.4 > np.mean(hist_q.max(1) / hist_q.sum(1))


def test_dirichlet_target_size_is_mean():
    p = make_partition(LAB, 10, 10, "dirichlet", samples_per_client=300, seed=1)
    hist = check_partition(p, LAB, 10)
    assert p.samples_per_client == 300 and hist.sum() == 3000
    assert len(set(hist.sum(1))) > 1  # Sizes vary.
    assert max_samples_per_client(LAB, 10, 10, "dirichlet") == 700
    with pytest.raises(UserInputError, match="largest feasible samples_per_client is 700"):
        make_partition(LAB, 10, 10, "dirichlet", samples_per_client=701)


def test_dirichlet_impossible_min_size_fails():
    with pytest.raises(UserInputError, match="after 1000 draws with alpha=0.01"):
        make_partition(LAB, 10, 50, "dirichlet", dirichlet_alpha=0.01, min_client_size=100)
    with pytest.raises(UserInputError, match="need 7010 examples but the pool has 7000"):
        make_partition(LAB, 10, 701, "dirichlet", min_client_size=10)


def test_iid():
    p = make_partition(LAB, 10, 9, "iid", seed=3)
    hist = check_partition(p, LAB, 9)
    assert p.samples_per_client == 777 and (hist.sum(1) == 777).all()
    assert hist.min() > 40  # Every class present in roughly its 10% share.
    with pytest.raises(UserInputError, match="largest feasible samples_per_client is 777"):
        make_partition(LAB, 10, 9, "iid", samples_per_client=778)


# ----------------------------------------------------------------------------- common


@pytest.mark.parametrize("scheme,kw", [("noniid1", {"classes_per_client": 3}), ("noniid2", {}),
                                       ("dirichlet", {}), ("iid", {})])
def test_deterministic_by_seed(scheme, kw):
    a, b, c = (make_partition(LAB, 10, 6, scheme, seed=s, **kw) for s in (7, 7, 8))
    for f in ("train_indices", "test_indices", "client_classes"):
        assert all(np.array_equal(x, y) for x, y in zip(getattr(a, f), getattr(b, f)))
    assert not all(np.array_equal(x, y) for x, y in zip(a.train_indices, c.train_indices))


def test_train_fraction():
    p = make_partition(LAB, 10, 10, "noniid1", classes_per_client=2, train_fraction=0.5)
    check_partition(p, LAB, 10, frac=0.5)
    assert all(len(a) == len(b) for a, b in zip(p.train_indices, p.test_indices))
    # Two examples per class: one each side even where rounding would put both on one.
    for frac in (0.1, 0.95):
        p = make_partition(LAB, 10, 10, "noniid1", classes_per_client=2, samples_per_client=4,
                           train_fraction=frac)
        check_partition(p, LAB, 10, frac=frac)
        assert all(len(a) == len(b) == 2 for a, b in zip(p.train_indices, p.test_indices))


@pytest.mark.parametrize(
    "args,kw,match",
    [
        ((10, 10, "noniid3"), {}, "unknown partition scheme 'noniid3'"),
        ((10, 0, "iid"), {}, "num_clients must be an integer >= 1"),
        ((10, 10, "noniid1"), {}, "noniid1 needs classes_per_client"),
        ((10, 10, "noniid1"), {"classes_per_client": 11},
         r"classes_per_client must be an integer in \[1, 10\]"),
        ((10, 10, "noniid1"), {"classes_per_client": 0}, "classes_per_client"),
        ((10, 10, "noniid2"), {"dominant_classes": 10}, "dominant_classes must be"),
        ((10, 10, "noniid2"), {"dominant_classes": 0}, "dominant_classes must be"),
        ((10, 10, "noniid2"), {"dominant_share": 1.0}, r"dominant_share must lie in \(0, 1\)"),
        ((10, 10, "noniid2"), {"dominant_share": 0.0}, r"dominant_share must lie in \(0, 1\)"),
        ((10, 10, "noniid2"), {"dominant_share": 0.1}, "less than their uniform share"),
        ((10, 10, "dirichlet"), {"dirichlet_alpha": 0.0}, "dirichlet_alpha must be > 0"),
        ((10, 10, "dirichlet"), {"dirichlet_alpha": -1.0}, "dirichlet_alpha must be > 0"),
        ((10, 10, "iid"), {"train_fraction": 1.0}, r"train_fraction must lie in \(0, 1\)"),
        ((10, 10, "iid"), {"train_fraction": 0.0}, r"train_fraction must lie in \(0, 1\)"),
        ((10, 10, "iid"), {"samples_per_client": 0}, "samples_per_client must be an integer >= 1"),
        ((5, 10, "iid"), {}, r"labels must lie in \[0, 5\)"),
        ((10, 8000, "iid"), {}, "no samples_per_client is feasible"),
        ((10, 10, "noniid1"), {"classes_per_client": 4, "samples_per_client": 2000},
         "10 clients x 4 classes need 2000 samples of class .* only 700 exist"),
    ],
)
def test_bad_parameters(args, kw, match):
    with pytest.raises(UserInputError, match=match) as e:
        make_partition(LAB, *args, **kw)
    assert "\n" not in str(e.value)


def test_noniid1_infeasible_at_any_size():
    labels = _labels([50] * 9 + [1])
    with pytest.raises(UserInputError, match="class 9 for 2 clients but only 1 examples"):
        make_partition(labels, 10, 20, "noniid1", classes_per_client=1)


# ----------------------------------------------------------------------------- adjacent (Fig. 6)


def test_adjacent_fig6_class_sets_and_overlaps():
    # The paper's Fig. 6 layout: 8 clients, 4 classes each, a sliding window over 10 classes.
    p = make_partition(LAB, 10, 8, "adjacent", classes_per_client=4, seed=3)
    hist = check_partition(p, LAB, 8)
    assert p.scheme == "adjacent"
    for i in range(8):
        want = sorted({(i + j) % 10 for j in range(4)})
        assert p.client_classes[i].tolist() == want
    assert p.client_classes[7].tolist() == [0, 7, 8, 9]  # wraps around
    sets = [set(c.tolist()) for c in p.client_classes]
    for i in range(7):
        assert len(sets[i] & sets[i + 1]) == 3  # adjacent IDs share k - 1 classes
    assert len(sets[0] & sets[2]) == 2 and len(sets[0] & sets[4]) == 0
    # Equal sizes, equal per-class counts. Class uses are 2,2,3,4,4,4,4,4,3,2, so the
    # largest feasible size is 4 * floor(700 / 4) = 700 (4 * 175).
    assert p.samples_per_client == 700
    assert max_samples_per_client(LAB, 10, 8, "adjacent", classes_per_client=4) == 700
    assert (hist.sum(1) == 700).all()
    for h in hist:
        assert set(h[h > 0].tolist()) == {175}
    assert np.array_equal(np.bincount(np.concatenate(p.client_classes), minlength=10),
                          [2, 2, 3, 4, 4, 4, 4, 4, 3, 2])


def test_adjacent_explicit_size_ring_and_determinism():
    p = make_partition(LAB, 10, 12, "adjacent", classes_per_client=3, samples_per_client=90, seed=1)
    hist = check_partition(p, LAB, 12)
    assert (hist.sum(1) == 90).all() and set(hist[hist > 0].tolist()) == {30}
    # More clients than classes: client i and i + C hold the same window.
    assert p.client_classes[10].tolist() == p.client_classes[0].tolist() == [0, 1, 2]
    assert p.client_classes[9].tolist() == [0, 1, 9]
    # Class sets do not depend on the seed; the examples do.
    q = make_partition(LAB, 10, 12, "adjacent", classes_per_client=3, samples_per_client=90, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(p.client_classes, q.client_classes))
    assert not all(np.array_equal(a, b) for a, b in zip(p.train_indices, q.train_indices))
    r = make_partition(LAB, 10, 12, "adjacent", classes_per_client=3, samples_per_client=90, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(p.train_indices, r.train_indices))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"classes_per_client": 4, "samples_per_client": 704},
         ("adjacent: 8 clients x 4 classes need 704 samples of class .* only 700 exist; "
          "the largest feasible samples_per_client is 700")),
        ({"classes_per_client": 4, "samples_per_client": 701},
         "adjacent: samples_per_client=701 is not a multiple of classes_per_client=4; use 700$"),
        ({}, "adjacent needs classes_per_client"),
        ({"classes_per_client": 11}, r"adjacent: classes_per_client must be an integer in \[1, 10\]"),
    ],
)
def test_adjacent_infeasible(kw, match):
    with pytest.raises(UserInputError, match=match) as e:
        make_partition(LAB, 10, 8, "adjacent", **kw)
    assert "\n" not in str(e.value)


def test_adjacent_infeasible_at_any_size():
    labels = _labels([50] * 9 + [0])  # class 9 is empty but client 9 needs it
    with pytest.raises(UserInputError, match="adjacent: 10 clients x 2 classes use class 9"):
        make_partition(labels, 10, 10, "adjacent", classes_per_client=2)
    with pytest.raises(UserInputError, match="adjacent: 10 clients x 2 classes use class 9"):
        max_samples_per_client(labels, 10, 10, "adjacent", classes_per_client=2)


# ----------------------------------------------------------------------------- fig5 (Fig. 5)


@pytest.mark.parametrize("seed", range(6))
def test_fig5_roles(seed):
    # The paper's Fig. 5: 8 clients x 4 classes: a target, a client with the same labels,
    # one sharing 3 classes with it, and 5 others.
    p = make_partition(LAB, 10, 8, "fig5", classes_per_client=4, samples_per_client=200, seed=seed)
    hist = check_partition(p, LAB, 8)
    assert p.scheme == "fig5"
    sets = [set(c.tolist()) for c in p.client_classes]
    assert all(len(s) == 4 for s in sets)
    target = sets[0]
    assert sets[1] == target
    assert len(sets[2] & target) == 3
    assert all(len(s & target) <= 2 for s in sets[3:])
    assert (hist.sum(1) == 200).all() and set(hist[hist > 0].tolist()) == {50}
    again = make_partition(LAB, 10, 8, "fig5", classes_per_client=4, samples_per_client=200, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(p.train_indices, again.train_indices))


def test_fig5_largest_size_and_bad_requests():
    p = make_partition(LAB, 10, 8, "fig5", classes_per_client=4, seed=0)
    assert p.samples_per_client == max_samples_per_client(LAB, 10, 8, "fig5", classes_per_client=4, seed=0)
    for kw in ({"classes_per_client": 9}, {"classes_per_client": 1}):
        with pytest.raises(UserInputError, match="fig5: needs"):
            make_partition(LAB, 10, 8, "fig5", **kw)
    with pytest.raises(UserInputError, match="fig5: needs >= 3 clients"):
        make_partition(LAB, 10, 2, "fig5", classes_per_client=4)


# ----------------------------------------------------------------------------- sizes vs the 70/30 split
# Automatic sizes, smallest sizes and the advice in messages must account for the
# per-client split (every client >= 1 train and >= 1 test example; in the k-class schemes
# every class of a client in both splits).

LAB600 = _labels(600)  # The pool of --dataset=synthetic (600 per class).


def _advised(msg):
    """{parameter: value} of every 'parameter <= value' the message advises."""
    return {k: int(v) for k, v in re.findall(r"(\w+) <= (\d+)", msg)}


@pytest.mark.parametrize("scheme", ["noniid1", "adjacent"])
def test_k_class_no_size_without_test_examples(scheme):
    # 1000 clients x 4 classes on 10 x 600 examples. Each class is used by 400 clients:
    # 1 example each, none left for test. Formerly S = 4 ("the largest the data allows")
    # with 0 test examples per client.
    msg = (rf"{scheme}: 1000 clients x 4 classes use class \d for 400 clients but only 600 "
           r"examples exist, fewer than 2 per client \(one train and one test example\); no "
           r"samples_per_client is feasible; use num_clients <= 750 or classes_per_client <= 3$")
    with pytest.raises(UserInputError, match=msg) as e:
        make_partition(LAB600, 10, 1000, scheme, classes_per_client=4)
    assert "\n" not in str(e.value)
    with pytest.raises(UserInputError, match=msg):
        max_samples_per_client(LAB600, 10, 1000, scheme, classes_per_client=4)
    for s in (4, 8):  # One per class, and the next size: both refused, same advice.
        with pytest.raises(UserInputError, match=msg):
            make_partition(LAB600, 10, 1000, scheme, classes_per_client=4, samples_per_client=s)
    # Every advised value is accepted, at the boundary: the automatic size is exactly 2
    # per class (one train, one test each); one more client or class is refused.
    advice = _advised(str(e.value))
    assert advice == {"num_clients": 750, "classes_per_client": 3}
    for name, value in advice.items():
        kw = {"num_clients": 1000, "classes_per_client": 4, name: value}
        p = make_partition(LAB600, 10, kw["num_clients"], scheme,
                           classes_per_client=kw["classes_per_client"], seed=2)
        k = kw["classes_per_client"]
        assert p.samples_per_client == 2 * k == max_samples_per_client(
            LAB600, 10, kw["num_clients"], scheme, classes_per_client=k)
        hist = check_partition(p, LAB600, kw["num_clients"], both_per_class=True)
        assert set(hist[hist > 0].tolist()) == {2}
        assert {len(t) for t in p.train_indices} == {len(t) for t in p.test_indices} == {k}
        kw[name] = value + 1
        with pytest.raises(UserInputError, match="no samples_per_client is feasible"):
            make_partition(LAB600, 10, kw["num_clients"], scheme,
                           classes_per_client=kw["classes_per_client"])


def test_fig5_no_size_names_levers_that_help():
    with pytest.raises(UserInputError,
                       match=r"fig5: 1000 clients x 4 classes .*fewer than 2 per client .*no "
                             r"samples_per_client is feasible; lower num_clients \(>= 3\) or "
                             r"classes_per_client \(>= 2\)$"):
        make_partition(LAB600, 10, 1000, "fig5", classes_per_client=4)
    for n, k in ((3, 4), (1000, 2)):  # Each lever, at its smallest allowed value, helps.
        p = make_partition(LAB600, 10, n, "fig5", classes_per_client=k)
        check_partition(p, LAB600, n, both_per_class=True)
    # At its smallest values there is nothing left to lower.
    with pytest.raises(UserInputError,
                       match="no samples_per_client is feasible; use a larger dataset$"):
        make_partition(_labels(3), 10, 3, "fig5", classes_per_client=2, seed=0)


def test_k_class_explicit_sizes_advise_only_accepted_values():
    # One sample per class would leave no test example: refused, naming 2k, accepted.
    with pytest.raises(UserInputError,
                       match=r"samples_per_client=4 gives each of the 4 classes 1 sample per "
                             r"client, leaving no test examples \(each class needs one train and "
                             r"one test example\); the smallest valid samples_per_client is 8$"):
        make_partition(LAB, 10, 10, "noniid1", classes_per_client=4, samples_per_client=4)
    for s in (5, 6, 7):  # Not multiples of 4: the nearest valid is 8, never 4.
        with pytest.raises(UserInputError,
                           match=f"samples_per_client={s} is not a multiple .*; use 8$"):
            make_partition(LAB, 10, 10, "noniid1", classes_per_client=4, samples_per_client=s)
    p = make_partition(LAB, 10, 10, "noniid1", classes_per_client=4, samples_per_client=8)
    check_partition(p, LAB, 10, both_per_class=True)


def test_noniid1_default_sizes_unchanged_where_already_valid():
    # The split-aware bound only refuses what left clients without test examples.
    assert max_samples_per_client(LAB600, 10, 100, "noniid1", classes_per_client=4) == 4 * 15
    assert max_samples_per_client(_labels(7000), 10, 100, "noniid1", classes_per_client=4) == 700


def test_noniid2_no_size_names_levers_that_help():
    # Many clients: only fewer clients help (even uniform classes need 20 x 1000 > 6000).
    with pytest.raises(UserInputError,
                       match="noniid2: 1000 clients .*no samples_per_client with every class "
                             "present is feasible; lower num_clients$"):
        make_partition(LAB600, 10, 1000, "noniid2")
    check_partition(make_partition(LAB600, 10, 150, "noniid2"), LAB600, 150)
    with pytest.raises(UserInputError, match="no samples_per_client"):
        make_partition(LAB600, 10, 1000, "noniid2", dominant_share=0.2)
    # Small classes: one dominant class cannot hold 80% of any valid size, however few
    # the clients; only a lower dominant_share helps.
    labels = _labels(23, 26)
    with pytest.raises(UserInputError, match="; lower dominant_share$"):
        make_partition(labels, 26, 10, "noniid2")
    with pytest.raises(UserInputError, match="no samples_per_client"):
        make_partition(labels, 26, 1, "noniid2")
    p = make_partition(labels, 26, 10, "noniid2", dominant_share=2 / 26)
    check_partition(p, labels, 10, num_classes=26)


def test_noniid2_too_small_advises_an_accepted_size():
    with pytest.raises(UserInputError, match=r"smallest valid samples_per_client is (\d+)$") as e:
        make_partition(LAB, 10, 10, "noniid2", samples_per_client=20)
    smallest = int(re.search(r"(\d+)$", str(e.value)).group(1))
    hist = check_partition(make_partition(LAB, 10, 10, "noniid2", samples_per_client=smallest),
                           LAB, 10)
    assert (hist > 0).all()
    # Dominant classes get >= 2 (one train, one test), so every client has test data.
    assert (np.sort(hist, axis=1)[:, -2:] >= 2).all()
    with pytest.raises(UserInputError, match="too small"):
        make_partition(LAB, 10, 10, "noniid2", samples_per_client=smallest - 1)


@pytest.mark.parametrize("min_client_size", [0, 1])
def test_dirichlet_small_minimum_still_gives_every_client_test_data(min_client_size):
    # 500 clients on 6000 examples with min_client_size=1 formerly left 19 clients without
    # a test example. Minimums below 2 act as 2, and a client whose classes are all single
    # examples is split as a whole.
    p = make_partition(LAB600, 10, 500, "dirichlet", min_client_size=min_client_size, seed=0)
    hist = check_partition(p, LAB600, 500)
    assert hist.sum() == LAB600.size  # Still the whole pool.
    assert hist.sum(1).min() >= 2
    singletons = np.flatnonzero(hist.max(1) == 1)
    assert singletons.size > 0  # The case the whole-client split exists for does occur.


def test_dirichlet_infeasible_minimums_name_the_levers():
    with pytest.raises(UserInputError,
                       match=r"dirichlet: 3001 clients x 2 samples \(one train and one test "
                             r"example\) need 6002 examples but the pool has 6000; no "
                             r"samples_per_client is feasible; lower num_clients$"):
        make_partition(LAB600, 10, 3001, "dirichlet", min_client_size=1)
    msg = (r"dirichlet: 700 clients x 10 samples \(min_client_size=10\) need 7000 examples "
           r"but the pool has 6000; no samples_per_client is feasible; lower num_clients or "
           r"min_client_size$")
    with pytest.raises(UserInputError, match=msg):
        make_partition(LAB600, 10, 700, "dirichlet", min_client_size=10)
    with pytest.raises(UserInputError, match=msg):
        max_samples_per_client(LAB600, 10, 700, "dirichlet", min_client_size=10)
    assert max_samples_per_client(LAB600, 10, 700, "dirichlet", min_client_size=8) == 8
    # A mean size below what each client needs: raise it (never a value then refused).
    with pytest.raises(UserInputError,
                       match=r"samples_per_client=1 \(the mean client size\) is below the 2 "
                             r"samples every client needs .*raise samples_per_client \(at most "
                             r"700\) or leave samples_per_client unset for the whole pool$"):
        make_partition(LAB, 10, 10, "dirichlet", samples_per_client=1, min_client_size=0)
    with pytest.raises(UserInputError,
                       match=r"below the 10 samples every client needs \(min_client_size=10\); "
                             r"raise samples_per_client \(at most 700\), lower min_client_size "
                             r"or leave samples_per_client unset for the whole pool$"):
        make_partition(LAB, 10, 10, "dirichlet", samples_per_client=5)
    check_partition(make_partition(LAB, 10, 10, "dirichlet", samples_per_client=700), LAB, 10)
    with pytest.raises(UserInputError, match="after 1000 draws .*lower num_clients$") as e:
        make_partition(LAB600, 10, 200, "dirichlet", dirichlet_alpha=0.01, min_client_size=0)
    assert "min_client_size" not in str(e.value).split(";")[-1]  # Lowering it cannot help.


def test_iid_small_clients_all_get_test_data():
    # 6 examples of 10 classes: some clients hold 6 distinct classes (formerly all train).
    p = make_partition(LAB600, 10, 1000, "iid", seed=0)
    hist = check_partition(p, LAB600, 1000)
    assert p.samples_per_client == 6
    assert (hist.max(1) == 1).sum() > 50
    # Boundary: 2 per client is exactly feasible (1 train, 1 test each) ...
    p = make_partition(LAB600, 10, 3000, "iid", seed=0)
    check_partition(p, LAB600, 3000)
    assert {len(t) for t in p.train_indices} == {len(t) for t in p.test_indices} == {1}
    # ... one more client is not, and the advice is exactly that boundary.
    with pytest.raises(UserInputError,
                       match=r"iid: 3001 clients x 2 samples .*no samples_per_client is "
                             r"feasible; use num_clients <= 3000$"):
        make_partition(LAB600, 10, 3001, "iid")
    with pytest.raises(UserInputError, match="use num_clients <= 3000$"):
        max_samples_per_client(LAB600, 10, 3001, "iid")
    with pytest.raises(UserInputError, match="smallest valid samples_per_client is 2$"):
        make_partition(LAB, 10, 10, "iid", samples_per_client=1)


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.7, 0.95])
def test_all_singleton_clients_split_as_a_whole(frac):
    # Two clients of 5 distinct classes each: no per-class split exists.
    labels = np.arange(10)
    p = make_partition(labels, 10, 2, "iid", train_fraction=frac, seed=1)
    check_partition(p, labels, 2, frac=frac)
    want = min(max(math.floor(frac * 5 + 0.5 + 1e-9), 1), 4)
    assert [len(t) for t in p.train_indices] == [want, want]
