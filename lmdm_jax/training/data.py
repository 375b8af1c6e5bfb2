"""Training batches: latent crops + captions -> model inputs, deterministic in (seed, step).

Sources: a pre-encoded ``LatentDataset`` folder (``lmdm_jax.data.dataset``) or ``synthetic``
(seeded smooth multi-channel signals with template captions, for tests and smoke runs).

Row i of step s's batch depends only on (seed, s, i): ``batch(step, batch_size, rows)`` builds
just the given rows of the global batch, so each process of a several-process run builds only
its own rows (``sharding.local_rows``) and the global batch does not depend on how many
processes there are.
"""
from __future__ import annotations

import os

import numpy as np

from lmdm_jax.config import DiTConfig


class SyntheticLatents:
  """Seeded smooth latents: per channel a sum of slow sinusoids; captions name the pattern."""

  def __init__(self, frames: int, channels: int, seed: int = 0):
    self.frames, self.channels, self.seed = frames, channels, seed

  def batch(self, step: int, batch_size: int, rows=None) -> dict:
    """Rows ``rows`` (default: all) of step ``step``'s batch; row i from (seed, step, i) alone."""
    rows = range(batch_size) if rows is None else rows
    draws = []
    for i in rows:
      rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(step), int(i)]))
      draws.append([rng.uniform(lo, hi, self.channels)
                    for lo, hi in ((0.01, 0.2), (0, 2 * np.pi), (0.5, 1.5))])
    freq, phase, amp = (np.asarray([d[k] for d in draws]).reshape(len(draws), 1, self.channels)
                        for k in range(3))
    t = np.arange(self.frames)[None, :, None]
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


def extra_groups(cfg: DiTConfig) -> tuple:
  """(accompaniment, sketch): which extra ``input_add`` groups the model has, from its width.
  Groups come in the order [accomp_mask | accomp latents (io_channels)] then sketch (SKETCH_DIM)."""
  from lmdm_jax.data.sketch import SKETCH_DIM
  e, acc = cfg.extra_dim, 1 + cfg.io_channels
  table = {0: (False, False), acc: (True, False), SKETCH_DIM: (False, True),
           acc + SKETCH_DIM: (True, True)}
  if e not in table:
    raise ValueError(f"model extra input_add channels = {e}: expected 0, {acc} (accompaniment), "
                     f"{SKETCH_DIM} (sketch) or {acc + SKETCH_DIM} (both)")
  return table[e]


class Batcher:
  """source batch -> the model inputs of ``Stage1.loss``; prompts through ``text`` (a callable
  list of str -> (B, T, cond_token_dim), e.g. ``lmdm_jax.text.from_config(config)``), cached per
  caption.

  Extra channels (when the model has them, see ``extra_groups``), deterministic in (seed, step,
  row):
  - jamming (accompaniment): for an item with >= 2 stems, with probability ``p_jam`` the target
    is one stem and the accompaniment another stem of the same crop (a duet partner), the caption
    is prefixed with the target's part name; the accompaniment is dropped whole with
    ``p_acc_uncond``, and with ``p_acc_partial`` each chunk only knows the partner up to a random
    frame (as a jam with a one-block delay does); mask 1 where known.
  - sketch: with probability ``p_sketch`` the pitch features (``data.sketch.pitch_features``) of
    the target's melody (the stem's pitch, or the skyline of the mix's stems).
  """

  def __init__(self, source, cfg: DiTConfig, text=None, *, p_jam: float = 0.4,
               p_acc_uncond: float = 0.1, p_acc_partial: float = 0.25, p_sketch: float = 0.5):
    self.source, self.cfg = source, cfg
    if text is None and cfg.cond_token_dim:
      from lmdm_jax.nn.byte_text import ByteTextEncoder
      text = ByteTextEncoder(cfg.cond_token_dim)
    self.text = text
    self._text_cache = {}
    self.accomp, self.sketch = extra_groups(cfg)
    self.p_jam, self.p_acc_uncond, self.p_acc_partial, self.p_sketch = (
        p_jam, p_acc_uncond, p_acc_partial, p_sketch)

  @classmethod
  def for_config(cls, source, conf, cfg: DiTConfig, **kw) -> "Batcher":
    """A Batcher with the config's own text encoder (``conf.conditioner``), as train.py uses."""
    from lmdm_jax import text as text_lib
    return cls(source, cfg, text_lib.from_config(conf) if cfg.cond_token_dim else None, **kw)

  def encode_text(self, captions) -> np.ndarray:
    new = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
    if new:
      emb = np.asarray(self.text(new), np.float32)
      for c, e in zip(new, emb):
        self._text_cache[c] = e
    return np.stack([self._text_cache[c] for c in captions])

  def _extra(self, raw, step: int, rows):
    cfg = self.cfg
    lat, mask = raw["latents"].astype(np.float32), raw["mask"]
    B, n, C = lat.shape
    caps = list(raw["captions"])
    seed = getattr(self.source, "seed", 0)
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, int(step), 0xE7, int(i)]))
            for i in rows]
    parts = []
    acc = np.zeros((B, n, 1 + C), np.float32) if self.accomp else None
    melody = raw.get("melody")
    melody = np.array(melody) if melody is not None else None
    stems = raw.get("stems")
    for b in range(B):
      if acc is None or stems is None:
        break
      rng = rngs[b]
      have = np.nonzero(raw["stem_mask"][b])[0]
      if len(have) < 2 or rng.random() >= self.p_jam:
        continue
      i, j = rng.choice(have, 2, replace=False)
      lat[b] = stems[b, i]
      name = raw["stem_names"][b][i] or "solo"
      caps[b] = f"{name[:1].upper()}{name[1:]} part. {caps[b]}"
      if melody is not None and "stem_melody" in raw:
        melody[b] = raw["stem_melody"][b, i]
      if rng.random() < self.p_acc_uncond:
        continue
      known = mask[b].astype(np.float32)
      if rng.random() < self.p_acc_partial:
        cs = cfg.chunk
        cut = rng.integers(0, cs + 1, size=-(-n // cs))  # per chunk: frames known
        known = known * (np.arange(n) % cs < np.repeat(cut, cs)[:n])
      acc[b, :, 0] = known
      acc[b, :, 1:] = stems[b, j] * known[:, None]
    if acc is not None:
      parts.append(acc)
    if self.sketch:
      from lmdm_jax.data.sketch import SKETCH_DIM, pitch_features
      sk = np.zeros((B, n, SKETCH_DIM), np.float32)
      if melody is not None:
        for b in range(B):
          if rngs[b].random() < self.p_sketch and np.isfinite(melody[b]).any():
            sk[b] = pitch_features(melody[b]) * mask[b][:, None]
      parts.append(sk)
    extra = np.concatenate(parts, axis=-1) if parts else None
    return lat, caps, extra

  def __call__(self, step: int, batch_size: int, rows=None) -> dict:
    """Rows ``rows`` (default: all) of step ``step``'s batch of ``batch_size``: the arrays have
    len(rows) rows, row i depending only on (seed, step, i)."""
    rows = range(batch_size) if rows is None else rows
    raw = self.source.batch(step, batch_size, rows)
    lat, caps, extra = self._extra(raw, step, rows)
    out = dict(latents=lat, frame_mask=raw["mask"].astype(np.float32))
    if extra is not None:
      out["extra"] = extra
    if self.text is not None:
      out["cond"] = self.encode_text(caps)
    if self.cfg.global_cond_dim:
      out["global_cond"] = np.zeros((len(lat), self.cfg.global_cond_dim), np.float32)
    return out
