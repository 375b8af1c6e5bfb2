"""A train.py work directory: ``config.json`` (config name, model and train sections, seed,
data), ``checkpoints/<step>/state`` (orbax) and ``metrics.jsonl``; arc.py runs use the same
metrics handling. Loading a model from one, and keeping its metrics log consistent on resume.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from lmdm_jax import file_checks as fc


def checkpoint_dir(path: str) -> str:
  """A work directory (or its ``checkpoints/`` folder itself) -> the absolute checkpoint folder
  (orbax refuses relative checkpoint paths)."""
  path = os.path.abspath(path)
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def truncate_metrics(path: str, after_step: int) -> None:
  """Drop log lines past the restored step (a killed run may have logged beyond its checkpoint)."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= after_step:
          keep.append(line)
      except (ValueError, KeyError):
        pass  # a torn last line
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def is_workdir(path: str) -> bool:
  return os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(
      os.path.join(path, "checkpoints"))


def load_model(path: str, use_ema: bool = False):
  """The model of a train.py work directory's newest intact checkpoint: only its parameters (EMA
  or raw) and buffers are read, after their stored shapes are checked against ``config.json``."""
  from lmdm_jax.training.checkpoints import Checkpointer, abstract_like
  meta = fc.read_json(os.path.join(path, "config.json"), "work directory config")
  where = f"checkpoint {path!r}"
  cfg = fc.model_config(meta.get("model"), f"{os.path.join(path, 'config.json')} model")
  graphdef, params, rest = nnx.split(fc.abstract_model(cfg, where), nnx.Param, ...)
  params, rest = abstract_like(params), abstract_like(rest)
  want_params, want_rest = fc.flat_shapes(params), fc.flat_shapes(rest)
  chosen = {}

  def target(stored):  # the stored shapes (orbax metadata) must be the config's, before reading
    name = "ema" if use_ema and any(k.startswith("ema/") for k in stored) else "params"
    for key, want in ((name, want_params), ("rest", want_rest)):
      got = {k[len(key) + 1:]: v for k, v in stored.items() if k.startswith(key + "/")}
      fc.compare(want, got, f"{where} {key}")
    chosen["name"] = name
    return {name: params, "rest": rest, "step": jax.ShapeDtypeStruct((), np.int32)}

  ckpt = Checkpointer(os.path.join(path, "checkpoints"))
  try:
    if ckpt.latest_step() is None:
      raise ValueError(f"checkpoint {path!r}: checkpoints/ holds no finished checkpoint")
    out, _ = ckpt.restore_items(target)
  finally:
    ckpt.close()
  model = nnx.merge(graphdef, out[chosen["name"]], out["rest"])
  return cfg, model, {"step": int(out["step"]), "meta": meta}
