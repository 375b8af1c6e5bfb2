"""Jamming: the "generative delay" (LMDM_REFERENCE §5). A partner plays; the model listens through
its accompaniment channels and plays along, a fixed delay behind.

Timeline (musical time tau; a live session's clock starts at ``start()`` or the first ``push``):
- the partner's audio for tau arrives at clock time tau (``push``);
- generated block k covers tau in [k B, (k+1) B) (B = chunk / frame_rate). It is due, decoded,
  by (k + d) B (d = ``delay_blocks``) and its generation starts ``lead`` before that, at
  (k + d) B - lead (``lead_seconds``, at most B; default B: at (k + d - 1) B). Finishing later
  than (k + d) B is a *deadline miss*: every delay leaves a block ``lead`` of compute time;
- the model's output for tau is heard at clock time tau + D: ``pull`` returns the output stream
  with the fixed delay ``D = d B + decoder latency`` (``delay_seconds``; the decoder is the
  codec's ``low_latency(chunk)`` one, 0.16 s of hold-back with the bundled codec). A pull that
  asks for samples not yet decoded gets silence there (an *under-run*; the delay stays fixed).
- d = 1 gives the lowest latency; the model then hears the partner's audio of its own block only
  up to B - lead (minus the encoder guard), so a short ``lead`` (fast compute) matters there.
  ``delay_blocks="auto"`` measures the block compute (step + decode + partner encode) at set-up
  and takes d = 1 with lead = 2x that compute when the model then still hears at least half of
  its own block (B - lead - guard >= B / 2), else d = 2 with lead B (with d = 1 and a lead near B
  the model would never hear the partner: a committed block keeps its accompaniment).
- Accompaniment channels of block k (the model's extra input_add channels; the first
  1 + latent_dim of them, ``[accomp_mask | accomp_latents]``): the partner's latents of the
  block's own frames that are *known* when the block is generated, i.e. whose audio (plus the
  codec's encoder look-ahead) has arrived; mask 1 there, 0 (and zero latents) elsewhere. A
  committed chunk keeps the accompaniment it was generated with.

Two ways to run a session:
- live (``start``/``push``/``pull``): a sampler thread on the real clock, as the jam server does;
- offline (``render(partner)``): block k sees exactly the partner audio a live session has when
  block k starts, (k + d) B - lead seconds of it, and nothing runs against a clock. This is the
  output a live session makes when its input arrives on time and its compute keeps up.
"""
from __future__ import annotations

import threading
import time

import numpy as np


