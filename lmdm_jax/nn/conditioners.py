"""Number conditioners of stable-audio-tools (``seconds_total``, ``seconds_start``) in Flax NNX, and
``Conditioning``: how the conditioners' outputs become the DiT's cross-attention tokens and global
conditioning vector.

A ``NumberConditioner`` (LMDM_REFERENCE.md §1.2) maps a batch of floats s to one token:
u = (clamp(s, min, max) - min) / (max - min), features [u, sin(2 pi u w), cos(2 pi u w)] with a
learned frequency vector w of length dim/2, then Linear(dim + 1 -> output_dim) with bias. The
output has shape (B, 1, output_dim): it is both a cross-attention token and (squeezed) the global
conditioning vector.

Parameter names follow the PyTorch keys ``embedder.embedding.0.weights`` (``freqs``) and
``embedder.embedding.1.{weight,bias}`` (``proj``; kernel stored (in, out)).

``Conditioning`` follows stable-audio-tools' ``MultiConditioner`` + ``get_conditioning_inputs``
(``ConditionedDiffusionModelWrapper``): the cross-attention input is the concatenation, along the
sequence axis and in the order of ``cross_attention_cond_ids``, of every listed conditioner's
tokens (a text encoder's (B, S, D) tokens, a number's single (B, 1, D) token); the global input
is the concatenation, along the channel axis and in the order of ``global_cond_ids``, of the
listed number conditioners' tokens, squeezed to (B, G). With the LMDM / SAO-small config
(cross ids [prompt, seconds_total], global ids [seconds_total]) that is 64 + 1 = 65 tokens and
a 768-wide global vector; with SAO 1.0's [prompt, seconds_start, seconds_total] /
[seconds_start, seconds_total] it is 64 + 2 tokens and 1536 wide.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

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


class Conditioning:
  """Text tokens + numbers -> (cross-attention tokens, global conditioning); see the module
  docstring. Holds ``numbers`` ({id: NumberConditioner}), ``text_ids`` (ids whose tokens come
  from a text encoder run outside, e.g. T5), ``cross_ids`` and ``global_ids`` (config order).
  """

  def __init__(self, numbers: Mapping[str, NumberConditioner], text_ids: Sequence[str],
               cross_ids: Sequence[str], global_ids: Sequence[str]):
    self.numbers = dict(numbers)
    self.text_ids = tuple(text_ids)
    self.cross_ids = tuple(cross_ids)
    self.global_ids = tuple(global_ids)
    known = set(self.numbers) | set(self.text_ids)
    unknown = [i for i in self.cross_ids + self.global_ids if i not in known]
    if unknown:
      raise ValueError(f"conditioning ids {unknown} name no conditioner (known: {sorted(known)})")
    bad = [i for i in self.global_ids if i not in self.numbers]
    if bad:
      raise ValueError(f"global conditioning from {bad}: only number conditioners give one vector")

  @property
  def global_dim(self) -> int:
    return sum(self.numbers[i].cfg.output_dim for i in self.global_ids)

  def cross_len(self, text_tokens: int) -> int:
    """Number of cross-attention tokens when each text conditioner gives ``text_tokens``."""
    return sum(text_tokens if i in self.text_ids else 1 for i in self.cross_ids)

  def _number(self, cid: str, values: Mapping[str, object], batch: int):
    if cid not in values:
      raise ValueError(f"no value for the number conditioner {cid!r}")
    v = np.asarray(values[cid], np.float32).reshape(-1)
    if v.shape[0] == 1 and batch > 1:
      v = np.repeat(v, batch)
    if v.shape[0] != batch:
      raise ValueError(f"{cid}: {v.shape[0]} values for a batch of {batch}")
    return self.numbers[cid](jnp.asarray(v))

  def __call__(self, text: Mapping[str, object], values: Mapping[str, object], batch: int = 1):
    """text: {text id: (B, S, D) tokens (zeros at padding)}; values: {number id: B floats or
    one float}. Returns (cross (B, N, D) or None, global (B, G) or None), float32."""
    outs = {cid: self._number(cid, values, batch) for cid in self.numbers
            if cid in self.cross_ids or cid in self.global_ids}
    for cid in self.text_ids:
      if cid in self.cross_ids:
        if cid not in text:
          raise ValueError(f"no tokens for the text conditioner {cid!r}")
        outs[cid] = jnp.asarray(text[cid], jnp.float32)
    cross = glob = None
    if self.cross_ids:
      cross = jnp.concatenate([outs[i] for i in self.cross_ids], axis=1)
    if self.global_ids:
      glob = jnp.concatenate([outs[i] for i in self.global_ids], axis=-1)[:, 0, :]
    return cross, glob
