"""``Codec`` around the Flax Oobleck VAE (Stable Audio Open's: 44.1 kHz stereo, hop 2048, 64 dims).

Encoding uses the posterior mean (deterministic). ``stream_decoder()`` decodes block-wise with
the exact margins of ``lmdm_jax.nn.oobleck.StreamingDecoder`` (10 frames of context and 10 of
look-ahead for this VAE), so the stream equals ``decode`` of the whole sequence up to float
rounding (tests require 1e-4; measured ~1e-6).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmdm_jax.codecs.base import Codec, StreamDecoder
from lmdm_jax.convert import oobleck as convert
from lmdm_jax.nn.oobleck import STABLE_AUDIO_OPEN_VAE, OobleckVAE, StreamingDecoder


class OobleckCodec(Codec):
  """Holds ``vae`` (``OobleckVAE``, parameters captured for the jitted calls at construction)
  and the geometry read from its config."""

  def __init__(self, vae: OobleckVAE, sample_rate: int = 44100):
    self.vae = vae
    self.sample_rate = int(sample_rate)
    self.channels = vae.cfg.io_channels
    self.hop = vae.cfg.hop
    self.latent_dim = vae.cfg.latent_dim
    graphdef, state = nnx.split(vae)
    enc = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    dec = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
    self._encode = lambda x: enc(state, x)
    self._decode = lambda z: dec(state, z)

  @classmethod
  def from_state_dict(cls, state_dict: Mapping[str, Any],
                      config: dict[str, Any] = STABLE_AUDIO_OPEN_VAE, sample_rate: int = 44100,
                      **allow) -> "OobleckCodec":
    """A PyTorch state_dict (see ``lmdm_jax.convert.oobleck``) + pretransform config dict."""
    vae = OobleckVAE.from_pretransform(copy.deepcopy(config))
    convert.load_torch_state_dict(vae, state_dict, **allow)
    return cls(vae, sample_rate)

  @classmethod
  def from_checkpoint(cls, path: str, config: dict[str, Any] = STABLE_AUDIO_OPEN_VAE,
                      sample_rate: int = 44100) -> "OobleckCodec":
    """A ``.safetensors`` or torch (``.ckpt``/``.pt``/``.pth``) file. When it is a whole
    stable-audio-tools model, only the keys under ``pretransform.model.`` are the VAE's and the
    rest (DiT, conditioners) is left out; otherwise every key must be a VAE key."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no VAE checkpoint at {path!r}")
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file
      sd: dict[str, Any] = dict(load_file(path))
    else:
      import torch
      sd = torch.load(path, map_location="cpu", weights_only=True)
      sd = sd.get("state_dict", sd)
    if any(k.startswith(convert.PREFIXES) for k in sd):
      sd = {k: v for k, v in sd.items() if k.startswith(convert.PREFIXES)}
    return cls.from_state_dict(sd, config, sample_rate)

  def _check_audio(self, audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, np.float32)
    if audio.ndim not in (2, 3) or audio.shape[-2] != self.channels:
      raise ValueError(f"expected ([batch,] {self.channels}, samples) audio, got {audio.shape}")
    return audio

  def encode(self, audio: np.ndarray) -> np.ndarray:
    """([B,] channels, samples) -> ([B,] frames, latent_dim); samples cut to a multiple of hop."""
    audio = self._check_audio(audio)
    n = audio.shape[-1] // self.hop * self.hop
    x = np.swapaxes(audio[..., :n], -1, -2)
    batched = x.ndim == 3
    z = np.asarray(self._encode(jnp.asarray(x if batched else x[None])))
    return z if batched else z[0]

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """([B,] frames, latent_dim) -> ([B,] channels, frames * hop)."""
    z = np.asarray(latents, np.float32)
    if z.ndim not in (2, 3) or z.shape[-1] != self.latent_dim:
      raise ValueError(f"expected ([batch,] frames, {self.latent_dim}) latents, got {z.shape}")
    batched = z.ndim == 3
    audio = np.asarray(self._decode(jnp.asarray(z if batched else z[None])))
    audio = np.swapaxes(audio, -1, -2)
    return audio if batched else audio[0]

  def stream_decoder(self, left: int | None = None, right: int | None = None) -> StreamDecoder:
    """Block-wise decoder; ``left``/``right`` default to the exact margins."""
    return OobleckStreamDecoder(StreamingDecoder(self.vae, left, right))


class OobleckStreamDecoder(StreamDecoder):
  """``StreamDecoder`` over ``StreamingDecoder`` (held in ``inner``); audio (channels, samples)."""

  def __init__(self, inner: StreamingDecoder):
    self.inner = inner

  def push(self, block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(self.inner.push(block).T)

  def flush(self) -> np.ndarray:
    return np.ascontiguousarray(self.inner.flush().T)
