"""The ARC discriminator head: a 1-D ConvNeXt over DiT hidden states -> one logit per position.

Upstream stable-audio-tools' ``ConvNeXtDiscriminator`` / ``ConvNeXtEncoder`` (LMDM_REFERENCE §4):
- ``proj_in``: conv(in -> channels, k7, p3);
- per stage s: ``num_blocks[s]`` ConvNeXt blocks at the stage's input width d (depthwise conv k7
  p3 -> pointwise d -> 4d -> GELU -> pointwise 4d -> d -> residual; no normalization), then a
  downsampling conv(d -> channels * c_mults[s], kernel 2 * stride, stride, padding ceil(stride/2));
- final conv(-> latent_dim = 1, k3, p1).
Every conv is weight-normalized (w = g * v / ||v||, g per output channel, initialized to ||v|| so
that w = v at init), as the reference. With the reference's settings (in 1024, channels 128,
c_mults [1, 2, 4], strides [1, 2, 2], blocks [2, 2, 2]) it has 3,201,538 parameters, gains
included (checked in tests/test_arc_forcing.py), and maps 577 positions to 144.
Layout: inputs (B, L, C) channels-last; outputs (B, L') float32 logits.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  channels: int = 128
  c_mults: tuple = (1, 2, 4)
  strides: tuple = (1, 2, 2)
  num_blocks: tuple = (2, 2, 2)

  def __post_init__(self):
    if not len(self.c_mults) == len(self.strides) == len(self.num_blocks):
      raise ValueError("head config: c_mults, strides and num_blocks need one entry per stage, got "
                       f"{self.c_mults}, {self.strides}, {self.num_blocks}")

  @classmethod
  def from_config(cls, c) -> "HeadConfig":
    d = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(c).items()}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown head config fields {unknown}; known: {sorted(names)}")
    return cls(**d)


class WNConv1d(nnx.Module):
  """Weight-normalized 1-D conv (PyTorch init: U(+-1/sqrt(fan_in)) for v and the bias)."""

  def __init__(self, din, dout, kernel, *, stride=1, padding=0, groups=1, zero_bias=False,
               rngs: nnx.Rngs):
    fan_in = din // groups * kernel
    bound = 1.0 / math.sqrt(fan_in)
    v = jax.random.uniform(rngs.params(), (kernel, din // groups, dout), jnp.float32, -bound, bound)
    self.v = nnx.Param(v)
    self.g = nnx.Param(jnp.sqrt(jnp.sum(v * v, axis=(0, 1))))
    self.bias = nnx.Param(jnp.zeros((dout,)) if zero_bias else
                          jax.random.uniform(rngs.params(), (dout,), jnp.float32, -bound, bound))
    self.stride, self.padding, self.groups = stride, padding, groups

  def __call__(self, x):
    v = self.v[...]
    w = v * (self.g[...] / jnp.sqrt(jnp.sum(v * v, axis=(0, 1))))[None, None]
    y = jax.lax.conv_general_dilated(
        x, w.astype(x.dtype), (self.stride,), [(self.padding, self.padding)],
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=self.groups)
    return y + self.bias[...].astype(y.dtype)


class ConvNeXtBlock(nnx.Module):
  def __init__(self, d, *, rngs):
    self.dw = WNConv1d(d, d, 7, padding=3, groups=d, rngs=rngs)
    self.pw1 = WNConv1d(d, 4 * d, 1, rngs=rngs)
    self.pw2 = WNConv1d(4 * d, d, 1, zero_bias=True, rngs=rngs)

  def __call__(self, x):
    return x + self.pw2(jax.nn.gelu(self.pw1(self.dw(x)), approximate=False))


class ConvNeXtHead(nnx.Module):
  """Hidden states (B, L, din) -> per-position logits (B, L')."""

  def __init__(self, din: int, hc: HeadConfig = HeadConfig(), *, rngs: nnx.Rngs):
    self.hc = hc
    self.proj_in = WNConv1d(din, hc.channels, 7, padding=3, rngs=rngs)
    d = hc.channels
    blocks, downs = [], []
    for mult, stride, nb in zip(hc.c_mults, hc.strides, hc.num_blocks):
      blocks.append(nnx.List([ConvNeXtBlock(d, rngs=rngs) for _ in range(nb)]))
      d_out = hc.channels * mult
      downs.append(WNConv1d(d, d_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2),
                            rngs=rngs))
      d = d_out
    self.blocks = nnx.List(blocks)
    self.downs = nnx.List(downs)
    self.proj_out = WNConv1d(d, 1, 3, padding=1, rngs=rngs)

  def __call__(self, h):
    x = self.proj_in(h.astype(jnp.float32))
    for stage, down in zip(self.blocks, self.downs):
      for blk in stage:
        x = blk(x)
      x = down(x)
    return self.proj_out(x)[..., 0]

  def out_len(self, n: int) -> int:
    for s in self.hc.strides:
      p = math.ceil(s / 2)
      n = (n + 2 * p - 2 * s) // s + 1
    return n
