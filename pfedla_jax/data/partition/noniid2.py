"""``noniid2``: every client holds all classes, a few dominant ones holding most of its data.

Source: the pFedLA paper's non-IID 2 setting (Ma et al., CVPR 2022, Sec. 4, Table 2):
every client has all classes, 2 of them (6 for CIFAR-100) with more samples than the
rest, and all clients hold the same amount of data. The paper does not give the
proportions; dominant_share (default 0.8) sets them.

With C = num_classes, N = num_clients, S = samples_per_client, d = dominant_classes:
every client holds all C classes; d of them (random, balanced like noniid1's sets:
`common.balanced_class_sets`) are dominant. With R = round_half_up(dominant_share * S),
each of the C - d other classes gets exactly floor((S - R) / (C - d)) samples and the
dominant classes share the remaining D >= R (so the dominant share exceeds
dominant_share by less than (C - d) / S): floor(D / d) each, plus one for the first
D mod d of them in the client's fixed order (a random class permutation rotated by the
client id, which spreads those extras over classes). Every class must get >= 1 sample
per client and every dominant class >= 2 (one train, one test); a minor class with a
single sample is in train only (the paper's CIFAR-100 setting at 100 clients, 6 dominant
classes, needs that: its largest size, 598, gives each of the 94 minor classes 1
sample). The largest feasible S is found by scanning down from an analytic upper bound;
it may depend on the seed (through the dominant sets). When no size is feasible the
error names which of num_clients and dominant_share to lower.
"""

from __future__ import annotations

import numbers

import numpy as np

from pfedla_jax.data.partition.common import (MIN_SPLIT, Pool, balanced_class_sets,
                                              check_size, deal_by_counts, is_int, or_list,
                                              round_half_up)
from pfedla_jax.data.partition.registry import Scheme, register_scheme
from pfedla_jax.errors import UserInputError

NAME = "noniid2"


def clients(pool: Pool, rng, samples_per_client, *, dominant_classes=2, dominant_share=0.8):
    """The `Scheme.clients` of noniid2.

    Args:
        dominant_classes: d, 1 <= d < C.
        dominant_share: The share of a client's samples in its d dominant classes,
            d/C <= share < 1.
    """
    plan = _plan(pool, rng, dominant_classes, dominant_share)
    if samples_per_client is None:
        total = plan.max_size()
    else:
        total = check_size(samples_per_client)
        plan.check(total)
    return deal_by_counts(rng, pool.labels, plan.counts(total)), int(total)


def max_samples_per_client(pool: Pool, rng, *, dominant_classes=2, dominant_share=0.8) -> int:
    """The `Scheme.max_samples_per_client` of noniid2."""
    return _plan(pool, rng, dominant_classes, dominant_share).max_size()


def _plan(pool, rng, dominant_classes, dominant_share) -> _Plan:
    d, share = _check(dominant_classes, dominant_share, pool.num_classes)
    return _Plan(rng, pool.num_clients, pool.num_classes, d, share, pool.class_counts)


def _check(d, share, num_classes) -> tuple[int, float]:
    if not is_int(d) or not 1 <= d < num_classes:
        raise UserInputError(
            f"noniid2: dominant_classes must be an integer in [1, {num_classes - 1}] "
            f"(below num_classes={num_classes}), got {d!r}"
        )
    if not isinstance(share, numbers.Real) or not 0.0 < share < 1.0:
        raise UserInputError(f"noniid2: dominant_share must lie in (0, 1), got {share!r}")
    if share < d / num_classes:
        raise UserInputError(
            f"noniid2: dominant_share={share} gives the {d} dominant classes less than "
            f"their uniform share {d}/{num_classes}={d / num_classes:g}"
        )
    return int(d), float(share)


def _split(s: int, share: float, m: int) -> tuple[int, int]:
    """(D, non) for per-client total s: see `_Plan`."""
    non = (s - round_half_up(share * s)) // m
    return s - m * non, non


def _valid(s: int, share: float, m: int, d: int) -> bool:
    """Whether total s gives every class >= 1 and every dominant class >= 2 samples."""
    dom, non = _split(s, share, m)
    return non >= 1 and dom >= MIN_SPLIT * d


def _min_size(share: float, m: int, d: int) -> int:
    """Smallest valid total (m other and d dominant classes); seed-independent."""
    # S - R grows with S, so bisect for the first S with non >= 1 ...
    low = m
    lo, hi = 1, 1
    while (hi - round_half_up(share * hi)) < low:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if mid - round_half_up(share * mid) >= low:
            hi = mid
        else:
            lo = mid + 1
    # ... then walk up for the dominant classes (share >= d/C makes this rare).
    while not _valid(lo, share, m, d):
        lo += 1
    return lo


