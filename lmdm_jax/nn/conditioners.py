"""Number conditioners of stable-audio-tools (``seconds_total``, ``seconds_start``) in Flax NNX.

A ``NumberConditioner`` (LMDM_REFERENCE.md §1.2) maps a batch of floats s to one token:
u = (clamp(s, min, max) - min) / (max - min), features [u, sin(2 pi u w), cos(2 pi u w)] with a
learned frequency vector w of length dim/2, then Linear(dim + 1 -> output_dim) with bias. The
output has shape (B, 1, output_dim): it is both a cross-attention token and (squeezed) the global
conditioning vector.

Parameter names follow the PyTorch keys ``embedder.embedding.0.weights`` (``freqs``) and
``embedder.embedding.1.{weight,bias}`` (``proj``; kernel stored (in, out)).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class NumberConditionerConfig:
  """``output_dim``: token width (the model's ``cond_dim``); ``dim``: Fourier feature width."""

  output_dim: int = 768
  min_val: float = 0.0
  max_val: float = 1.0
  dim: int = 256

  def __post_init__(self):
    if self.dim % 2:
      raise ValueError(f"NumberConditioner dim must be even, got {self.dim}")
    if not self.max_val > self.min_val:
      raise ValueError(f"NumberConditioner needs max_val > min_val, got [{self.min_val}, "
                       f"{self.max_val}]")

  @classmethod
  def from_conditioning(cls, entry: dict, cond_dim: int) -> "NumberConditionerConfig":
    """From one ``model.conditioning.configs`` entry of type ``number``."""
    if entry.get("type") != "number":
      raise ValueError(f"conditioner {entry.get('id')!r}: type {entry.get('type')!r} is not "
                       "'number'")
    c = dict(entry.get("config", {}))
    fft = c.pop("fourier_features_type", "learned")
    if fft != "learned":
      raise ValueError(f"conditioner {entry.get('id')!r}: fourier_features_type {fft!r} is not "
                       "supported (only 'learned')")
    unknown = sorted(set(c) - {"min_val", "max_val"})
    if unknown:
      raise ValueError(f"conditioner {entry.get('id')!r}: unsupported config keys {unknown}")
    return cls(output_dim=int(cond_dim), min_val=float(c.get("min_val", 0.0)),
               max_val=float(c.get("max_val", 1.0)))


class NumberConditioner(nnx.Module):
  """floats (B,) -> (B, 1, output_dim). See the module docstring."""

  def __init__(self, cfg: NumberConditionerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    half = cfg.dim // 2
    self.freqs = nnx.Param(16.0 * jax.random.normal(rngs.params(), (half,), jnp.float32))
    bound = 1.0 / np.sqrt(cfg.dim + 1)
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    self.proj = nnx.Linear(cfg.dim + 1, cfg.output_dim, kernel_init=init, bias_init=init,
                           rngs=rngs)

  def features(self, values):
    """(B,) floats -> (B, dim + 1): [u, sin(2 pi u w), cos(2 pi u w)] in float32."""
    c = self.cfg
    s = jnp.clip(jnp.asarray(values, jnp.float32), c.min_val, c.max_val)
    u = (s - c.min_val) / (c.max_val - c.min_val)
    # Same operation order as the reference: ((u * w) * 2) * pi.
    f = u[:, None] * self.freqs[...][None, :] * 2 * np.pi
    return jnp.concatenate([u[:, None], jnp.sin(f), jnp.cos(f)], axis=-1)

  def __call__(self, values):
    return self.proj(self.features(values))[:, None, :]
