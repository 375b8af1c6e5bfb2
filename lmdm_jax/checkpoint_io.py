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


def load_model(path: str, use_ema: bool = False):
  """-> (DiTConfig, DiT, extras dict). Raises ValueError naming what is missing."""
  if os.path.isfile(path) and path.endswith(".npz"):
    from lmdm_jax import bundle
    cfg, model, meta = bundle.load_bundle(path)
    return cfg, model, {"step": meta.get("step"), "meta": meta}
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint {path!r}: no such directory")
  from lmdm_jax.training import workdir
  if workdir.is_workdir(path):
    return workdir.load_model(path, use_ema)
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
