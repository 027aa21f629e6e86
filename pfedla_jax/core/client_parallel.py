"""Where clients run: the device mesh, and the primitives that place work on it.

With core/multihost.py (which adds the processes of a multi-process run), this module is
the only code that knows about devices: the rest of the package calls the functions below
and never builds a mesh, a sharding or a `shard_map` itself. Two kinds of primitives:

Mapping a function of ONE client over a cohort: `for_each_client` (the idea of fedjax's
`for_each_client`, on stacked clients). Every per-client quantity is a pytree with a
leading client axis (`[S, ...]` for a cohort of S participants). `for_each_client(client_fn,
strategy, mesh)` turns

    client_fn(shared, client, client_id, key) -> out

into a function of the whole cohort,

    fn(shared, clients[S, ...], client_ids[S], key) -> out[S, ...],

where `shared` (a global model, the client data store, ...) is passed to every client
without being copied S times. Strategies:

  vmap   `jax.vmap` over the cohort (GPU/TPU). On a mesh of several devices, each device
         vmaps its block of clients (`shard_map`). `batch_size` bounds how many clients
         are vmapped at once (`lax.map(..., batch_size=)`), e.g. for evaluation.
  loop   one client after another (`lax.map`) on one device: the fast CPU path with a
         single device (XLA:CPU runs a vmapped conv as a slow grouped conv).
  shard  the cohort split over the mesh axis `clients` (`shard_map`), each device running
         its clients one after another (`lax.map`): the CPU path with one XLA device per
         core, and the multi-device path.
  auto   by backend: CPU -> `shard` with several devices, `loop` with one; else `vmap`.

Client ids < 0 mark padding: such entries are skipped (`lax.cond`; under `vmap` both
branches run and the padding's result is dropped) and their outputs are zeros. A cohort
that does not divide the mesh is padded this way, so no device computes a copy of a real
client. With `cost` (e.g. each client's number of local steps), `shard` deals the clients
to devices so that every device gets a similar total (a cohort's time is its slowest
device's), then restores the original order.

Working on the stacked state ([N_pad, ...] per-client leaves, rows split over the mesh
axis `clients`, N padded to a multiple of the mesh size: `padded_size`,
`client_sharding`): `take_rows` / `put_rows` read and write the participants' rows,
`over_row_blocks` runs a contraction where the rows live (each device on its own block,
partial results summed across devices: pFedLA's aggregation and cotangents), and
`on_every_device` runs small replicated work whole on every device.

All of it is traceable: call it inside a jitted round.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pfedla_jax.errors import UserInputError

STRATEGIES = ("auto", "vmap", "loop", "shard")
CLIENT_AXIS = "clients"


def resolve_strategy(strategy: str) -> str:
    """Picks the client-parallel strategy; 'auto' by backend and device count.

    Raises:
      UserInputError: unknown strategy.
    """
    if strategy not in STRATEGIES:
        raise UserInputError(
            f"unknown --client_parallelism {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if strategy == "loop" and jax.process_count() > 1:
        raise UserInputError("--client_parallelism=loop runs on one device; a run over several "
                             "processes needs shard, vmap or auto")
    if strategy != "auto":
        return strategy
    if jax.default_backend() == "cpu":
        # Measured in BUILD_NOTES (core engine figures): on CPU the per-client loop with the
        # custom-VJP conv beats vmap (grouped conv); several host devices beat XLA's
        # intra-op threads.
        return "shard" if jax.device_count() > 1 else "loop"
    return "vmap"


def make_mesh(strategy: str) -> Mesh:
    """The 1-D mesh (axis `clients`) a resolved strategy runs on: `loop` uses one device,
    `vmap` and `shard` every device of the run (of every process in a multi-process run,
    ordered by process: core/multihost.py)."""
    devices = jax.devices()[:1] if strategy == "loop" else jax.devices()
    return Mesh(np.array(devices), (CLIENT_AXIS,))


def padded_size(num: int, mesh: Mesh) -> int:
    """`num` rounded up to a multiple of the mesh size (stacked state is padded to it)."""
    d = mesh.devices.size
    return -(-num // d) * d


def client_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (client) axis split over the mesh."""
    return NamedSharding(mesh, P(CLIENT_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _pad_rows(tree: Any, pad: int) -> Any:
    return jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)]), tree)


