"""One code path from a laptop CPU to a pod: a 2-D mesh (data, fsdp).

Batches are split over both axes; every parameter and optimizer-state leaf is sharded FSDP-style
over ``fsdp`` along its largest dimension divisible by that axis (replicated otherwise). With
fsdp = 1 this is plain data parallelism; on one device everything is replicated. The same rules
lay out stage 1 (train.py: params, rest, optimizer state) and ARC-Forcing (arc.py: the frozen
base, adapter, discriminator head and both optimizer states): ``state_shardings`` / ``place``
for any pytree of arrays, ``batch_sharding`` for batches.

Several processes (``training.distributed``): the mesh spans every process's devices. Each
process builds only the rows of a global batch its own devices hold (``local_rows``), and
``global_batch`` assembles them into one global array (``jax.make_array_from_process_local_data``);
``put`` places host values every process holds alike (an initialized state, a PRNG key) without
comparing them across processes. With one process the same calls are plain ``device_put``s.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(fsdp: int = 1, data: int = -1, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if data == -1:
    if n % fsdp:
      raise ValueError(f"mesh: fsdp={fsdp} does not divide the {n} devices")
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh: data={data} x fsdp={fsdp} != {n} devices")
  return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def leaf_spec(shape, fsdp: int) -> P:
  if fsdp > 1 and len(shape):
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
      if shape[i] % fsdp == 0 and shape[i] >= fsdp:
        spec = [None] * len(shape)
        spec[i] = "fsdp"
        return P(*spec)
  return P()


def state_shardings(state, mesh: Mesh):
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), fsdp)), state)


def place(tree, mesh: Mesh):
  """(tree laid out on ``mesh`` with ``state_shardings``, those shardings). Leaves already so
  placed are returned as they are (no copy)."""
  shardings = state_shardings(tree, mesh)
  return put(tree, shardings), shardings


def put(tree, shardings):
  """``tree`` laid out with ``shardings``: a matching tree or a prefix of it (one sharding for a
  whole subtree, e.g. a batch dict). Arrays already so laid out are kept; other leaves are
  copied. A sharding that spans other processes' devices takes each local shard of a host value
  from this process's copy, which must be the same in every process (an initialized state, a
  PRNG key; not compared across processes, which would gather every leaf)."""
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: _put_leaf(x, s), sub), shardings, tree)


def _put_leaf(x, s):
  if isinstance(x, jax.Array):
    if x.sharding.is_equivalent_to(s, x.ndim):
      return x
    if s.is_fully_addressable or not x.is_fully_addressable:
      return jax.device_put(x, s)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(_put_leaf(jax.random.key_data(x), s),
                                      impl=jax.random.key_impl(x))
  elif s.is_fully_addressable:
    return jax.device_put(x, s)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, s, lambda index: host[index])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_rows(batch_size: int, mesh: Mesh) -> np.ndarray:
  """The rows of a global batch of ``batch_size`` that this process's devices hold under
  ``batch_sharding``, ascending: the rows, in order, of the local data ``global_batch`` takes.
  All rows with one process."""
  index = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  rows = set()
  for sl in index.values():
    rows.update(range(*sl[0].indices(batch_size)))
  return np.asarray(sorted(rows), np.int64)


def global_batch(local: dict, batch_size: int, mesh: Mesh) -> dict:
  """Global arrays (split over the mesh by ``batch_sharding``) of a batch of ``batch_size`` rows
  from each process's ``local`` arrays: its ``local_rows`` rows, in that order."""
  sh = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v),
                                                    (batch_size,) + np.shape(v)[1:])
          for k, v in local.items()}


def check_batch(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % n:
    raise ValueError(f"batch_size {batch_size} is not a multiple of the {n} devices of the mesh "
                     f"(data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']})")
