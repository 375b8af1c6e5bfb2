"""One code path from a laptop CPU to a pod: a 2-D mesh (data, fsdp).

Batches are split over both axes; every parameter and optimizer-state leaf is sharded FSDP-style
over ``fsdp`` along its largest dimension divisible by that axis (replicated otherwise). With
fsdp = 1 this is plain data parallelism; on one device everything is replicated. The same rules
lay out stage 1 (train.py: params, rest, optimizer state) and ARC-Forcing (arc.py: the frozen
base, adapter, discriminator head and both optimizer states): ``state_shardings`` / ``place``
for any pytree of arrays, ``batch_sharding`` for batches.
Multi-host: ``init_distributed()`` calls ``jax.distributed.initialize()`` when the usual
coordinator environment variables are set (or always, with ``force=True``).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def init_distributed(force: bool = False) -> None:
  if force or os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS"):
    jax.distributed.initialize()


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
  return jax.device_put(tree, shardings), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % n:
    raise ValueError(f"batch_size {batch_size} is not a multiple of the {n} devices of the mesh "
                     f"(data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']})")
