"""lmdm_jax.music_metrics on signals whose answers are known."""
import numpy as np
import pytest

from lmdm_jax import music_metrics as M

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
