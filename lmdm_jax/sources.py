"""Where a System comes from: every kind of model source this project reads, in one place.

  None                      the bundled trained model (``lmdm_jax/assets/demo_model.npz``)
  path/to/model.npz         a bundle (``lmdm_jax.bundle``)
  path/to/run/              a ``train.py`` work directory (config.json + checkpoints/) or an
                            ``arc.py`` one (arc_config.json: its base + latest adapter, merged)
  path/to/converted/        a converted stable-audio-tools / LMDM checkpoint (``lmdm convert``)
  config=NAME, no source    a registered config (or the user's config file) with RANDOM weights

The files of a source are untrusted data: a config they record is looked up among the registered
configs only (``config.config_named_by_file``), and loaders check declared sizes before building
(``file_checks``). Every failure is a ``SourceError`` whose one-line message names the missing
piece and the flag (``--t5``, ``--vae``, ``--codec``, ``--config``) that supplies it.
"""
from __future__ import annotations

import json
import os

import numpy as np

from lmdm_jax.config import DiTConfig, config_named_by_file, load_cli_config
from lmdm_jax.system import SamplerDefaults, System


class SourceError(ValueError):
  """A model source that cannot be loaded or assembled (one line, names the flag to use)."""


def kind_of(path: str) -> str:
  """'bundle' | 'workdir' | 'arc' | 'converted', or SourceError."""
  if os.path.isfile(path):
    if path.endswith(".npz"):
      return "bundle"
    raise SourceError(f"model source {path!r}: a file that is not a model bundle (.npz)")
  if not os.path.isdir(path):
    raise SourceError(f"model source {path!r}: no such file or directory")
  if os.path.isfile(os.path.join(path, "arc_config.json")):
    return "arc"
  from lmdm_jax.training import workdir
  if workdir.is_workdir(path):
    return "workdir"
  from lmdm_jax.convert.load import is_converted
  if is_converted(path):
    return "converted"
  raise SourceError(f"model source {path!r}: neither a train.py work directory (config.json + "
                    "checkpoints/), an arc.py run, a bundle (.npz), nor a converted checkpoint "
                    "(lmdm convert)")


def load_dit(path: str):
  """Only the DiT of a model source, for fine-tuning (``train.init_from``): -> (DiT, kind, which
  weights). A work directory gives its EMA weights when it has them (as arc.py's ``--base``).
  Raises ValueError / SourceError naming the problem."""
  kind = kind_of(path)
  if kind == "arc":
    from lmdm_jax.training.arc_run import load_arc_model
    return load_arc_model(path, merge=True), kind, "base + ARC-Forcing adapter, merged"
  if kind == "converted":
    from lmdm_jax.convert import dit as conv
    return conv.load_converted(path)[1], kind, "converted weights"
  from lmdm_jax.checkpoint_io import load_model
  _, model, extras = load_model(path, use_ema=True)
  ema = " (EMA weights when stored)" if kind == "workdir" else ""
  return model, kind, f"step {extras.get('step', '?')}{ema}"


# ------------------------------------------------------------------------------ conditioning


_TEXT_ENCODERS: dict = {}


def text_encoder(conf, cfg: DiTConfig, t5: str | None = None):
  """The config's prompt encoder (None for a model without text conditioning), loaded once per
  process for a given conditioner section (encoders hold no per-use state)."""
  if not cfg.cond_token_dim:
    return None
  spec = dict(conf.conditioner)
  if spec.get("type") == "t5":
    if t5:
      if not os.path.isdir(t5):
        raise SourceError(f"--t5 {t5!r} is not a folder")
      spec["path"] = t5
    if not spec.get("path"):
      raise SourceError(f"config {conf.name!r} encodes prompts with T5: pass --t5 DIR, a local "
                        "Hugging Face T5 folder (config.json, model.safetensors, tokenizer.json "
                        "or spiece.model); nothing is downloaded")
  key = repr((sorted(spec.items()), cfg.cond_token_dim))
  if key not in _TEXT_ENCODERS:
    from lmdm_jax import text as text_lib
    name = spec.pop("type")
    spec.setdefault("dim", cfg.cond_token_dim)
    _TEXT_ENCODERS[key] = text_lib.get_text_encoder(name, **spec)
  return _TEXT_ENCODERS[key]


