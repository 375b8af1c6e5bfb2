"""The Oobleck VAE of stable-audio-tools (``OobleckEncoder``/``OobleckDecoder`` + ``VAEBottleneck``).

Arrays are frame-major inside JAX: audio ``(batch, samples, channels)``, latents
``(batch, frames, latent_dim)``. Weight norm is folded into plain conv kernels when weights are
converted (``lmdm_jax.convert.oobleck``), so every conv here holds one ordinary kernel.

Module layout mirrors the PyTorch ``nn.Sequential`` indices (``encoder.layers[i]...``) so that
parameter paths map one-to-one onto state_dict keys. ``decoder_receptive_field`` and
``StreamingDecoder`` implement block-wise decoding (see ``StreamingDecoder`` for the margins).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_HIGHEST = jax.lax.Precision.HIGHEST
_RESIDUAL_DILATIONS = (1, 3, 9)

# The VAE of Stable Audio Open (and so of LMDM): 44.1 kHz stereo, hop 2048, 64 latent channels.
STABLE_AUDIO_OPEN_VAE = {
  "type": "autoencoder",
  "iterate_batch": True,
  "config": {
    "encoder": {"type": "oobleck", "requires_grad": False, "config": {
      "in_channels": 2, "channels": 128, "c_mults": [1, 2, 4, 8, 16], "strides": [2, 4, 4, 8, 8],
      "latent_dim": 128, "use_snake": True}},
    "decoder": {"type": "oobleck", "config": {
      "out_channels": 2, "channels": 128, "c_mults": [1, 2, 4, 8, 16], "strides": [2, 4, 4, 8, 8],
      "latent_dim": 64, "use_snake": True, "final_tanh": False}},
    "bottleneck": {"type": "vae"},
    "latent_dim": 64,
    "downsampling_ratio": 2048,
    "io_channels": 2,
  },
}


@dataclasses.dataclass(frozen=True)
class OobleckConfig:
  """Hyper-parameters of one Oobleck encoder or decoder.

  io_channels: audio channels (encoder input / decoder output); channels: base width;
  c_mults: width multipliers per block (a leading 1 is implied, as in the reference);
  strides: down-sampling factor per block (the decoder uses them in reverse);
  latent_dim: encoder output channels (2x the VAE latent: mean and scale) or decoder input
  channels; use_snake: SnakeBeta (True) or ELU activations; final_tanh: decoder output tanh.
  """
  io_channels: int = 2
  channels: int = 128
  c_mults: tuple[int, ...] = (1, 2, 4, 8)
  strides: tuple[int, ...] = (2, 4, 8, 8)
  latent_dim: int = 32
  use_snake: bool = False
  final_tanh: bool = True

  @classmethod
  def from_reference(cls, cfg: dict[str, Any], encoder: bool) -> "OobleckConfig":
    """Builds from the ``{"type": "oobleck", "config": {...}}`` dict of stable-audio-tools."""
    if cfg.get("type") != "oobleck":
      raise ValueError(f"only oobleck encoders/decoders are supported, got {cfg.get('type')!r}")
    c = dict(cfg.get("config", {}))
    if c.pop("antialias_activation", False):
      raise NotImplementedError("antialias_activation=True is not supported")
    if c.pop("use_nearest_upsample", False):
      raise NotImplementedError("use_nearest_upsample=True is not supported")
    io = c.pop("in_channels" if encoder else "out_channels", 2)
    final_tanh = c.pop("final_tanh", True)
    known = {"channels", "c_mults", "strides", "latent_dim", "use_snake"}
    if set(c) - known:
      raise ValueError(f"unknown oobleck config keys: {sorted(set(c) - known)}")
    defaults = cls()
    return cls(
      io_channels=io, channels=c.get("channels", defaults.channels),
      c_mults=tuple(c.get("c_mults", defaults.c_mults)),
      strides=tuple(c.get("strides", defaults.strides)),
      latent_dim=c.get("latent_dim", defaults.latent_dim),
      use_snake=c.get("use_snake", False), final_tanh=bool(final_tanh) and not encoder)


class SnakeBeta(nnx.Module):
  """x + 1/(beta + 1e-9) * sin(alpha x)^2 per channel; ``alpha``/``beta`` hold log values (C,)."""

  def __init__(self, channels: int):
    self.alpha = nnx.Param(jnp.zeros((channels,), jnp.float32))
    self.beta = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x):
    alpha = jnp.exp(self.alpha[...])
    beta = jnp.exp(self.beta[...])
    return x + (1.0 / (beta + 1e-9)) * jnp.sin(x * alpha) ** 2


class Elu(nnx.Module):
  """ELU activation (the reference's ``use_snake=False`` choice); holds no parameters."""

  def __call__(self, x):
    return jax.nn.elu(x)


def _activation(use_snake: bool, channels: int) -> nnx.Module:
  return SnakeBeta(channels) if use_snake else Elu()


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, *, stride: int = 1, dilation: int = 1,
          padding: int = 0, bias: bool = True) -> nnx.Conv:
  """A PyTorch-style Conv1d (symmetric zero padding) on (B, T, C); kernel (k, cin, cout)."""
  return nnx.Conv(cin, cout, kernel_size=(k,), strides=(stride,), padding=[(padding, padding)],
                  kernel_dilation=(dilation,), use_bias=bias, precision=_HIGHEST, rngs=rngs)


