"""Non-streaming sampling for base models (no input_add channels, e.g. SAO-small itself): the
whole clip is denoised at once with full attention, as stable-audio-tools' ``generate_diffusion_cond``
does, with the same rectified-flow schedule and updates as the streaming sampler
(``lmdm_jax.sampling.schedule`` / ``update``: Euler or pingpong, CFG / CFG++; the unconditional
half of CFG has zeroed cross-attention tokens and the same global conditioning).

``ClipStream`` offers the part of ``sampling.Stream``'s interface a block loop uses
(``set_prompt``, ``next_block``): the clip is generated on the first ``next_block`` and then
handed out ``chunk`` frames at a time, so a caller written for streams plays it unchanged. A base
model cannot change prompt mid-clip: ``set_prompt`` after the first block is an error.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmdm_jax import sampling as S

REGIME = "clip"


def generate_clip(model, frames: int, cond_tokens, global_cond, key, sp: S.SamplerParams,
                  cfg_guidance: bool):
  """Denoise (B, frames, C) from noise drawn with ``key``. cond_tokens: (B, N, cond_token_dim);
  global_cond: (B, global_cond_dim) or None. Jit-friendly; returns float32 latents."""
  b = cond_tokens.shape[0]
  n = 2 if cfg_guidance else 1
  cross = cond_tokens
  glob = global_cond
  if cfg_guidance:
    cross = jnp.concatenate([cond_tokens, jnp.zeros_like(cond_tokens)])
    glob = None if global_cond is None else jnp.concatenate([global_cond, global_cond])
  k_init, k_steps = jax.random.split(key)
  x = jax.random.normal(k_init, (b, frames, model.cfg.io_channels), jnp.float32)

  def velocity_at(x, t, _):
    xx = x if n == 1 else jnp.concatenate([x, x])
    v = model(xx, jnp.full((b * n,), t), cross if model.cfg.cond_token_dim else None, glob)
    return (v[:b], v[b:]) if cfg_guidance else (v, v)

  out, _ = S._denoise(x, None, None, k_steps, sp, cfg_guidance, velocity_at)
  return out


class ClipStream:
  """See the module docstring. ``frames``: the clip's length in latent frames."""

  def __init__(self, model, frames: int, *, batch: int = 1, cfg_guidance: bool = True,
               cross_len: int | None = None, seed: int = 0,
               sampler: S.SamplerParams | None = None):
    cfg = model.cfg
    if cfg.input_add_dim:
      raise ValueError("ClipStream is for base models (no input_add channels); stream this one "
                       "with lmdm_jax.sampling.Stream")
    if frames <= 0:
      raise ValueError(f"frames must be positive, got {frames}")
    self.cfg, self.batch, self.frames, self.cfg_guidance = cfg, batch, int(frames), cfg_guidance
    self.regime = REGIME
    self.cross_len = cross_len if cross_len is not None else 1
    self.sampler = sampler or S.SamplerParams.make()
    self.graphdef, self.params = nnx.split(model)
    self.key = jax.random.key(seed)
    self._cond = self._glob = None
    self._clip = None
    self._pos = 0
    gd = self.graphdef

    def run(params, cond, glob, key, sp):
      return generate_clip(nnx.merge(gd, params), self.frames, cond, glob, key, sp, cfg_guidance)

    self._run = jax.jit(run)

  def set_prompt(self, cond_tokens, global_cond=None) -> None:
    """cond_tokens: (batch, cross_len, cond_token_dim); global_cond: (batch, global_cond_dim)."""
    if self._clip is not None:
      raise ValueError("a base model generates the whole clip at once: the prompt cannot change "
                       "after the first block (use one prompt, or a streaming model)")
    cfg = self.cfg
    cond = jnp.asarray(cond_tokens, jnp.float32)
    want = (self.batch, self.cross_len, cfg.cond_token_dim)
    if cond.shape != want:
      raise ValueError(f"conditioning tokens: expected (batch, tokens, dim) = {want}, got "
                       f"{tuple(cond.shape)}")
    if cfg.global_cond_dim:
      glob = (jnp.zeros((self.batch, cfg.global_cond_dim), jnp.float32) if global_cond is None
              else jnp.asarray(global_cond, jnp.float32))
      if glob.shape != (self.batch, cfg.global_cond_dim):
        raise ValueError(f"global conditioning: expected shape "
                         f"{(self.batch, cfg.global_cond_dim)}, got {tuple(glob.shape)}")
    else:
      if global_cond is not None and np.size(global_cond):
        raise ValueError("global conditioning given but the model has none (global_cond_dim 0)")
      glob = None
    self._cond, self._glob = cond, glob

  def generate(self) -> jax.Array:
    """The whole clip (batch, frames, C)."""
    if self._cond is None:
      raise ValueError("call set_prompt first")
    return self._run(self.params, self._cond, self._glob, self.key, self.sampler)

  def next_block(self, extra=None) -> jax.Array:
    """The next ``chunk`` frames of the clip (the last block may be shorter); the clip is
    generated on the first call."""
    if extra is not None and np.size(extra):
      raise ValueError("a base model has no extra input channels")
    if self._clip is None:
      self._clip = self.generate()
    if self._pos >= self.frames:
      raise ValueError(f"the clip has only {self.frames} frames")
    blk = self._clip[:, self._pos:self._pos + self.cfg.chunk]
    self._pos += self.cfg.chunk
    return blk
