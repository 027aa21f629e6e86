"""The layer map of a parameter pytree: which leaves form each aggregation unit.

pFedLA learns one aggregation weight per client and per *layer* (paper Eq. 3). A layer
is a top-level module of the client model (Conv1, BN1, Conv2, BN2, FC1, FC2, FC3): its
weight and bias share one weight, and BN layers are layers of their own (paper Fig. 7).
The per-tensor granularity (one weight per leaf, as FL-bench does) is an option.

The map is static (Python ints), so it can be closed over inside jitted code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from pfedla_jax.errors import UserInputError

GRANULARITIES = ("layer", "tensor")

# Order of leaves inside one layer when the granularity is per tensor.
_LEAF_ORDER = {"kernel": 0, "scale": 0, "bias": 1}


def leaf_path(path: Sequence[Any]) -> str:
    """'Conv1/kernel' for a jax key path."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class LayerMap:
    """Aggregation units of a parameter pytree.

    Attributes:
      names: the aggregation units in forward order, e.g. ('Conv1', 'Conv2', 'FC1', ...).
      layer_of_leaf: a pytree with the structure of the (unstacked) params whose leaves are
        the index into `names` of the unit that leaf belongs to.
      num_params: number of scalars in each unit (unstacked).
      granularity: 'layer' or 'tensor'.
    """

    names: tuple[str, ...]
    layer_of_leaf: Any
    num_params: tuple[int, ...]
    granularity: str

    @property
    def num_layers(self) -> int:
        return len(self.names)


def make_layer_map(params: Any, layer_order: Sequence[str], granularity: str = "layer",
                   stacked: bool = False) -> LayerMap:
    """Builds the layer map of `params`.

    Args:
      params: a Flax params dict whose top-level keys are layer names.
      layer_order: the layers in forward order (e.g. models.layer_names(model)).
      granularity: 'layer' (weight and bias share one unit; BN layers separate) or 'tensor'.
      stacked: whether the leaves carry a leading client axis (excluded from sizes).

    Returns:
      The LayerMap.
    """
    if granularity not in GRANULARITIES:
        raise UserInputError(
            f"unknown alpha granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
    top = set(params.keys())
    missing = [n for n in layer_order if n not in top]
    extra = sorted(top - set(layer_order))
    if missing or extra:
        raise ValueError(f"layer_order {tuple(layer_order)} does not match params keys {sorted(top)}")

    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    info = []  # (layer name, leaf name, size)
    for path, leaf in leaves_with_path:
        p = leaf_path(path).split("/")
        shape = np.shape(leaf)[1:] if stacked else np.shape(leaf)
        info.append((p[0], "/".join(p[1:]), int(np.prod(shape, dtype=np.int64))))

    if granularity == "layer":
        names = tuple(layer_order)
        index = {n: i for i, n in enumerate(names)}
        leaf_units = [index[layer] for layer, _, _ in info]
    else:
        rank = {n: i for i, n in enumerate(layer_order)}
        units = sorted({(layer, leaf) for layer, leaf, _ in info},
                       key=lambda u: (rank[u[0]], _LEAF_ORDER.get(u[1], 2), u[1]))
        names = tuple(f"{layer}/{leaf}" for layer, leaf in units)
        index = {u: i for i, u in enumerate(units)}
        leaf_units = [index[(layer, leaf)] for layer, leaf, _ in info]

    sizes = [0] * len(names)
    for unit, (_, _, size) in zip(leaf_units, info):
        sizes[unit] += size
    layer_of_leaf = jax.tree_util.tree_unflatten(treedef, leaf_units)
    return LayerMap(names=names, layer_of_leaf=layer_of_leaf, num_params=tuple(sizes),
                    granularity=granularity)
