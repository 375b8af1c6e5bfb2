"""A weight-free text conditioner for small configs: UTF-8 bytes -> fixed random embeddings.

Each of the 256 byte values maps to a fixed Gaussian vector (from a seed), so a prompt becomes
``max_tokens`` tokens (zero-padded, like the reference's padded T5 tokens). It needs no download
and lets the `tiny` model be trained and sampled end to end; real prompts use T5 or MiniLM.
"""
from __future__ import annotations

import numpy as np


class ByteTextEncoder:
  def __init__(self, dim: int, max_tokens: int = 16, seed: int = 1234):
    self.dim, self.max_tokens = dim, max_tokens
    self.table = np.random.default_rng(seed).normal(0, 0.5, (256, dim)).astype(np.float32)

  def __call__(self, prompts) -> np.ndarray:
    """list of str -> (B, max_tokens, dim) float32."""
    out = np.zeros((len(prompts), self.max_tokens, self.dim), np.float32)
    for b, p in enumerate(prompts):
      ids = np.frombuffer(str(p).encode("utf-8")[:self.max_tokens], np.uint8)
      out[b, :len(ids)] = self.table[ids]
    return out
