"""Load a model for sampling from either kind of checkpoint this project writes.

- a converted stable-audio-tools / LMDM checkpoint (``python3 -m lmdm_jax.convert``): a folder
  with the converter's metadata, restored by ``lmdm_jax.convert.dit.load_converted``;
- a ``train.py`` work directory: ``config.json`` + ``checkpoints/`` (orbax), latest step;
- a model bundle ``.npz`` (``lmdm_jax.bundle``; the bundled default model is one).

All three are untrusted data: the model config they declare is checked, and the parameter shapes
it implies (computed without allocating) must match the stored arrays' before a model is built or
an array read (``lmdm_jax.file_checks``). Config names they record are not interpreted here (see
``lmdm_jax.config.config_named_by_file``).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from lmdm_jax import file_checks as fc


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