def balanced_order(cost: jax.Array, num_devices: int) -> jax.Array:
    """A permutation of the cohort that gives each device's contiguous block a similar total cost.

    Clients sorted by decreasing cost are dealt to devices in a snake order (0, 1, ..., D-1,
    D-1, ..., 0, ...); the result lists device 0's clients first. Traceable.

    Args:
      cost: [S] per-client cost (S a multiple of num_devices).
      num_devices: D.
    Returns:
      int32 [S]: position p of the reordered cohort holds client perm[p].
    """
    s = cost.shape[0]
    per = s // num_devices
    rank = np.arange(s)
    lap, pos = rank // num_devices, rank % num_devices
    device = np.where(lap % 2 == 0, pos, num_devices - 1 - pos)
    slot = device * per + lap                     # where the rank-th costliest client goes
    by_cost = jnp.argsort(-cost, stable=True)     # client ids by decreasing cost
    return jnp.zeros(s, jnp.int32).at[jnp.asarray(slot)].set(by_cost.astype(jnp.int32))


def _pack(leaves, num):
    dtype = jnp.result_type(*leaves)
    return jnp.concatenate([a.reshape(num, -1).astype(dtype) for a in leaves], axis=1)


def _unpack(flat, like):
    out, offset = [], 0
    for a in like:
        size = int(np.prod(a.shape[1:], dtype=np.int64))
        out.append(flat[:, offset:offset + size].reshape((flat.shape[0],) + a.shape[1:]).astype(a.dtype))
        offset += size
    return out


def take_rows(tree: Any, ids: jax.Array, mesh: Mesh | None) -> Any:
    """Rows `ids` of a stacked tree split over `mesh` ([N_pad, ...] -> [S, ...] on every device).

    Each device takes the rows it holds (zeros for the others) and ONE sum across devices
    (all leaves packed into one buffer) completes them: one collective, however many leaves.
    Without a mesh (or with one device) a plain gather. Traceable.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if mesh is None or mesh.devices.size == 1 or not leaves:
        return jax.tree.map(lambda a: jnp.take(a, ids, axis=0), tree)

    def local(block_leaves, ids):
        rows = block_leaves[0].shape[0]
        mine = ids - jax.lax.axis_index(CLIENT_AXIS) * rows
        held = (mine >= 0) & (mine < rows)
        taken = [jnp.where(held.reshape((-1,) + (1,) * (a.ndim - 1)),
                           jnp.take(a, jnp.clip(mine, 0, rows - 1), axis=0), 0) for a in block_leaves]
        return jax.lax.psum(_pack(taken, ids.shape[0]), CLIENT_AXIS)

    flat = jax.shard_map(local, mesh=mesh, in_specs=(P(CLIENT_AXIS), P()), out_specs=P(),
                         check_vma=False)(leaves, ids)
    return jax.tree.unflatten(treedef, _unpack(flat, leaves))


def put_rows(tree: Any, ids: jax.Array, rows: Any, mesh: Mesh | None) -> Any:
    """`tree` with rows `ids` set to `rows` ([S, ...], the same on every device): each device
    writes the rows it holds, in place, with no communication. Without a mesh a plain scatter.
    Traceable."""
    if mesh is None or mesh.devices.size == 1:
        return jax.tree.map(lambda a, r: a.at[ids].set(r.astype(a.dtype), mode="drop"), tree, rows)

    def local(block, ids, rows):
        def write(a, r):
            num = a.shape[0]
            mine = ids - jax.lax.axis_index(CLIENT_AXIS) * num
            target = jnp.where((mine >= 0) & (mine < num), mine, num)   # others: dropped
            return a.at[target].set(r.astype(a.dtype), mode="drop")
        return jax.tree.map(write, block, rows)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(CLIENT_AXIS), P(), P()),
                         out_specs=P(CLIENT_AXIS), check_vma=False)(tree, ids, rows)


def on_every_device(fn: Callable[..., Any], mesh: Mesh | None) -> Callable[..., Any]:
    """Inside a jitted program: `fn` run whole on every device of `mesh` (its inputs and
    outputs replicated), so XLA does not split it over the devices and gather the pieces
    back (for small per-cohort work that the state's layout would otherwise partition)."""
    if mesh is None or mesh.devices.size == 1:
        return fn
    return lambda *args: jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(),
                                       check_vma=False)(*args)


