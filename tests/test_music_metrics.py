"""lmdm_jax.music_metrics on signals whose answers are known."""
import numpy as np
import pytest

from lmdm_jax import music_metrics as M

pytestmark = pytest.mark.slow  # audio analysis (the full suite runs them)

SR = 22050


def _tones(midis, seconds, sr=SR):
  t = np.arange(int(seconds * sr)) / sr
  return sum(np.sin(2 * np.pi * 440 * 2 ** ((m - 69) / 12) * t) for m in midis) / len(midis)


def _progression(tonic_midi, minor=False, seconds=2.0):
  third = 3 if minor else 4
  chords = [(0, third, 7), (5, 5 + third + (1 if minor else 0), 12), (7, 11, 14), (0, third, 7)]
  return np.concatenate([_tones([tonic_midi + i for i in c], seconds) for c in chords])


def test_pitch_class_names():
  assert [M.pitch_class(n) for n in ("C", "B-", "Bb", "F#", "c#", "E--")] == [0, 10, 10, 6, 1, 2]
  with pytest.raises(ValueError, match="not a pitch name"):
    M.pitch_class("H")


@pytest.mark.parametrize("tonic,minor", [(62, False), (67, False), (57, True)])
def test_key_of_a_cadence(tonic, minor):
  k, mode, r = M.estimate_key(_progression(tonic, minor), SR)
  assert (k, mode) == (tonic % 12, "minor" if minor else "major") and r > 0.6
  assert M.key_relation((k, mode), (tonic % 12, mode)) == "exact"


def test_key_relations():
  assert M.key_relation((9, "minor"), (0, "major")) == "related"  # relative
  assert M.key_relation((7, "major"), (0, "major")) == "related"  # dominant
  assert M.key_relation((1, "major"), (0, "major")) == "other"


def test_tempo_of_a_click_track():
  x = np.zeros(SR * 12)
  for s in np.arange(0, 12, 0.5):  # 120 BPM
    i = int(s * SR)
    x[i:i + 400] = np.sin(2 * np.pi * 1000 * np.arange(400) / SR) * np.hanning(400)
  x += 1e-3 * np.random.default_rng(0).standard_normal(x.size)
  est = M.estimate_tempo(x, SR)
  assert M.tempo_error(est, 120) < 0.05 and M.tempo_error(est, 60) < 0.05
  assert M.tempo_error(180, 120) == pytest.approx(1 - np.log2(1.5), abs=1e-9)  # 3:2 is wrong
  assert M.tempo_error(0.0, 120) == float("inf")


def test_loudness_stability():
  steady = 0.1 * _tones([69], 60)
  st = M.loudness_stability(steady, SR)
  assert st["std_db"] < 0.01 and abs(st["mean_db"] - (-23.0)) < 0.1 and st["silent_windows"] == 0
  fade = steady * np.linspace(1, 0.01, steady.size)
  fd = M.loudness_stability(fade, SR)
  assert fd["slope_db_per_min"] < -20 and fd["range_db"] > 20


def test_sketch_adherence_and_partner_agreement():
  hop = 512
  melody = np.repeat([60.0, 64.0, 67.0, np.nan], int(SR * 1.0 / hop))
  audio = np.concatenate([_tones([m], 1.0) if np.isfinite(m) else np.zeros(SR)
                          for m in (60, 64, 67, np.nan)])
  good = M.sketch_adherence(audio, SR, hop, melody)
  wrong = M.sketch_adherence(audio, SR, hop, melody + 1)
  assert good["top1"] > 0.9 and good["share"] > 0.4 and wrong["share"] < good["share"] / 2
  assert good["frames"] == 3 * int(SR / hop)
  a = _progression(62)
  assert M.chroma_agreement(a, a, SR) > 0.99
  assert M.chroma_agreement(a, _progression(63), SR) < 0.5


def test_loud_and_silent_windows_and_level_std():
  loud = np.clip(2.0 * _tones([69], 10), -1, 1)  # a runaway: RMS about -1 dBFS
  quiet = 0.1 * _tones([69], 40)  # -23 dBFS
  x = np.concatenate([loud, quiet, np.zeros(10 * SR)])  # 12 windows of 5 s
  assert M.loud_share(x, SR) == pytest.approx(2 / 12)
  assert M.silent_share(x, SR) == pytest.approx(2 / 12)
  assert M.loudness_stability(x, SR)["loud_windows"] == pytest.approx(2 / 12)
  assert M.loud_share(quiet, SR) == 0 and M.silent_share(quiet, SR) == 0
  # 5-s windows alternating between two levels 6 dB apart: std exactly 3 dB
  a = 0.1 * _tones([69], 5)
  alt = np.concatenate([a, a / 10 ** (6 / 20)] * 4)
  assert M.loudness_stability(alt, SR)["std_db"] == pytest.approx(3.0, abs=0.01)


def test_clipped_samples():
  assert M.clipped_samples(np.array([0.5, 1.0, -1.0, 0.999, 1.3, -2.0])) == 4
  # a sine at twice full scale: |x| >= 1 where |sin| >= 1/2, two thirds of the time
  x = 2.0 * np.sin(2 * np.pi * np.arange(120000) / 120 + 1e-3)
  assert M.clipped_samples(x) == pytest.approx(2 / 3 * x.size, rel=1e-3)
  assert M.clipped_samples(0.5 * x) == 0
  assert M.clipped_samples(np.stack([x, x])) == 2 * M.clipped_samples(x)  # every channel


def _chords(roots, seconds):
  return np.concatenate([_tones([r, r + 4, r + 7], seconds) for r in roots])


def test_harmonic_motion():
  held = _tones([60, 64, 67], 8)
  moving = _chords([60, 65, 67, 60] * 2, 1.0)  # I-IV-V-I, one chord a second
  h, m = M.harmonic_motion(held, SR), M.harmonic_motion(moving, SR)
  assert h < 0.05 and m > 0.3, (h, m)
  assert np.isnan(M.harmonic_motion(np.zeros(4 * SR), SR))


def test_chroma_distance_and_context_correlation():
  a = _progression(60)
  assert abs(M.chroma_distance(a, a, SR)) < 1e-9
  assert M.chroma_distance(a, _progression(66), SR) > 0.3  # a tritone away
  assert M.context_correlation(_progression(60), a, SR, seconds=8) > 0.9
  assert M.context_correlation(_progression(66), a, SR, seconds=8) < 0.0
  assert np.isnan(M.context_correlation(np.zeros(SR), a, SR))


def test_shuffled_partner_agrees_less():
  part = _chords([60, 65, 67, 62, 69, 64], 2.0)  # a new chord every 2-s window
  sh = M.shuffle_windows(part, SR)
  assert sh.shape == part.shape and not np.allclose(sh, part)
  np.testing.assert_array_equal(np.sort(sh), np.sort(part))  # the same samples, moved
  true, shuffled = M.chroma_agreement(part, part, SR), M.chroma_agreement(part, sh, SR)
  assert true > 0.99 and shuffled < 0.5, (true, shuffled)
  with pytest.raises(ValueError, match="fewer than two"):
    M.shuffle_windows(part[:3 * SR], SR)