class ConvTranspose1d(nnx.Module):
  """PyTorch ``ConvTranspose1d`` semantics on (B, T, C).

  ``kernel`` (k, cin, cout) is the PyTorch weight (cin, cout, k) moved axis-wise; ``bias`` (cout,).
  Output length is (T - 1) * stride + k - 2 * padding.
  """

  def __init__(self, cin: int, cout: int, k: int, stride: int, padding: int, rngs: nnx.Rngs):
    self.stride, self.padding, self.k = stride, padding, k
    scale = 1.0 / math.sqrt(cout * k)
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (k, cin, cout), jnp.float32,
                                               -scale, scale))
    self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))

  def __call__(self, x):
    pad = self.k - 1 - self.padding
    y = jax.lax.conv_general_dilated(
      x, jnp.flip(self.kernel[...], axis=0), window_strides=(1,), padding=[(pad, pad)],
      lhs_dilation=(self.stride,), dimension_numbers=("NWC", "WIO", "NWC"), precision=_HIGHEST)
    return y + self.bias[...]


class ResidualUnit(nnx.Module):
  """x + conv1(act(conv7_dilated(act(x)))); ``layers`` = [act, conv k7, act, conv k1]."""

  def __init__(self, channels: int, dilation: int, use_snake: bool, rngs: nnx.Rngs):
    self.layers = nnx.List([
      _activation(use_snake, channels),
      _conv(channels, channels, 7, rngs, dilation=dilation, padding=3 * dilation),
      _activation(use_snake, channels),
      _conv(channels, channels, 1, rngs),
    ])

  def __call__(self, x):
    y = x
    for layer in self.layers:
      y = layer(y)
    return x + y


