"""What the applications (sample.py, jam, sketch) share: picking a config, loading the model,
codec and text encoder, parsing time-varying prompts, and a real-time-factor clock.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time

import numpy as np

from lmdm_jax.config import DiTConfig, config_named_by_file, load_cli_config, load_config


class UsageError(ValueError):
  """A bad command-line value; the CLIs print it without a traceback."""


# ------------------------------------------------------------------------------------ prompts

_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


@dataclasses.dataclass(frozen=True)
class TimedPrompt:
  start: float  # seconds
  text: str


# String quartet: the bundled model plays this at about -20 dBFS (seeds 0-1, 30 s), while short
# generic "Piano playing ..." prompts come out quiet, -50 to -80 (README, "The bundled model").
DEFAULT_PROMPT = "String quartet playing a lively piece. G major, 4/4 time, 120 BPM."
SAO_FRAME_RATE = 44100 / 2048  # latent frames/s of the SAO VAE: the time base when no codec decodes


def frame_rate(codec) -> float:
  return codec.frame_rate if codec is not None else SAO_FRAME_RATE


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


# -------------------------------------------------------------------------------------- setup


def codec_name(conf, override: str | None = None) -> str | None:
  if override:
    return None if override.lower() == "none" else override
  return conf.get("codec", None) if hasattr(conf, "get") else None


def default_config(log=print) -> str:
  """``demo`` when its codec and text encoder load here, else ``tiny`` (and say why)."""
  try:
    conf = load_config("demo")
    from lmdm_jax import codecs
    codecs.get_codec(conf.codec)
    _text_encoder(conf)  # loaded once: text_encoder() reuses it
    log("[sample] config demo (spectral codec + MiniLM prompts; pass --config to change)")
    return "demo"
  except Exception as e:  # noqa: BLE001 - any missing piece falls back to tiny
    log(f"[sample] config tiny: the demo config needs its codec and MiniLM text encoder, which "
        f"did not load here ({type(e).__name__}: {str(e)[:160]}); tiny writes latents, not audio")
    return "tiny"


def load(config: str | None, checkpoint: str | None, seed: int, log=print, tag="[sample]"):
  """-> (conf, DiTConfig, model). Random weights (said on the first line) without a checkpoint.

  ``config`` is a ``--config`` value (a registered name or the user's own .py file). A checkpoint
  that records its config (a bundle, a train.py run) uses that one, looked up among the
  registered configs only (the file is untrusted data); when it names anything else, the user's
  ``--config`` is used instead, or, without one, a UsageError says so. A damaged or inconsistent
  checkpoint is a UsageError too (one line, no traceback in the CLIs).
  """
  from flax import nnx

  from lmdm_jax.nn.dit import DiT
  if not checkpoint and config is None:
    config = default_config(log)
    from lmdm_jax.bundle import DEFAULT_BUNDLE
    if config == "demo" and os.path.isfile(DEFAULT_BUNDLE):
      checkpoint = DEFAULT_BUNDLE  # the trained default model shipped in the repository
  if checkpoint:
    from lmdm_jax.checkpoint_io import load_model
    try:
      cfg, model, extras = load_model(checkpoint)
    except ValueError as e:
      raise UsageError(f"--checkpoint: {e}") from None
    meta = extras.get("meta") or {}
    if "meta" in extras:  # a train.py run: its config names its text encoder, codec and sampler
      conf = _recorded_config(meta.get("config"), checkpoint, config, log, tag)
    else:
      conf = _cli_config(config or "tiny")
    if meta.get("arc_step") is not None:  # an ARC-Forcing bundle: base + merged adapter
      trained = f"base step {meta.get('base_step', '?')} + ARC-Forcing step {meta['arc_step']}"
    else:
      trained = f"step {extras.get('step', '?')}"
    log(f"{tag} loaded {checkpoint} ({cfg.depth}x{cfg.embed_dim}, {trained}), config {conf.name}")
    return conf, cfg, model
  conf = _cli_config(config)
  cfg = DiTConfig.from_config(conf.model)
  log(f"{tag} config {conf.name}: RANDOM WEIGHTS from seed {seed} (no trained checkpoint given): "
      "this exercises the streaming sampler and decoder; it does not make music.")
  return conf, cfg, DiT(cfg, rngs=nnx.Rngs(seed))


def _cli_config(value: str):
  try:
    return load_cli_config(value)
  except ValueError as e:
    raise UsageError(f"--config: {e}") from None


def _recorded_config(value, checkpoint: str, config: str | None, log, tag: str):
  """The config a checkpoint records (registered names only), else the user's ``--config``."""
  where = checkpoint if checkpoint.endswith(".npz") else os.path.join(checkpoint, "config.json")
  field = "__meta__ config" if checkpoint.endswith(".npz") else "config"
  try:
    return config_named_by_file(value, field, where)
  except ValueError as e:
    if config is None:
      raise UsageError(f"{e}; pass --config to choose the config to sample with") from None
    log(f"{tag} note: {where} records config {str(value)[:80]!r}, not a registered config; "
        f"using --config {config}")
    return _cli_config(config)


def load_codec(conf, cfg: DiTConfig, override: str | None, log=print, tag="[sample]"):
  """The codec that decodes this model's latents, or None (and say why)."""
  name = codec_name(conf, override)
  if name is None:
    log(f"{tag} no codec named (the config has no `codec` field and no --codec): cannot decode; "
        "writing latents instead")
    return None
  from lmdm_jax import codecs
  codec = codecs.get_codec(name)
  if codec.latent_dim != cfg.io_channels:
    log(f"{tag} codec {name!r} has {codec.latent_dim}-dim latents but the model has "
        f"io_channels={cfg.io_channels}: cannot decode; writing latents instead")
    return None
  return codec


def text_encoder(conf, cfg: DiTConfig):
  """The config's text encoder (None for a model without text conditioning), loaded once per
  process for a given conditioner section (encoders hold no per-use state)."""
  if not cfg.cond_token_dim:
    return None
  return _text_encoder(conf)


_TEXT_ENCODERS: dict = {}


def _text_encoder(conf):
  key = repr((sorted(dict(conf.conditioner).items()), conf.model.get("cond_token_dim")))
  if key not in _TEXT_ENCODERS:
    from lmdm_jax import text as text_lib
    _TEXT_ENCODERS[key] = text_lib.from_config(conf)
  return _TEXT_ENCODERS[key]


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
