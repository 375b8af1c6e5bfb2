"""Atomic, resumable checkpoints with orbax (CheckpointManager + preservation policy).

orbax writes each step into a temporary directory and renames it when complete, so a run killed
at any moment (even with SIGKILL) leaves only whole checkpoints; ``latest_step`` ignores the
rest. A JSON side file holds metadata (config, data position).

Damage after the fact (a truncated file, a flipped bit on disk) is caught: each saved step gets
``lmdm_integrity.json`` (size and SHA-256 of every file in it), checked before the step is read,
since orbax's compressed arrays do not all notice a changed byte. ``restore`` without a step
falls back from a damaged newest step to the newest intact one, with a one-line warning naming
the damaged step; with none intact it raises ``CheckpointError`` naming each. A later ``save`` of
a step found damaged moves the damaged folder aside (``<step>.damaged``) instead of failing.

Several processes (``training.distributed``): every process calls ``save`` / ``restore`` /
``latest_step`` at the same point (orbax writes and reads each process's shards). Process 0
alone writes the integrity record and checks records; the others take its findings
(``distributed.agree``), so all restore the same step and none waits on another that failed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

import jax
import orbax.checkpoint as ocp
from etils import epath

from lmdm_jax.training import distributed

INTEGRITY = "lmdm_integrity.json"


class CheckpointError(ValueError):
  """No intact checkpoint to restore; the message names each damaged step and why."""


class _NotDamage(Exception):
  """Wraps an error that is not damage to a step (e.g. a target that does not match it)."""


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = False):
    self.directory = os.path.abspath(directory)
    policy = ocp.checkpoint_managers.LatestN(keep)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                             enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True))
    self.damaged: set[int] = set()  # steps that restore found damaged (a save moves them aside)

  def latest_step(self):
    """The newest finished step or None (process 0's answer in every process)."""
    step = self.manager.latest_step()
    return distributed.agree(None if step is None else int(step))

  def all_steps(self):
    """The finished steps (process 0's list in every process)."""
    return [int(s) for s in distributed.agree([int(s) for s in self.manager.all_steps()])]

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def save(self, step: int, state, meta: dict | None = None, force: bool = True) -> None:
    step = int(step)
    if step in self.damaged:
      self._move_aside(step)
    args = {"state": ocp.args.StandardSave(state)}
    if meta is not None:
      args["meta"] = ocp.args.JsonSave(meta)
    self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    self.manager.wait_until_finished()
    error = None
    if distributed.is_main() and os.path.isdir(self.step_dir(step)):
      try:
        write_integrity(self.step_dir(step))
      except OSError as e:
        error = _one_line(e)
    error = distributed.agree(error)  # also: no process goes on before the record is written
    if error is not None:
      raise OSError(f"checkpoint step {step} ({self.step_dir(step)}): its integrity record "
                    f"could not be written: {error}")

  def restore(self, abstract_state, step: int | None = None):
    """Restore into the structure/shardings of ``abstract_state`` (e.g. jax.eval_shape output
    with .sharding set). Returns (state, meta or None). Without ``step``: the newest intact step
    (see the module docstring)."""
    def read(s):
      args = {"state": ocp.args.StandardRestore(abstract_state)}
      names = self.manager.item_metadata(s)
      has_meta = names is not None and "meta" in getattr(names, "keys", lambda: [])()
      if has_meta:
        args["meta"] = ocp.args.JsonRestore()
      out = self.manager.restore(s, args=ocp.args.Composite(**args))
      return out["state"], (out["meta"] if has_meta else None)
    return self._newest_intact(read, step)

  def restore_items(self, make_target, step: int | None = None):
    """Read only some arrays of a step's state: ``make_target(stored)`` gets the stored arrays'
    {"a/b": (shape, dtype)} (from the metadata, nothing read yet) and returns the abstract
    subtree to read (it may raise ValueError, e.g. when the stored shapes are not the expected
    ones; that is not damage and is raised as is). Returns (restored subtree, step)."""
    from lmdm_jax import file_checks as fc

    def read(s):
      item = os.path.join(self.step_dir(s), "state")
      stored = fc.orbax_shapes(item, f"checkpoint step {s} ({item})")
      try:
        target = make_target(stored)
      except ValueError as e:
        raise _NotDamage(e) from None
      dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      restore_args = jax.tree.map(
          lambda x: ocp.ArrayRestoreArgs(sharding=getattr(x, "sharding", None) or dev), target)
      h = ocp.PyTreeCheckpointHandler()
      try:
        out = h.restore(epath.Path(item), args=ocp.args.PyTreeRestore(
            target, restore_args=restore_args, partial_restore=True))
      finally:
        h.close()
      return out, s
    return self._newest_intact(read, step)

  def _newest_intact(self, read, step: int | None):
    """``read(step)`` of the newest step that is not damaged. Damaged: its files differ from its
    integrity record, or (steps without one) reading it fails. A read failure of a step whose
    files verify is not damage (a target that does not fit it, memory, ...) and is raised as is."""
    steps = [int(step)] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    errors = []
    for s in steps:
      verified, why = self._verify(s)
      if why is not None:
        self._note_damage(s, why, errors, warn=step is None)
        continue
      out, failed = None, None
      try:
        out = read(s)
      except _NotDamage as e:
        raise e.args[0] from None
      except Exception as e:  # noqa: BLE001 - damage shows in whatever way orbax/TensorStore say
        if verified:
          raise
        failed = e
      if distributed.all_true(failed is None):
        return out
      # an unverified step some process could not read: damaged for every process
      self._note_damage(s, _one_line(failed) if failed is not None else
                        "another process could not read it", errors, warn=step is None)
    raise CheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(errors))

  def _verify(self, step: int):
    """(verified, None) or (False, why it is damaged): ``check_integrity`` of the step by process
    0, the same answer in every process."""
    result = None
    if distributed.is_main():
      try:
        result = [check_integrity(self.step_dir(step)), None]
      except Exception as e:  # noqa: BLE001 - an unreadable or mismatching record
        result = [False, _one_line(e)]
    verified, why = distributed.agree(result)
    return bool(verified), why

  def _note_damage(self, step: int, why: str, errors: list, warn: bool) -> None:
    errors.append(f"step {step}: {why}")
    self.damaged.add(step)
    if warn and distributed.is_main():
      print(f"[checkpoints] warning: step {step} ({self.step_dir(step)}) is damaged, not "
            f"restored: {why}", file=sys.stderr, flush=True)

  def _move_aside(self, step: int) -> None:
    """A damaged step about to be written again: keep its folder as ``<step>.damaged[.N]``."""
    src = self.step_dir(step)
    if os.path.isdir(src) and distributed.is_main():
      dst, n = src + ".damaged", 1
      while os.path.exists(dst):
        dst, n = f"{src}.damaged.{n}", n + 1
      os.replace(src, dst)
      print(f"[checkpoints] moved damaged step {step} aside to {dst}", file=sys.stderr, flush=True)
    distributed.barrier(f"lmdm-checkpoints-move-aside-{step}")
    self.damaged.discard(step)
    self.manager.reload()

  def close(self):
    self.manager.close()


