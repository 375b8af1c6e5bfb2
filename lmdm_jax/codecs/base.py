"""The one interface every audio codec implements.

Latents are frame-major float32 arrays ``(frames, latent_dim)`` (a leading batch axis is allowed);
audio is ``(channels, samples)`` float32 in [-1, 1] at ``sample_rate``.
"""
from __future__ import annotations

import abc

import numpy as np


class Codec(abc.ABC):
  """Audio <-> latent frames. Subclasses set the four geometry attributes."""

  sample_rate: int  # audio samples per second
  channels: int  # audio channels (1 mono, 2 stereo)
  hop: int  # audio samples per latent frame
  latent_dim: int  # channels of one latent frame

  @property
  def frame_rate(self) -> float:
    """Latent frames per second."""
    return self.sample_rate / self.hop

  @abc.abstractmethod
  def encode(self, audio: np.ndarray) -> np.ndarray:
    """(channels, samples) -> (frames, latent_dim); samples are cut to a multiple of ``hop``."""

  @abc.abstractmethod
  def decode(self, latents: np.ndarray) -> np.ndarray:
    """(frames, latent_dim) -> (channels, frames * hop)."""

  @abc.abstractmethod
  def stream_decoder(self) -> "StreamDecoder":
    """A stateful decoder that takes latent blocks one at a time (see ``StreamDecoder``)."""

  def low_latency(self, block: int) -> "Codec":
    """This codec (same encoder and latents) with the decoder that holds back the least audio
    when fed ``block`` frames at a time, for live use (the jam). Default: the codec itself."""
    return self

  def block_decoder(self, frames: int) -> "BlockDecoder | None":
    """The stream decoder as pure functions for blocks of exactly ``frames`` latent frames, to
    run inside a compiled block program (``BlockDecoder``); None when the codec has none for
    that block size (callers then push blocks through ``stream_decoder``)."""
    return None


class StreamDecoder(abc.ABC):
  """Block-wise decoding of a latent stream.

  ``push(block)`` takes ``(frames, latent_dim)`` and returns the audio that is final so far
  (it may hold back a few frames of look-ahead); ``flush()`` returns the rest. The concatenation of
  every returned piece equals ``codec.decode`` of the whole sequence, within the margin the codec
  documents.
  """

  @abc.abstractmethod
  def push(self, block: np.ndarray) -> np.ndarray:
    ...

  @abc.abstractmethod
  def flush(self) -> np.ndarray:
    ...


class BlockDecoder(abc.ABC):
  """``StreamDecoder`` for fixed blocks of ``frames`` latent frames as pure JAX functions, so
  that a compiled block program can decode its block (the batch axis is kept).

  ``params``: the codec's arrays (an argument of the program, not a constant in it);
  ``init(batch)``: the decoder state before the first block; ``step(params, state, latents
  (B, frames, latent_dim))`` -> (audio (B, channels, ``max_samples``), state): static shapes;
  ``valid(k)``: the sample range (lo, hi) of block k's (0-based) audio that the stream decoder
  would have returned for that block (host side); ``tail(state, item)``: a ``StreamDecoder``
  that continues from ``state`` for batch item ``item`` (its ``flush`` gives the stream's end).
  Concatenating ``audio[..., lo:hi]`` of every block and the tail's ``flush`` equals the stream
  decoder's output, within the codec's documented margin.
  """

  params: object
  frames: int
  max_samples: int

  @abc.abstractmethod
  def init(self, batch: int):
    ...

  @abc.abstractmethod
  def step(self, params, state, latents):
    ...

  @abc.abstractmethod
  def valid(self, k: int) -> tuple[int, int]:
    ...

  @abc.abstractmethod
  def tail(self, state, item: int = 0) -> StreamDecoder:
    ...
