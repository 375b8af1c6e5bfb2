"""The default, weight-free codec: PCA log-STFT latents, small nets, streamed fast Griffin-Lim.

Geometry: 22.05 kHz mono, hop 512 (43.07 latent frames/s), latent_dim 192 (shipped asset).

Encode (numpy): STFT (n_fft 2048, periodic Hann, frame ``g`` centred on sample ``g * hop``) ->
``log(|X| / (n_fft/4) + eps)`` (a full-scale sine peaks at 0; ``eps`` = 3e-5, about -90 dBFS)
-> the first 256 whitened principal coordinates of that log-spectrum -> latent = the first 192
of them + a small learned residual (one kernel-3 temporal conv, GELU, linear; kept small by an
L2 penalty) -> standardized per channel with training statistics. The latents are thus close to
whitened linear features: per-channel mean 0 / std 1, values within about +-5, smooth in time.

Decode (one jitted JAX function per chunk): latents -> log-magnitude (PCA reconstruction + the
residual of a small temporal conv net and a linear layer, trained with 0.1-std latent noise; the
shipped asset: four kernel-3 convs of width 512 with skip connections, receptive radius 4 frames,
trained by ``fit_default_codec.py refit-decoder`` on the encoder's latents) -> magnitude -> fast
Griffin-Lim (Perraudin et al. 2013, momentum 0.99, 32 iterations), block by block: the stream is
cut into fixed internal chunks of ``chunk`` frames (the grid starts ``offset`` frames before the
stream); each chunk is refined together with ``lookahead`` future frames while the 3 previous,
already emitted frames are held fixed; new frames start from the previous chunk's phases
(lookahead frames) or a phase-vocoder extrapolation of them (or of the last committed frame).
``decode`` runs the very same chunked procedure, so streaming decode equals full decode
(documented margin: max abs difference <= 1e-5; measured 0), whatever the block sizes pushed.

Latency (frames of audio a stream decoder holds back, ``hold_back``): a chunk needs the latents
of its lookahead frames plus the net's radius; its last 2 frames' audio still overlaps the next
chunk's first frame (a frame's 2048-sample window reaches 2 hops either side); and pushed
frames wait for the end of their internal chunk. The default decoder (chunk 16, lookahead 4)
fed 16-frame blocks holds back 18 frames (0.42 s); ``low_latency(16)`` (chunk 16, lookahead 1,
grid aligned to the pushes) 7 frames (0.16 s) at a small quality cost (bench/codec_quality.py).

Assets: ``assets/spectral_default.npz`` (about 7.9 MB: PCA basis float32, net weights float16),
re-created by ``scripts/fit_default_codec.py``. Without the nets (an asset with only mean,
basis, scale) the codec is pure PCA + Griffin-Lim.
"""
from __future__ import annotations

import copy
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from lmdm_jax.codecs.base import BlockDecoder, Codec, StreamDecoder

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_ASSET = os.path.join(ASSET_DIR, "spectral_default.npz")

SAMPLE_RATE = 22050
N_FFT = 2048
HOP = 512
EPS = 1e-4
_OVERLAP = N_FFT // HOP  # 4 hop-segments per frame
_CTX = _OVERLAP - 1  # emitted frames that still overlap the next new frame
# Look-ahead frames of ``SpectralCodec.low_latency`` (the jam's decoder). 1 rather than 0: with
# none, onsets smear (held-out onset correlation 0.82 against 0.90 with 1 and 0.91 with 4).
LOW_LOOKAHEAD = 1


def hann(n: int = N_FFT) -> np.ndarray:
  """Periodic Hann window (float64)."""
  return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


