"""Training batches: latent crops + captions -> model inputs, deterministic in (seed, step).

Sources: a pre-encoded ``LatentDataset`` folder (``lmdm_jax.data.dataset``) or ``synthetic``
(seeded smooth multi-channel signals with template captions, for tests and smoke runs).
"""
from __future__ import annotations

import os

import numpy as np

from lmdm_jax.config import DiTConfig


class SyntheticLatents:
  """Seeded smooth latents: per channel a sum of slow sinusoids; captions name the pattern."""

  def __init__(self, frames: int, channels: int, seed: int = 0):
    self.frames, self.channels, self.seed = frames, channels, seed

  def batch(self, step: int, batch_size: int) -> dict:
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(step)]))
    t = np.arange(self.frames)[None, :, None]
    freq = rng.uniform(0.01, 0.2, (batch_size, 1, self.channels))
    phase = rng.uniform(0, 2 * np.pi, (batch_size, 1, self.channels))
    amp = rng.uniform(0.5, 1.5, (batch_size, 1, self.channels))
    lat = (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)
    caps = [f"pattern {int(f * 100)}" for f in freq[:, 0, 0]]
    return dict(latents=lat, mask=np.ones(lat.shape[:2], bool), captions=caps)


def make_source(spec: str, frames: int, cfg: DiTConfig, seed: int, holdout: bool = False):
  """``synthetic`` or a LatentDataset folder (its latent_dim must match the model)."""
  if spec == "synthetic":
    return SyntheticLatents(frames, cfg.io_channels, seed + (10_000 if holdout else 0))
  from lmdm_jax.data.dataset import LatentDataset
  if not os.path.exists(os.path.join(spec, "dataset.json")):
    raise ValueError(f"--data {spec!r}: not a latent dataset folder (no dataset.json); build one "
                     "with `python3 -m lmdm_jax.data.dataset` or pass `synthetic`")
  ds = LatentDataset(spec, frames, seed=seed)
  if ds.latent_dim != cfg.io_channels:
    raise ValueError(f"{spec}/dataset.json: latent_dim {ds.latent_dim} does not match the model's "
                     f"io_channels {cfg.io_channels}")
  train, held = ds.split()
  idx = held if holdout else train
  if not idx:
    idx = train or held
  return LatentDataset(spec, frames, seed=seed + (10_000 if holdout else 0), indices=idx)


class Batcher:
  """source batch -> the model inputs of ``Stage1.loss``; prompts through ``text`` (a callable
  list of str -> (B, T, cond_token_dim), e.g. ``lmdm_jax.text.from_config(config)``)."""

  def __init__(self, source, cfg: DiTConfig, text=None):
    self.source, self.cfg = source, cfg
    if text is None and cfg.cond_token_dim:
      from lmdm_jax.nn.byte_text import ByteTextEncoder
      text = ByteTextEncoder(cfg.cond_token_dim)
    self.text = text

  def __call__(self, step: int, batch_size: int) -> dict:
    raw = self.source.batch(step, batch_size)
    out = dict(latents=raw["latents"].astype(np.float32),
               frame_mask=raw["mask"].astype(np.float32))
    if self.text is not None:
      out["cond"] = self.text(raw["captions"])
    if self.cfg.global_cond_dim:
      out["global_cond"] = np.zeros((batch_size, self.cfg.global_cond_dim), np.float32)
    return out
