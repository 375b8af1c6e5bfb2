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


def load(config: str | None, checkpoint: str | None, seed: int, log=print, tag="[sample]", *,
         t5: str | None = None, vae: str | None = None, codec: str | None = None):
  """-> (conf, DiTConfig, model). Random weights (said on the first line) without a checkpoint.

  ``config`` is a ``--config`` value (a registered name or the user's own .py file). A checkpoint
  that records its config (a bundle, a train.py run) uses that one, looked up among the
  registered configs only (the file is untrusted data); when it names anything else, the user's
  ``--config`` is used instead, or, without one, a UsageError says so. A damaged or inconsistent
  checkpoint is a UsageError too (one line, no traceback in the CLIs).

  ``t5``: a local T5 folder for T5-conditioned models (--t5); ``vae`` / ``codec``: see
  ``load_converted``.
  """
  from flax import nnx

  from lmdm_jax.nn.dit import DiT
  # --- converted stable-audio-tools / LMDM checkpoints (lmdm_jax.convert.load) ---
  if checkpoint:
    from lmdm_jax.convert.load import is_converted
    if is_converted(checkpoint):
      return load_converted(checkpoint, config, t5=t5, vae=vae, codec=codec, log=log, tag=tag)
  # ---
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
    _use_t5(conf, t5, log, tag)
    return conf, cfg, model
  conf = _cli_config(config)
  _use_t5(conf, t5, log, tag)
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
  converted = conf.get("converted") if hasattr(conf, "get") else None
  if converted is not None and not override:  # the converted checkpoint's VAE
    return converted.codec
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
  converted = conf.get("converted") if hasattr(conf, "get") else None
  if converted is not None:
    return converted.text
  if conf.conditioner.type == "t5" and not conf.conditioner.get("path"):
    raise UsageError(f"config {conf.name!r} encodes prompts with T5: pass --t5 DIR, a local "
                     "Hugging Face T5 folder (config.json, model.safetensors, tokenizer.json or "
                     "spiece.model); nothing is downloaded")
  return _text_encoder(conf)


_TEXT_ENCODERS: dict = {}


def _text_encoder(conf):
  key = repr((sorted(dict(conf.conditioner).items()), conf.model.get("cond_token_dim")))
  if key not in _TEXT_ENCODERS:
    from lmdm_jax import text as text_lib
    _TEXT_ENCODERS[key] = text_lib.from_config(conf)
  return _TEXT_ENCODERS[key]


# ------------------------------------------- converted checkpoints: conditioning and streams


def _use_t5(conf, t5: str | None, log, tag) -> None:
  """--t5 DIR: the local T5 folder of a T5-conditioned config."""
  if not t5:
    return
  if conf.conditioner.type != "t5":
    log(f"{tag} --t5 is ignored: config {conf.name!r} encodes prompts with "
        f"{conf.conditioner.type!r}")
    return
  if not os.path.isdir(t5):
    raise UsageError(f"--t5 {t5!r} is not a folder")
  conf.conditioner.path = t5


def load_converted(checkpoint: str, config: str | None, *, t5=None, vae=None, codec=None,
                   log=print, tag="[sample]"):
  """A converted checkpoint (``python3 -m lmdm_jax.convert``) -> (conf, DiTConfig, model).
  ``conf`` holds the config the sampler reads (name, model, sampler defaults) and ``converted``,
  the ``lmdm_jax.convert.load.ConvertedSystem`` (conditioning, T5, VAE). Missing pieces raise
  one UsageError that names each and its flag (--t5, --vae)."""
  import ml_collections

  from lmdm_jax.convert import load as conv_load
  from lmdm_jax.nn.dit import count_params
  if config is not None:
    log(f"{tag} --config {config} is ignored: a converted checkpoint brings its own config")
  try:
    system = conv_load.load(checkpoint, t5=t5, vae=vae, codec=not codec)
  except conv_load.NotSampleable as e:
    raise UsageError(str(e).replace(":\n  - ", ": ").replace("\n  - ", "; ")) from e
  except ValueError as e:
    raise UsageError(f"--checkpoint {checkpoint}: {e}") from e
  cfg = system.cfg
  sc = {k: system.sampler[k] for k in ("regime", "steps", "cfg_scale", "plus_plus", "pingpong")}
  conf = ml_collections.ConfigDict(dict(
      name=f"converted:{os.path.basename(os.path.normpath(checkpoint))}",
      model=dataclasses.asdict(cfg), sampler=sc))
  conf.converted = system
  n = count_params(system.model)
  log(f"{tag} loaded converted {checkpoint} ({cfg.depth}x{cfg.embed_dim}, {n / 1e6:.1f}M "
      f"parameters; prompt encoder {'T5' if system.text is not None else 'none'}, codec "
      f"{'Oobleck VAE' if system.codec is not None else 'none'}, regime {sc['regime']})")
  return conf, cfg, system.model


class PromptConditioning:
  """prompt -> (cross tokens (1, cross_len, cond_token_dim), global (1, G) or None) for one
  stream: the converted checkpoint's T5 + seconds conditioning, or the config's text encoder and
  zero global conditioning. ``seconds``: the length of the piece (a base model's seconds_total)."""

  def __init__(self, conf, cfg: DiTConfig, seconds: float, log=print, tag="[sample]"):
    self.cfg = cfg
    self.converted = conf.get("converted") if hasattr(conf, "get") else None
    if self.converted is not None:
      c = self.converted
      self.seconds_total = (c.sampler["seconds_total"] if c.sampler["seconds_total"] is not None
                            else float(seconds))
      self.cross_len = c.cross_len
      spec = c.conditioning
      log(f"{tag} conditioning: cross tokens {list(spec.cross_ids)} ({self.cross_len}), global "
          f"{list(spec.global_ids)}; seconds_start {c.sampler['seconds_start']:g}, seconds_total "
          f"{self.seconds_total:g}")
      return
    self.text = text_encoder(conf, cfg)
    self.cross_len = self.text.max_tokens if self.text is not None else 1

  def __call__(self, prompt: str):
    if self.converted is not None:
      return self.converted.condition([prompt], seconds_total=self.seconds_total)
    cfg = self.cfg
    toks = (np.asarray(self.text([prompt])) if self.text is not None
            else np.zeros((1, 1, cfg.cond_token_dim), np.float32))
    glob = np.zeros((1, cfg.global_cond_dim), np.float32) if cfg.global_cond_dim else None
    return toks, glob


def make_stream(model, regime: str, frames: int, n_prompts: int = 1, **kw):
  """``sampling.Stream`` for streaming models; ``clip_sampling.ClipStream`` (the whole clip at
  once) for base models, whose regime is ``clip``. kw: batch, cfg_guidance, cross_len, seed,
  sampler."""
  from lmdm_jax import clip_sampling, sampling
  if regime == clip_sampling.REGIME or not model.cfg.streaming:
    if regime != clip_sampling.REGIME:
      raise UsageError(f"--regime {regime}: this model has no input_add channels (a base model "
                       "such as SAO-small), so it cannot stream; it samples whole clips (the "
                       "default regime 'clip' for it)")
    if n_prompts > 1:
      raise UsageError("a base model generates the whole clip at once: give one --prompt")
    return clip_sampling.ClipStream(model, frames, **kw)
  return sampling.Stream(model, regime=regime, **kw)


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