class JamSession:
  """Accompaniment on a ``System``: ``push(audio)`` the partner, ``pull(n)`` the model's part."""

  def __init__(self, system, prompt: str = "", *, delay_blocks: int | str = 2, steps: int = 8,
               cfg_scale: float = 1.0, plus_plus: bool = False, pingpong: bool = True,
               seed: int = 0, regime: str = "block_causal", encoder_guard_frames: int = 4,
               lead_seconds: float | None = None, low_latency_decoder: bool = True,
               clock=time.perf_counter, log=None, progress=None, server=None):
    """``progress(stage)``, if given, names each set-up stage as it begins (the jam page shows
    them): encoding the prompt, compiling the block step, compiling the decoder, warming up the
    encoder (and measuring the block compute, for ``delay_blocks="auto"``).
    ``low_latency_decoder=False`` decodes with the codec's default stream decoder (more
    look-ahead: 0.42 s instead of 0.16 s with the bundled codec). ``server``: a
    ``serving.SlotServer`` of this system: the session takes one of its slots (``SlotsFull`` when
    none is free; released by ``close()``) and, live, its blocks come from the server's sampler
    thread, batched with the other sessions' (``SlotServer.attach``), instead of its own stream
    and thread; ``delay_blocks="auto"`` then chooses 2 blocks (the shared step is not timed
    per session)."""
    from lmdm_jax import sampling as S
    progress = progress or (lambda stage: None)
    cfg, codec = system.cfg, system.codec
    self.acc_dim = 1 + codec.latent_dim
    if cfg.extra_dim < self.acc_dim:
      raise ValueError(f"jamming needs accompaniment channels: the model has extra_dim="
                       f"{cfg.extra_dim}, it needs >= 1 + latent_dim = {self.acc_dim} "
                       f"(input_add_dim = 1 + io_channels + {self.acc_dim})")
    auto = delay_blocks == "auto"
    if not auto and (isinstance(delay_blocks, str) or int(delay_blocks) < 1):
      raise ValueError(f"delay_blocks must be >= 1 or 'auto', got {delay_blocks!r}")
    if auto and lead_seconds is not None:
      raise ValueError("delay_blocks='auto' chooses lead_seconds; give one or the other")
    if not regime.startswith("block_causal"):
      raise ValueError("jamming streams with the KV cache: regime block_causal(_unfused)")
    self.system, self.cfg, self.codec, self.clock = system, cfg, codec, clock
    self.sr, self.channels, self.hop = codec.sample_rate, codec.channels, codec.hop
    self.cs = cfg.chunk
    self.block_seconds = self.cs / codec.frame_rate
    block = self.cs * self.hop
    if lead_seconds is not None and not 0 < lead_seconds <= self.block_seconds:
      raise ValueError(f"lead_seconds must be in (0, {self.block_seconds:.3f}] (one block), got "
                       f"{lead_seconds}")
    self.dec_codec = codec.low_latency(self.cs) if low_latency_decoder else codec
    self.guard = int(encoder_guard_frames)
    self._log = log or (lambda *a: None)
    progress("encoding the prompt")
    tokens, glob = system.condition(prompt)
    self.server = server
    if server is not None:
      if regime != server.regime:
        raise ValueError(f"regime {regime!r}: the slot server streams in {server.regime!r}")
      if (cfg_scale != 1.0) not in server.pools:
        progress("compiling the block step")
      else:
        progress("taking a session slot (its block step is compiled)")
      self.stream = server.join(tokens, glob, seed=seed, steps=steps, cfg_scale=cfg_scale,
                                plus_plus=plus_plus, pingpong=pingpong)
    else:
      progress("compiling the block step")
      self.stream = S.Stream(system.model, batch=1, regime=regime, cfg_guidance=cfg_scale != 1.0,
                             cross_len=system.cross_len, seed=seed,
                             sampler=S.SamplerParams.make(steps, cfg_scale, plus_plus, pingpong))
      self.stream.set_prompt(tokens, glob)
    self.measured_block_compute_s = None
    try:
      progress("compiling the decoder")
      self.decoder_latency = self._decoder_latency()  # samples; also compiles the decoder
      progress("warming up the encoder")
      codec.encode(np.zeros((self.channels, 4 * self.cs * self.hop), np.float32))  # warm up
      if auto and server is not None:
        delay_blocks = 2
      elif auto:
        progress("measuring the block compute")
        self.measured_block_compute_s = c = self.measure_block_compute()
        heard = self.cs - int(np.ceil(2 * c * self.sr / self.hop - 1e-6)) - self.guard
        if 2 * heard >= self.cs:
          delay_blocks, lead_seconds = 1, 2 * c
        else:
          delay_blocks, lead_seconds = 2, None
    except BaseException:
      if server is not None:
        self.stream.close()  # the slot is free again
      raise
    self.delay_blocks = int(delay_blocks)
    # samples before a block's deadline that its generation starts, in whole hops
    self.lead_samples = block if lead_seconds is None else min(
        int(np.ceil(lead_seconds * self.sr / self.hop - 1e-6)) * self.hop, block)
    self.delay_samples = self.delay_blocks * block + self.decoder_latency
    self._decoder = self.dec_codec.stream_decoder()
    # partner input, generated output (musical sample positions from 0)
    self._lock = threading.Lock()
    self._partner = np.zeros((self.channels, 0), np.float32)
    self._partner_start = 0  # sample index of _partner[:, 0]
    self._out = np.zeros((self.channels, 0), np.float32)
    self._out_start = 0  # musical sample index of _out[:, 0]
    self._pulled = 0  # samples returned by pull (clock-side position)
    self.blocks = 0
    self.deadline_misses = 0
    self.underruns = 0
    self.underrun_samples = 0
    self.block_times: list[float] = []
    self.max_lateness = 0.0
    self._t0 = None
    self._stop = threading.Event()
    self._error = None
    self._thread = None

  def set_prompt(self, prompt: str) -> None:
    """Condition the next blocks on ``prompt`` (no recompilation)."""
    tokens, glob = self.system.condition(prompt)
    self.stream.set_prompt(tokens, glob)

  # ------------------------------------------------------------------------------- properties

  @property
  def delay_seconds(self) -> float:
    """The fixed delay between the partner's audio and the model's matching output."""
    return self.delay_samples / self.sr

  @property
  def lead_seconds(self) -> float:
    """Seconds before a block's deadline that its generation starts (its compute budget)."""
    return self.lead_samples / self.sr

  def stats(self) -> dict:
    bt = np.asarray(self.block_times) if self.block_times else np.zeros(1)
    return dict(delay_seconds=self.delay_seconds, delay_blocks=self.delay_blocks,
                decoder_latency_seconds=self.decoder_latency / self.sr,
                lead_seconds=self.lead_seconds, blocks=self.blocks,
                deadline_misses=self.deadline_misses, underruns=self.underruns,
                underrun_seconds=self.underrun_samples / self.sr,
                block_seconds=self.block_seconds, mean_block_compute_s=float(bt.mean()),
                max_block_compute_s=float(bt.max()), max_lateness_s=self.max_lateness,
                real_time_factor=self.block_seconds / max(float(bt.mean()), 1e-9))

  def keep_up_report(self) -> str | None:
    """None when every block met its deadline, else one loud line saying by how much not."""
    s = self.stats()
    if not s["deadline_misses"]:
      return None
    return (f"WARNING: the model could not keep up live: {s['deadline_misses']} of {s['blocks']} "
            f"blocks late (by up to {1000 * s['max_lateness_s']:.0f} ms), computing at "
            f"{s['real_time_factor']:.2f}x real time where >= 1x is needed; "
            f"{s['underrun_seconds']:.2f} s of its part were silence")

  # ------------------------------------------------------------------------------- lifecycle

  def _decoder_latency(self) -> int:
    """Largest hold-back (samples) of the stream decoder over pushes of one block each."""
    sd = self.dec_codec.stream_decoder()
    z = np.zeros((self.cs, self.codec.latent_dim), np.float32)
    pushed = emitted = worst = 0
    for _ in range(max(4, 64 // self.cs + 2)):
      emitted += sd.push(z).shape[-1]
      pushed += self.cs * self.hop
      worst = max(worst, pushed - emitted)
    sd.flush()
    return worst

  def block_start(self, k: int) -> float:
    """Clock time (s) at which block k's generation starts: (k + d) B - lead."""
    block = self.cs * self.hop
    return (k + self.delay_blocks - 1) * self.block_seconds + (block - self.lead_samples) / self.sr

  def measure_block_compute(self, blocks: int = 2) -> float:
    """Seconds one block takes (block step + decode + partner encode), the best of ``blocks``
    runs after a warm-up one. The stream's state is restored afterwards, so the session's
    output does not change."""
    import jax
    import jax.numpy as jnp
    saved = jax.tree.map(jnp.copy, self.stream.state)  # the block step donates its state
    dec = self.dec_codec.stream_decoder()
    seg = np.zeros((self.channels, (self.cs + 12) * self.hop), np.float32)
    extra = np.zeros((1, self.cs, self.cfg.extra_dim), np.float32)
    times = []
    for _ in range(blocks + 1):
      t0 = time.perf_counter()
      self.codec.encode(seg)
      blk = np.asarray(self.stream.next_block(extra))[0]
      dec.push(blk)
      times.append(time.perf_counter() - t0)
    self.stream.state = saved
    return float(min(times[1:]))

  def start(self):
    if self._t0 is None and self.server is not None:
      if self._stop.is_set():
        raise RuntimeError("this session was closed")
      self._t0 = self.server.attach(self)
    elif self._thread is None and self.server is None:
      self._t0 = self.clock()
      self._thread = threading.Thread(target=self._run, name="jam-sampler", daemon=True)
      self._thread.start()
    return self

  def close(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=60)
    if self.server is not None:
      self.server.detach(self)
      self.stream.close()
    self._raise()

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.close()
    return False

  def _raise(self):
    if self._error is not None:
      raise RuntimeError("the jam sampler thread failed") from self._error

  def now(self) -> float:
    return 0.0 if self._t0 is None else self.clock() - self._t0

  # ----------------------------------------------------------------------------------- I/O

  def _check_audio(self, audio) -> np.ndarray:
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 1:
      audio = audio[None]
    if audio.ndim != 2 or audio.shape[0] != self.channels:
      raise ValueError(f"push expects ({self.channels}, n) audio at {self.sr} Hz, got {audio.shape}")
    return audio

  def push(self, audio) -> None:
    """The partner's next samples: (channels, n) or (n,) at the codec's sample rate."""
    audio = self._check_audio(audio)
    self.start()
    self._append_partner(audio)

  def _append_partner(self, audio) -> None:
    with self._lock:
      self._partner = np.concatenate([self._partner, audio], axis=1)

  def pull(self, n: int) -> np.ndarray:
    """The next ``n`` samples of the model's part as heard live: (channels, n). The first
    ``delay_samples`` are silence; missing (not yet decoded) samples are silence and counted."""
    self._raise()
    self.start()
    out = np.zeros((self.channels, n), np.float32)
    a = self._pulled - self.delay_samples  # musical position of the first requested sample
    b = a + n
    lo = max(a, 0)
    with self._lock:
      avail_end = self._out_start + self._out.shape[1]
      hi = min(b, avail_end)
      if hi > lo:
        out[:, lo - a:hi - a] = self._out[:, lo - self._out_start:hi - self._out_start]
      missing = b - max(lo, hi)
      if missing > 0 and b > 0:
        self.underruns += 1
        self.underrun_samples += missing
      # drop what will never be pulled again
      drop = min(max(b, 0) - self._out_start, self._out.shape[1])
      if drop > 0:
        self._out = self._out[:, drop:]
        self._out_start += drop
    self._pulled += n
    return out

  # ------------------------------------------------------------------------------- offline

  def render(self, partner, progress=None) -> np.ndarray:
    """Offline: the model's part for the whole ``partner`` (channels, n), as ``pull`` returns it
    from a live session that keeps up while the partner plays and then ``delay_samples`` of
    silence (as the jam CLI feeds it): (channels, n + delay_samples), the first
    ``delay_samples`` silent. Not bound to a clock; ``progress(k, n_blocks)`` after each block."""
    self.render_begin(partner)
    block = self.cs * self.hop
    n_blocks = int(np.ceil((self._render["n"] + self.decoder_latency) / block))
    while self.render_pending():
      t1 = time.perf_counter()
      extra = self.render_input()
      self.render_output(np.asarray(self.stream.next_block(extra))[0],
                         time.perf_counter() - t1)
      if progress is not None:
        progress(self.blocks, max(n_blocks, self.blocks))
    return self.render_result()

  # ``render`` in steps, so that a ``SlotServer`` can run several sessions in lockstep.

  def render_begin(self, partner) -> None:
    if self._thread is not None or self._t0 is not None:
      raise RuntimeError("render() runs a session offline; this one was started live")
    partner = self._check_audio(partner)
    # the partner, then silence while the model finishes
    self._render = dict(partner=partner, n=partner.shape[1], fed=0,
                        fed_total=partner.shape[1] + self.delay_samples)

  def render_pending(self) -> bool:
    """Whether the offline render still needs blocks."""
    return self._out_start + self._out.shape[1] < self._render["n"]

  def render_input(self) -> np.ndarray:
    """Feeds the partner audio known when the next block starts; returns its extra channels."""
    r, k, block = self._render, self.blocks, self.cs * self.hop
    upto = min(max((k + self.delay_blocks) * block - self.lead_samples, 0),
               r["fed_total"])  # known when block k starts
    if upto > r["fed"]:
      seg = r["partner"][:, r["fed"]:min(upto, r["n"])]
      pad = upto - r["fed"] - seg.shape[1]
      self._append_partner(np.pad(seg, ((0, 0), (0, pad))) if pad else seg)
      r["fed"] = upto
    return self._accomp_extra(k, trim=True)

  def render_output(self, blk, seconds: float) -> None:
    """The next block's latents (chunk, C): decoded and appended; ``seconds`` its compute."""
    self._emit(self.blocks, blk)
    self.block_times.append(seconds)

  def render_result(self) -> np.ndarray:
    n = self._render["n"]
    out = np.zeros((self.channels, self._render["fed_total"]), np.float32)
    with self._lock:
      made = self._out[:, :n - self._out_start]
    out[:, self.delay_samples:self.delay_samples + made.shape[1]] = made
    return out

  # ------------------------------------------------------------------------------- sampler

  def _accomp_extra(self, k: int, trim: bool = False) -> np.ndarray:
    """(1, chunk, extra_dim): the partner's latents of block k's frames that are known now."""
    cs, hop, margin = self.cs, self.hop, 8
    f0 = k * cs
    extra = np.zeros((1, cs, self.cfg.extra_dim), np.float32)
    with self._lock:
      p0 = self._partner_start
      got = p0 + self._partner.shape[1]
      known = min(got // hop - self.guard, f0 + cs) - f0  # frames of this block that are final
      s0 = max(f0 - margin, 0) * hop
      cut = min(s0, got)
      if trim and cut > p0:  # the sampler's blocks come in order: older audio is not needed
        self._partner = self._partner[:, cut - p0:]
        self._partner_start = p0 = cut
      if known <= 0 or s0 < p0:
        return extra
      seg = self._partner[:, s0 - p0:(f0 + known + self.guard) * hop - p0]
    lat = self.codec.encode(seg)
    first = f0 - s0 // hop
    lat = lat[first:first + known]
    extra[0, :lat.shape[0], 0] = 1.0
    extra[0, :lat.shape[0], 1:self.acc_dim] = lat
    return extra

  def _generate(self, k: int) -> None:
    """Block k from the partner audio known now: generated, decoded, appended to the output."""
    extra = self._accomp_extra(k, trim=True)
    self._emit(k, np.asarray(self.stream.next_block(extra))[0])

  def _emit(self, k: int, blk) -> None:
    """Block k's latents (chunk, C): checked, decoded, appended to the output."""
    if not np.isfinite(blk).all():
      raise FloatingPointError(f"jam block {k}: the sampler produced non-finite latents")
    audio = self._decoder.push(blk)
    with self._lock:
      self._out = np.concatenate([self._out, audio], axis=1)
    self.blocks += 1

  def _run(self):
    try:
      k = 0
      while not self._stop.is_set():
        t_start = self.block_start(k)
        while self.now() < t_start:
          if self._stop.wait(min(0.005, max(t_start - self.now(), 0.0005))):
            return
        t1 = time.perf_counter()
        self._generate(k)
        self.block_times.append(time.perf_counter() - t1)
        late = self.now() - (k + self.delay_blocks) * self.block_seconds
        self.max_lateness = max(self.max_lateness, late)
        if late > 0:
          self.deadline_misses += 1
        k += 1
    except BaseException as e:  # noqa: BLE001 - surfaced by pull/close
      self._error = e