def text_conditioner(text, cfg: DiTConfig):
  """Our models' conditioning: prompt tokens, and zeros for the global vector (they are trained
  without seconds conditioning). -> (conditioner, cross_len)."""

  def zeros_global(n):
    return np.zeros((n, cfg.global_cond_dim), np.float32) if cfg.global_cond_dim else None

  if text is None:
    def cond(prompts, start, total):
      return np.zeros((len(prompts), 1, cfg.cond_token_dim), np.float32), zeros_global(len(prompts))
    return cond, 1

  def cond(prompts, start, total):
    return np.asarray(text(list(prompts)), np.float32), zeros_global(len(prompts))
  return cond, text.max_tokens


def codec_for(conf, cfg: DiTConfig, override: str | None, log=print):
  """The codec that decodes this model's latents: ``override`` (a name, or 'none'), else the
  config's ``codec``; None when there is none (the system then streams latents)."""
  name = override if override else (conf.get("codec", None) if hasattr(conf, "get") else None)
  if name is None or str(name).lower() == "none":
    if not override:
      log("[system] this model names no codec: it streams latents")
    return None
  from lmdm_jax import codecs
  try:
    codec = codecs.get_codec(name)
  except ValueError as e:
    raise SourceError(f"--codec: {e}") from None
  if codec.latent_dim != cfg.io_channels:
    log(f"[system] codec {name!r} has {codec.latent_dim}-dim latents but the model has "
        f"io_channels={cfg.io_channels}: cannot decode; the system streams latents instead")
    return None
  return codec


def assemble(model, conf, *, codec: str | None = None, t5: str | None = None, description="",
             log=print) -> System:
  """A System from a model and the config that names its conditioner, codec and sampler."""
  cfg = model.cfg
  cond, cross_len = text_conditioner(text_encoder(conf, cfg, t5), cfg)
  return System(model, conditioner=cond, cross_len=cross_len,
                codec=codec_for(conf, cfg, codec, log),
                defaults=SamplerDefaults.from_config(conf.sampler), name=conf.name,
                description=description)


# ----------------------------------------------------------------------------------- sources


def load(source: str | None = None, *, config: str | None = None, codec: str | None = None,
         t5: str | None = None, vae: str | None = None, seed: int = 0, log=print) -> System:
  """See the module docstring; ``config`` is a ``--config`` value: the user's choice (a
  registered name or their own config file). With a source, it overrides the config the source
  records (a converted checkpoint brings its own and ignores it)."""
  if source is None and config is None:
    from lmdm_jax.bundle import DEFAULT_BUNDLE
    if not os.path.isfile(DEFAULT_BUNDLE):
      raise SourceError(f"the bundled model {DEFAULT_BUNDLE} is missing: pass a model source "
                        "(--checkpoint) or --config for random weights")
    source = DEFAULT_BUNDLE
  if source is None:
    return _random(config, codec=codec, t5=t5, seed=seed, log=log)
  kind = kind_of(source)
  if kind == "converted":
    if config is not None:
      log(f"[system] --config {config} is ignored: a converted checkpoint brings its own config")
    return _converted(source, codec=codec, t5=t5, vae=vae, log=log)
  if kind == "arc":
    return _arc(source, config, codec=codec, t5=t5, log=log)
  from lmdm_jax.checkpoint_io import load_model
  try:
    _, model, extras = load_model(source)
  except (ValueError, OSError) as e:
    raise SourceError(f"--checkpoint: {e}") from None
  meta = extras.get("meta") or {}
  conf = _recorded_config(meta.get("config"), meta.get("overrides"), source, config, log)
  if meta.get("arc_step") is not None:  # an ARC-Forcing bundle: base + merged adapter
    trained = f"base step {meta.get('base_step', '?')} + ARC-Forcing step {meta['arc_step']}"
  else:
    trained = f"step {extras.get('step', '?')}"
  cfg = model.cfg
  desc = f"{source} ({cfg.depth}x{cfg.embed_dim}, {trained}), config {conf.name}"
  log(f"[system] loaded {desc}")
  return assemble(model, conf, codec=codec, t5=t5, description=desc, log=log)