class EncoderBlock(nnx.Module):
  """``layers`` = [ResidualUnit d1, d3, d9, act, strided conv (k 2s, pad ceil(s/2))]."""

  def __init__(self, cin: int, cout: int, stride: int, use_snake: bool, rngs: nnx.Rngs):
    self.layers = nnx.List([ResidualUnit(cin, d, use_snake, rngs) for d in _RESIDUAL_DILATIONS] + [
      _activation(use_snake, cin),
      _conv(cin, cout, 2 * stride, rngs, stride=stride, padding=math.ceil(stride / 2)),
    ])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class DecoderBlock(nnx.Module):
  """``layers`` = [act, transposed conv (k 2s, pad ceil(s/2)), ResidualUnit d1, d3, d9]."""

  def __init__(self, cin: int, cout: int, stride: int, use_snake: bool, rngs: nnx.Rngs):
    self.layers = nnx.List([
      _activation(use_snake, cin),
      ConvTranspose1d(cin, cout, 2 * stride, stride, math.ceil(stride / 2), rngs),
    ] + [ResidualUnit(cout, d, use_snake, rngs) for d in _RESIDUAL_DILATIONS])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class OobleckEncoder(nnx.Module):
  """Audio (B, T, io) -> (B, T / prod(strides), latent_dim).

  ``layers`` = [conv k7, EncoderBlock per stride, act, conv k3].
  """

  def __init__(self, cfg: OobleckConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    mults = (1,) + tuple(cfg.c_mults)
    ch = cfg.channels
    layers: list[nnx.Module] = [_conv(cfg.io_channels, mults[0] * ch, 7, rngs, padding=3)]
    for i, s in enumerate(cfg.strides):
      layers.append(EncoderBlock(mults[i] * ch, mults[i + 1] * ch, s, cfg.use_snake, rngs))
    layers += [_activation(cfg.use_snake, mults[-1] * ch),
               _conv(mults[-1] * ch, cfg.latent_dim, 3, rngs, padding=1)]
    self.layers = nnx.List(layers)

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class OobleckDecoder(nnx.Module):
  """Latents (B, F, latent_dim) -> audio (B, F * prod(strides), io) for even strides.

  ``layers`` = [conv k7, DecoderBlock per reversed stride, act, conv k7 (no bias)]; the optional
  final tanh has no parameters and is applied in ``__call__``.
  """

  def __init__(self, cfg: OobleckConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    mults = (1,) + tuple(cfg.c_mults)
    ch = cfg.channels
    layers: list[nnx.Module] = [_conv(cfg.latent_dim, mults[-1] * ch, 7, rngs, padding=3)]
    for i in range(len(mults) - 1, 0, -1):
      layers.append(DecoderBlock(mults[i] * ch, mults[i - 1] * ch, cfg.strides[i - 1],
                                 cfg.use_snake, rngs))
    layers += [_activation(cfg.use_snake, mults[0] * ch),
               _conv(mults[0] * ch, cfg.io_channels, 7, rngs, padding=3, bias=False)]
    self.layers = nnx.List(layers)

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return jnp.tanh(x) if self.cfg.final_tanh else x


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The whole pretransform: encoder/decoder configs, VAE ``latent_dim``, ``hop``
  (``downsampling_ratio``), ``io_channels`` and the pretransform ``scale`` (latents are divided
  by it after encoding and multiplied by it before decoding)."""
  encoder: OobleckConfig
  decoder: OobleckConfig
  latent_dim: int
  hop: int
  io_channels: int
  scale: float = 1.0

  @classmethod
  def from_pretransform(cls, cfg: dict[str, Any]) -> "VAEConfig":
    """Builds from a stable-audio-tools pretransform dict (``{"type": "autoencoder", ...}``)."""
    if cfg.get("type") != "autoencoder":
      raise ValueError(f"pretransform type must be 'autoencoder', got {cfg.get('type')!r}")
    ae = cfg["config"]
    bottleneck = (ae.get("bottleneck") or {}).get("type")
    if bottleneck != "vae":
      raise NotImplementedError(f"only the 'vae' bottleneck is supported, got {bottleneck!r}")
    if ae.get("pretransform") is not None:
      raise NotImplementedError("a nested pretransform inside the autoencoder is not supported")
    enc = OobleckConfig.from_reference(ae["encoder"], encoder=True)
    dec = OobleckConfig.from_reference(ae["decoder"], encoder=False)
    out = cls(encoder=enc, decoder=dec, latent_dim=int(ae["latent_dim"]),
              hop=int(ae["downsampling_ratio"]), io_channels=int(ae["io_channels"]),
              scale=float(cfg.get("scale", 1.0)))
    if enc.latent_dim != 2 * out.latent_dim or dec.latent_dim != out.latent_dim:
      raise ValueError("a VAE encoder must output 2 * latent_dim channels and the decoder take "
                       f"latent_dim: got {enc.latent_dim}, {dec.latent_dim}, {out.latent_dim}")
    for c in (enc, dec):
      if math.prod(c.strides) != out.hop:
        raise ValueError(f"prod(strides) {math.prod(c.strides)} != downsampling_ratio {out.hop}")
    return out


class OobleckVAE(nnx.Module):
  """Encoder + VAE bottleneck + decoder; ``encoder``/``decoder`` hold the two conv stacks."""

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = OobleckEncoder(cfg.encoder, rngs)
    self.decoder = OobleckDecoder(cfg.decoder, rngs)

  @classmethod
  def from_pretransform(cls, cfg: dict[str, Any], rngs: nnx.Rngs | None = None) -> "OobleckVAE":
    return cls(VAEConfig.from_pretransform(cfg), rngs or nnx.Rngs(0))

  def encode(self, audio, sample: bool = False, key: jax.Array | None = None):
    """(B, T, io) -> (B, T / hop, latent_dim): posterior mean, or a sample when ``sample``."""
    h = self.encoder(audio)
    mean, scale = jnp.split(h, 2, axis=-1)
    if sample:
      if key is None:
        raise ValueError("encode(sample=True) needs a PRNG key")
      stdev = jax.nn.softplus(scale) + 1e-4
      mean = mean + stdev * jax.random.normal(key, mean.shape, mean.dtype)
    return mean / self.cfg.scale

  def decode(self, latents):
    """(B, F, latent_dim) -> (B, F * hop, io)."""
    return self.decoder(latents * self.cfg.scale)


def decoder_receptive_field(cfg: OobleckConfig) -> tuple[int, int]:
  """How far, in output samples, one latent frame's influence reaches outside its own hop.

  Returns (before, after): latent frame c changes output samples
  [c * hop - before, (c + 1) * hop - 1 + after] and no others. Found by carrying an index
  interval through every conv of the decoder (activations are pointwise).
  """
  lo, hi = 0, 0
  lo, hi = lo - 3, hi + 3  # input conv k7 pad 3
  for s in reversed(cfg.strides):
    k, p = 2 * s, math.ceil(s / 2)
    lo, hi = lo * s - p, hi * s + k - 1 - p
    for d in _RESIDUAL_DILATIONS:
      lo, hi = lo - 3 * d, hi + 3 * d
  lo, hi = lo - 3, hi + 3  # output conv k7 pad 3
  hop = math.prod(cfg.strides)
  return -lo, hi - (hop - 1)


def stream_margins(cfg: OobleckConfig) -> tuple[int, int]:
  """(left, right): latent frames of left context and right look-ahead that make block-wise
  decoding equal the full decode (up to float rounding). See ``StreamingDecoder``."""
  before, after = decoder_receptive_field(cfg)
  hop = math.prod(cfg.strides)
  return -(-after // hop), -(-before // hop)


class StreamingDecoder:
  """Decodes a latent stream block by block, equal to ``vae.decode`` of the whole sequence.

  Each call decodes the new frames together with ``left`` frames of already-seen context and
  holds back the last ``right`` frames (their audio still depends on frames not yet received);
  ``flush`` emits them. With ``left``/``right`` from ``stream_margins`` (the decoder's exact
  receptive field) the stream equals the full decode up to float rounding; the tests measure
  ~1e-6 and require 1e-4. For the Stable Audio Open VAE (strides 2,4,4,8,8, hop 2048) a latent
  frame reaches 18,981 samples before and 18,981 after its own hop, so left = right = 10
  frames (464 ms of look-ahead at 44.1 kHz); the audio of a block is final once 10 more
  frames have arrived. Smaller margins trade exactness for latency.

  Holds: ``frames`` (latent frames kept: the context plus the not-yet-final ones), ``start``
  (index in the stream of ``frames[0]``), ``done`` (frames whose audio was emitted). The VAE's
  parameters are captured when the decoder is built; later changes to ``vae`` are not seen.
  """

  def __init__(self, vae: OobleckVAE, left: int | None = None, right: int | None = None):
    d_left, d_right = stream_margins(vae.cfg.decoder)
    self.left = d_left if left is None else int(left)
    self.right = d_right if right is None else int(right)
    self.hop = vae.cfg.hop
    self.io_channels = vae.cfg.decoder.io_channels
    graphdef, state = nnx.split(vae)

    @jax.jit
    def _decode(state, z):
      return nnx.merge(graphdef, state).decode(z)

    self._decode = lambda z: _decode(state, z)
    self.frames = np.zeros((0, vae.cfg.latent_dim), np.float32)
    self.start = 0
    self.done = 0

  def _emit(self, final_end: int) -> np.ndarray:
    """Decodes the kept window and returns the audio of frames [done, final_end)."""
    if final_end <= self.done:
      return np.zeros((0, self.io_channels), np.float32)
    audio = np.asarray(self._decode(jnp.asarray(self.frames)[None]))[0]
    if audio.shape[0] != self.frames.shape[0] * self.hop:
      raise ValueError("the decoder's output length is not frames * hop (odd strides?)")
    a, b = (self.done - self.start) * self.hop, (final_end - self.start) * self.hop
    out = audio[a:b]
    self.done = final_end
    keep_from = max(self.start, self.done - self.left)
    self.frames = self.frames[keep_from - self.start:]
    self.start = keep_from
    return out

  def push(self, block) -> np.ndarray:
    """Takes (frames, latent_dim); returns (samples, io) of audio that is now final."""
    block = np.asarray(block, np.float32)
    if block.ndim != 2 or block.shape[1] != self.frames.shape[1]:
      raise ValueError(f"expected (frames, {self.frames.shape[1]}), got {block.shape}")
    self.frames = np.concatenate([self.frames, block], axis=0)
    end = self.start + self.frames.shape[0]
    return self._emit(end - self.right)

  def flush(self) -> np.ndarray:
    """Returns the audio of every held-back frame (decoded as the end of the sequence) and
    resets the decoder for a new stream."""
    out = self._emit(self.start + self.frames.shape[0])
    self.frames = self.frames[:0]
    self.start = self.done = 0
    return out