def stft_frames(audio: np.ndarray) -> np.ndarray:
  """(samples,), samples % HOP == 0 -> complex (frames, N_FFT//2+1); frame g centred at g*HOP."""
  audio = np.asarray(audio, np.float32)
  n = audio.shape[-1] // HOP
  pad = np.pad(audio[: n * HOP], (N_FFT // 2, N_FFT // 2))
  idx = np.arange(n)[:, None] * HOP + np.arange(N_FFT)[None, :]
  return np.fft.rfft(pad[idx] * hann().astype(np.float32), axis=-1)


def log_magnitude(audio: np.ndarray, eps: float = EPS) -> np.ndarray:
  """(samples,) -> (frames, N_FFT//2+1) float32 log-magnitude features."""
  return np.log(np.abs(stft_frames(audio)) / (N_FFT / 4) + eps).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Jitted block decoder
# --------------------------------------------------------------------------------------------


def _frames_from_segments(seg: jnp.ndarray, n_frames: int) -> jnp.ndarray:
  """(n_frames+3, HOP) -> (n_frames, N_FFT): frame t = segments t..t+3."""
  return jnp.concatenate([seg[k:k + n_frames] for k in range(_OVERLAP)], axis=-1)


def _ola(frames: jnp.ndarray) -> jnp.ndarray:
  """(W, N_FFT) -> (W+3, HOP) overlap-add."""
  w = frames.shape[0]
  out = jnp.zeros((w + _OVERLAP - 1, HOP), frames.dtype)
  for k in range(_OVERLAP):
    out = out.at[k:k + w].add(frames[:, k * HOP:(k + 1) * HOP])
  return out


def _radius(params) -> int:
  """Temporal receptive radius of the residual net (static: from weight shapes)."""
  if "net" not in params:
    return 0
  return sum((w.shape[0] - 1) // 2 for w, _ in params["net"]["convs"])


def _decode_logmag(params, lat: jnp.ndarray, residual: bool = False) -> jnp.ndarray:
  """(frames + 2r, K) latents -> (frames, F) log-magnitudes (r = receptive radius of the net).

  ``residual``: square conv layers add their (centre-cropped) input, as the asset's nets were
  trained (its ``net_residual`` flag).
  """
  r = _radius(params)
  lat = lat * params["lat_std"] + params["lat_mean"]
  base = (lat * params["scale"]) @ params["basis_t"] + params["mean"]
  if "net" not in params:
    return base[r:base.shape[0] - r] if r else base
  net = params["net"]
  h = lat
  for i, (w, b) in enumerate(net["convs"]):  # 'valid' temporal convs (odd kernel), GELU
    kk = w.shape[0]
    t = h.shape[0] - kk + 1
    y = jax.nn.gelu(sum(h[j:j + t] @ w[j] for j in range(kk)) + b)
    if residual and w.shape[1] == w.shape[2]:  # skip connection (centre-cropped input)
      y = y + h[(kk - 1) // 2:(kk - 1) // 2 + t]
    h = y
  res = h @ net["out_w"] + net["out_b"]
  return base[r:base.shape[0] - r] + res


def _chunk_step(params, lat, ctx, prev_ahead, exists, *, n_iter: int, momentum: float,
                residual: bool = False):
  """One chunk of streamed fast Griffin-Lim.

  lat: (B+L+2r, K) latents for frames a-r .. a+B+L+r-1
  ctx: (3, F) complex, the committed frames a-3..a-1
  prev_ahead: (L, F) complex, the previous chunk's lookahead frames a..a+L-1 (warm start)
  exists: (3+B+L,) float, 1 where the frame exists in the stream (edges are normalised by it)
  returns (new frames a..a+B+L-1 complex, audio (B*HOP,) for segments a-2..a+B-3)
  """
  logmag = _decode_logmag(params, lat, residual)
  mag = jnp.maximum(jnp.exp(logmag) - params["eps"], 0.0) * (N_FFT / 4)
  return _gl_step(mag, ctx, prev_ahead, exists, n_iter=n_iter, momentum=momentum)


def _gl_step(mag, ctx, prev_ahead, exists, *, n_iter: int, momentum: float):
  """Streamed fast Griffin-Lim on one chunk, from target magnitudes (B+L, F)."""
  win = jnp.asarray(hann(), jnp.float32)
  n_new = mag.shape[0]
  look = prev_ahead.shape[0]
  b = n_new - look
  mag = mag * exists[_CTX:, None]
  # Initial phases: warm start for the first L frames, phase-vocoder extrapolation after them.
  bins = jnp.arange(N_FFT // 2 + 1, dtype=jnp.float32)
  adv = 2 * np.pi * HOP / N_FFT * bins
  # the newest frame with a phase: the last lookahead frame, or without lookahead the last
  # committed one
  last = jnp.angle(prev_ahead[-1] if look else ctx[-1])
  steps = jnp.arange(1, b + 1, dtype=jnp.float32)[:, None]
  extra = last[None, :] + steps * adv[None, :]
  phase0 = jnp.concatenate([jnp.angle(prev_ahead), extra], axis=0)
  angles = jnp.exp(1j * phase0).astype(jnp.complex64)

  w_total = _CTX + n_new
  wsq = _ola(jnp.broadcast_to(win * win, (w_total, N_FFT)) * exists[:, None])
  norm = jnp.where(wsq > 1e-3, 1.0 / jnp.maximum(wsq, 1e-3), 0.0)

  def istft(spec):
    fr = jnp.fft.irfft(spec, n=N_FFT, axis=-1) * win
    return _ola(fr) * norm

  def stft(seg):
    return jnp.fft.rfft(_frames_from_segments(seg, w_total) * win, axis=-1)

  def full(ang):
    return jnp.concatenate([ctx, (mag * ang).astype(jnp.complex64)], axis=0)

  def body(_, carry):
    ang, tprev = carry
    rebuilt = stft(istft(full(ang)))[_CTX:]
    ang = rebuilt - (momentum / (1 + momentum)) * tprev
    ang = ang / (jnp.abs(ang) + 1e-16)
    return ang, rebuilt

  angles, _ = jax.lax.fori_loop(0, n_iter, body, (angles, jnp.zeros_like(angles)))
  spec = full(angles)
  seg = istft(spec)
  audio = seg[_CTX:_CTX + b].reshape(-1)
  return spec[_CTX:], audio


@functools.partial(jax.jit, static_argnames=("n_iter", "momentum", "residual"))
def _chunk_step_jit(params, lat, ctx, prev_ahead, exists, n_iter, momentum, residual):
  return _chunk_step(params, lat, ctx, prev_ahead, exists, n_iter=n_iter, momentum=momentum,
                     residual=residual)


@functools.partial(jax.jit, static_argnames=("n_iter", "momentum"))
def _gl_step_jit(mag, ctx, prev_ahead, exists, n_iter, momentum):
  return _gl_step(mag, ctx, prev_ahead, exists, n_iter=n_iter, momentum=momentum)


def griffin_lim_stream(mag: np.ndarray, *, chunk: int = 16, lookahead: int = 4,
                       n_iter: int = 32, momentum: float = 0.99) -> np.ndarray:
  """Magnitudes (frames, F) -> audio (frames*HOP,) with the codec's streamed chunked fast GL.

  For baselines and oracles (e.g. true STFT magnitudes, mel-inverted magnitudes).
  """
  mag = np.asarray(mag, np.float32)
  total, f = mag.shape
  ctx = np.zeros((_CTX, f), np.complex64)
  ahead = np.zeros((lookahead, f), np.complex64)
  out, a = [], 0
  while a - 2 < total:
    m = mag[a:a + chunk + lookahead]
    m = np.pad(m, ((0, chunk + lookahead - m.shape[0]), (0, 0)))
    g = np.arange(a - _CTX, a + chunk + lookahead)
    exists = ((g >= 0) & (g < total)).astype(np.float32)
    spec, audio = _gl_step_jit(jnp.asarray(m), jnp.asarray(ctx), jnp.asarray(ahead),
                               jnp.asarray(exists), n_iter=n_iter, momentum=momentum)
    spec, audio = np.asarray(spec), np.asarray(audio)
    if a - 2 < 0:
      audio = audio[(2 - a) * HOP:]
    out.append(audio)
    ctx, ahead = np.concatenate([ctx, spec])[chunk:chunk + _CTX], spec[chunk:]
    a += chunk
  return np.concatenate(out)[: total * HOP]


# --------------------------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------------------------


class SpectralCodec(Codec):
  """PCA log-STFT latents (see module docstring)."""

  sample_rate = SAMPLE_RATE
  channels = 1
  hop = HOP

  def __init__(self, asset_path: str | None = None, *, n_iter: int = 32, chunk: int = 16,
               lookahead: int = 4, momentum: float = 0.99, offset: int = 0):
    path = asset_path or DEFAULT_ASSET
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"codec assets not found at {path}; run `python scripts/fit_default_codec.py fit`")
    with np.load(path) as z:
      a = {k: z[k] for k in z.files}
    self.mean = a["mean"].astype(np.float32)  # (F,)
    self.basis = a["basis"].astype(np.float32)  # (F, P), orthonormal PCA directions
    self.scale = a["scale"].astype(np.float32)  # (P,), their standard deviations
    self.eps = float(a["eps"]) if "eps" in a else EPS  # log floor (magnitude re full scale)
    self.latent_dim = int(a["latent_dim"]) if "latent_dim" in a else int(self.basis.shape[1])
    k = self.latent_dim
    self.lat_mean = a.get("net_latent_mean", np.zeros(k)).astype(np.float32)
    self.lat_std = a.get("net_latent_std", np.ones(k)).astype(np.float32)
    if lookahead < 0 or chunk < 1 or not 0 <= offset < chunk:
      raise ValueError(f"need chunk >= 1, lookahead >= 0 and 0 <= offset < chunk; got chunk="
                       f"{chunk}, lookahead={lookahead}, offset={offset}")
    self.n_iter, self.chunk, self.lookahead, self.momentum = n_iter, chunk, lookahead, momentum
    self.offset = offset
    put = lambda x: jax.device_put(np.asarray(x, np.float32))  # noqa: E731 - no programs
    params = {"mean": put(self.mean), "basis_t": put(self.basis[:, :k].T),
              "scale": put(self.scale[:k]), "lat_mean": put(self.lat_mean),
              "lat_std": put(self.lat_std), "eps": put(self.eps)}
    self._enc = []
    self.residual = bool(a["net_residual"]) if "net_residual" in a else False
    self._enc_out = a["net_enc_out_w"].astype(np.float32) if "net_enc_out_w" in a else None
    i = 0
    while f"net_enc{i}_w" in a:  # learned encoder residual: kernel-3 convs, GELU, linear
      self._enc.append((a[f"net_enc{i}_w"].astype(np.float32),
                        a[f"net_enc{i}_b"].astype(np.float32)))
      i += 1
    if "net_out_w" in a:
      convs, i = [], 0
      while f"net_conv{i}_w" in a:
        convs.append((put(a[f"net_conv{i}_w"]), put(a[f"net_conv{i}_b"])))
        i += 1
      params["net"] = {"convs": convs, "out_w": put(a["net_out_w"]), "out_b": put(a["net_out_b"])}
    self.radius = _radius(params)
    self._params = params
    # Latent of a silent frame: what lies before the stream's start and after its end.
    self.silence = self.encode(np.zeros((1, 4 * HOP), np.float32))[1]

  def low_latency(self, block: int) -> "SpectralCodec":
    """The same codec (same encoder, latents and decoder net) with the jam's streamed
    Griffin-Lim for pushes of ``block`` frames: chunks of ``block`` frames, ``LOW_LOOKAHEAD``
    look-ahead frame(s), and the chunk grid shifted (``offset``) so that a chunk completes with
    every push. Its hold-back is ``LOW_LOOKAHEAD + radius + 2`` frames (7 with the shipped
    asset: 0.16 s, against 18 frames, 0.42 s, for the default decoder fed 16-frame blocks). Its
    ``decode`` runs the same procedure, so its stream decoder is exact against its own
    ``decode``. Quality on held-out renders: bench/codec_quality.py --low-latency."""
    if block < 1:
      raise ValueError(f"block must be >= 1 frame, got {block}")
    fast = copy.copy(self)
    fast.chunk, fast.lookahead = int(block), LOW_LOOKAHEAD
    fast.offset = (fast.lookahead + fast.radius) % fast.chunk
    return fast

  def hold_back(self, block: int) -> int:
    """Largest number of frames the stream decoder holds back when fed ``block`` frames at a
    time: the Griffin-Lim look-ahead, the net's receptive radius, 2 frames of overlap-add (a
    frame's window reaches 2 hops back) and the wait for the next internal chunk boundary."""
    ahead = self.lookahead + self.radius
    worst = 0
    for j in range(1, 2 * self.chunk + ahead + 4):  # past the start, periodic in j mod chunk
      n = j * block  # frames pushed
      done = (n - ahead + self.offset) // self.chunk * self.chunk - self.offset  # chunks run
      worst = max(worst, n - max(done - 2, 0))
    return worst

  # -- checks --------------------------------------------------------------------------------
  def _check_audio(self, audio: np.ndarray, sample_rate: int | None) -> np.ndarray:
    if sample_rate is not None and int(sample_rate) != self.sample_rate:
      raise ValueError(f"SpectralCodec expects {self.sample_rate} Hz audio, got {sample_rate} Hz;"
                       " resample first")
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 2 or audio.shape[0] != self.channels:
      raise ValueError(f"SpectralCodec expects (channels={self.channels}, samples) audio, got"
                       f" shape {audio.shape}")
    return audio

  def _check_latents(self, latents: np.ndarray) -> np.ndarray:
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 2 or latents.shape[1] != self.latent_dim:
      raise ValueError(f"SpectralCodec expects (frames, latent_dim={self.latent_dim}) latents,"
                       f" got shape {latents.shape}")
    if not np.all(np.isfinite(latents)):
      raise ValueError("latents contain NaN or inf")
    return latents

  # -- interface -----------------------------------------------------------------------------
  def encode(self, audio: np.ndarray, sample_rate: int | None = None) -> np.ndarray:
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 3:
      return np.stack([self.encode(a, sample_rate) for a in audio])
    audio = self._check_audio(audio, sample_rate)
    if audio.shape[1] < self.hop:
      raise ValueError(f"need at least one hop ({self.hop} samples) of audio")
    feats = log_magnitude(audio[0], self.eps)
    k = self.latent_dim
    r = len(self._enc)
    if r:
      edge = np.full((r, feats.shape[1]), np.log(self.eps), np.float32)
      feats = np.concatenate([edge, feats, edge])
    pc = (feats - self.mean) @ self.basis / self.scale
    z = pc[r:pc.shape[0] - r, :k]
    if r:
      h = pc
      for w, b in self._enc:
        t = h.shape[0] - w.shape[0] + 1
        h = sum(h[j:j + t] @ w[j] for j in range(w.shape[0])) + b
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))  # jax gelu
      z = z + h @ self._enc_out
    z = (z - self.lat_mean) / self.lat_std
    return z.astype(np.float32)

  def decode(self, latents: np.ndarray) -> np.ndarray:
    latents = np.asarray(latents, np.float32)
    if latents.ndim == 3:
      return np.stack([self.decode(z) for z in latents])
    latents = self._check_latents(latents)
    sd = self.stream_decoder()
    return np.concatenate([sd.push(latents), sd.flush()], axis=-1)

  def stream_decoder(self) -> "SpectralStreamDecoder":
    return SpectralStreamDecoder(self)

  def block_decoder(self, frames: int) -> "SpectralBlockDecoder | None":
    """The stream decoder for blocks of ``frames`` latent frames, a multiple of the internal
    chunk (then every block runs the same number of chunks once the decoder is primed), for a
    chunk grid that starts with the stream (``offset`` 0) and look-ahead of at least the net's
    radius; other decoders (``low_latency``'s) return None and stream on the host."""
    if frames < 1 or frames % self.chunk or self.offset or self.lookahead < self.radius:
      return None
    return SpectralBlockDecoder(self, frames)

  def decode_logmag(self, latents: np.ndarray) -> np.ndarray:
    """(frames, K) -> (frames, F) log-magnitudes (no phase reconstruction); for analysis."""
    latents = self._check_latents(latents)
    r = self.radius
    pad = np.concatenate([np.repeat(self.silence[None], r, 0), latents,
                          np.repeat(self.silence[None], r, 0)])
    return np.asarray(_decode_logmag(self._params, jnp.asarray(pad), self.residual))


class SpectralStreamDecoder(StreamDecoder):
  """Re-blocks pushed latents into fixed chunks, so output does not depend on push sizes.

  Latency: ``codec.hold_back(block)`` frames for pushes of ``block`` frames; at most
  ``chunk + lookahead + radius + 2`` for any push sizes.
  """

  def __init__(self, codec: SpectralCodec):
    self.c = codec
    f = N_FFT // 2 + 1
    r = codec.radius
    # the chunk grid starts ``offset`` frames before the stream (frames < 0 do not exist)
    self._lat = np.repeat(codec.silence[None], r + codec.offset, 0)  # frames a-r .. (buffered)
    self._ctx = np.zeros((_CTX, f), np.complex64)
    self._ahead = np.zeros((codec.lookahead, f), np.complex64)
    self._a = -codec.offset  # first frame of the next chunk
    self._n = 0  # latent frames received
    self._done = False
    self._emitted = 0  # samples returned by push so far

  def _run(self, total: int | None) -> np.ndarray:
    """Process every chunk whose inputs are available; total = stream length when flushing."""
    c = self.c
    b, look, r = c.chunk, c.lookahead, c.radius
    need = b + look + 2 * r
    out = []
    while True:
      if total is None:
        if self._lat.shape[0] < need:
          break
        lat = self._lat[:need]
      else:
        if self._a - 2 >= total:  # every segment 0..total-1 has been emitted
          break
        lat = self._lat[:need]
        if lat.shape[0] < need:
          lat = np.concatenate([lat, np.repeat(c.silence[None], need - lat.shape[0], 0)])
      g = np.arange(self._a - _CTX, self._a + b + look)
      n_exist = total if total is not None else np.inf
      exists = ((g >= 0) & (g < n_exist)).astype(np.float32)
      spec, audio = _chunk_step_jit(c._params, jnp.asarray(lat), jnp.asarray(self._ctx),
                                    jnp.asarray(self._ahead), jnp.asarray(exists),
                                    n_iter=c.n_iter, momentum=c.momentum, residual=c.residual)
      spec = np.asarray(spec)
      audio = np.asarray(audio)
      # Audio covers segments a-2 .. a+b-3: drop those before the stream start.
      first = self._a - 2
      if first < 0:
        audio = audio[-first * HOP:]
      out.append(audio)
      self._emitted += audio.shape[0]
      self._ctx = np.concatenate([self._ctx, spec])[b:b + _CTX]  # frames a+b-3 .. a+b-1
      self._ahead = spec[b:]
      self._lat = self._lat[b:]
      self._a += b
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def push(self, block: np.ndarray) -> np.ndarray:
    if self._done:
      raise RuntimeError("push after flush")
    block = self.c._check_latents(block)
    self._lat = np.concatenate([self._lat, block]) if self._lat.size else block
    self._n += block.shape[0]
    return self._run(None)[None, :]

  def flush(self) -> np.ndarray:
    if self._done:
      return np.zeros((1, 0), np.float32)
    self._done = True
    total = self._n
    before = self._emitted
    audio = self._run(total)
    return audio[None, : max(total * HOP - before, 0)]


class SpectralBlockDecoder(BlockDecoder):
  """``SpectralStreamDecoder`` for blocks of ``frames`` = q * chunk latent frames, as one pure
  function per block (``BlockDecoder``): every block runs q chunk steps over a fixed window of
  the latest latents; during the first blocks, before the decoder has its look-ahead, the steps
  that the stream decoder would not run yet are skipped (``lax.cond``) and their audio is not
  valid. The state holds the window, the committed and look-ahead spectra and a block counter.

  In the stream decoder's terms: frames are numbered in the stream padded with ``radius``
  silent frames in front; after k blocks, P(k) = radius + k * frames frames are in and
  S(k) = (P(k) - need) // chunk + 1 chunk steps have run (0 while P(k) < need = chunk +
  lookahead + 2 radius); step s reads padded frames s * chunk .. s * chunk + need - 1. Once
  primed, the q steps of block k end delta = (radius - need) mod chunk frames before its end.
  """

  def __init__(self, codec: "SpectralCodec", frames: int):
    self.c, self.frames = codec, frames
    b, look, r = codec.chunk, codec.lookahead, codec.radius
    self.q = frames // b
    self.need = b + look + 2 * r
    self.delta = (r - self.need) % b
    self.window = (self.q - 1) * b + self.need + self.delta
    self.max_samples = self.q * b * HOP
    self.params = codec._params

  def __repr__(self) -> str:  # names the compiled program (compile_cache keys): no ids
    c = self.c
    return (f"SpectralBlockDecoder(frames={self.frames}, chunk={c.chunk}, lookahead={c.lookahead},"
            f" radius={c.radius}, n_iter={c.n_iter}, momentum={c.momentum}, residual="
            f"{c.residual}, latent_dim={c.latent_dim})")

  def steps_after(self, k: int) -> int:
    """S(k): chunk steps run after k blocks."""
    p = self.c.radius + k * self.frames
    return 0 if p < self.need else (p - self.need) // self.c.chunk + 1

  def init(self, batch: int):
    f, c = N_FFT // 2 + 1, self.c
    sil = np.broadcast_to(c.silence, (batch, self.window, c.latent_dim))
    put = jax.device_put  # not jnp: no small programs compiled at start-up
    return {"lat": put(np.ascontiguousarray(sil, np.float32)),
            "ctx": put(np.zeros((batch, _CTX, f), np.complex64)),
            "ahead": put(np.zeros((batch, c.lookahead, f), np.complex64)),
            "blocks": put(np.zeros((), np.int32))}

  def step(self, params, state, latents):
    c = self.c
    b, look = c.chunk, c.lookahead
    lat = jnp.concatenate([state["lat"], latents.astype(jnp.float32)], axis=1)[:, self.frames:]
    k = state["blocks"] + 1  # blocks in after this one
    p = c.radius + k * self.frames
    s_after = jnp.where(p < self.need, 0, (p - self.need) // b + 1)
    ctx, ahead, out = state["ctx"], state["ahead"], []
    one = jax.vmap(functools.partial(_chunk_step, n_iter=c.n_iter, momentum=c.momentum,
                                     residual=c.residual), in_axes=(None, 0, 0, 0, None))
    for j in range(self.q):
      s = s_after - self.q + j  # this chunk step's index in the stream (< 0: not run yet)
      g = s * b + jnp.arange(-_CTX, b + look)
      exists = (g >= 0).astype(jnp.float32)
      window = lat[:, j * b:j * b + self.need]

      def run(ops):  # item by item: a batched FFT rounds differently, and Griffin-Lim's
        ctx, ahead = ops  # phase feedback grows 1-ulp differences to ~1e-4 over blocks
        parts = [one(params, window[i:i + 1], ctx[i:i + 1], ahead[i:i + 1], exists)
                 for i in range(window.shape[0])]
        spec = jnp.concatenate([p[0] for p in parts])
        audio = jnp.concatenate([p[1] for p in parts])
        return spec[:, b - _CTX:b], spec[:, b:], audio

      def skip(ops):
        ctx, ahead = ops
        return ctx, ahead, jnp.zeros((lat.shape[0], b * HOP), jnp.float32)

      ctx, ahead, audio = jax.lax.cond(s >= 0, run, skip, (ctx, ahead))
      out.append(audio)
    audio = jnp.concatenate(out, axis=1)[:, None, :]
    return audio, {"lat": lat, "ctx": ctx, "ahead": ahead, "blocks": k}

  def valid(self, k: int) -> tuple[int, int]:
    b = self.c.chunk
    s_after = self.steps_after(k + 1)
    first = s_after - self.q  # step index of the block's first chunk
    j0 = max(0, -first)  # chunks of this block that did not run
    lo = j0 * b * HOP + (2 * HOP if first + j0 == 0 and j0 < self.q else 0)
    return (min(lo, self.max_samples), self.max_samples)

  def tail(self, state, item: int = 0) -> "SpectralStreamDecoder":
    k = int(state["blocks"])
    s = self.steps_after(k)
    p = self.c.radius + k * self.frames
    sd = SpectralStreamDecoder(self.c)
    keep = p - s * self.c.chunk  # padded frames in and not yet consumed by a chunk step
    sd._lat = np.asarray(state["lat"][item])[self.window - keep:]
    sd._ctx = np.asarray(state["ctx"][item])
    sd._ahead = np.asarray(state["ahead"][item])
    sd._a = s * self.c.chunk
    sd._n = k * self.frames
    sd._emitted = max(0, s * self.c.chunk * HOP - 2 * HOP)
    return sd
