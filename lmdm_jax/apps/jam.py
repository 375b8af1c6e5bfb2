"""Jamming: the "generative delay" (LMDM_REFERENCE §5). A partner plays; the model listens through
its accompaniment channels and plays along, a fixed delay behind.

Timeline (musical time tau; the session clock starts at ``start()`` or the first ``push``):
- the partner's audio for tau arrives at clock time tau (``push``);
- generated block k covers tau in [k B, (k+1) B) (B = chunk / frame_rate). It is generated at
  clock time (k + d - 1) B (d = ``delay_blocks``) and is due, decoded, by (k + d) B: finishing
  later is a *deadline miss*;
- the model's output for tau is heard at clock time tau + D: ``pull`` returns the output stream
  with the fixed delay ``D = d B + decoder latency`` (``delay_seconds``). A pull that asks for
  samples not yet decoded gets silence there (an *under-run*; the delay stays fixed).
- Accompaniment channels of block k (the model's extra input_add channels; the first
  1 + latent_dim of them, ``[accomp_mask | accomp_latents]``): the partner's latents of the
  block's own frames that are *known* when the block is generated, i.e. whose audio (plus the
  codec's encoder look-ahead) has arrived; mask 1 there, 0 (and zero latents) elsewhere. With
  d >= 2 the whole block is known; a committed chunk keeps the accompaniment it was generated
  with (the cache is not recomputed when more of the partner arrives).

  python3 -m lmdm_jax.apps.jam --input partner.wav --out duet.wav [--part generated.wav]
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np


class JamSession:
  """Real-time accompaniment: ``push(audio)`` the partner, ``pull(n)`` the model's part."""

  def __init__(self, model, codec, text=None, prompt: str = "", *, delay_blocks: int = 2,
               steps: int = 8, cfg_scale: float = 1.0, plus_plus: bool = False,
               pingpong: bool = True, seed: int = 0, regime: str = "block_causal",
               encoder_guard_frames: int = 4, clock=time.perf_counter, log=None):
    from lmdm_jax import sampling as S
    cfg = model.cfg
    if codec.latent_dim != cfg.io_channels:
      raise ValueError(f"the codec's {codec.latent_dim}-dim latents do not match the model's "
                       f"io_channels={cfg.io_channels}")
    self.acc_dim = 1 + codec.latent_dim
    if cfg.extra_dim < self.acc_dim:
      raise ValueError(f"jamming needs accompaniment channels: the model has extra_dim="
                       f"{cfg.extra_dim}, it needs >= 1 + latent_dim = {self.acc_dim} "
                       f"(input_add_dim = 1 + io_channels + {self.acc_dim})")
    if delay_blocks < 1:
      raise ValueError(f"delay_blocks must be >= 1, got {delay_blocks}")
    if not regime.startswith("block_causal"):
      raise ValueError("jamming streams with the KV cache: regime block_causal(_unfused)")
    self.cfg, self.codec, self.clock = cfg, codec, clock
    self.sr, self.channels, self.hop = codec.sample_rate, codec.channels, codec.hop
    self.cs = cfg.chunk
    self.block_seconds = self.cs / codec.frame_rate
    self.delay_blocks = delay_blocks
    self.guard = int(encoder_guard_frames)
    self._log = log or (lambda *a: None)
    n_tok = text.max_tokens if text is not None else 1
    cond = (np.asarray(text([prompt]), np.float32) if text is not None
            else np.zeros((1, 1, cfg.cond_token_dim), np.float32))
    glob = np.zeros((1, cfg.global_cond_dim), np.float32) if cfg.global_cond_dim else None
    self.stream = S.Stream(model, batch=1, regime=regime, cfg_guidance=cfg_scale != 1.0,
                           cross_len=n_tok, seed=seed,
                           sampler=S.SamplerParams.make(steps, cfg_scale, plus_plus, pingpong))
    self.stream.set_prompt(cond, glob)
    self.decoder_latency = self._decoder_latency()  # samples; also compiles the decoder
    codec.encode(np.zeros((self.channels, 4 * self.cs * self.hop), np.float32))  # warm up
    self.delay_samples = int(round(delay_blocks * self.block_seconds * self.sr)) + self.decoder_latency
    self._decoder = codec.stream_decoder()
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

  # ------------------------------------------------------------------------------- properties

  @property
  def delay_seconds(self) -> float:
    """The fixed delay between the partner's audio and the model's matching output."""
    return self.delay_samples / self.sr

  def stats(self) -> dict:
    bt = np.asarray(self.block_times) if self.block_times else np.zeros(1)
    return dict(delay_seconds=self.delay_seconds, blocks=self.blocks,
                deadline_misses=self.deadline_misses, underruns=self.underruns,
                underrun_seconds=self.underrun_samples / self.sr,
                block_seconds=self.block_seconds, mean_block_compute_s=float(bt.mean()),
                max_block_compute_s=float(bt.max()), max_lateness_s=self.max_lateness,
                real_time_factor=self.block_seconds / max(float(bt.mean()), 1e-9))

  # ------------------------------------------------------------------------------- lifecycle

  def _decoder_latency(self) -> int:
    """Largest hold-back (samples) of the stream decoder over pushes of one block each."""
    sd = self.codec.stream_decoder()
    z = np.zeros((self.cs, self.codec.latent_dim), np.float32)
    pushed = emitted = worst = 0
    for _ in range(max(4, 64 // self.cs + 2)):
      emitted += sd.push(z).shape[-1]
      pushed += self.cs * self.hop
      worst = max(worst, pushed - emitted)
    sd.flush()
    return worst

  def start(self):
    if self._thread is None:
      self._t0 = self.clock()
      self._thread = threading.Thread(target=self._run, name="jam-sampler", daemon=True)
      self._thread.start()
    return self

  def close(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=60)
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

  def push(self, audio) -> None:
    """The partner's next samples: (channels, n) or (n,) at the codec's sample rate."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 1:
      audio = audio[None]
    if audio.ndim != 2 or audio.shape[0] != self.channels:
      raise ValueError(f"push expects ({self.channels}, n) audio at {self.sr} Hz, got {audio.shape}")
    self.start()
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

  def _run(self):
    try:
      k = 0
      while not self._stop.is_set():
        t_start = (k + self.delay_blocks - 1) * self.block_seconds
        while self.now() < t_start:
          if self._stop.wait(min(0.005, max(t_start - self.now(), 0.0005))):
            return
        t1 = time.perf_counter()
        extra = self._accomp_extra(k, trim=True)
        blk = np.asarray(self.stream.next_block(extra))[0]
        audio = self._decoder.push(blk)
        with self._lock:
          self._out = np.concatenate([self._out, audio], axis=1)
        self.block_times.append(time.perf_counter() - t1)
        late = self.now() - (k + self.delay_blocks) * self.block_seconds
        self.max_lateness = max(self.max_lateness, late)
        if late > 0:
          self.deadline_misses += 1
        self.blocks += 1
        k += 1
    except BaseException as e:  # noqa: BLE001 - surfaced by pull/close
      self._error = e


# ----------------------------------------------------------------------------------- CLI


MAX_DELAY_BLOCKS = 64
BUFFER_RANGE = (16, 1 << 16)


def _check_args(args):
  """Every value that can be checked before a model is loaded (UsageError on the first bad one)."""
  import os

  from lmdm_jax.apps import checks as K
  K.input_file("--input", args.input)
  if args.seconds is not None:
    K.seconds("--seconds", args.seconds)
  K.steps(args.steps)
  if args.cfg_scale is not None:
    K.number("--cfg-scale", args.cfg_scale)
  K.number("--delay-blocks", args.delay_blocks, lo=1, hi=MAX_DELAY_BLOCKS)
  K.number("--buffer", args.buffer, *BUFFER_RANGE)
  K.seed(args.seed)
  K.text("--prompt", args.prompt)
  K.codec(args.codec)
  if args.checkpoint:
    K.input_file("--checkpoint", args.checkpoint)
  part = args.part or os.path.splitext(args.out)[0] + "_part.wav"
  inputs = {"--input": args.input, "--checkpoint": args.checkpoint}
  K.output("--out", args.out, inputs)
  K.output("--part", part, dict(inputs, **{"--out": args.out}))
  if args.config is not None:
    K.config(args.config)
  return part


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--input", required=True, help="the partner's audio (any format)")
  ap.add_argument("--out", default="outputs/duet.wav", help="the live mix: partner + model "
                  "(written as OUT.partial.wav, renamed to OUT when complete)")
  ap.add_argument("--part", default=None, help="the model's part alone (default: OUT with _part)")
  ap.add_argument("--config", default=None, help="a config with accompaniment channels "
                  "(extra_dim >= 1 + latent_dim)")
  ap.add_argument("--checkpoint", default=None)
  ap.add_argument("--prompt", default="", help="text prompt (default empty)")
  ap.add_argument("--codec", default=None)
  ap.add_argument("--delay-blocks", type=int, default=2, help=f"1..{MAX_DELAY_BLOCKS}")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--cfg-scale", type=float, default=None)
  ap.add_argument("--seconds", type=float, default=None, help="cut the input to this length")
  ap.add_argument("--buffer", type=int, default=1024, help="audio callback size in samples "
                  f"({BUFFER_RANGE[0]}..{BUFFER_RANGE[1]})")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  from lmdm_jax.apps import checks as K
  from lmdm_jax.apps.common import UsageError
  tag = "[jam]"
  try:
    return _run(args, tag)
  except UsageError as e:
    print(f"{tag} error: {K.one_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # before the session started: nothing was written
    print(f"{tag} interrupted before any output was written", file=sys.stderr)
    return 130


def _run(args, tag):
  import os

  from lmdm_jax import compile_cache
  from lmdm_jax.apps import checks as K
  from lmdm_jax.apps import common as C
  from lmdm_jax.data.audio import AudioFileError, WavWriter, load_audio
  part_path = _check_args(args)
  try:  # checked before the model loads; decoded again at the codec's rate below
    load_audio(args.input, duration=args.seconds)
  except AudioFileError as e:
    raise C.UsageError(f"--input {e}") from e
  compile_cache.enable(log=lambda m: print(f"{tag} {m}"))
  try:
    conf, cfg, model = C.load(args.config or "demo", args.checkpoint, args.seed, tag=tag)
    codec = C.load_codec(conf, cfg, args.codec, tag=tag)
  except (ValueError, OSError) as e:  # the named checkpoint or config cannot be used
    raise C.UsageError(str(e)) from e
  if codec is None:
    raise C.UsageError("jamming needs a codec that matches the model")
  partner = load_audio(args.input, sample_rate=codec.sample_rate, channels=codec.channels,
                       duration=args.seconds)
  sc = conf.sampler
  t0 = time.perf_counter()
  try:
    sess = JamSession(model, codec, C.text_encoder(conf, cfg), args.prompt,
                      delay_blocks=args.delay_blocks,
                      steps=sc.steps if args.steps is None else args.steps,
                      cfg_scale=sc.cfg_scale if args.cfg_scale is None else args.cfg_scale,
                      plus_plus=sc.plus_plus, pingpong=sc.pingpong, seed=args.seed)
  except ValueError as e:
    raise C.UsageError(str(e)) from e
  print(f"{tag} ready in {time.perf_counter() - t0:.1f} s: delay {sess.delay_seconds:.2f} s "
        f"({args.delay_blocks} blocks of {sess.block_seconds:.2f} s + decoder "
        f"{sess.decoder_latency / codec.sample_rate:.2f} s); jamming along with "
        f"{partner.shape[1] / codec.sample_rate:.1f} s of {args.input} in real time")
  n_total = partner.shape[1] + sess.delay_samples  # let the model finish the last bars
  buf = args.buffer
  interrupted = complete = False
  failure = None
  # both outputs go to partial files, renamed over --out / --part only when the run completes
  duet = WavWriter(args.out, codec.sample_rate, codec.channels)
  part = WavWriter(part_path, codec.sample_rate, codec.channels)
  sess.start()
  t_start = time.perf_counter()
  pos = 0
  try:
    try:
      while pos < n_total:
        target = t_start + (pos + buf) / codec.sample_rate  # a callback every `buf` samples
        x = partner[:, pos:pos + buf]
        if x.shape[1] < buf:
          x = np.pad(x, ((0, 0), (0, buf - x.shape[1])))
        sess.push(x)
        y = sess.pull(buf)
        if not np.all(np.isfinite(y)):
          raise RuntimeError("the model's part has NaN or infinite samples")
        m = min(buf, n_total - pos)
        part.append(y[:, :m])
        duet.append(np.clip(0.5 * (x[:, :m] + y[:, :m]), -1, 1))
        pos += buf
        dt = target - time.perf_counter()
        if dt > 0:
          time.sleep(dt)
    finally:
      try:
        sess.close()
      finally:
        s = sess.stats()
    complete = True
  except KeyboardInterrupt:
    interrupted = True
    print(f"{tag} interrupted: keeping what was made")
  except RuntimeError as e:  # the sampler thread failed, or non-finite output
    failure = str(e) if e.__cause__ is None else f"{e}: {e.__cause__}"
  finally:
    for w in (duet, part):
      if complete:
        w.commit()
      else:
        w.close()
    if not complete:
      notes = "; ".join(f"{w.path} was not changed" if os.path.exists(w.path)
                        else f"{w.path} was not written" for w in (duet, part))
      note = (f"the partial output ({duet.seconds_written:.1f} s) is in {duet.partial_path} and "
              f"{part.partial_path}; {notes}")
      if failure:
        print(f"{tag} error: {K.one_line(failure)}; {note}", file=sys.stderr)
      elif interrupted:
        print(f"{tag} {note}")
      else:  # an unexpected error: its traceback follows
        print(f"{tag} stopped by an error: {note}", file=sys.stderr)
  if failure:
    return 1
  if interrupted:
    return 130
  print(f"{tag} wrote {args.out} (live mix, {duet.seconds_written:.1f} s) and {part_path}")
  print(f"{tag} delay {s['delay_seconds']:.2f} s, {s['blocks']} blocks, deadline misses "
        f"{s['deadline_misses']}, under-runs {s['underruns']} ({s['underrun_seconds']:.2f} s), "
        f"block compute {1000 * s['mean_block_compute_s']:.0f} ms mean / "
        f"{1000 * s['max_block_compute_s']:.0f} ms max for {1000 * s['block_seconds']:.0f} ms "
        f"blocks (real-time factor {s['real_time_factor']:.1f}x)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
