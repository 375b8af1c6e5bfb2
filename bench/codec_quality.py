"""Round-trip quality and speed of the default codec vs the 64-mel + Griffin-Lim baseline.

  python bench/codec_quality.py [--dir data_cache/codec_data/heldout] [--seconds 20]
  python bench/codec_quality.py --low-latency --no-baseline   # + the jam's decoder (same latents)

Held-out clips: every WAV in --dir (pieces never seen by scripts/fit_default_codec.py), one clip
of --seconds from each, starting at --offset. Metrics, averaged over clips:
  LSD   log-spectral distance (dB): STFT 2048/512 magnitudes in dB, floored at 80 dB below the
        reference clip's maximum, RMS over frequency, mean over frames.
  chroma  Pearson correlation of librosa chroma_stft (reference vs round trip), all cells.
  onset   Pearson correlation of librosa onset_strength envelopes.
  enc/dec xRT   audio seconds per wall second (after a warm-up call; this machine, 1 process).
  stream xRT    the same for StreamDecoder, latents pushed in blocks of 48 frames (1.1 s).
  +noise LSD    LSD when Gaussian noise of 0.1 per-channel std is added to the latents
                (the generator's error budget).
  hold ms       audio a stream decoder holds back when fed --block-frame pushes (the jam's blocks)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lmdm_jax.codecs.spectral import (HOP, N_FFT, SAMPLE_RATE, SpectralCodec,  # noqa: E402
                                      griffin_lim_stream, stft_frames)


def lsd(ref: np.ndarray, est: np.ndarray, top_db: float = 80.0) -> float:
  n = min(len(ref), len(est)) // HOP * HOP
  a, b = np.abs(stft_frames(ref[:n])), np.abs(stft_frames(est[:n]))
  floor = a.max() * 10 ** (-top_db / 20)
  da, db = 20 * np.log10(np.maximum(a, floor)), 20 * np.log10(np.maximum(b, floor))
  return float(np.mean(np.sqrt(np.mean((da - db) ** 2, axis=1))))


def chroma_corr(ref: np.ndarray, est: np.ndarray) -> float:
  import librosa

  n = min(len(ref), len(est))
  a = librosa.feature.chroma_stft(y=ref[:n], sr=SAMPLE_RATE)
  b = librosa.feature.chroma_stft(y=est[:n], sr=SAMPLE_RATE)
  return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def onset_corr(ref: np.ndarray, est: np.ndarray) -> float:
  import librosa

  n = min(len(ref), len(est))
  a = librosa.onset.onset_strength(y=ref[:n], sr=SAMPLE_RATE)
  b = librosa.onset.onset_strength(y=est[:n], sr=SAMPLE_RATE)
  return float(np.corrcoef(a, b)[0, 1])


class MelGLBaseline:
  """DESIGN.md's baseline: 64 log-mel channels, pseudo-inverse to magnitudes, the same streamed
  fast Griffin-Lim as the default codec (32 iterations). Latents standardized per channel."""

  hop = HOP
  latent_dim = 64

  def __init__(self):
    import librosa

    self.fb = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=64).astype(np.float32)
    self.pinv = np.linalg.pinv(self.fb).astype(np.float32)

  def encode(self, audio):
    mag = np.abs(stft_frames(audio[0]))
    return np.log(mag @ self.fb.T + 1e-5).astype(np.float32)

  def decode(self, lat):
    mag = np.maximum(np.exp(lat) - 1e-5, 0) @ self.pinv.T
    return griffin_lim_stream(np.maximum(mag, 0))[None]


class OracleGL:
  """True STFT magnitudes + the codec's streamed fast Griffin-Lim (bound of the phase part)."""

  hop = HOP
  latent_dim = N_FFT // 2 + 1

  def encode(self, audio):
    return np.abs(stft_frames(audio[0])).astype(np.float32)

  def decode(self, lat):
    return griffin_lim_stream(lat)[None]


