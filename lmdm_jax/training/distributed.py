"""Several processes (several hosts, or several processes on one machine) in one training run.

Every process runs the same command with its own ``--process-id`` (or the environment variables
below); ``initialize`` starts JAX's distributed runtime before anything touches a device, after
which ``jax.devices()`` lists every process's devices and one mesh spans them all
(``training.sharding``). What the processes must do once (write a file) or agree on (which
checkpoint step to restore) goes through ``is_main`` / ``agree`` / ``barrier``; with one process
these are plain local calls (no collective, nothing to start).

  python3 train.py ... --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # host 0
  python3 train.py ... --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 1   # host 1

Without the flags: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``;
on a cluster JAX detects itself (SLURM, Open MPI, Kubernetes, TPU pods), JAX's
``jax.distributed.initialize()`` with no arguments, used when ``SLURM_NTASKS`` > 1 or only the
coordinator address is set.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np


def _env_int(name: str):
  v = os.environ.get(name)
  if v is None or v == "":
    return None
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"${name}={v!r} is not an integer") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts JAX's distributed runtime when the run has several processes; True if it did.

  Arguments left None come from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID``. With a coordinator and N > 1 every process must pass its id; with neither
  (and no SLURM job of several tasks) this is a one-process run and nothing happens. Must run
  before anything uses a device (``jax.distributed.initialize`` raises otherwise). ValueError
  names a bad value."""
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if n is not None and n < 1:
    raise ValueError(f"--num-processes must be at least 1, got {n}")
  if pid is not None and (pid < 0 or (n is not None and pid >= n)):
    raise ValueError(f"--process-id {pid} is not in 0..{'N-1' if n is None else n - 1}")
  if coordinator is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", coordinator):
    raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT, e.g. 127.0.0.1:1234")
  import jax
  if coordinator is None and n in (None, 1) and pid in (None, 0):
    if (_env_int("SLURM_NTASKS") or 1) > 1:
      jax.distributed.initialize()  # a SLURM job: JAX reads everything from its variables
      _compile_once()
      return True
    return False
  if n is None and pid is None:  # only an address: JAX detects the rest on a cluster
    jax.distributed.initialize(coordinator_address=coordinator)
    _compile_once()
    return True
  if coordinator is None:
    raise ValueError(f"{n or 'several'} processes need --coordinator HOST:PORT (process 0's "
                     "address, the same for every process)")
  if n is None:
    raise ValueError("--process-id needs --num-processes")
  if pid is None:
    raise ValueError(f"{n} processes: --process-id (0..{n - 1}) is needed")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=pid)
  _compile_once()
  return True


def _compile_once() -> None:
  """Several processes: the first compiles each program and hands it to the others (JAX's
  ``jax_share_binary_between_hosts``), so all start running it together, and the persistent
  compilation cache is off. JAX writes that cache from process 0 only (and on CPU the other
  processes did not find their programs in it), so process 0 would start a cached program while
  the others still compile, and a collective that waits longer than its timeout (30 s for the
  CPU's gloo) fails."""
  import jax
  if jax.process_count() > 1:
    jax.config.update("jax_enable_compilation_cache", False)
    try:
      jax.config.update("jax_share_binary_between_hosts", True)
    except AttributeError:  # a JAX without the option: every process compiles
      pass


def is_main() -> bool:
  """True in process 0: the one that writes run files (config, metrics, integrity records)."""
  import jax
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (nothing with one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def agree(value):
  """Process 0's ``value`` (anything JSON can hold) on every process; ``value`` itself with one
  process. Every process must call it at the same point of the run (a collective)."""
  import jax
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main() else np.zeros(0, np.uint8)
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  buf = np.zeros(n, np.uint8)
  buf[:len(data)] = data[:n]
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
  return json.loads(out.tobytes().decode())


def all_true(flag: bool) -> bool:
  """True when ``flag`` is true in every process (a collective, as ``agree``)."""
  import jax
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))