def rows_mesh(tree: Any, mesh: Mesh | None) -> Mesh | None:
    """`mesh` if the stacked `tree`'s rows ([K, ...]) can be split over it (several devices,
    K a multiple of their number), else None: what `over_row_blocks` should split by."""
    if mesh is None or mesh.devices.size == 1:
        return None
    rows = jax.tree.leaves(tree)[0].shape[0]
    return mesh if rows % mesh.devices.size == 0 else None


@dataclasses.dataclass(frozen=True)
class RowBlock:
    """One device's block of a stack's rows, as `over_row_blocks` hands it to its function.

    Attributes:
      split: whether the rows are split over several devices (False: the block is the
        whole stack, on one device or without a mesh).
    """

    split: bool

    def first_row(self, rows: int) -> jax.Array | int:
        """The stack's index of the block's first row, for blocks of `rows` rows (0 if not
        split)."""
        return jax.lax.axis_index(CLIENT_AXIS) * rows if self.split else 0

    def total(self, x: Any) -> Any:
        """`x` summed over every device's block (one collective; `x` itself if not split)."""
        return jax.lax.psum(x, CLIENT_AXIS) if self.split else x


def _axis_spec(axis: int | None) -> P:
    return P() if axis is None else P(*([None] * axis), CLIENT_AXIS)


def over_row_blocks(fn: Callable[..., Any], mesh: Mesh | None, in_axes: tuple[int | None, ...],
                    out_axes: int | None | tuple[int | None, ...]) -> Callable[..., Any]:
    """Inside a jitted program: `fn(block, *args)` computed where a stack's rows live.

    With a mesh of several devices each device runs `fn` on its own block of the arguments
    split over the mesh axis `clients` (`shard_map`): the stack never moves. `fn` writes its
    cross-device sums as `block.total(x)` and finds its rows' global index with
    `block.first_row(rows)`; without a mesh (or with one device, or `mesh=None` from
    `rows_mesh`) it runs once on the whole arguments, where both are the identity.

    Args:
      fn: `fn(block: RowBlock, *args) -> outputs`.
      mesh: the mesh, or None.
      in_axes: per positional argument, the axis split over the devices (e.g. 0 for a
        stack [N, ...]) or None (the whole argument on every device).
      out_axes: per output (or one for a single output), the axis along which the devices'
        results are joined, or None (the same on every device, e.g. after `block.total`).
    Returns:
      `g(*args) -> outputs`.
    """
    if mesh is None or mesh.devices.size == 1:
        return functools.partial(fn, RowBlock(split=False))
    in_specs = tuple(_axis_spec(a) for a in in_axes)
    out_specs = (tuple(_axis_spec(a) for a in out_axes) if isinstance(out_axes, tuple)
                 else _axis_spec(out_axes))
    return jax.shard_map(functools.partial(fn, RowBlock(split=True)), mesh=mesh,
                         in_specs=in_specs, out_specs=out_specs, check_vma=False)


