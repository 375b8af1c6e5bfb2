"""Audio codecs behind one interface (``base.Codec``), by name.

``get_codec("spectral")`` (alias ``"default"``) is the weight-free default codec shipped with the
repo: PCA log-STFT latents + streamed fast Griffin-Lim, 22.05 kHz mono, 43 frames/s, 192 dims.
"""
from __future__ import annotations

import importlib

from lmdm_jax.codecs.base import Codec, StreamDecoder

# name -> "module:Class"; imported lazily so that a codec's dependencies load only when used.
_REGISTRY = {
    "spectral": "lmdm_jax.codecs.spectral:SpectralCodec",
}
_ALIASES = {"default": "spectral"}


def register_codec(name: str, target: str) -> None:
  """Add a codec as ``"package.module:ClassName"`` (e.g. from the Oobleck wrapper's module)."""
  _REGISTRY[name] = target


def available_codecs() -> list[str]:
  return sorted(_REGISTRY) + sorted(_ALIASES)


def get_codec(name: str = "default", **kwargs) -> Codec:
  """Instantiate a codec by name; kwargs go to its constructor."""
  key = _ALIASES.get(name, name)
  if key not in _REGISTRY:
    raise ValueError(f"unknown codec {name!r}; available: {', '.join(available_codecs())}")
  module, cls = _REGISTRY[key].split(":")
  return getattr(importlib.import_module(module), cls)(**kwargs)


__all__ = ["Codec", "StreamDecoder", "available_codecs", "get_codec", "register_codec"]
