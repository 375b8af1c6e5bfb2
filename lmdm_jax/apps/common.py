"""What the commands share beyond the System (``lmdm_jax.system``): the one-line usage error,
time-varying prompts (``SECONDS:TEXT``), a decoder warm-up and a real-time-factor clock.
"""
from __future__ import annotations

import dataclasses
import re
import time

import numpy as np

from lmdm_jax.system import DEFAULT_PROMPT


class UsageError(ValueError):
  """A bad command-line value; the CLIs print it without a traceback."""


# ------------------------------------------------------------------------------------ prompts

_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


@dataclasses.dataclass(frozen=True)
class TimedPrompt:
  start: float  # seconds
  text: str


def parse_prompts(specs, default: str = DEFAULT_PROMPT) -> list[TimedPrompt]:
  """``["0:solo piano, calm", "20:string quartet, lively"]`` -> sorted ``TimedPrompt``s.

  A spec without a colon starts at 0 s. With a colon, the part before the first colon must be a
  non-negative number of seconds (write ``0:genre: jazz`` for a prompt that contains a colon).
  The earliest prompt also covers the time before it.
  """
  if not specs:
    return [TimedPrompt(0.0, default)]
  out = []
  for spec in specs:
    if ":" not in spec:
      out.append(TimedPrompt(0.0, spec.strip()))
      continue
    head, text = spec.split(":", 1)
    head, text = head.strip(), text.strip()
    if not _NUM.match(head):
      raise UsageError(f"--prompt {spec!r}: {head!r} is not a time in seconds; use "
                       "'SECONDS:text' (e.g. '20:string quartet, lively'), or '0:text' for a "
                       "prompt that contains a colon")
    t = float(head)
    if t < 0:
      raise UsageError(f"--prompt {spec!r}: the start time must be >= 0 seconds, got {t:g}")
    if not text:
      raise UsageError(f"--prompt {spec!r}: empty prompt text")
    out.append(TimedPrompt(t, text))
  out.sort(key=lambda p: p.start)
  for a, b in zip(out, out[1:]):
    if a.start == b.start:
      raise UsageError(f"two prompts start at {a.start:g} s: {a.text!r} and {b.text!r}")
  return out


def prompt_schedule(prompts: list[TimedPrompt], block_seconds: float, n_blocks: int) -> list[int]:
  """Index of the prompt in force for each block: a prompt starting at second t takes over at the
  block containing t (block k covers [k * block_seconds, (k + 1) * block_seconds))."""
  first_block = [int(np.floor(p.start / block_seconds + 1e-9)) for p in prompts]
  sched, cur = [], 0
  for k in range(n_blocks):
    while cur + 1 < len(prompts) and first_block[cur + 1] <= k:
      cur += 1
    sched.append(cur)
  return sched


def warm_decoder(codec, frames: int) -> None:
  """Compile the codec's stream decoder before timing starts (push + flush of silence)."""
  sd = codec.stream_decoder()
  sd.push(np.zeros((frames, codec.latent_dim), np.float32))
  sd.flush()


class RTF:
  """Real-time factor: audio seconds produced / wall seconds since ``start``."""

  def __init__(self):
    self.t0 = time.perf_counter()
    self.audio_s = 0.0

  def add(self, seconds: float) -> float:
    self.audio_s += seconds
    return self.value

  @property
  def wall(self) -> float:
    return time.perf_counter() - self.t0

  @property
  def value(self) -> float:
    return self.audio_s / max(self.wall, 1e-9)
