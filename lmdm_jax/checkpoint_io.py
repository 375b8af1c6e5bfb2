"""Load a model for sampling from either kind of checkpoint this project writes.

- a converted stable-audio-tools / LMDM checkpoint (``python3 -m lmdm_jax.convert``): a folder
  with the converter's metadata, restored by ``lmdm_jax.convert.dit.load_converted``;
- a ``train.py`` work directory: ``config.json`` + ``checkpoints/`` (orbax), latest step;
- a model bundle ``.npz`` (``lmdm_jax.bundle``; the bundled default model is one).
"""
from __future__ import annotations

import json
import os

from flax import nnx

from lmdm_jax.config import DiTConfig, load_config
from lmdm_jax.nn.dit import DiT


def load_model(path: str, use_ema: bool = False):
  """-> (DiTConfig, DiT, extras dict). Raises ValueError naming what is missing."""
  if os.path.isfile(path) and path.endswith(".npz"):
    from lmdm_jax import bundle
    cfg, model, meta = bundle.load_bundle(path)
    return cfg, model, {"step": meta.get("step"), "meta": meta}
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint {path!r}: no such directory")
  if os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(
      os.path.join(path, "checkpoints")):
    return _load_workdir(path, use_ema)
  from lmdm_jax.convert import dit as conv
  if not os.path.isdir(os.path.join(path, "config")):  # the converter's JSON item
    raise ValueError(f"checkpoint {path!r}: neither a train.py work directory (config.json + "
                     "checkpoints/) nor a converted checkpoint (python3 -m lmdm_jax.convert)")
  try:
    cfg, model, conds = conv.load_converted(path)
  except (FileNotFoundError, KeyError) as e:
    raise ValueError(f"checkpoint {path!r}: neither a train.py work directory (config.json + "
                     f"checkpoints/) nor a converted checkpoint ({e})") from e
  return cfg, model, {"conditioners": conds}


def _load_workdir(path: str, use_ema: bool):
  from lmdm_jax.training.checkpoints import Checkpointer, abstract_like
  from lmdm_jax.training.stage1 import Stage1, Stage1Config, model_from_state
  with open(os.path.join(path, "config.json")) as f:
    meta = json.load(f)
  cfg = DiTConfig.from_stored(meta["model"])
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
