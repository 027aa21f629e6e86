"""``iid``: a random equal split.

Not a setting of the pFedLA paper: an extra scheme (the usual IID baseline).

With N = num_clients, S = samples_per_client and M examples in the pool: N*S examples
drawn at random without replacement, S per client, S >= 2 (one train and one test
example). The largest S is floor(M / N); when it is below 2 the error names the largest
num_clients that fits.
"""

from __future__ import annotations

from pfedla_jax.data.partition.common import MIN_SPLIT, Pool, check_size, pool_max
from pfedla_jax.data.partition.registry import Scheme, register_scheme
from pfedla_jax.errors import UserInputError

NAME = "iid"


def clients(pool: Pool, rng, samples_per_client):
    """The `Scheme.clients` of iid (no parameters of its own)."""
    n, m = pool.num_clients, pool.num_examples
    s_max = pool_max(pool, NAME)
    if samples_per_client is None:
        total = s_max
    else:
        total = check_size(samples_per_client)
        if total < MIN_SPLIT:
            raise UserInputError(
                f"iid: samples_per_client={total} leaves no example for one of train "
                f"and test; the smallest valid samples_per_client is {MIN_SPLIT}"
            )
        if total > s_max:
            raise UserInputError(
                f"iid: {n} clients x {total} samples need {n * total} examples but "
                f"only {m} exist; the largest feasible samples_per_client is {s_max}"
            )
    chosen = rng.permutation(m)[: n * total].reshape(n, total)
    return list(chosen), total


def max_samples_per_client(pool: Pool, rng) -> int:
    """The `Scheme.max_samples_per_client` of iid: floor(M / N)."""
    del rng
    return pool_max(pool, NAME)


register_scheme(Scheme(
    name=NAME,
    description="a random equal split",
    parameters=(),
    clients=clients,
    max_samples_per_client=max_samples_per_client,
    order=60,
))
