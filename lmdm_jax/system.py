"""The System: one object that owns everything between a prompt and sound.

A ``System`` holds the diffusion model, its conditioning (text encoder, and the seconds
conditioners of converted stable-audio-tools models), the codec that decodes its latents, and
its sampler defaults. Every app and benchmark goes through it:

  from lmdm_jax import load_system
  system = load_system()                                  # the bundled trained model
  audio = system.generate("String quartet ... G major", seconds=20)   # (channels, samples)

  stream = system.stream("solo piano, calm", seed=1)      # live: one block at a time
  for k, audio in zip(range(20), stream):
    if k == 10:
      stream.set_prompt("string quartet, lively")         # no recompilation
  tail = stream.flush()

  session = system.jam(prompt="...", delay_blocks=2)      # generative delay (a JamSession)

  slots = lmdm_jax.serving.SlotServer(system, slots=8)    # many streams, one batched step
  a, b = slots.open_stream("solo piano", seed=1), slots.open_stream("drums", steps=4)

``load_system(source)`` reads any source this project knows (``sources.describe``): ``None`` (the
bundled default model), a bundle ``.npz``, a ``train.py`` or ``arc.py`` work directory, or a
converted stable-audio-tools checkpoint directory; ``load_system(config="tiny")`` builds a config
with random weights (said loudly: it exercises the pipeline, it does not make music).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np



# String quartet: the bundled model plays this steadily, while short generic prompts ("Piano
# playing ...") come out quiet (docs/RESULTS.md, "The bundled model").
DEFAULT_PROMPT = "String quartet playing a lively piece. G major, 4/4 time, 120 BPM."
SAO_FRAME_RATE = 44100 / 2048  # latent frames/s of the SAO VAE: the time base when no codec
MAX_SECONDS = 24 * 3600.0  # longest stream generate() accepts (one day)


@dataclasses.dataclass(frozen=True)
class SamplerDefaults:
  """How a model is sampled unless a call says otherwise (from its config or its bundle)."""

  steps: int = 8
  cfg_scale: float = 3.0
  plus_plus: bool = False
  pingpong: bool = True
  regime: str = "block_causal"

  @classmethod
  def from_config(cls, sc) -> "SamplerDefaults":
    return cls(steps=int(sc.steps), cfg_scale=float(sc.cfg_scale), plus_plus=bool(sc.plus_plus),
               pingpong=bool(sc.pingpong), regime=str(sc.regime))


Conditioner = Callable[[list, float, float], tuple]
"""``(prompts, seconds_start, seconds_total) -> (cross tokens (B, S, D), global (B, G) or None)``."""


class System:
  """A model with its conditioning, codec and sampler defaults (see the module docstring).

  ``conditioner`` maps prompts to the model's conditioning; ``cross_len`` is its token count.
  ``codec`` may be None: the system then streams latents (``frame_rate`` falls back to the SAO
  VAE's, the time base of converted models).
  """

  def __init__(self, model, *, conditioner: Conditioner, cross_len: int, codec=None,
               defaults: SamplerDefaults = SamplerDefaults(), name: str = "",
               description: str = "", seconds_start: float = 0.0,
               seconds_total: float | None = None):
    self.model, self.cfg = model, model.cfg
    self.conditioner, self.cross_len = conditioner, int(cross_len)
    self.codec, self.defaults = codec, defaults
    self.name, self.description = name, description
    self.seconds_start, self.seconds_total = float(seconds_start), seconds_total
    self.conditioning_note = ""  # what the conditioning holds, for logs (converted models)
    self.quantize = "none"  # "int8": the model is a dynamic-int8 view (``load_system``)
    if codec is not None and codec.latent_dim != self.cfg.io_channels:
      raise ValueError(f"the codec's {codec.latent_dim}-dim latents do not match the model's "
                       f"io_channels={self.cfg.io_channels}")

  # ------------------------------------------------------------------------------- geometry

  @property
  def frame_rate(self) -> float:
    """Latent frames per second."""
    return self.codec.frame_rate if self.codec is not None else SAO_FRAME_RATE

  @property
  def block_seconds(self) -> float:
    return self.cfg.chunk / self.frame_rate

  @property
  def sample_rate(self) -> int | None:
    return None if self.codec is None else self.codec.sample_rate

  @property
  def channels(self) -> int | None:
    return None if self.codec is None else self.codec.channels

  def blocks_for(self, seconds: float) -> int:
    """Blocks needed to cover ``seconds`` (at least one); rejects non-finite or huge values."""
    seconds = float(seconds)
    if not np.isfinite(seconds) or seconds <= 0:
      raise ValueError(f"seconds must be a positive finite number, got {seconds}")
    if seconds > MAX_SECONDS:
      raise ValueError(f"seconds must be at most {MAX_SECONDS:g} (one day), got {seconds:g}")
    return max(1, int(np.ceil(seconds / self.block_seconds - 1e-9)))

  # ---------------------------------------------------------------------------- conditioning

  @property
  def streams(self) -> bool:
    """Whether the model streams block by block (an LMDM model); a base model (no input_add
    channels, e.g. SAO-small) generates whole clips (``generate``)."""
    return self.cfg.streaming

  def condition(self, prompt: str, seconds_start: float | None = None,
                seconds_total: float | None = None):
    """One prompt -> (cross tokens (1, cross_len, D), global conditioning (1, G) or None). The
    seconds feed a converted model's seconds conditioners (ours ignore them); they default to
    the system's (the authors' inference values for converted LMDM models)."""
    start = self.seconds_start if seconds_start is None else seconds_start
    total = self.seconds_total if seconds_total is None else seconds_total
    return self.conditioner([str(prompt)], float(start), float(total or 0.0))

  # ------------------------------------------------------------------------------- streams

  def sampler_settings(self, steps=None, cfg_scale=None, plus_plus=None, pingpong=None,
                       regime=None) -> SamplerDefaults:
    """The defaults with the given overrides, validated (one clear error per bad value)."""
    d = self.defaults
    s = SamplerDefaults(
        steps=d.steps if steps is None else int(steps),
        cfg_scale=d.cfg_scale if cfg_scale is None else float(cfg_scale),
        plus_plus=d.plus_plus if plus_plus is None else bool(plus_plus),
        pingpong=d.pingpong if pingpong is None else bool(pingpong),
        regime=d.regime if regime is None else str(regime))
    from lmdm_jax import clip_sampling
    from lmdm_jax import sampling as S
    if not 1 <= s.steps <= S.MAX_STEPS:
      raise ValueError(f"steps must be between 1 and {S.MAX_STEPS}, got {s.steps}")
    if not np.isfinite(s.cfg_scale):
      raise ValueError(f"cfg_scale must be a finite number, got {s.cfg_scale}")
    if not self.streams:
      if s.regime != clip_sampling.REGIME:
        raise ValueError(f"regime {s.regime}: this model has no input_add channels (a base model "
                         "such as SAO-small), so it cannot stream; it samples whole clips "
                         f"(regime {clip_sampling.REGIME!r})")
    elif s.regime not in S.REGIMES:
      raise ValueError(f"unknown regime {s.regime!r}; choose one of {list(S.REGIMES)}")
    return s

  def stream(self, prompt: str | None = None, *, seed: int = 0, sketch=None, decode: bool = True,
             seconds: float | None = None, limiter=None, **sampler) -> "AudioStream":
    """A stream of decoded blocks (see ``AudioStream``). ``sketch``: a melody file (audio or
    MIDI) or (frames, 14) pitch features for the model's sketch channels; ``sampler``: ``steps``,
    ``cfg_scale``, ``plus_plus``, ``pingpong``, ``regime`` overrides. ``seconds``: the length of
    the piece, needed by base models (whole clips) only. ``limiter``: off (None, the default),
    True or a ``limiter.SoftLimiter`` as the last stage of decoding; the stream's ``limiter``
    counts the samples it changed."""
    if not self.streams and seconds is None:
      raise ValueError("a base model generates whole clips: give the clip's length (seconds=)")
    return AudioStream(self, DEFAULT_PROMPT if prompt is None else prompt, seed=seed,
                       sketch=sketch, decode=decode, settings=self.sampler_settings(**sampler),
                       limiter=limiter,
                       frames=None if seconds is None else self.blocks_for(seconds) * self.cfg.chunk)

  def generate(self, prompt: str | None = None, seconds: float = 10.0, *, seed: int = 0,
               sketch=None, limiter=None, **sampler) -> np.ndarray:
    """Offline: ``seconds`` of audio, (channels, samples) float32 (latents (frames, C) when the
    system has no codec). ``limiter`` as ``stream``: pass a ``SoftLimiter`` to read its count
    (``limiter.limited``) afterwards."""
    n = self.blocks_for(seconds)
    stream = self.stream(prompt, seed=seed, sketch=sketch, seconds=seconds, limiter=limiter,
                         **sampler)
    parts = [stream.next_block() for _ in range(n)]
    parts.append(stream.flush())
    if self.codec is None:
      return np.concatenate(parts, axis=0)
    audio = np.concatenate(parts, axis=1)
    return audio[:, :int(round(float(seconds) * self.codec.sample_rate))]

  def jam(self, prompt: str = "", **kw):
    """A ``JamSession`` (generative delay) on this system; ``kw`` as ``JamSession`` (with
    ``server=``, a ``serving.SlotServer``, it takes one of its slots)."""
    from lmdm_jax.jamming import JamSession
    if self.codec is None:
      raise ValueError("jamming needs a codec that decodes this model's latents")
    s = self.sampler_settings(**{k: kw.pop(k) for k in ("steps", "cfg_scale", "plus_plus",
                                                        "pingpong", "regime") if k in kw})
    return JamSession(self, prompt, steps=s.steps, cfg_scale=s.cfg_scale,
                      plus_plus=s.plus_plus, pingpong=s.pingpong, regime=s.regime, **kw)


class AudioStream:
  """Blocks of audio from a ``Stream`` through the codec's stream decoder.

  ``next_block()`` -> the audio this block releases, (channels, n) float32 (n varies with the
  decoder's look-ahead; latents (chunk, C) when the system has no codec or ``decode=False``);
  ``flush()`` -> the decoder's tail. ``set_prompt(text)`` takes effect at the next block.
  ``last_latents``: the latents of the last block. ``limiter``: the ``SoftLimiter`` applied to
  the decoded audio (None: off), with its count of limited samples (``limited``, ``report()``);
  ``limit(audio)`` applies it. Non-finite latents stop the stream with ``FloatingPointError``
  (nothing non-finite is emitted).

  When the codec decodes blocks of the model's size inside a program (``Codec.block_decoder``),
  each block is ONE compiled program: commit, denoising steps and decode (``sampling.
  block_program``); otherwise the latents go through ``codec.stream_decoder()`` on the host.
  ``next_latents()`` runs the same program; the audio of blocks taken as latents comes with
  the next ``next_block()`` or ``flush()``, so nothing is lost either way.
  """

  def __init__(self, system: System, prompt: str, *, seed: int, sketch, decode: bool,
               settings: SamplerDefaults, frames: int | None = None, server=None, limiter=None):
    """``server``: a ``serving.SlotServer`` of this system: the stream takes one of its slots
    (released by ``close()``) instead of compiling its own step."""
    from lmdm_jax import sampling as S
    from lmdm_jax.limiter import make_limiter
    self.system, self.settings = system, settings
    self.limiter = make_limiter(limiter)
    cfg = system.cfg
    kw = dict(batch=1, cfg_guidance=settings.cfg_scale != 1.0, cross_len=system.cross_len,
              seed=seed, sampler=S.SamplerParams.make(settings.steps, settings.cfg_scale,
                                                      settings.plus_plus, settings.pingpong))
    self.block = 0
    self.prompt = None
    self.seconds_total = None
    fused = None
    if server is not None:  # a slot of a batched server; its blocks are decoded on the host
      tokens, glob = system.condition(prompt)
      self.stream = server.join(tokens, glob, seed=seed, steps=settings.steps,
                                cfg_scale=settings.cfg_scale, plus_plus=settings.plus_plus,
                                pingpong=settings.pingpong)
      self.prompt = prompt
    elif system.streams:
      if decode and system.codec is not None:
        fused = system.codec.block_decoder(cfg.chunk)
      self.stream = S.Stream(system.model, regime=settings.regime, decoder=fused, **kw)
    else:  # a base model: the whole clip at once, handed out block by block
      from lmdm_jax import clip_sampling
      self.stream = clip_sampling.ClipStream(system.model, frames, **kw)
      self.seconds_total = frames / system.frame_rate
    if self.prompt is None:
      self.set_prompt(prompt)
    self._sketch = None
    if sketch is not None:
      from lmdm_jax.data import sketch as sketch_lib
      feats = sketch if isinstance(sketch, np.ndarray) else sketch_lib.load_sketch(
          sketch, system.frame_rate)
      sketch_lib.place(np.asarray(feats[:0], np.float32), cfg.extra_dim)  # the model has them
      self._sketch = np.asarray(feats, np.float32)
    self.fused = fused  # the codec's BlockDecoder inside the block program, or None
    self.decoder = (system.codec.stream_decoder()
                    if decode and system.codec is not None and fused is None else None)
    self.last_latents = None
    self._flushed = False
    self._audio = []  # audio of blocks taken as latents, not yet handed out

  def set_prompt(self, prompt: str) -> None:
    """Condition the next blocks on ``prompt`` (no recompilation)."""
    tokens, glob = self.system.condition(prompt, seconds_total=self.seconds_total)
    self.stream.set_prompt(tokens, glob)
    self.prompt = prompt

  @property
  def sketch_features(self):
    """The sketch's (frames, 14) pitch features, or None."""
    return self._sketch

  def _sketch_extra(self, k: int):
    if self._sketch is None:
      return None
    from lmdm_jax.data import sketch as sketch_lib
    cs = self.system.cfg.chunk
    part = np.zeros((cs, self._sketch.shape[1]), np.float32)
    got = self._sketch[k * cs:(k + 1) * cs]
    part[:got.shape[0]] = got  # silence past the sketch's end
    return sketch_lib.place(part, self.system.cfg.extra_dim)[None]  # placed per block

  def next_latents(self, extra=None) -> np.ndarray:
    """The next block's latents (chunk, C); ``extra``: (1, chunk, extra_dim) channels (default:
    the sketch's, else zeros)."""
    if self._flushed:
      raise RuntimeError("the stream was flushed: start a new one")
    if extra is None:
      extra = self.next_extra()
    if self.fused is None:
      return self._accept(np.asarray(self.stream.next_block(extra))[0])
    blk, audio = self.stream.step(extra)
    return self._accept(np.asarray(blk)[0], audio)

  def _accept(self, blk, audio=None) -> np.ndarray:
    if not np.isfinite(blk).all():
      raise FloatingPointError(f"block {self.block}: the sampler produced non-finite latents "
                               f"({self.settings})")
    if audio is not None:
      lo, hi = self.fused.valid(self.block)
      self._audio.append(np.asarray(audio)[0, :, lo:hi])
    self.block += 1
    self.last_latents = blk
    return blk

  def _take_audio(self) -> np.ndarray:
    parts, self._audio = self._audio, []
    if len(parts) == 1:
      return parts[0]
    return np.concatenate(parts, axis=-1) if parts else np.zeros(
        (self.system.channels, 0), np.float32)

  def next_extra(self):
    """The next block's extra channels (the sketch's), or None (zeros)."""
    return self._sketch_extra(self.block)

  def take_block(self, blk) -> np.ndarray:
    """The next block's latents (chunk, C), computed elsewhere (a ``SlotServer``'s batched
    step): checked and decoded as ``next_block`` does."""
    blk = self._accept(np.asarray(blk))
    return blk if self.decoder is None else self.limit(self.decoder.push(blk))

  def limit(self, audio: np.ndarray) -> np.ndarray:
    """Decoded audio through the stream's limiter (unchanged when it has none)."""
    return audio if self.limiter is None else self.limiter(audio)

  def next_block(self, extra=None) -> np.ndarray:
    blk = self.next_latents(extra)
    if self.fused is not None:
      return self.limit(self._take_audio())
    return blk if self.decoder is None else self.limit(self.decoder.push(blk))

  def close(self) -> None:
    """Release the stream's serving slot (if it has one)."""
    if hasattr(self.stream, "close"):
      self.stream.close()

  def flush(self) -> np.ndarray:
    """The decoder's held-back tail (empty without a decoder)."""
    if self.fused is not None:
      head = self._take_audio()
      if self._flushed:
        return self.limit(head)
      self._flushed = True
      tail = self.fused.tail(self.stream.dec_state).flush()
      return self.limit(np.concatenate([head, tail], axis=-1))
    if self.decoder is None:
      return np.zeros((0, self.system.cfg.io_channels), np.float32)
    return self.limit(self.decoder.flush())

  def __iter__(self) -> Iterator[np.ndarray]:
    while True:
      yield self.next_block()


def load_system(source: str | None = None, *, config: str | None = None, codec: str | None = None,
                t5: str | None = None, vae: str | None = None, seed: int = 0,
                quantize: str | None = None, log=print) -> System:
  """The System of ``source`` (see ``lmdm_jax.sources``): None is the bundled trained model.
  ``config``: a registered config name or the user's own config file, for random weights or to
  override the config a source records; ``codec``: a codec name (``"none"``: latents); ``t5``:
  a local T5 folder for T5-conditioned models; ``vae``: the VAE of a converted checkpoint that
  has none; ``seed``: random weights' seed; ``quantize``: ``"int8"`` samples with a dynamic-int8
  view of the DiT's block linears (``lmdm_jax.quantize``; a CPU speed option, the loaded weights
  are unchanged), None or ``"none"`` (default) in the model's dtype. Raises
  ``sources.SourceError`` (a ValueError) with a one-line message naming what is missing and the
  flag that supplies it."""
  from lmdm_jax import quantize as Q
  from lmdm_jax import sources
  mode = "none" if quantize is None else str(quantize)
  if mode not in Q.QUANTIZE_MODES:
    raise sources.SourceError(f"--quantize {mode!r}: choose one of {list(Q.QUANTIZE_MODES)}")
  system = sources.load(source, config=config, codec=codec, t5=t5, vae=vae, seed=seed, log=log)
  if mode != "none":
    system.model, system.quantize = Q.quantize_model(system.model, mode), mode
    system.description += f"; {mode} dynamic quantisation of the block linears"
    log(f"[system] {mode}: the DiT's block linears run as dynamic {mode} (weights per output "
        "channel, activations per token)")
  return system
