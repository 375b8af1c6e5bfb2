"""Atomic, resumable checkpoints with orbax (CheckpointManager + preservation policy).

orbax writes each step into a temporary directory and renames it when complete, so a run killed
at any moment (even with SIGKILL) leaves only whole checkpoints; ``latest_step`` ignores the
rest. A JSON side file holds metadata (config, data position).
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = False):
    self.directory = os.path.abspath(directory)
    policy = ocp.checkpoint_managers.LatestN(keep)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                             enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True))

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict | None = None, force: bool = True) -> None:
    args = {"state": ocp.args.StandardSave(state)}
    if meta is not None:
      args["meta"] = ocp.args.JsonSave(meta)
    self.manager.save(int(step), args=ocp.args.Composite(**args), force=force)
    self.manager.wait_until_finished()

  def restore(self, abstract_state, step: int | None = None):
    """Restore into the structure/shardings of ``abstract_state`` (e.g. jax.eval_shape output
    with .sharding set). Returns (state, meta or None)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    names = self.manager.item_metadata(step)
    has_meta = names is not None and "meta" in getattr(names, "keys", lambda: [])()
    if has_meta:
      args["meta"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["state"], (out["meta"] if has_meta else None)

  def close(self):
    self.manager.close()


def latest_step(directory: str):
  """The newest whole checkpoint step in ``directory``, or None; a missing folder is not created."""
  if not os.path.isdir(directory):
    return None
  ck = Checkpointer(directory)
  try:
    return ck.latest_step()
  finally:
    ck.close()


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
