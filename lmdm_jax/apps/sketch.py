"""Sketch input for the commands: a melody file -> the per-block extra channels of a model with
sketch channels (the features are ``lmdm_jax.data.sketch``).
"""
from __future__ import annotations

import numpy as np

from lmdm_jax.apps.common import UsageError
from lmdm_jax.data.sketch import SKETCH_DIM, SketchError, load_sketch, place


def extra_for_model(path, cfg, frame_rate: float, frames: int):
  """-> ``extra(k)``: the (1, chunk, extra_dim) extra channels of block k, for ``Stream.next_block``."""
  try:
    feats = load_sketch(path, frame_rate, frames)
    place(feats[:0], cfg.extra_dim)  # the model has the channels
  except SketchError as e:
    raise UsageError(f"--sketch: {e}") from e
  voiced = float(feats[:, 0].mean()) if len(feats) else 0.0
  print(f"[sketch] {path}: {frames} frames, {100 * voiced:.0f}% voiced -> the last {SKETCH_DIM} "
        f"of {cfg.extra_dim} extra channels")
  cs = cfg.chunk

  def extra(k: int) -> np.ndarray:  # placed per block: a long run holds only the 14 channels
    return place(feats[k * cs:(k + 1) * cs], cfg.extra_dim)[None]

  return extra