def load_clips(folder: str, seconds: float, offset: float) -> list[tuple[str, np.ndarray]]:
  import soundfile as sf

  clips = []
  for f in sorted(os.listdir(folder)):
    if not f.endswith(".wav"):
      continue
    y, sr = sf.read(os.path.join(folder, f), dtype="float32", always_2d=True)
    if sr != SAMPLE_RATE:
      raise ValueError(f"{f}: {sr} Hz")
    y = y.mean(1)
    start = int(offset * sr) if len(y) > (offset + seconds) * sr else 0
    y = y[start:start + int(seconds * sr)]
    clips.append((f[:-4], y[: len(y) // HOP * HOP]))
  return clips


def evaluate(name, codec, clips, stream=False, noise=False, rng=None):
  rows = []
  for _, y in clips:
    secs = len(y) / SAMPLE_RATE
    codec.encode(y[None])  # warm-up / compile
    t0 = time.perf_counter()
    z = codec.encode(y[None])
    t_enc = time.perf_counter() - t0
    codec.decode(z[:64])  # compile
    t0 = time.perf_counter()
    out = codec.decode(z)[0]
    t_dec = time.perf_counter() - t0
    r = dict(lsd=lsd(y, out), chroma=chroma_corr(y, out), onset=onset_corr(y, out),
             enc=secs / t_enc, dec=secs / t_dec)
    if stream:
      sd = codec.stream_decoder()
      t0 = time.perf_counter()
      parts = [sd.push(z[i:i + 48]) for i in range(0, len(z), 48)] + [sd.flush()]
      t_str = time.perf_counter() - t0
      ys = np.concatenate(parts, -1)[0]
      r["stream"] = secs / t_str
      r["stream_maxdiff"] = float(np.abs(ys - out).max())
    if noise:
      zn = z + 0.1 * z.std(0, keepdims=True) * rng.standard_normal(z.shape).astype(np.float32)
      r["noise_lsd"] = lsd(y, codec.decode(zn)[0])
    rows.append(r)
  keys = rows[0].keys()
  avg = {k: float(np.mean([r[k] for r in rows])) for k in keys}
  if "stream_maxdiff" in avg:
    avg["stream_maxdiff"] = float(np.max([r["stream_maxdiff"] for r in rows]))
  return name, avg, rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--dir", default=os.path.join(ROOT, "data_cache", "codec_data", "heldout"))
  ap.add_argument("--seconds", type=float, default=20.0)
  ap.add_argument("--offset", type=float, default=10.0)
  ap.add_argument("--asset", default=None, help="codec asset .npz (default: the shipped one)")
  ap.add_argument("--n-iter", type=int, default=32, help="Griffin-Lim iterations per chunk")
  ap.add_argument("--lookahead", type=int, default=4)
  ap.add_argument("--low-latency", action="store_true",
                  help="also the jam's decoder, codec.low_latency(--block)")
  ap.add_argument("--block", type=int, default=16, help="push size in frames for 'hold ms'")
  ap.add_argument("--no-baseline", action="store_true")
  ap.add_argument("--per-clip", action="store_true")
  args = ap.parse_args()

  clips = load_clips(args.dir, args.seconds, args.offset)
  print(f"{len(clips)} held-out clips of {args.seconds:.0f} s from {args.dir}")
  rng = np.random.default_rng(0)
  codec = SpectralCodec(args.asset, n_iter=args.n_iter, lookahead=args.lookahead)
  results = [evaluate(f"spectral (PCA{codec.latent_dim}"
                      f"{'+net' if codec.radius else ''}, GL{codec.n_iter})", codec, clips,
                      stream=True, noise=True, rng=rng)]
  holds = [codec.hold_back(args.block)]
  if args.low_latency:
    fast = codec.low_latency(args.block)
    results.append(evaluate(f"  low-latency (chunk {fast.chunk}, look {fast.lookahead})", fast,
                            clips, stream=True, noise=True, rng=rng))
    holds.append(fast.hold_back(args.block))
  if not args.no_baseline:
    results.append(evaluate("64-mel + GL32 baseline", MelGLBaseline(), clips))
    results.append(evaluate("oracle |STFT| + GL32", OracleGL(), clips))

  hdr = (f"| {'codec':34s} | LSD dB | chroma | onset | enc xRT | dec xRT | stream xRT |"
         f" +noise LSD | hold ms |")
  print(hdr)
  print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
  for i, (name, a, _) in enumerate(results):
    stream = f"{a['stream']:10.1f}" if "stream" in a else f"{'-':>10s}"
    noise = f"{a['noise_lsd']:10.2f}" if "noise_lsd" in a else f"{'-':>10s}"
    hold = f"{1000 * holds[i] * HOP / SAMPLE_RATE:7.0f}" if i < len(holds) else f"{'-':>7s}"
    print(f"| {name:34s} | {a['lsd']:6.2f} | {a['chroma']:6.3f} | {a['onset']:5.3f} |"
          f" {a['enc']:7.0f} | {a['dec']:7.1f} | {stream} | {noise} | {hold} |")
  for name, a, _ in results:
    if "stream_maxdiff" in a:
      print(f"{name.strip()}: streaming vs full decode, max abs difference:"
            f" {a['stream_maxdiff']:.2e}")
  name, a, rows = results[0]
  z = np.concatenate([codec.encode(y[None]) for _, y in clips])
  print(f"latents: {codec.latent_dim} dims at {codec.frame_rate:.2f} frames/s; held-out mean"
        f" {z.mean():+.3f}, per-channel std {z.std(0).min():.2f}..{z.std(0).max():.2f},"
        f" |z| 99.9th pct {np.percentile(np.abs(z), 99.9):.2f}, max {np.abs(z).max():.2f}")
  if args.per_clip:
    for (clip, _), r in zip(clips, rows):
      print(f"  {clip:40s} LSD {r['lsd']:5.2f} chroma {r['chroma']:.3f} onset {r['onset']:.3f}")


if __name__ == "__main__":
  main()
