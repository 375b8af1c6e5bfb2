"""Command-line value checks shared by sample.py and the jam CLI. Each raises ``UsageError`` (one
line naming the option and the problem; the CLIs print it and exit 2) and runs before any model is
loaded, so a bad value costs no loading time.
"""
from __future__ import annotations

import math
import os

from lmdm_jax.apps.common import UsageError

MAX_SECONDS = 24 * 3600.0  # one day of audio: bounds the per-block schedule and the output file
MAX_SEED = 2 ** 32 - 1


def number(option: str, value: float, lo: float | None = None, hi: float | None = None,
           positive: bool = False) -> float:
  """A finite number in [lo, hi] (and > 0 when ``positive``)."""
  if value is None or not math.isfinite(value):
    raise UsageError(f"{option} must be a finite number, got {value}")
  if positive and value <= 0:
    raise UsageError(f"{option} must be positive, got {value:g}")
  if lo is not None and value < lo:
    raise UsageError(f"{option} must be >= {lo:g}, got {value:g}")
  if hi is not None and value > hi:
    raise UsageError(f"{option} must be <= {hi:g}, got {value:g}")
  return value


def seconds(option: str, value: float, max_seconds: float = MAX_SECONDS) -> float:
  return number(option, value, hi=max_seconds, positive=True)


def steps(value: int | None) -> int | None:
  """``--steps``: None (the config's) or 1..sampling.MAX_STEPS."""
  from lmdm_jax.sampling import MAX_STEPS
  if value is not None and not 1 <= value <= MAX_STEPS:
    raise UsageError(f"--steps must be in 1..{MAX_STEPS}, got {value}")
  return value


def seed(value: int) -> int:
  if not 0 <= value <= MAX_SEED:
    raise UsageError(f"--seed must be in 0..{MAX_SEED}, got {value}")
  return value


def text(option: str, value: str) -> str:
  """Text that encodes as UTF-8 (a command line can carry undecodable bytes as lone surrogates)."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise UsageError(f"{option} {value!r}: not valid UTF-8 text ({e.reason} at {e.start})") from e
  return value


def _same_file(a: str, b: str) -> bool:
  if os.path.exists(a) and os.path.exists(b):
    return os.path.samefile(a, b)
  return os.path.realpath(a) == os.path.realpath(b)


def output(option: str, path: str, inputs: dict | None = None) -> str:
  """A writable output file name that is none of ``inputs`` ({option: path})."""
  from lmdm_jax.data.audio import check_output_path
  try:
    check_output_path(path)
  except ValueError as e:
    raise UsageError(f"{option}: {e}") from e
  for name, other in (inputs or {}).items():
    if other and _same_file(path, other):
      raise UsageError(f"{option} {path} is the same file as {name}: it would be replaced")
  return path


def input_file(option: str, path: str) -> str:
  if not os.path.exists(path):
    raise UsageError(f"{option} {path}: no such file or folder")
  return path


def config(spec: str):
  """Load ``--config`` (a registered name or a file): the ConfigDict, or UsageError naming why."""
  from lmdm_jax.config import load_cli_config
  try:
    return load_cli_config(spec)
  except Exception as e:  # noqa: BLE001 - whatever makes the named config unusable
    msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
    raise UsageError(f"--config {spec!r}: {msg}" if spec not in msg else msg) from e


def regime(value: str, where: str) -> str:
  from lmdm_jax.sampling import REGIMES
  if value not in REGIMES:
    raise UsageError(f"unknown regime {value!r} ({where}); choose one of {', '.join(REGIMES)}")
  return value


def codec(name: str | None) -> str | None:
  """``--codec``: a registered codec name, or 'none'."""
  from lmdm_jax import codecs
  if name and name.lower() != "none" and name not in codecs.available_codecs():
    raise UsageError(f"--codec {name!r}: unknown codec; available: "
                     f"{', '.join(codecs.available_codecs())}, none")
  return name


def one_line(msg) -> str:
  """An error message on one line (file-format errors sometimes carry newlines)."""
  return " ".join(str(msg).split())