def _cli_config(value: str):
  try:
    return load_cli_config(value)
  except ValueError as e:
    raise SourceError(f"--config: {e}") from None


def _recorded_config(value, overrides, source: str, config: str | None, log):
  """The config a source records (registered names only) with the fields its run set on the
  command line (``overrides``, as data); the user's ``--config`` wins."""
  if config is not None:
    return _cli_config(config)
  where = source if source.endswith(".npz") else os.path.join(source, "config.json")
  field = "__meta__ config" if source.endswith(".npz") else "config"
  if value is None:
    raise SourceError(f"{where} records no config: pass --config to choose the config to "
                      "sample with")
  try:
    return config_named_by_file(value, field, where, overrides)
  except ValueError as e:
    raise SourceError(f"{e}; pass --config to choose the config to sample with") from None


def _random(config: str, *, codec, t5, seed, log) -> System:
  from flax import nnx

  from lmdm_jax.nn.dit import DiT
  conf = _cli_config(config)
  cfg = DiTConfig.from_config(conf.model)
  desc = (f"config {conf.name}: RANDOM WEIGHTS from seed {seed} (no trained model given): this "
          "exercises the streaming sampler and decoder; it does not make music")
  log(f"[system] {desc}")
  return assemble(DiT(cfg, rngs=nnx.Rngs(seed)), conf, codec=codec, t5=t5, description=desc,
                  log=log)


def _arc(path: str, config, *, codec, t5, log) -> System:
  from lmdm_jax.training.arc_run import load_arc_model
  rec_path = os.path.join(path, "arc_config.json")
  try:
    with open(rec_path) as f:
      rec = json.load(f)
    conf = _cli_config(config) if config else config_named_by_file(
        rec.get("config"), "config", rec_path, rec.get("overrides"))
    model = load_arc_model(path, merge=True)
  except (ValueError, OSError, KeyError) as e:
    raise SourceError(f"--checkpoint {path}: {e}") from None
  desc = f"{path} (arc.py run: base + ARC-Forcing adapter, merged), config {conf.name}"
  log(f"[system] loaded {desc}")
  return assemble(model, conf, codec=codec, t5=t5, description=desc, log=log)


def _converted(path: str, *, codec, t5, vae, log) -> System:
  from lmdm_jax.convert import load as conv_load
  no_codec = codec is not None and str(codec).lower() == "none"
  try:
    conv = conv_load.load(path, t5=t5, vae=vae, codec=not no_codec)
  except conv_load.NotSampleable as e:
    raise SourceError(str(e).replace(":\n  - ", ": ").replace("\n  - ", "; ")) from None
  except (ValueError, OSError) as e:
    raise SourceError(f"--checkpoint {path}: {e}") from None
  cfg, sc = conv.cfg, conv.sampler
  if codec is not None and not no_codec:
    chosen = codec_for(None, cfg, codec, log)
  else:
    chosen = conv.codec
  defaults = SamplerDefaults(steps=int(sc["steps"]), cfg_scale=float(sc["cfg_scale"]),
                             plus_plus=bool(sc["plus_plus"]), pingpong=bool(sc["pingpong"]),
                             regime=str(sc["regime"]))

  def cond(prompts, start, total):
    return conv.condition(list(prompts), seconds_total=total, seconds_start=start)

  desc = (f"converted {path} ({cfg.depth}x{cfg.embed_dim}; prompt encoder "
          f"{'T5' if conv.text is not None else 'none'}, codec "
          f"{'Oobleck VAE' if chosen is not None else 'none'}, regime {defaults.regime})")
  log(f"[system] loaded {desc}")
  system = System(conv.model, conditioner=cond, cross_len=conv.cross_len, codec=chosen,
                  defaults=defaults, name=f"converted:{os.path.basename(os.path.normpath(path))}",
                  description=desc, seconds_start=float(sc.get("seconds_start") or 0.0),
                  seconds_total=sc.get("seconds_total"))
  spec = conv.conditioning
  system.conditioning_note = (f"cross tokens {list(spec.cross_ids)} ({conv.cross_len}), global "
                              f"{list(spec.global_ids)}")
  return system