class _Plan:
    """noniid2's random choices (dominant sets, remainder order), fixed before S.

    Every client has the same total S, so it splits the same way: R = round_half_up(
    share * S), each of the m = C - d other classes gets non = floor((S - R) / m), and
    the d dominant classes share D = S - m * non (>= R; the other group's rounding
    remainder goes to the dominant classes, so the other classes are exactly equal and
    the dominant share is exceeded by less than m / S). Within the dominant group each
    class gets floor(D / d), and D mod d of them one more, taken in the client's order
    (a random class permutation rotated by the client id, spreading the extra samples
    over classes).
    """

    def __init__(self, rng, n, num_classes, d, share, avail):
        self.n, self.c, self.d, self.m = n, num_classes, d, num_classes - d
        self.share, self.avail = share, avail
        dom_sets = balanced_class_sets(rng, n, d, avail)
        self.dominant = np.zeros((n, num_classes), dtype=bool)
        np.put_along_axis(self.dominant, dom_sets, True, axis=1)
        self.uses = self.dominant.sum(axis=0)  # [C] clients where c is dominant
        perm = rng.permutation(num_classes)
        rank = np.empty(num_classes, dtype=np.int64)
        rank[perm] = np.arange(num_classes)
        key = np.where(self.dominant, (rank[None, :] - np.arange(n)[:, None]) % num_classes,
                       num_classes)
        order = np.argsort(key, axis=1, kind="stable")
        self.pos = np.empty_like(order)  # rank of a dominant class in its client's order
        np.put_along_axis(self.pos, order, np.arange(num_classes)[None, :], axis=1)
        # extra[c, r]: clients in which class c gets one of r remainder samples.
        self.extra = np.stack(
            [(self.dominant & (self.pos < r)).sum(axis=0) for r in range(d)], axis=1)

    def split(self, s: int) -> tuple[int, int]:
        """(D, non): dominant-group total and the count of each other class."""
        return _split(s, self.share, self.m)

    def counts(self, s: int) -> np.ndarray:
        """int64 [N, C] samples of each class per client for per-client total s."""
        dom, non = self.split(s)
        dom_counts = dom // self.d + (self.pos < dom % self.d)
        return np.where(self.dominant, dom_counts, non).astype(np.int64)

    def need(self, s: int) -> np.ndarray:
        """int64 [C] examples of each class all clients need: column sums of counts."""
        dom, non = self.split(s)
        return self.uses * (dom // self.d) + self.extra[:, dom % self.d] + (
            self.n - self.uses) * non

    def _valid(self, s: int) -> bool:
        return _valid(s, self.share, self.m, self.d)

    def min_size(self) -> int:
        """Smallest S giving every class >= 1 and every dominant class >= 2 samples in
        every client; it need not be feasible (see `smallest_feasible`)."""
        return _min_size(self.share, self.m, self.d)

    def _feasible(self, s: int) -> bool:
        return bool((self.need(s) <= self.avail).all())

    def fits_smallest(self) -> bool:
        """Whether the smallest valid size is feasible."""
        return self._feasible(self.min_size())

    def max_size(self) -> int:
        lo = self.min_size()
        # need(S) is not monotone in S (D drops when `non` steps up), so no bisection.
        # Instead: need_c(S) >= S * rate_c - slack_c (each count is at least its exact
        # share minus rounding), which bounds the feasible S from above; scan down from
        # that bound, a few times C steps at most.
        rate = self.uses * self.share / self.d + (self.n - self.uses) * (1 - self.share) / self.m
        slack = self.uses * (0.5 / self.d + 1) + (self.n - self.uses) * (0.5 / self.m + 1)
        hi = min(int(self.avail.sum()) // self.n,
                 int(np.floor(np.min((self.avail + slack) / rate))))
        for s in range(hi, lo - 1, -1):
            if self._valid(s) and self._feasible(s):
                return s
        self._raise_infeasible(lo, None)

    def smallest_feasible(self) -> int:
        """Smallest valid S that the data allows (raises like `max_size` if none)."""
        s_max = self.max_size()
        return next(s for s in range(self.min_size(), s_max + 1)
                    if self._valid(s) and self._feasible(s))

    def check(self, s: int) -> None:
        if not self._valid(s):
            dom, non = self.split(s)
            raise UserInputError(
                f"noniid2: samples_per_client={s} is too small for all {self.c} classes "
                f"to be present with >= {MIN_SPLIT} samples (one train, one test) of each "
                f"dominant class ({self.d} dominant classes sharing {dom}, {self.m} other "
                f"classes getting {non} each); the smallest valid samples_per_client is "
                f"{self.smallest_feasible()}"
            )
        if not self._feasible(s):
            self._raise_infeasible(s, self.max_size())

    def _raise_infeasible(self, s: int, s_max: int | None) -> None:
        need = self.need(s)
        c = int(np.argmax(need - self.avail))
        if s_max is not None:
            tail = f"the largest feasible samples_per_client is {s_max}"
        else:
            # Name only the levers that help: one client at this share, or these
            # clients at the uniform share d/C, fit at their smallest valid size (their
            # random choices drawn from a throwaway generator).
            def fits(n, share):
                return _Plan(np.random.default_rng(0), n, self.c, self.d, share,
                             self.avail).fits_smallest()

            uniform = self.d / self.c
            levers = (["num_clients"] if self.n > 1 and fits(1, self.share) else []) + (
                ["dominant_share"] if self.share > uniform and fits(self.n, uniform) else [])
            tail = ("no samples_per_client with every class present is feasible; "
                    + ("lower " + or_list(levers) if levers else "use a larger dataset"))
        raise UserInputError(
            f"noniid2: {self.n} clients ({self.d} dominant classes, share "
            f"{self.share:g}) need {need[c]} samples of class {c} at samples_per_client="
            f"{s} but only {self.avail[c]} exist; {tail}"
        )


register_scheme(Scheme(
    name=NAME,
    description=("every client holds all classes, dominant_classes of them holding "
                 "dominant_share of its samples (paper non-IID 2, Table 2)"),
    parameters=("dominant_classes", "dominant_share"),
    clients=clients,
    max_samples_per_client=max_samples_per_client,
    order=20,
))
