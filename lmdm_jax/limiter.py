"""A soft limiter for the last stage of decoding, which counts what it changes.

A sample-wise soft knee: ``|x| <= threshold`` passes unchanged (exactly); above it, the excess is
squashed by ``tanh`` into the headroom left below full scale:

  y = sign(x) * (t + (1 - t) * tanh((|x| - t) / (1 - t)))      for |x| > t

continuous with slope 1 at the knee, and ``|y| <= 1`` always (``|y| < 1`` until ``tanh`` rounds
to 1 in float). It has no memory and no look-ahead, so a streamed signal is limited exactly as the
whole signal would be.

It is a safety net for listeners, not part of the model: the System leaves it off unless asked
(``System.stream(limiter=True)``), ``bench/music_eval.py`` measures the decoder's raw output, and
``limited`` says how many samples (values, over all channels) it changed, so a model that relies on
it shows.
"""
from __future__ import annotations

import numpy as np


class SoftLimiter:
  """``limiter(audio)`` -> the limited audio (same shape, float32); ``limited`` / ``samples`` count
  the values changed / seen so far over every call."""

  def __init__(self, threshold: float = 0.9):
    threshold = float(threshold)
    if not 0.0 < threshold < 1.0:
      raise ValueError(f"limiter threshold must be between 0 and 1 (exclusive), got {threshold}")
    self.threshold = threshold
    self.limited = 0
    self.samples = 0

  def __call__(self, audio: np.ndarray) -> np.ndarray:
    x = np.asarray(audio, np.float32)
    t = self.threshold
    over = np.abs(x) > t
    n = int(over.sum())
    self.samples += x.size
    if not n:
      return x
    self.limited += n
    y = x.copy()
    a = np.abs(x[over]).astype(np.float64)
    y[over] = np.sign(x[over]) * np.minimum(t + (1 - t) * np.tanh((a - t) / (1 - t)), 1.0)
    return y

  @property
  def share(self) -> float:
    """The fraction of the samples seen that were limited (0 before any)."""
    return self.limited / self.samples if self.samples else 0.0

  def report(self) -> str | None:
    """'[limiter] 1234 samples (0.5%) limited', or None when nothing was limited."""
    if not self.limited:
      return None
    return f"[limiter] {self.limited} samples ({100 * self.share:.2g}%) limited"


def make_limiter(limiter) -> SoftLimiter | None:
  """None/False -> None (off); True -> a ``SoftLimiter()``; a ``SoftLimiter`` -> itself (so the
  caller keeps it and reads its count)."""
  if limiter is None or limiter is False:
    return None
  if limiter is True:
    return SoftLimiter()
  if isinstance(limiter, SoftLimiter):
    return limiter
  raise ValueError(f"limiter must be True, False, None or a SoftLimiter, got {limiter!r}")
