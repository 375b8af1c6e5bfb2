"""The default codec (lmdm_jax/codecs/spectral.py): geometry, latents, streaming, errors, quality.

Runs on the shipped assets and a synthetic but musical signal (a I-vi-IV-V progression of
harmonic tones with a bass line and note onsets); no audio files needed. About 30 s on CPU.
"""
from __future__ import annotations

import numpy as np
import pytest

from lmdm_jax.codecs import get_codec
from lmdm_jax.codecs.base import Codec, StreamDecoder
from lmdm_jax.codecs.spectral import HOP, SAMPLE_RATE, SpectralCodec, stft_frames

pytestmark = pytest.mark.slow  # codec fits, quality and streaming decode (the full suite runs them)

SR = SAMPLE_RATE


def _tone(freq: float, dur: float, amp: float, decay: float = 2.0) -> np.ndarray:
  t = np.arange(int(dur * SR)) / SR
  env = np.minimum(t / 0.01, 1.0) * np.exp(-decay * t)
  return amp * env * sum((0.6 ** h) * np.sin(2 * np.pi * freq * (h + 1) * t + h)
                         for h in range(8) if freq * (h + 1) < SR / 2)


def chord_progression(seconds: float = 8.0, seed: int = 0) -> np.ndarray:
  """Piano-like harmonic tones: I-vi-IV-V in C, arpeggiated melody, bass, 0.5 s chords."""
  rng = np.random.default_rng(seed)
  chords = [[60, 64, 67], [57, 60, 64], [53, 57, 60], [55, 59, 62]]
  out = np.zeros(int(seconds * SR) + SR)
  step = 0.5
  for k in range(int(seconds / step)):
    chord = chords[(k // 4) % 4]
    start = int(k * step * SR)
    notes = chord + [chord[0] - 12] if k % 4 == 0 else chord
    for m in notes:
      f = 440 * 2 ** ((m - 69) / 12)
      x = _tone(f, 1.0, 0.06 * rng.uniform(0.7, 1.0))
      out[start:start + len(x)] += x
    mel = chord[k % 3] + 12
    x = _tone(440 * 2 ** ((mel - 69) / 12), 0.5, 0.08, decay=4.0)
    out[start:start + len(x)] += x
  out = out[: int(seconds * SR) // HOP * HOP]
  return (0.5 * out / np.abs(out).max()).astype(np.float32)[None]


def lsd_db(ref: np.ndarray, est: np.ndarray) -> float:
  a, b = np.abs(stft_frames(ref)), np.abs(stft_frames(est))
  floor = a.max() * 1e-4
  da, db = 20 * np.log10(np.maximum(a, floor)), 20 * np.log10(np.maximum(b, floor))
  return float(np.mean(np.sqrt(np.mean((da - db) ** 2, axis=1))))


def chroma(y: np.ndarray) -> np.ndarray:
  """A plain STFT chroma (12 x frames), so the test needs no librosa."""
  mag = np.abs(stft_frames(y)).T
  freqs = np.fft.rfftfreq(2048, 1 / SR)
  ok = (freqs > 60) & (freqs < 5000)
  pc = np.round(12 * np.log2(freqs[ok] / 440.0)).astype(int) % 12
  out = np.zeros((12, mag.shape[1]))
  np.add.at(out, pc, mag[ok] ** 2)
  return out


@pytest.fixture(scope="module")
def codec() -> SpectralCodec:
  return get_codec("spectral")


@pytest.fixture(scope="module")
def music() -> np.ndarray:
  return chord_progression()


@pytest.fixture(scope="module")
def round_trip(codec, music):
  z = codec.encode(music)
  return z, codec.decode(z)


def test_geometry(codec):
  assert isinstance(codec, Codec)
  assert (codec.sample_rate, codec.channels, codec.hop) == (22050, 1, 512)
  assert 20 <= codec.frame_rate <= 45
  assert 32 <= codec.latent_dim <= 256


def test_shapes(codec, music, round_trip):
  z, out = round_trip
  frames = music.shape[1] // HOP
  assert z.shape == (frames, codec.latent_dim) and z.dtype == np.float32
  assert out.shape == (1, frames * HOP) and out.dtype == np.float32
  # Samples are cut to a multiple of hop; a batch axis is allowed.
  assert codec.encode(music[:, : 10 * HOP + 100]).shape == (10, codec.latent_dim)
  zb = codec.encode(np.stack([music[:, : 20 * HOP]] * 2))
  assert zb.shape == (2, 20, codec.latent_dim)
  assert codec.decode(zb).shape == (2, 1, 20 * HOP)


def test_latent_statistics(codec, round_trip):
  z, _ = round_trip
  assert np.all(np.isfinite(z))
  # Standardized channels: values of a normal-level signal stay within about +-5 (a few
  # low-variance channels may poke out on a very synthetic signal; the bulk must not).
  assert np.percentile(np.abs(z), 99) < 6.0
  assert np.abs(z).max() < 12.0
  # Smooth in time: frame-to-frame change is well below the signal's own spread.
  assert np.mean(np.abs(np.diff(z, axis=0))) < np.mean(np.abs(z - z.mean(0)))
  # Silence has one fixed latent.
  zs = codec.encode(np.zeros((1, 8 * HOP), np.float32))
  np.testing.assert_allclose(zs[2:-2], np.repeat(codec.silence[None], 4, 0), atol=1e-4)


def test_streaming_equals_full_decode(codec, round_trip):
  """Documented margin: max abs difference <= 1e-5 (the decoder re-blocks internally, so any
  push sizes give the same chunks; only float rounding could differ)."""
  z, full = round_trip
  rng = np.random.default_rng(1)
  for sizes in ([48] * 100, list(rng.integers(1, 30, size=200))):
    sd = codec.stream_decoder()
    assert isinstance(sd, StreamDecoder)
    parts, i = [], 0
    for n in sizes:
      if i >= len(z):
        break
      piece = sd.push(z[i:i + n])
      assert piece.ndim == 2 and piece.shape[0] == 1
      parts.append(piece)
      i += n
    parts.append(sd.flush())
    out = np.concatenate(parts, axis=-1)
    assert out.shape == full.shape
    assert np.abs(out - full).max() <= 1e-5


def test_streaming_latency_is_bounded(codec, round_trip):
  z, _ = round_trip
  sd = codec.stream_decoder()
  got = 0
  for i in range(0, 96, 8):
    got += sd.push(z[i:i + 8]).shape[1]
    held_back = (i + 8) * HOP - got
    assert held_back <= (codec.chunk + codec.lookahead + codec.radius + 2) * HOP


def test_round_trip_quality(round_trip, music):
  """Measured with the shipped assets: LSD 2.95 dB, chroma correlation 0.966 (3.6 / 0.952 with
  the earlier 2-layer decoder; held-out real music: see bench/codec_quality.py). The bounds leave
  margin for float differences."""
  _, out = round_trip
  assert lsd_db(music[0], out[0]) < 4.5
  a, b = chroma(music[0]), chroma(out[0])
  assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.93


def test_latent_noise_tolerance(codec, round_trip, music):
  """The generator's error budget: 0.1 std of latent noise must not wreck the audio."""
  z, out = round_trip
  rng = np.random.default_rng(0)
  noisy = codec.decode(z + 0.1 * rng.standard_normal(z.shape).astype(np.float32))
  assert lsd_db(music[0], noisy[0]) < lsd_db(music[0], out[0]) + 2.0


def test_bad_input_raises(codec, music):
  with pytest.raises(ValueError, match="channels"):
    codec.encode(np.concatenate([music, music]))  # stereo into a mono codec
  with pytest.raises(ValueError, match="channels"):
    codec.encode(music[0])  # missing channel axis
  with pytest.raises(ValueError, match="Hz"):
    codec.encode(music, sample_rate=44100)
  with pytest.raises(ValueError, match="latent_dim"):
    codec.decode(np.zeros((10, codec.latent_dim + 1), np.float32))
  with pytest.raises(ValueError, match="latent_dim"):
    codec.stream_decoder().push(np.zeros((10, 7), np.float32))
  with pytest.raises(ValueError, match="NaN"):
    codec.decode(np.full((4, codec.latent_dim), np.nan, np.float32))
  with pytest.raises(ValueError):
    get_codec("no-such-codec")


@pytest.mark.slow
def test_refit_decoder_keeps_the_latents(tmp_path, codec, music):
  """`fit_default_codec.py refit-decoder` trains only a new (residual) decoder: the encoder, and so
  every latent already encoded (datasets, trained models), stays bit-identical; the new asset's
  decoder is a different function that streams exactly like full decode."""
  import importlib.util
  import os
  import sys

  import soundfile as sf

  from lmdm_jax.codecs.spectral import DEFAULT_ASSET

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("fit_default_codec",
                                                os.path.join(root, "scripts",
                                                             "fit_default_codec.py"))
  fit = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fit)
  for split, seeds in (("train", (1, 2)), ("held", (3,))):
    (tmp_path / split).mkdir()
    for s in seeds:
      sf.write(tmp_path / split / f"piece{s}.wav", chord_progression(3.0, seed=s)[0], SR)
  out = tmp_path / "refit.npz"
  argv = sys.argv
  sys.argv = ["fit_default_codec.py", "refit-decoder", "--data", str(tmp_path / "train"),
              "--heldout", str(tmp_path / "held"), "--dec-layers", "3", "--hidden", "16",
              "--steps", "3", "--batch", "2", "--crop", "8", "--log-every", "1",
              "--out", str(out)]
  try:
    fit.main()
  finally:
    sys.argv = argv
  new = SpectralCodec(str(out))
  with np.load(DEFAULT_ASSET) as a, np.load(out) as b:
    for k in a.files:
      if not k.startswith(("net_conv", "net_out", "recipe")):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert bool(b["net_residual"]) and b["net_conv1_w"].shape == (3, 16, 16)
  np.testing.assert_array_equal(new.encode(music), codec.encode(music))
  assert new.radius == 3 and new.residual
  z = codec.encode(music)[:120]
  full = new.decode(z)
  sd = new.stream_decoder()
  parts = [sd.push(z[i:i + 7]) for i in range(0, len(z), 7)] + [sd.flush()]
  assert np.abs(np.concatenate(parts, -1) - full).max() <= 1e-5
  # The skip connections are part of the function the asset was trained as.
  with_skip = new.decode_logmag(z)
  new.residual = False
  assert np.abs(new.decode_logmag(z) - with_skip).max() > 1e-3
  # A second stage fine-tunes that decoder (here with the chroma loss); a mismatched one is refused.
  out2 = tmp_path / "stage2.npz"
  stage2 = ["fit_default_codec.py", "refit-decoder", "--data", str(tmp_path / "train"),
                          "--heldout", str(tmp_path / "held"), "--dec-layers", "3", "--hidden",
                          "16", "--steps", "2", "--batch", "2", "--crop", "8", "--asset", str(out),
                          "--init", str(out), "--chroma-weight", "10", "--out", str(out2)]
  for args in (stage2, stage2[:7] + ["32"] + stage2[8:]):
    sys.argv = args
    try:
      if args is stage2:
        fit.main()
      else:
        with pytest.raises(ValueError, match="--init decoder does not match"):
          fit.main()
    finally:
      sys.argv = argv
  with np.load(out) as a, np.load(out2) as b:
    assert a["net_conv0_w"].shape == b["net_conv0_w"].shape
    assert not np.array_equal(a["net_out_w"], b["net_out_w"])
    np.testing.assert_array_equal(a["basis"], b["basis"])


def _held_back(codec, z, block):
  """Largest number of frames a stream decoder of `codec` holds back over pushes of `block`."""
  sd, pushed, got, worst = codec.stream_decoder(), 0, 0, 0
  for i in range(0, len(z) - block + 1, block):
    got += sd.push(z[i:i + block]).shape[1]
    pushed += block * HOP
    worst = max(worst, pushed - got)
  assert worst % HOP == 0
  return worst // HOP


def test_low_latency_decoder_streams_exactly_with_a_shorter_hold_back(codec, round_trip, music):
  """The jam's decoder (`low_latency(16)`): same latents, its stream equals its own full decode
  for any push sizes, it holds back 7 frames of 16-frame pushes (0.16 s) where the default
  decoder holds back 18 (0.42 s), both as `hold_back` accounts, at a small quality cost."""
  z, full = round_trip
  fast = codec.low_latency(16)
  assert (fast.chunk, fast.lookahead, fast.offset) == (16, 1, 5)
  assert (codec.chunk, codec.lookahead, codec.offset) == (16, 4, 0)  # the default is unchanged
  ref = fast.decode(z)
  assert ref.shape == full.shape
  rng = np.random.default_rng(2)
  for sizes in ([16] * 40, list(rng.integers(1, 40, size=100))):
    sd, parts, i = fast.stream_decoder(), [], 0
    for n in sizes:
      parts.append(sd.push(z[i:i + n]))
      i += n
    parts.append(sd.push(z[i:]))
    parts.append(sd.flush())
    assert np.abs(np.concatenate(parts, -1) - ref).max() <= 1e-5
  assert _held_back(codec, z, 16) == codec.hold_back(16) == 18
  assert _held_back(fast, z, 16) == fast.hold_back(16) == 7 == 1 + codec.radius + 2
  assert _held_back(codec.low_latency(8), z, 8) == codec.low_latency(8).hold_back(8) == 7
  # quality: the round trip stays close to the default decoder's
  assert lsd_db(music[0], ref[0]) < lsd_db(music[0], full[0]) + 0.5
  a, b = chroma(music[0]), chroma(ref[0])
  assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.93
  assert np.abs(ref - full).max() > 1e-3  # a different phase reconstruction, not the same one


@pytest.mark.parametrize("chunk, lookahead, offset", [(2, 0, 1), (5, 0, 0), (3, 2, 2)])
def test_griffin_lim_chunking_without_lookahead_or_shorter_than_the_overlap(
    codec, round_trip, chunk, lookahead, offset):
  """Any chunking streams exactly: no look-ahead frames, chunks shorter than the 3 frames held
  fixed, a shifted chunk grid; the hold-back is as `hold_back` accounts."""
  z = round_trip[0][:70]
  c = SpectralCodec(chunk=chunk, lookahead=lookahead, offset=offset)
  ref = c.decode(z)
  assert ref.shape == (1, 70 * HOP) and np.all(np.isfinite(ref)) and np.abs(ref).max() > 0
  sd = c.stream_decoder()
  parts = [sd.push(z[i:i + 7]) for i in range(0, len(z), 7)] + [sd.flush()]
  assert np.abs(np.concatenate(parts, -1) - ref).max() <= 1e-5
  assert _held_back(c, z, 4) == c.hold_back(4)
  with pytest.raises(ValueError, match="offset"):
    SpectralCodec(chunk=chunk, lookahead=lookahead, offset=chunk)
