"""A train.py work directory: ``config.json`` (config name, model and train sections, seed,
data), ``checkpoints/<step>/state`` (orbax) and ``metrics.jsonl``; arc.py runs use the same
metrics handling. Loading a model from one, and keeping its metrics log consistent on resume.
"""
from __future__ import annotations

import json
import os

from flax import nnx

from lmdm_jax.config import DiTConfig
from lmdm_jax.nn.dit import DiT


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
  """A work directory's latest checkpoint -> (DiTConfig, DiT, {"step", "meta": config.json})."""
  from lmdm_jax.training.checkpoints import Checkpointer, abstract_like
  from lmdm_jax.training.stage1 import Stage1, Stage1Config, model_from_state
  with open(os.path.join(path, "config.json")) as f:
    meta = json.load(f)
  cfg = DiTConfig.from_config(meta["model"])
  model = DiT(cfg, rngs=nnx.Rngs(0))
  tc = Stage1Config.from_config(meta["train"].get("stage1", {}))
  trainer = Stage1(model, tc)
  state = trainer.init_state(model)
  ckpt = Checkpointer(os.path.join(path, "checkpoints"))
  if ckpt.latest_step() is None:
    raise ValueError(f"checkpoint {path!r}: checkpoints/ holds no finished checkpoint")
  state, _ = ckpt.restore(abstract_like(state))
  step = int(state["step"])
  ckpt.close()
  return cfg, model_from_state(trainer.graphdef, state, use_ema), {"step": step, "meta": meta}