def for_each_client(client_fn: Callable[..., Any], strategy: str, mesh: Mesh | None = None, *,
                    batch_size: int | None = None, negative_ids: bool = True) -> Callable[..., Any]:
    """Maps `client_fn(shared, client, client_id, key) -> out` over a stacked cohort.

    Args:
      client_fn: a pure function of one client: `shared` (any pytree, the same for every
        client), `client` (one row of the per-client pytree), `client_id` (int32 scalar,
        >= 0), `key` (the round's key; derive per-client keys with fold_in(key, client_id)).
      strategy: 'vmap', 'loop', 'shard' or 'auto'.
      mesh: the device mesh (axis 'clients'); default `make_mesh(strategy)`.
      batch_size: with 'vmap', at most this many clients are vmapped at once.
      negative_ids: whether callers may pass padding ids (< 0). If not, the per-client
        `lax.cond` is only used for the padding to the mesh (it costs a copy of its
        operands, the shared data included, on XLA:CPU).

    Returns:
      `fn(shared, clients, client_ids, key, cost=None) -> out`, with `clients` leaves
      [S, ...], `client_ids` int32 [S] (negative = padding: skipped, zero output) and
      `out` leaves [S, ...] in the cohort's order, on every device of the mesh (gathered
      in one collective). `cost` ([S], optional) balances the `shard` split.
    """
    strategy = resolve_strategy(strategy)
    mesh = mesh if mesh is not None else make_mesh(strategy)
    num_devices = mesh.devices.size

    def guarded(shared, client, cid, key):
        valid = cid >= 0
        safe = jnp.maximum(cid, 0)
        shape = jax.eval_shape(client_fn, shared, client, safe, key)
        zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
        return jax.lax.cond(valid, lambda: client_fn(shared, client, safe, key), zeros)

    def run_block(shared, clients, ids, key, guard=True):
        """One device's clients."""
        call = guarded if guard else client_fn
        one = lambda a: call(shared, a[0], a[1], key)
        if strategy == "vmap":
            if batch_size is None or batch_size >= ids.shape[0]:
                return jax.vmap(one)((clients, ids))
            return jax.lax.map(one, (clients, ids), batch_size=batch_size)
        return jax.lax.map(one, (clients, ids))

    def fn(shared, clients, client_ids, key, cost=None):
        client_ids = jnp.asarray(client_ids, jnp.int32)
        num = client_ids.shape[0]
        if num_devices == 1:
            return run_block(shared, clients, client_ids, key, negative_ids)
        pad = (-num) % num_devices
        guard = negative_ids or pad > 0
        if pad:
            clients = _pad_rows(clients, pad)
            client_ids = jnp.concatenate([client_ids, jnp.full((pad,), -1, jnp.int32)])
            if cost is not None:
                cost = jnp.concatenate([cost, jnp.full((pad,), -1, cost.dtype)])
        perm = None
        if cost is not None and strategy == "shard":
            perm = balanced_order(cost, num_devices)
            clients = jax.tree.map(lambda a: jnp.take(a, perm, axis=0), clients)
            client_ids = jnp.take(client_ids, perm)
        shape = jax.eval_shape(functools.partial(run_block, guard=guard), shared, clients, client_ids, key)
        leaves, treedef = jax.tree.flatten(shape)

        def run_and_gather(shared, clients, ids, key):
            # the block's outputs packed into one buffer and gathered from every device at once
            # (one collective, however many leaves the outputs have)
            out = jax.tree.leaves(run_block(shared, clients, ids, key, guard))
            return jax.lax.all_gather(_pack(out, ids.shape[0]), CLIENT_AXIS, tiled=True)

        flat = jax.shard_map(run_and_gather, mesh=mesh,
                             in_specs=(P(), P(CLIENT_AXIS), P(CLIENT_AXIS), P()),
                             out_specs=P(), check_vma=False)(shared, clients, client_ids, key)
        out = jax.tree.unflatten(treedef, _unpack(flat, leaves))
        if perm is not None:
            inverse = jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))
            out = jax.tree.map(lambda a: jnp.take(a, inverse, axis=0), out)
        if pad:
            out = jax.tree.map(lambda a: a[:num], out)
        return out

    fn.strategy = strategy
    fn.mesh = mesh
    return fn
