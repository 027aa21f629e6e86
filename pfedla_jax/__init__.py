"""pfedla-jax: pFedLA (Ma et al., CVPR 2022) and personalized-FL baselines in JAX/Flax."""

__version__ = "0.1.0"

import jax as _jax

# Counter-based ("partitionable") threefry: the first k draws of uniform(key, (n,)) equal
# uniform(key, (k,)), so a client's shuffle depends only on (seed, round, client, its own
# size) and not on how much the store pads it. Default in recent JAX; pinned here.
_jax.config.update("jax_threefry_partitionable", True)