def latest_step(directory: str):
  """The newest whole checkpoint step in ``directory``, or None; a missing folder is not created.
  Read by process 0 (no orbax manager, which would be a collective), the same in every process."""
  step = None
  if distributed.is_main() and os.path.isdir(directory):
    step = max(ocp.path.step.checkpoint_steps(directory), default=None)
  return distributed.agree(step)


def _one_line(e: BaseException, n: int = 200) -> str:
  msg = " ".join(str(e).split())
  return f"{type(e).__name__}: {msg[:n]}{'...' if len(msg) > n else ''}"


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
  return sorted(f for f in out if f != INTEGRITY and not f.startswith(INTEGRITY + "."))


def write_integrity(step_dir: str) -> None:
  """Record size and SHA-256 of every file of a finished step (atomically: temp + rename)."""
  rec = {"files": {f: [os.path.getsize(os.path.join(step_dir, f)),
                       _sha256(os.path.join(step_dir, f))] for f in _files(step_dir)}}
  tmp = os.path.join(step_dir, INTEGRITY + ".tmp")
  with open(tmp, "w") as fh:
    json.dump(rec, fh)
  os.replace(tmp, os.path.join(step_dir, INTEGRITY))


def check_integrity(step_dir: str) -> bool:
  """ValueError naming the first file of ``step_dir`` that is missing, of another size or with
  other bytes than ``write_integrity`` recorded; True when all match. Steps saved without the
  record give False (unverified: orbax's own reading errors still catch most damage)."""
  path = os.path.join(step_dir, INTEGRITY)
  if not os.path.exists(path):
    return False
  from lmdm_jax import file_checks as fc
  files = fc.read_json(path, "checkpoint integrity record", max_bytes=16 << 20).get("files")
  if not isinstance(files, dict):
    raise ValueError(f"{path}: no file list")
  for rel, want in sorted(files.items()):
    p = os.path.join(step_dir, rel)
    if (not isinstance(want, list) or len(want) != 2 or os.path.isabs(rel)
        or ".." in rel.replace("\\", "/").split("/")):
      raise ValueError(f"{path}: bad entry {rel[:80]!r}")
    if not os.path.isfile(p):
      raise ValueError(f"{rel} is missing")
    if os.path.getsize(p) != want[0]:
      raise ValueError(f"{rel} has {os.path.getsize(p)} bytes, {want[0]} were written")
    if _sha256(p) != want[1]:
      raise ValueError(f"{rel} does not hold the bytes that were written (SHA-256 differs)")
  return True


def abstract_like(state, shardings=None):
  """ShapeDtypeStructs (with shardings) of a state pytree, for ``Checkpointer.restore``."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def run_layout(cfg, path: str):
  """``cfg`` in the rotary layout (``DiTConfig.positions``) the train.py run at ``path`` (its work
  directory or its checkpoints/ folder) recorded in config.json; a run recorded before the field
  existed trained in the legacy layout (``DiTConfig.from_stored``). Unchanged when ``path``
  records no model."""
  path = os.path.abspath(path)
  dirs = [path] + ([os.path.dirname(path)] if os.path.basename(path) == "checkpoints" else [])
  for d in dirs:
    f = os.path.join(d, "config.json")
    if os.path.isfile(f):
      with open(f) as fh:
        model = json.load(fh).get("model")
      if isinstance(model, dict):
        return dataclasses.replace(cfg, positions=type(cfg).from_stored(model).positions)
  return cfg
